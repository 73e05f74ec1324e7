"""Label verification: counts per category on a folder with planted bad files, the cache, image listing."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from utils import labels as labels_module
from utils.errors import UserError
from utils.labels import cache_path_for, label_path_for, list_image_files, scan_labels, scan_split


def write_image(path: Path, size=(48, 64), suffix=".jpg") -> Path:
    path = path.with_suffix(suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((*size, 3), 90, np.uint8)
    cv2.rectangle(image, (10, 10), (30, 30), (20, 200, 40), -1)
    cv2.imwrite(str(path), image)
    return path


def write_label(image: Path, text: str | None) -> None:
    if text is None:
        return
    label = label_path_for(image)
    label.parent.mkdir(parents=True, exist_ok=True)
    label.write_text(text)


@pytest.fixture
def planted(tmp_path) -> Path:
    """A split with good images beside one planted problem of each kind; returns images/train."""
    images = tmp_path / "images" / "train"
    good = "0 0.5 0.5 0.2 0.3\n1 0.25 0.25 0.1 0.1\n"
    for i in range(4):
        write_label(write_image(images / f"good{i}"), good)
    write_label(write_image(images / "png_ok", suffix=".png"), "2 0.5 0.5 0.5 0.5\n")
    write_label(write_image(images / "duplicates"), "0 0.5 0.5 0.2 0.3\n0 0.5 0.5 0.2 0.3\n")  # kept, deduplicated
    write_label(write_image(images / "polygon"), "1 0.1 0.1 0.5 0.1 0.5 0.6 0.1 0.6\n")  # segment -> its box
    write_image(images / "no_label")                                         # missing
    write_label(write_image(images / "empty_label"), "\n")                     # empty
    write_label(write_image(images / "tiny", size=(8, 8)), good)               # corrupt: under 10 px
    (images / "garbage.jpg").write_bytes(b"this is not an image")              # corrupt
    truncated = write_image(images / "truncated")
    truncated.write_bytes(truncated.read_bytes()[:-200])                       # corrupt: no JPEG end marker
    write_label(truncated, good)
    (images / "zero.png").write_bytes(b"")                                     # corrupt
    write_label(write_image(images / "four_columns"), "0 0.5 0.5 0.2\n")       # corrupt label
    write_label(write_image(images / "word"), "0 0.5 abc 0.2 0.2\n")           # corrupt label
    write_label(write_image(images / "outside"), "0 0.5 0.5 1.2 0.2\n")        # corrupt label
    write_label(write_image(images / "class_id"), "7 0.5 0.5 0.2 0.2\n")       # corrupt: class >= nc
    write_label(write_image(images / "nan"), "0 nan 0.5 0.2 0.2\n")            # corrupt label
    return images


def test_counts_on_planted_files(planted):
    files = list_image_files([planted])
    scan = scan_labels(files, num_classes=3, cache_path=None)
    assert (scan.num_found, scan.num_missing, scan.num_empty, scan.num_corrupt) == (7, 1, 1, 9)
    assert scan.summary() == "18 images, 7 labels found, 1 missing, 1 empty, 9 corrupt (skipped)"
    assert scan.problems == {"unreadable image": 2, "image under 10 px": 1, "truncated JPEG": 1,
                             "malformed label row": 2, "coordinates outside [0, 1]": 1, "class id out of range": 1,
                             "non-finite value": 1, "duplicate rows removed": 1}
    kept = {p.stem: lb for p, lb in zip(scan.image_files, scan.labels)}
    assert set(kept) == {"good0", "good1", "good2", "good3", "png_ok", "duplicates", "polygon", "no_label", "empty_label"}
    assert len(kept["duplicates"]) == 1
    np.testing.assert_allclose(kept["polygon"], [[1, 0.3, 0.35, 0.4, 0.5]], atol=1e-6)
    assert kept["no_label"].shape == (0, 5)
    messages = "\n".join(scan.messages)
    for stem, reason in [("tiny", "under 10 px"), ("truncated", "truncated JPEG"), ("four_columns", "4 columns"),
                         ("word", "non-numeric"), ("outside", "normalised"), ("class_id", "class 7"), ("nan", "non-finite"),
                         ("duplicates", "1 duplicate rows removed")]:
        assert any(stem in line and reason in line for line in scan.messages), (stem, reason, messages)
    shapes = dict(zip((p.stem for p in scan.image_files), scan.shapes.tolist()))
    assert shapes["good0"] == [48, 64]


def test_cache_is_reused_and_invalidated(planted, monkeypatch):
    files = list_image_files([planted])
    cache = cache_path_for(files)
    assert cache == planted.parent.parent / "labels" / "train.cache"
    first = scan_labels(files, 3, cache)
    assert cache.exists()

    def fail(*args):
        raise AssertionError("verification ran although the cache is valid")

    monkeypatch.setattr(labels_module, "verify_image_and_label", fail)
    again = scan_labels(files, 3, cache)
    assert again.summary() == first.summary()
    assert all(np.array_equal(a, b) for a, b in zip(again.labels, first.labels))
    monkeypatch.undo()

    label_path_for(planted / "good0.jpg").write_text("0 0.5 0.5 0.2 0.3\n0 0.1 0.1 0.1 0.1\n0 0.9 0.9 0.1 0.1\n")
    changed = scan_labels(files, 3, cache)
    assert len(changed.labels[changed.image_files.index(planted / "good0.jpg")]) == 3


def test_unwritable_cache_location_still_scans(planted, caplog):
    caplog.set_level("INFO")
    files = list_image_files([planted])
    cache = planted.parent.parent / "labels" / "no_such_dir" / "train.cache"
    scan = scan_labels(files, 3, cache)
    assert scan.num_found == 7 and not cache.exists()
    assert "label cache not written" in caplog.text


def test_scan_split_reports_problems_and_refuses_an_empty_split(planted, tmp_path, caplog):
    caplog.set_level("INFO")
    scan_split((planted,), 3, prefix="train: ")
    assert "train: 18 images, 7 labels found" in caplog.text and "1 class id out of range" in caplog.text
    assert "names in the dataset YAML" in caplog.text and "... and" not in caplog.text
    bad_only = tmp_path / "bad" / "images"
    bad_only.mkdir(parents=True)
    (bad_only / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match="no usable images"):
        scan_split((bad_only,), 3, prefix="val: ")


def test_image_list_txt_and_errors(tmp_path, planted):
    listing = tmp_path / "list.txt"
    listing.write_text("images/train/good0.jpg\n\n" + str(planted / "good1.jpg") + "\n")
    assert list_image_files([listing]) == sorted([planted / "good0.jpg", planted / "good1.jpg"])
    with pytest.raises(UserError, match="no images found"):
        list_image_files([tmp_path / "labels"])
    with pytest.raises(UserError, match="is not a folder"):
        list_image_files([tmp_path / "absent"])


def test_label_path_uses_the_last_images_folder():
    assert label_path_for(Path("/d/images/x/images/train/a.b.jpg")) == Path("/d/images/x/labels/train/a.b.txt")
