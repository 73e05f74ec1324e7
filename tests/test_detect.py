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
from tests.conftest import run_script
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


def write_clip(path: Path, frames: int, size_wh: tuple[int, int], fps: float = 12.0) -> None:
    """A short mp4 of moving squares, as detect.py users feed it."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size_wh)
    for i in range(frames):
        image = np.full((size_wh[1], size_wh[0], 3), 40, np.uint8)
        cv2.rectangle(image, (5 + 3 * i, 10), (35 + 3 * i, 40), (0, 200, 255), -1)
        writer.write(image)
    writer.release()


def read_clip(path: Path) -> tuple[int, tuple[int, int], float]:
    """(frames, (width, height), fps) of a video file, counted by decoding it."""
    capture = cv2.VideoCapture(str(path))
    size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    fps, frames = capture.get(cv2.CAP_PROP_FPS), 0
    while capture.read()[0]:
        frames += 1
    capture.release()
    return frames, size, fps


def test_a_video_is_written_back_with_its_frames_size_and_rate(tiny_run, tmp_path):
    clip = tmp_path / "clip.mp4"
    write_clip(clip, frames=10, size_wh=(96, 64))
    weights = tiny_run / "weights" / "best.pt"
    assert (
        detect.main(detect_args(weights, clip, tmp_path / "out", "--conf-thres", "0", "--max-det", "3", "--save-txt"))
        == 0
    )
    assert read_clip(tmp_path / "out" / "exp" / "clip.mp4") == (10, (96, 64), 12.0)
    labels = sorted((tmp_path / "out" / "exp" / "labels").glob("clip_*.txt"))
    assert labels and all(1 <= int(p.stem.split("_")[1]) <= 10 for p in labels)  # per frame with boxes, from 1
    # --vid-stride 2: frames 0, 2, ..., 8 at half the rate
    assert detect.main(detect_args(weights, clip, tmp_path / "out", "--vid-stride", "2", "--name", "s2")) == 0
    assert read_clip(tmp_path / "out" / "s2" / "clip.mp4") == (5, (96, 64), 6.0)


def test_an_image_named_like_a_frame_keeps_its_labels(tiny_run, tmp_path):
    """clip_1.jpg beside clip.mp4: frame 1's labels and the image's both survive."""
    folder = tmp_path / "in"
    folder.mkdir()
    write_clip(folder / "clip.mp4", frames=2, size_wh=(96, 64))
    cv2.imwrite(str(folder / "clip_1.jpg"), np.full((64, 96, 3), 90, np.uint8))
    args = detect_args(
        tiny_run / "weights" / "best.pt", folder, tmp_path / "out", "--conf-thres", "0", "--max-det", "2"
    )
    assert detect.main([*args, "--save-txt", "--nosave"]) == 0
    labels = sorted(p.name for p in (tmp_path / "out" / "exp" / "labels").iterdir())
    assert labels == ["clip_1.txt", "clip_1_2.txt", "clip_2.txt"]


@pytest.mark.parametrize(
    "source, message",
    [
        ("99", "--source 99: cannot open webcam 99 (no camera on this machine?)"),
        ("rtsp://127.0.0.1:9/none", "--source rtsp://127.0.0.1:9/none: cannot open the stream"),
    ],
)
def test_a_source_that_cannot_be_opened_is_one_error_line(tiny_run, tmp_path, source, message):
    """As a user runs it: exit status 2, one line on stderr, no traceback, no run folder."""
    result = run_script("detect.py", *detect_args(tiny_run / "weights" / "best.pt", source, tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"detect.py: error: {message}")
    assert not (tmp_path / "out").exists()


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
