"""Annotated frames written back as videos: one mp4v file per path, at the frame rate it is given."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from utils.errors import UserError
from utils.log import LOGGER

FOURCC = "mp4v"  # in every OpenCV wheel's FFmpeg, unlike H.264; verified in .mp4 (open_source's names), .avi, .mkv


class VideoWriter:
    """Writes BGR frames (as cv2 draws them) into one video per path, each opened on its first frame with
    that frame's fps and size. A frame of another size than its video's first is resized to it, with one
    warning per video.

    Streams are read side by side, so by default every video stays open until close() (or the end of a
    `with` block). Video files are read one after another: write them with one_at_a_time=True and a new
    one finishes the previous (its file is then complete, and playable even if the run is killed later)."""

    def __init__(self) -> None:
        self._open: dict[Path, tuple[cv2.VideoWriter, tuple[int, int], bool]] = {}  # writer, (w, h), one_at_a_time
        self._finished: set[Path] = set()
        self._resized: set[Path] = set()

    def write(self, path: Path, image_bgr: np.ndarray, fps: float | None, one_at_a_time: bool = False) -> None:
        """Append image_bgr ((H, W, 3) uint8 BGR) to the video at path, creating its folder and file on the
        first frame; fps (frames per second, Frame.fps) is used on that first frame only."""
        path = Path(path)
        if path not in self._open:
            if path in self._finished:
                raise ValueError(f"{path} was already finished; writing it again would overwrite it")
            if one_at_a_time:
                for other in [p for p, (_, _, sequential) in self._open.items() if sequential]:
                    self._finish(other)
            self._open[path] = (_new_writer(path, fps, image_bgr), image_bgr.shape[1::-1], one_at_a_time)
        writer, size, _ = self._open[path]
        if image_bgr.shape[1::-1] != size:
            if path not in self._resized:
                LOGGER.warning(f"WARNING: {path}: frames of {image_bgr.shape[1::-1]} resized to the first's {size}")
                self._resized.add(path)
            image_bgr = cv2.resize(image_bgr, size, interpolation=cv2.INTER_AREA)
        writer.write(np.ascontiguousarray(image_bgr))

    def _finish(self, path: Path) -> None:
        """Close one video's file (complete and playable from then on); later frames for it are refused."""
        writer, _, _ = self._open.pop(Path(path))
        writer.release()
        self._finished.add(Path(path))

    def close(self) -> None:
        """Finish every open video; safe to call more than once."""
        for path in list(self._open):
            self._finish(path)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _new_writer(path: Path, fps: float | None, image_bgr: np.ndarray) -> cv2.VideoWriter:
    if not fps or fps <= 0:
        raise ValueError(f"{path}: a video needs a frame rate, got {fps}")
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = image_bgr.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*FOURCC), fps, (width, height))
    if not writer.isOpened():
        writer.release()
        raise UserError(f"cannot write the video {path}: no {FOURCC} encoder in this OpenCV, or a read-only folder")
    return writer
