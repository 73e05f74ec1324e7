"""OpenCV captures: telling a stream URL from a path (and hiding its password in messages), opening a
cv2.VideoCapture quietly (a dead URL fails within a timeout) and reading what it reports."""

from __future__ import annotations

import math
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import cv2

from utils.log import LOGGER

URL_PREFIXES = ("rtsp://", "rtsps://", "rtmp://", "rtmps://", "http://", "https://")
DEFAULT_FPS = 30.0  # when the container or camera reports no frame rate
MAX_PLAUSIBLE_FPS = 1000.0  # some streams report a time base (90000) as their frame rate


def is_url(source: str) -> bool:
    """A network stream OpenCV reads through FFmpeg (rtsp, rtmp, http, https)."""
    return source.lower().startswith(URL_PREFIXES)


def redact_url(url: str) -> str:
    """The URL with any user:password replaced by ***, for logs and error messages."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()


@contextmanager
def _stderr_to_debug_log() -> Iterator[None]:
    """OpenCV and FFmpeg write several lines straight to file descriptor 2 when a capture fails to open
    (FFmpeg ignores OpenCV's log level); the caller reports the failure in one line instead, and those
    lines go to the debug log. Opening happens in one thread at a time, so the swap of fd 2 is safe."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to keep quiet
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace").strip()
            if text:
                LOGGER.debug(f"OpenCV while opening a capture:\n{text}")


def open_capture(target: str | int, timeout_s: float) -> cv2.VideoCapture | None:
    """An opened capture of a video file (path), a webcam (index) or a URL, or None when OpenCV cannot open it.

    URLs go through FFmpeg with open and read timeouts of `timeout_s`, so a dead address fails
    within that time and a stream that stalls later ends its reads instead of blocking forever."""
    try:
        with _stderr_to_debug_log():
            if isinstance(target, str) and is_url(target):
                timeout_ms = int(timeout_s * 1000)
                params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
                capture = cv2.VideoCapture(target, cv2.CAP_FFMPEG, params)
            else:
                capture = cv2.VideoCapture(target)
    except cv2.error:  # some backends raise instead of returning a closed capture
        return None
    if capture.isOpened():
        return capture
    capture.release()
    return None


def capture_fps(capture: cv2.VideoCapture) -> float:
    """The frame rate the capture reports, or DEFAULT_FPS when it reports none (0, NaN) or an implausible one."""
    fps = capture.get(cv2.CAP_PROP_FPS)
    return fps if math.isfinite(fps) and 0 < fps <= MAX_PLAUSIBLE_FPS else DEFAULT_FPS


def capture_frame_count(capture: cv2.VideoCapture) -> int | None:
    """Frames in a video file as its container reports them; None when unknown (live sources report 0 or -1)."""
    count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
    return int(count) if math.isfinite(count) and count > 0 else None
