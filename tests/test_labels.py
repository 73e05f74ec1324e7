"""Label verification: every kind of bad file counted and reported, repairs in memory, the cache."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from utils.data import labels as labels_module
from utils.data.label_cache import cache_path_for
from utils.data.labels import scan_labels, scan_split, write_data_report
from utils.data.listing import label_path_for, list_image_paths
from utils.errors import UserError


def write_image(path: Path, size=(48, 64), suffix=".jpg") -> Path:
    path = path.with_suffix(suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((*size, 3), 90, np.uint8)
    cv2.rectangle(image, (10, 10), (30, 30), (20, 200, 40), -1)
    cv2.imwrite(str(path), image)
    return path


def write_label(image: Path, text: str | bytes | None) -> None:
    if text is None:
        return
    label = label_path_for(image)
    label.parent.mkdir(parents=True, exist_ok=True)
    label.write_bytes(text if isinstance(text, bytes) else text.encode())


GOOD = "0 0.5 0.5 0.2 0.3\n1 0.25 0.25 0.1 0.1\n"
# stem -> (how the image is made, label text, expected problem kind or status)
PLANTED = {
    "zero_byte": ("empty file", GOOD, "unreadable image"),
    "text_as_jpg": ("text", GOOD, "unreadable image"),
    "truncated_jpg": ("truncated jpg", GOOD, "truncated image"),
    "truncated_png": ("truncated png", GOOD, "unreadable image"),
    "gif": ("gif", GOOD, "unsupported format"),
    "tiny": ("tiny", GOOD, "image under 10 px"),
    "four_columns": ("ok", "0 0.5 0.5 0.2\n", "wrong number of columns"),
    "six_columns": ("ok", "0 0.5 0.5 0.2 0.2 0.9\n", "wrong number of columns"),
    "word": ("ok", "0 0.5 abc 0.2 0.2\n", "non-numeric value"),
    "nan": ("ok", "0 nan 0.5 0.2 0.2\n", "NaN or infinite value"),
    "class_id": ("ok", "7 0.5 0.5 0.2 0.2\n", "class id out of range"),
    "fractional_class": ("ok", "1.5 0.5 0.5 0.2 0.2\n", "class id out of range"),
    "negative_size": ("ok", "0 0.5 0.5 -0.2 0.2\n", "negative or zero size"),
    "outside": ("ok", "0 0.5 0.5 1.2 0.2\n", "coordinates outside [0, 1]"),
    "binary_label": ("ok", b"\xff\xfe\x00\x01garbage", "unreadable label file"),
    "duplicates": ("ok", "2 0.5 0.5 0.2 0.3\n1 0.5 0.5 0.2 0.3\n2 0.5 0.5 0.2 0.3\n", "duplicate rows removed"),
    "overflow": ("ok", "0 0.9 0.5 0.204 0.2\n", "boxes clipped to the image"),
    "rounding": ("ok", "0 0.9 0.5 0.2000019 0.2\n", "found"),  # 1e-6 past the edge: label rounding, kept as is
    "polygon": ("ok", "1 0.1 0.1 0.5 0.1 0.5 0.6 0.1 0.6\n", "found"),
    "no_label": ("ok", None, "missing"),
    "empty_label": ("ok", "\n", "empty"),
}


def plant(images: Path, stem: str, how: str, label) -> None:
    if how == "ok":
        path = write_image(images / stem)
    elif how == "empty file":
        path = images / f"{stem}.jpg"
        path.write_bytes(b"")
    elif how == "text":
        path = images / f"{stem}.jpg"
        path.write_text("this is not an image")
    elif how == "truncated jpg":
        path = write_image(images / stem)
        path.write_bytes(path.read_bytes()[:-200])
    elif how == "truncated png":
        path = write_image(images / stem, suffix=".png")
        path.write_bytes(path.read_bytes()[:-40])
    elif how == "gif":
        from PIL import Image

        path = images / f"{stem}.jpg"  # a GIF behind a .jpg name
        Image.new("RGB", (40, 40)).save(path, format="GIF")
    elif how == "tiny":
        path = write_image(images / stem, size=(8, 8))
    write_label(path, label)


@pytest.fixture
def planted(tmp_path) -> Path:
    """images/train with four good images beside one planted case of each kind; returns the folder."""
    images = tmp_path / "images" / "train"
    images.mkdir(parents=True)
    for i in range(4):
        write_label(write_image(images / f"good{i}"), GOOD)
    for stem, (how, label, _) in PLANTED.items():
        plant(images, stem, how, label)
    return images


def test_every_kind_is_counted_and_named(planted):
    files, unreadable = list_image_paths([planted])
    scan = scan_labels(files, num_classes=3, cache_path=None)
    corrupt = [
        v[2]
        for v in PLANTED.values()
        if v[2] not in ("found", "missing", "empty", "duplicate rows removed", "boxes clipped to the image")
    ]
    assert (scan.num_corrupt, scan.num_missing, scan.num_empty) == (len(corrupt), 1, 1)
    assert scan.num_found == 4 + 4  # good ones, the repaired ones, the rounding case and the polygon
    expected = {}
    for kind in [v[2] for v in PLANTED.values() if v[2] not in ("found", "missing", "empty")]:
        expected[kind] = expected.get(kind, 0) + 1
    assert scan.problems == expected
    for stem, (_, _, kind) in PLANTED.items():
        if kind not in ("found", "missing", "empty"):
            assert any(k == kind and stem in message for k, message in scan.messages), (stem, kind)
    kept = {p.stem: lb for p, lb in zip(scan.image_files, scan.labels)}
    assert set(kept) == {f"good{i}" for i in range(4)} | {
        "duplicates",
        "overflow",
        "rounding",
        "polygon",
        "no_label",
        "empty_label",
    }
    np.testing.assert_array_equal(kept["rounding"], np.array([[0, 0.9, 0.5, 0.2000019, 0.2]], np.float32))
    np.testing.assert_allclose(kept["duplicates"][:, 0], [2, 1])  # file order kept, the later copy dropped
    np.testing.assert_array_equal(kept["good0"][:, 0], [0, 1])  # rows stay in file order
    np.testing.assert_allclose(kept["polygon"], [[1, 0.3, 0.35, 0.4, 0.5]], atol=1e-6)
    np.testing.assert_allclose(kept["overflow"], [[0, 0.899, 0.5, 0.202, 0.2]], atol=1e-6)  # x2 1.002 -> 1.0
    assert unreadable == []


def test_summary_line_counts_each_problem(planted):
    scan = scan_labels(list_image_paths([planted])[0], 3, cache_path=None)
    summary = scan.summary()
    assert summary.startswith("25 images, 8 labels found, 1 missing, 1 empty, 15 corrupt (skipped); skipped: ")
    assert "2 class id out of range" in summary and "1 truncated image" in summary
    assert summary.endswith("repaired: 1 boxes clipped to the image, 1 duplicate rows removed")


def test_unreadable_folder_is_counted(planted, monkeypatch):
    blocked = planted / "blocked"
    write_label(write_image(blocked / "inside"), GOOD)
    real_scandir = os.scandir

    def scandir(path="."):  # as if the folder had no read permission (root can read anything)
        if Path(path) == blocked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    files, unreadable = list_image_paths([planted])
    assert not any(Path(p).parent == blocked for p in files)
    assert len(unreadable) == 1 and str(blocked) in unreadable[0] and "Permission denied" in unreadable[0]


def test_scan_split_reports_every_file(planted, tmp_path, caplog):
    caplog.set_level("INFO")
    report = tmp_path / "data_report.txt"
    scan = scan_split((planted,), 3, prefix="train: ", reported=True)
    write_data_report(report, [("train", scan)])
    lines = report.read_text().splitlines()
    assert len(lines) == 17 and all(line.startswith("train\t") for line in lines)
    assert any(line.split("\t")[1] == "truncated image" and "truncated_jpg" in line for line in lines)
    assert "train: 25 images, 8 labels found" in caplog.text and "names in the dataset YAML" in caplog.text
    assert "... and 7 more, listed in the run's data_report.txt" in caplog.text
    bad_only = tmp_path / "bad" / "images"
    bad_only.mkdir(parents=True)
    (bad_only / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match="no usable images"):
        scan_split((bad_only,), 3, prefix="val: ")


def test_user_files_are_never_modified(planted):
    root = planted.parent.parent
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    scan_labels(list_image_paths([planted])[0], 3, cache_path_for([planted]))
    after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert after == before  # nothing changed, nothing added: the cache lies in the cache folder


def test_cache_is_reused_and_invalidated(planted, monkeypatch, tmp_path):
    monkeypatch.setenv("EMA_YOLO_CACHE_DIR", str(tmp_path / "cache"))
    files = list_image_paths([planted])[0]
    cache = cache_path_for([planted])
    assert cache.parent == tmp_path / "cache" / "labels" and cache.name.startswith(f"{tmp_path.name}-train-")
    first = scan_labels(files, 3, cache)
    assert cache.exists()

    def fail(*args):
        raise AssertionError("verification ran although the cache is valid")

    monkeypatch.setattr(labels_module, "verify_image_and_label", fail)
    again = scan_labels(files, 3, cache)
    assert again.summary() == first.summary() and again.messages == first.messages
    assert all(np.array_equal(a, b) for a, b in zip(again.labels, first.labels))
    monkeypatch.undo()

    label_path_for(planted / "good0.jpg").write_text("0 0.5 0.5 0.2 0.3\n0 0.1 0.1 0.1 0.1\n0 0.9 0.9 0.1 0.1\n")
    changed = scan_labels(files, 3, cache)
    assert len(changed.labels[changed.image_files.index(planted / "good0.jpg")]) == 3


def test_each_split_has_its_own_cache(tmp_path, monkeypatch):
    """Two datasets with the same split names (or one dataset copied), and two image lists of one
    folder of images (YOLOv5's autosplit), never share a cache."""
    monkeypatch.setenv("EMA_YOLO_CACHE_DIR", str(tmp_path / "cache"))
    first, second = (cache_path_for([tmp_path / name / "images" / "train"]) for name in ("one", "two"))
    assert first != second and first.parent == second.parent == tmp_path / "cache" / "labels"
    assert first.name.startswith("one-train-")
    lists = [cache_path_for([tmp_path / "d" / f"autosplit_{split}.txt"]) for split in ("train", "val")]
    assert lists[0] != lists[1]


def test_unwritable_cache_location_still_scans(planted, caplog, tmp_path):
    caplog.set_level("INFO")
    files = list_image_paths([planted])[0]
    (tmp_path / "a_file").write_text("")
    cache = tmp_path / "a_file" / "labels" / "train.cache"  # its folder cannot be made
    scan = scan_labels(files, 3, cache)
    assert scan.num_found == 8 and not cache.exists()
    assert "label cache not written" in caplog.text


def test_image_list_txt_and_errors(tmp_path, planted):
    listing = tmp_path / "list.txt"
    listing.write_text("images/train/good0.jpg\n\n" + str(planted / "good1.jpg") + "\n")
    assert list_image_paths([listing])[0] == [str(planted / "good0.jpg"), str(planted / "good1.jpg")]
    with pytest.raises(UserError, match="no images found"):
        list_image_paths([tmp_path / "labels"])
    with pytest.raises(UserError, match="is not a folder"):
        list_image_paths([tmp_path / "absent"])


def test_label_path_uses_the_last_images_folder():
    assert label_path_for(Path("/d/images/x/images/train/a.b.jpg")) == Path("/d/images/x/labels/train/a.b.txt")


def test_a_split_without_boxes_is_refused_for_training_and_flagged_for_validation(tmp_path, caplog):
    images = tmp_path / "data" / "images" / "val"
    for name in ("a", "b"):
        write_image(images / name)
    empty = tmp_path / "data" / "labels" / "val" / "a.txt"
    empty.parent.mkdir(parents=True)
    empty.write_text("")
    scan = scan_split((images,), 3, prefix="val: ")
    assert scan.num_empty == 1 and scan.num_missing == 1
    assert "val: WARNING: no labelled boxes in this split: its mAP is 0 whatever the model detects" in caplog.text
    assert "1 label files were found, all empty" in caplog.text
    with pytest.raises(UserError, match="train: no labelled boxes in .*nothing to learn"):
        scan_split((images,), 3, prefix="train: ", needs_labels=True)


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_cache_is_scanned_again_with_one_warning(planted, caplog, damage):
    """A cache cut short (a full disk, a killed copy) is named in one warning, scanned again and rewritten."""
    files = list_image_paths([planted])[0]
    cache = cache_path_for([planted])
    first = scan_labels(files, 3, cache)
    whole = cache.read_bytes()
    cache.write_bytes(b"" if damage == "empty" else whole[: len(whole) // 2])
    caplog.set_level("INFO")
    again = scan_labels(files, 3, cache)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"label cache {cache} is damaged or unreadable" in warnings[0], warnings
    assert again.summary() == first.summary() and again.messages == first.messages
    assert all(np.array_equal(a, b) for a, b in zip(again.labels, first.labels))
    assert cache.read_bytes() == whole  # rewritten whole


def test_a_scan_shared_out_to_processes_equals_one_in_this_process(planted, monkeypatch):
    """A large split is verified in chunks by a process per core: the same scan, in the same order,
    every planted problem counted and reported as one process finds them."""
    files = list_image_paths([planted])[0]
    whole = scan_labels(files, 3, cache_path=None)
    monkeypatch.setattr(labels_module, "SCAN_CHUNK", 3)
    monkeypatch.setattr(labels_module, "usable_cpu_count", lambda: 2)
    shared = scan_labels(files, 3, cache_path=None)
    assert shared.summary() == whole.summary() and shared.messages == whole.messages
    assert shared.image_files == whole.image_files and np.array_equal(shared.shapes, whole.shapes)
    assert all(np.array_equal(a, b) for a, b in zip(shared.labels, whole.labels))
