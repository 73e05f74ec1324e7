"""Tests for utils/data/synthetic_shapes.py: layout, label validity, tight boxes, occlusion bookkeeping,
determinism and the never-overwrite / no-leftovers guarantees."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from utils.data import synthetic_shapes
from utils.data.synthetic_shapes import CLASS_NAMES, FORMAT_VERSION, ensure_shapes_dataset, generate_shapes_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_VAL, SEED = 12, 6, 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dataset") / "shapes"
    generate_shapes_dataset(root, NUM_TRAIN, NUM_VAL, seed=SEED)
    return root


def digests(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root`."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def rotated_shape(cls_id: int, rng: np.random.Generator, diameter: float, centre: tuple[float, float]):
    angle = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return synthetic_shapes._unit_shape(cls_id, rng) @ rotation.T * (diameter / 2) + centre


def test_layout_counts_and_marker(dataset: Path) -> None:
    assert sorted(path.name for path in dataset.iterdir()) == ["images", "labels", "shapes.json"]
    for split, count in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        stems = [f"{index:06d}" for index in range(count)]
        assert sorted(path.name for path in (dataset / "images" / split).iterdir()) == [s + ".jpg" for s in stems]
        assert sorted(path.name for path in (dataset / "labels" / split).iterdir()) == [s + ".txt" for s in stems]
    assert json.loads((dataset / "shapes.json").read_text()) == {
        "format_version": FORMAT_VERSION,
        "num_train": NUM_TRAIN,
        "num_val": NUM_VAL,
        "seed": SEED,
        "image_size": [256, 416],
        "class_names": list(CLASS_NAMES),
    }
    assert 5 <= len(set(CLASS_NAMES)) == len(CLASS_NAMES) <= 8


def test_images_decode_and_labels_are_valid_boxes_of_whole_pixels(dataset: Path) -> None:
    sizes, objects_per_image = set(), []
    for image_path in sorted(dataset.glob("images/*/*.jpg")):
        image = cv2.imread(str(image_path))
        assert image is not None and image.ndim == 3
        height, width = image.shape[:2]
        assert 256 <= width <= 416 and 256 <= height <= 416
        sizes.add((width, height))
        label_path = dataset / "labels" / image_path.parent.name / f"{image_path.stem}.txt"
        lines = label_path.read_text().splitlines()
        objects_per_image.append(len(lines))
        for line in lines:
            fields = line.split(" ")
            assert len(fields) == 5 and fields[0].isdigit() and int(fields[0]) < len(CLASS_NAMES)
            assert all(re.fullmatch(r"[01]\.\d{6}", field) for field in fields[1:]), line
            cx, cy, w, h = map(float, fields[1:])
            x0, x1 = (cx - w / 2) * width, (cx + w / 2) * width
            y0, y1 = (cy - h / 2) * height, (cy + h / 2) * height
            assert x0 >= -1e-3 and x1 <= width + 1e-3 and y0 >= -1e-3 and y1 <= height + 1e-3, line
            assert x1 - x0 >= 3 - 1e-3 and y1 - y0 >= 3 - 1e-3, line  # at least a few px wide
            # a box of whole pixels: its edges sit on integer pixel coordinates (up to 6-decimal rounding)
            assert np.allclose([x0, y0, x1, y1], np.round([x0, y0, x1, y1]), atol=2e-3), line
    assert len(sizes) > len(objects_per_image) // 2  # widths and heights (and so aspect ratios) vary
    assert max(objects_per_image) >= 3 and np.mean(objects_per_image) >= 1.5


@pytest.mark.parametrize("cls_id", range(len(CLASS_NAMES)))
def test_drawn_box_matches_the_shape_geometry(cls_id: int) -> None:
    # Reference: the polygon's own extent. cv2 puts pixel centres on integer coordinates, so the
    # pixel edges around a vertex at x lie at x + 0.5; anti-aliasing may add up to about 1 px.
    rng = np.random.default_rng(cls_id)
    for diameter in (12, 20, 45, 90, 150):
        polygon = rotated_shape(cls_id, rng, diameter, (130.3, 129.6))
        x0, y0, inside, _ = synthetic_shapes._rasterize(polygon, 0, True, 260, 260)
        box = synthetic_shapes._mask_box(inside >= 128, x0, y0)
        expected = np.concatenate([polygon.min(0), polygon.max(0)]) + 0.5
        assert np.abs(np.subtract(box, expected)).max() <= 1.5, (CLASS_NAMES[cls_id], diameter, box, expected)


def test_isolated_objects_get_the_box_of_their_painted_pixels() -> None:
    # Paint objects onto a flat grey image, then measure each isolated object's extent from the
    # pixels that changed: the label must agree within the anti-aliased fringe (1 px).
    checked = 0
    for seed in range(30):
        image = np.full((280, 360, 3), 128, np.uint8)
        labels = synthetic_shapes._draw_objects(image, np.random.default_rng(seed))
        changed = np.abs(image.astype(np.int16) - 128).max(2) > 20
        for i, (_, (x0, y0, x1, y1)) in enumerate(labels):
            others = [box for j, (_, box) in enumerate(labels) if j != i]
            if any(b[0] < x1 + 6 and x0 - 6 < b[2] and b[1] < y1 + 6 and y0 - 6 < b[3] for b in others):
                continue  # another object's anti-aliased fringe could reach into the window
            wx0, wy0, wx1, wy1 = max(x0 - 3, 0), max(y0 - 3, 0), min(x1 + 3, 360), min(y1 + 3, 280)
            measured = synthetic_shapes._mask_box(changed[wy0:wy1, wx0:wx1], wx0, wy0)
            assert np.abs(np.subtract(measured, (x0, y0, x1, y1))).max() <= 1, (seed, measured, x0, y0, x1, y1)
            checked += 1
    assert checked >= 40


def test_scene_labels_visible_pixels_and_bounds_occlusion() -> None:
    scene = synthetic_shapes._Scene()
    assert scene.try_add(0, 10, 10, np.ones((20, 40), bool))  # 800 px, box (10, 10, 50, 30)
    assert scene.try_add(1, 40, 5, np.ones((30, 20), bool))  # hides its right 10 columns: 25%
    assert scene.labels() == [(0, (10, 10, 40, 30)), (1, (40, 5, 60, 35))]
    assert not scene.try_add(2, 10, 10, np.ones((20, 8), bool))  # 20% more would leave only 55% visible
    assert scene.labels() == [(0, (10, 10, 40, 30)), (1, (40, 5, 60, 35))]
    assert scene.try_add(2, 10, 10, np.ones((20, 4), bool))  # 10% more: 35% hidden in all
    assert scene.labels()[0] == (0, (14, 10, 40, 30))
    frame = np.ones((30, 20), bool)
    frame[2:-2, 2:-2] = False  # hides only 31% of object 1, but its box IoU with it is 1
    assert not scene.try_add(3, 40, 5, frame)
    assert scene.try_add(4, 100, 100, np.ones((4, 4), bool))  # drawn, but too small to label
    assert [cls_id for cls_id, _ in scene.labels()] == [0, 1, 2]


def test_same_parameters_give_identical_bytes_and_other_seeds_differ(dataset: Path, tmp_path: Path) -> None:
    reference = digests(dataset)
    generate_shapes_dataset(tmp_path / "again", NUM_TRAIN, NUM_VAL, seed=SEED)
    assert digests(tmp_path / "again") == reference
    generate_shapes_dataset(tmp_path / "fewer", 4, 2, seed=SEED)  # an image depends on its index only
    fewer = digests(tmp_path / "fewer")
    assert all(fewer[name] == reference[name] for name in fewer if name != "shapes.json")
    generate_shapes_dataset(tmp_path / "other", NUM_TRAIN, NUM_VAL, seed=SEED + 1)
    other = digests(tmp_path / "other")
    assert all(other[name] != reference[name] for name in reference if name.endswith(".jpg"))


def test_train_and_val_share_no_image(dataset: Path) -> None:
    train = {digest for name, digest in digests(dataset).items() if name.startswith("images/train/")}
    val = {digest for name, digest in digests(dataset).items() if name.startswith("images/val/")}
    assert len(train) == NUM_TRAIN and len(val) == NUM_VAL and not train & val


def test_ensure_generates_once_then_reuses(tmp_path: Path) -> None:
    root = tmp_path / "datasets" / "shapes"  # the parent is created too
    assert ensure_shapes_dataset(root, 4, 2, seed=1) is True
    before = digests(root)
    assert ensure_shapes_dataset(root, 4, 2, seed=1) is False
    assert digests(root) == before
    with pytest.raises(FileExistsError, match=re.escape(str(root))):  # same folder, other parameters
        ensure_shapes_dataset(root, 4, 2, seed=2)
    with pytest.raises(FileExistsError, match=re.escape(str(root))):
        generate_shapes_dataset(root, 4, 2, seed=1)
    assert digests(root) == before
    assert [path.name for path in root.parent.iterdir()] == ["shapes"]  # no temp folder left


def test_ensure_refuses_a_foreign_folder_and_leaves_it_alone(tmp_path: Path) -> None:
    mine, empty = tmp_path / "mine", tmp_path / "empty"
    mine.mkdir()
    empty.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for root in (mine, empty):
        with pytest.raises(FileExistsError, match=re.escape(str(root))):
            ensure_shapes_dataset(root, 2, 1)
    assert [path.name for path in mine.iterdir()] == ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep me"
    assert list(empty.iterdir()) == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty", "mine"]


def test_failed_generation_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    render, rendered = synthetic_shapes._render_image, []

    def render_then_fail(rng: np.random.Generator, image_size: tuple[int, int]):
        if len(rendered) == 3:
            raise RuntimeError("disk full")
        rendered.append(image_size)
        return render(rng, image_size)

    monkeypatch.setattr(synthetic_shapes, "_render_image", render_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_shapes_dataset(tmp_path / "shapes", 4, 2)
    assert list(tmp_path.iterdir()) == []


def test_a_stale_temp_folder_of_our_pid_is_replaced(tmp_path: Path) -> None:
    stale = tmp_path / f".shapes.tmp-{os.getpid()}"  # left by a killed process that had our pid
    (stale / "images").mkdir(parents=True)
    (stale / "images" / "half-written.jpg").write_bytes(b"")
    assert ensure_shapes_dataset(tmp_path / "shapes", 2, 1) is True
    assert [path.name for path in tmp_path.iterdir()] == ["shapes"]
    assert not (tmp_path / "shapes" / "images" / "half-written.jpg").exists()


def test_losing_the_rename_race_uses_the_winners_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    winner, root = tmp_path / "winner", tmp_path / "shapes"
    generate_shapes_dataset(winner, 4, 2, seed=5)
    rename = os.rename

    def other_process_renames_first(src: Path, dst: Path) -> None:
        shutil.copytree(winner, root)
        rename(src, dst)

    monkeypatch.setattr(os, "rename", other_process_renames_first)
    assert ensure_shapes_dataset(root, 4, 2, seed=5) is False
    assert digests(root) == digests(winner)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["shapes", "winner"]  # our temp copy is gone


def test_rejects_invalid_parameters(tmp_path: Path) -> None:
    for kwargs in ({"num_train": -1}, {"seed": -1}, {"image_size": (300, 200)}, {"image_size": (32, 64)}):
        with pytest.raises(ValueError):
            generate_shapes_dataset(tmp_path / "shapes", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_command_line(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    command = [
        sys.executable,
        "-m",
        "utils.data.synthetic_shapes",
        "--out",
        str(out),
        "--num-train",
        "2",
        "--num-val",
        "1",
        "--seed",
        "7",
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert "wrote 2 + 1 images" in result.stdout
    marker = json.loads((out / "shapes.json").read_text())
    assert (marker["num_train"], marker["num_val"], marker["seed"]) == (2, 1, 7)
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert "already holds" in result.stdout
