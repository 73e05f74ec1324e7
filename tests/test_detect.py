"""detect.py: outputs that never overwrite each other, and clear answers to sources it cannot read."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

import detect
from utils.errors import UserError


def detect_args(weights: Path, source: Path, project: Path, *extra: str) -> list[str]:
    return ["--weights", str(weights), "--source", str(source), "--project", str(project), *extra]


def test_images_with_the_same_name_in_different_folders_keep_their_results(tiny_run, tiny_dataset, tmp_path):
    source = Path(yaml.safe_load(tiny_dataset.read_text())["path"]) / "images" / "val"
    first, second = sorted(source.glob("*.jpg"))[:2]
    for folder, image in (("a", first), ("b", second)):  # two different images, both called x.jpg
        (tmp_path / "in" / folder).mkdir(parents=True)
        shutil.copy(image, tmp_path / "in" / folder / "x.jpg")
    assert (
        detect.main(
            detect_args(
                tiny_run / "weights" / "best.pt",
                str(tmp_path / "in" / "**" / "*.jpg"),
                str(tmp_path / "out"),
                "--conf-thres",
                "0",
                "--max-det",
                "1",
                "--save-txt",
            )
        )
        == 0
    )
    run = tmp_path / "out" / "exp"
    assert {p.relative_to(run).as_posix() for p in run.rglob("*.jpg")} == {"a/x.jpg", "b/x.jpg"}
    assert {p.relative_to(run).as_posix() for p in run.rglob("*.txt")} == {"labels/a/x.txt", "labels/b/x.txt"}
    # the annotated images are of their own inputs, not one written twice
    assert cv2.imread(str(run / "a" / "x.jpg")).shape == cv2.imread(str(first)).shape
    assert not np.array_equal(cv2.imread(str(run / "a" / "x.jpg")), cv2.imread(str(run / "b" / "x.jpg")))


def test_a_single_folder_keeps_plain_file_names(tiny_run, tiny_dataset, tmp_path):
    source = Path(yaml.safe_load(tiny_dataset.read_text())["path"]) / "images" / "val"
    assert (
        detect.main(
            detect_args(
                tiny_run / "weights" / "best.pt",
                str(source),
                str(tmp_path),
                "--nosave",
                "--conf-thres",
                "0",
                "--max-det",
                "1",
                "--save-txt",
            )
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "exp" / "labels").iterdir()) == sorted(
        p.with_suffix(".txt").name for p in source.glob("*.jpg")
    )


def test_a_video_source_says_videos_are_not_supported_yet(tiny_run, tmp_path):
    clip = tmp_path / "clips" / "street.mp4"
    clip.parent.mkdir()
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    for source in (clip, clip.parent):
        with pytest.raises(UserError, match="street.mp4 is a video; detect.py reads images only so far"):
            detect.main(detect_args(tiny_run / "weights" / "best.pt", source, tmp_path / "out"))


def test_the_smallest_image_size_is_the_models_stride(tiny_run, tiny_dataset, tmp_path):
    """A model whose largest stride is 16 (P3 and P4 only) runs at --imgsz 16; below it the
    message names the stride the check uses."""
    state = torch.load(tiny_run / "weights" / "best.pt", weights_only=True)
    yaml_p4 = {**state["model_yaml"], "anchors": state["model_yaml"]["anchors"][:2]}
    yaml_p4["backbone"] = yaml_p4["backbone"][:7] + [[-1, 1, "SPPF", [512, 5]]]  # up to P4/16, then SPPF (7)
    yaml_p4["head"] = [
        [-1, 1, "Conv", [256, 1, 1]],
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],  # 8, 9
        [[-1, 4], 1, "Concat", [1]],
        [-1, 1, "C3", [256, False]],  # 10, 11: P3/8
        [-1, 1, "Conv", [256, 3, 2]],
        [[-1, 8], 1, "Concat", [1]],
        [-1, 1, "C3", [512, False]],  # 14: P4/16
        [[11, 14], 1, "Detect", ["nc", "anchors"]],
    ]
    from models.yolo import DetectionModel

    model = DetectionModel(yaml_p4)
    assert int(model.stride.max()) == 16
    small = tmp_path / "p4.pt"
    torch.save({**state, "model_yaml": yaml_p4, "ema": model.state_dict(), "model": model.state_dict()}, small)
    image = sorted((Path(yaml.safe_load(tiny_dataset.read_text())["path"]) / "images" / "val").glob("*.jpg"))[0]
    assert detect.main(detect_args(small, image, tmp_path, "--imgsz", "16", "--nosave")) == 0
    with pytest.raises(UserError, match="--imgsz 8 is smaller than the model's stride 16: use at least 16"):
        detect.main(detect_args(small, image, tmp_path, "--imgsz", "8"))
