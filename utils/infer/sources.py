"""detect.py's --source as one iterator of frames: images, video files, webcams, network streams and
lists of them, each frame tagged with where it came from and where its result goes. (Which files a
source names: media_files; opening captures: capture; reading streams side by side: streams.)

    with open_source("clip.mp4", vid_stride=2) as frames:   # fails here, before any run folder exists
        for frame in frames:
            ...  # frame.image_rgb, frame.output_name, frame.fps, frame.description
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from utils.data.decode import read_image_rgb
from utils.errors import UserError
from utils.infer.capture import capture_fps, capture_frame_count, is_url, open_capture, redact_url
from utils.infer.media_files import (
    file_output_names,
    has_glob_pattern,
    is_image,
    is_video,
    media_files,
    read_folders,
    stream_output_name,
    unique_names,
)
from utils.infer.streams import StreamReaders
from utils.log import LOGGER

STREAMS_SUFFIX = ".streams"  # a list file of live sources
LIST_SUFFIXES = (STREAMS_SUFFIX, ".txt")
DEFAULT_TIMEOUT_S = 10.0  # opening a URL, and waiting for its next frame, fails after this long


@dataclass
class Frame:
    """One image to detect on, with its origin and its destination."""

    image_rgb: np.ndarray  # (H, W, 3) uint8 RGB
    source: str  # the file path, webcam index or URL it came from
    kind: str  # "image", "video" or "stream" (webcams and the entries of a .streams file are streams)
    output_name: Path  # relative to the run folder: the image file to write, or the video the frame goes into
    frame_index: int  # 0-based index of this frame in its source (0 for images)
    fps: float | None  # frame rate of the output video: the source's / vid_stride (None for images)
    description: str  # log prefix: "image 3/10 path", "video 1/2 (frame 5/30) path", "stream 0 (frame 12) url"


class FrameSource:
    """The frames of one --source, in order; made by open_source. An iterator (read it once); close(),
    or leaving a `with` block, releases every capture and stops the stream threads. files: the files it
    reads; folders: those it reads whole (what no output may be written over or into)."""

    def __init__(self, frames: Iterator[Frame], release: Callable[[], None]) -> None:
        self._frames = frames
        self._release = release
        self.files: list[Path] = []
        self.folders: list[Path] = []

    def __iter__(self) -> FrameSource:
        return self

    def __next__(self) -> Frame:
        return next(self._frames)

    def close(self) -> None:
        """Release every capture; safe to call more than once."""
        self._frames.close()
        self._release()

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_source(source: str, vid_stride: int = 1, timeout_s: float = DEFAULT_TIMEOUT_S) -> FrameSource:
    """Open what --source names, failing with a UserError before any frame if it cannot be read.

    source: an image or video file; a folder (its images and videos, sorted); a glob pattern (** recurses);
    a webcam index ("0"); an rtsp/rtmp/http(s) URL; a .streams file of such sources, one a line (blank
    lines and # comments skipped; relative paths are relative to the list file). A .txt list is read the
    same way, as streams if it names any webcam or URL, otherwise as a list of image and video files.
    vid_stride: keep frames 0, s, 2s, ... of every video and stream. timeout_s: how long a URL may take
    to open, or to send its next frame. An image that cannot be decoded, or a video of a folder or list
    that cannot be opened, is skipped with a warning; after the last frame one warning counts them."""
    if vid_stride < 1:
        raise UserError(f"--vid-stride {vid_stride}: must be at least 1")
    source = source.strip()
    where = f"--source {redact_url(source) if is_url(source) else source}"
    if source.isdigit() or is_url(source):
        return _open_streams([source], [where], vid_stride, timeout_s)
    path = Path(source)
    if path.suffix.lower() in LIST_SUFFIXES and path.exists() and not has_glob_pattern(source):
        entries = _list_entries(path, where)
        if not entries:
            raise UserError(f"{where}: lists no sources (one file, webcam index or URL a line)")
        paths = [e for _, e in entries]
        lines = [f"{where}, line {n}: {redact_url(e) if is_url(e) else e}" for n, e in entries]
        if path.suffix.lower() == STREAMS_SUFFIX or any(e.isdigit() or is_url(e) for e in paths):
            opened_streams = _open_streams(paths, lines, vid_stride, timeout_s)
            opened_streams.files = [path] + [Path(e) for e in paths if Path(e).is_file()]
            return opened_streams
        files = [f for entry, line in zip(paths, lines) for f in media_files(entry, line)]
        listed = _open_files(files, vid_stride, {})
        listed.files, listed.folders = [path, *files], [f for entry in paths for f in read_folders(entry)]
        return listed
    files = media_files(source, where)
    opened: dict[Path, cv2.VideoCapture] = {}
    if files == [path] and is_video(path):  # the one video the user named: fail now if it cannot be read
        capture = open_capture(str(path), timeout_s)
        if capture is None:
            raise UserError(f"{where}: cannot read the video (damaged, or a codec this OpenCV build lacks)")
        opened[path] = capture
    frame_source = _open_files(files, vid_stride, opened)
    frame_source.files, frame_source.folders = files, read_folders(source)
    return frame_source


def _list_entries(list_file: Path, where: str) -> list[tuple[int, str]]:
    """(line number, entry) of a list file; relative paths made relative to the list file's folder.
    A # at the start of a line, or after a space, starts a comment (a URL may hold a # of its own).
    A list that cannot be read as UTF-8 text (a folder, no permission, another encoding) is a UserError."""
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = error.object.count(b"\n", 0, error.start) + 1
        raise UserError(f"{where}: cannot read the list file (line {line} is not UTF-8 text)") from None
    except OSError as error:
        raise UserError(f"{where}: cannot read the list file ({error.strerror or error})") from None
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        entry = re.split(r"(?:^|\s)#", line, maxsplit=1)[0].strip()
        if not entry:
            continue
        if not (entry.isdigit() or is_url(entry) or Path(entry).is_absolute()):
            entry = str(list_file.parent / entry)
        entries.append((n, entry))
    return entries


def _open_files(files: list[Path], vid_stride: int, opened: dict[Path, cv2.VideoCapture]) -> FrameSource:
    def release() -> None:
        for capture in opened.values():
            capture.release()

    return FrameSource(_file_frames(files, file_output_names(files), vid_stride, opened), release)


def _file_frames(
    files: list[Path], names: list[Path], vid_stride: int, opened: dict[Path, cv2.VideoCapture]
) -> Iterator[Frame]:
    """Every image, and every vid_stride-th frame of every video, in the order of `files`; an input that
    cannot be read is skipped with a warning, and their number is logged once after the last frame."""
    total, skipped = len(files), 0
    for number, (path, name) in enumerate(zip(files, names), 1):
        if is_image(path):
            image_rgb = read_image_rgb(path)
            if image_rgb is None:
                _warn_skipped(path, "not a readable image")
                skipped += 1
                continue
            yield Frame(image_rgb, str(path), "image", name, 0, None, f"image {number}/{total} {path}")
            continue
        capture = opened.pop(path, None) or open_capture(str(path), DEFAULT_TIMEOUT_S)
        if capture is None:
            _warn_skipped(path, "cannot open the video (damaged, or a codec this OpenCV build lacks)")
            skipped += 1
            continue
        try:
            fps, count = capture_fps(capture) / vid_stride, capture_frame_count(capture)
            yielded = 0
            for index, image_bgr in _strided_frames(capture, vid_stride):
                yielded += 1
                description = f"video {number}/{total} (frame {index + 1}/{count or '?'}) {path}"
                image_rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
                yield Frame(image_rgb, str(path), "video", name, index, fps, description)
            if not yielded:
                _warn_skipped(path, "no frame could be decoded")
                skipped += 1
        finally:
            capture.release()
    if skipped:
        LOGGER.warning(f"WARNING: skipped {skipped} of {total} inputs that could not be read")


def _strided_frames(capture: cv2.VideoCapture, vid_stride: int) -> Iterator[tuple[int, np.ndarray]]:
    """(index, BGR image) of frames 0, s, 2s, ... until the video ends; the others are grabbed, not decoded."""
    index = 0
    while True:
        if index % vid_stride == 0:
            ok, image_bgr = capture.read()
            if not ok:
                return
            yield index, image_bgr
        elif not capture.grab():
            return
        index += 1


def _warn_skipped(path: Path, why: str) -> None:
    LOGGER.warning(f"WARNING: skipped {path}: {why}")


def _open_streams(entries: list[str], wheres: list[str], vid_stride: int, timeout_s: float) -> FrameSource:
    """Open every stream and read its first frame now, so a dead one fails before anything is written."""
    captures: list[cv2.VideoCapture] = []
    first_frames, live = [], []
    try:
        for entry, where in zip(entries, wheres):
            capture = _open_stream(entry, where, timeout_s)
            captures.append(capture)
            ok, image_bgr = capture.read()
            if not ok:
                raise UserError(f"{where}: opened, but sent no frame")
            first_frames.append(image_bgr)
            live.append(entry.isdigit() or is_url(entry))
    except BaseException:
        for capture in captures:
            capture.release()
        raise
    shown = [redact_url(e) if is_url(e) else e for e in entries]
    readers = StreamReaders(captures, first_frames, [f"stream {k} {s}" for k, s in enumerate(shown)], live, vid_stride)
    names = unique_names([stream_output_name(e) for e in entries])
    fps = [capture_fps(c) / vid_stride for c in captures]

    def frames() -> Iterator[Frame]:
        for k, index, image_rgb in readers.frames():
            description = f"stream {k} (frame {index + 1}) {shown[k]}"
            yield Frame(image_rgb, entries[k], "stream", names[k], index, fps[k], description)

    return FrameSource(frames(), readers.close)


def _open_stream(entry: str, where: str, timeout_s: float) -> cv2.VideoCapture:
    """An opened capture of a webcam index, URL or video file, or a UserError saying why not."""
    if entry.isdigit():
        capture = open_capture(int(entry), timeout_s)
        if capture is None:
            raise UserError(f"{where}: cannot open webcam {int(entry)} (no camera on this machine?)")
        return capture
    if is_url(entry):
        capture = open_capture(entry, timeout_s)
        if capture is None:
            raise UserError(
                f"{where}: cannot open the stream (unreachable, refused, not a video, or silent for {timeout_s:g} s)"
            )
        return capture
    path = Path(entry)
    if not path.is_file():
        raise UserError(f"{where}: not a webcam index, a stream URL or a video file that exists")
    capture = open_capture(entry, timeout_s) if is_video(path) else None
    if capture is None:
        raise UserError(f"{where}: cannot read it as a video")
    return capture
