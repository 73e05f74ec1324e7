"""Listing a split (utils/data/listing.py): the images of a tree in Path order, whatever the names,
and the label file of each image by the YOLO layout's rule."""

from __future__ import annotations

import os
from pathlib import Path

from utils.data.listing import label_path_for, label_paths, list_image_paths


def test_a_tree_lists_its_images_in_path_order(tmp_path):
    names = ["a/b/x.jpg", "a-b/x.png", "a/x.JPG", "A/y.webp", "ä/z.jpeg", "a/.hidden.jpg", "a/..jpg", "a/notes.txt"]
    names += ["a/b c/1.tif", "a/b/c/2.bmp", "a.jpg/3.jpg", "a/noext"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    files, unreadable = list_image_paths([tmp_path])
    expected = sorted(
        tmp_path / n
        for n in names
        if os.path.splitext(os.path.basename(n))[1].lower() in (".jpg", ".jpeg", ".png", ".webp", ".tif", ".bmp")
    )
    assert [Path(f) for f in files] == expected and unreadable == []
    assert len(files) == 9  # '..jpg' has no suffix to os.path.splitext, as to Path


def test_label_paths_follow_the_last_images_folder_for_every_kind_of_name():
    images = [
        "/d/images/x/images/train/a.b.jpg",
        "/d/images/x/images/train/.hidden.jpg",
        "/d/images/x/images/train/..jpg",
        "/d/other/c.png",
        "images/rel.jpg",
        "bare.jpg",
        "/root.jpg",
    ]
    expected = [
        "/d/images/x/labels/train/a.b.txt",
        "/d/images/x/labels/train/.hidden.txt",
        "/d/images/x/labels/train/..jpg.txt",
        "/d/other/c.txt",
        "labels/rel.txt",
        "bare.txt",
        "/root.txt",
    ]
    assert label_paths(images) == expected
    assert [label_path_for(Path(p)) for p in images] == [Path(p) for p in expected]
