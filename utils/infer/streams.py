"""Several opened captures read at once, each in its own daemon thread, their frames taken round robin.

A live source (webcam, URL) keeps only its newest frame: a slow consumer skips frames rather
than falling behind the world. A video file listed among streams is read without skipping: its
thread waits until the previous frame was taken, and it ends cleanly at its last frame."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from utils.log import LOGGER

JOIN_TIMEOUT_S = 1.0  # close() waits this long per thread; a thread still blocked in a read releases on its own


@dataclass
class _Stream:
    """One capture and what its thread has left for the consumer (guarded by StreamReaders._changed)."""

    capture: cv2.VideoCapture
    name: str
    live: bool
    newest: tuple[int, np.ndarray] | None  # (frame index, RGB image) not yet taken
    thread: threading.Thread | None = None
    done: bool = False
    error: str = ""
    frames_grabbed: int = 1  # the first frame was read when the stream was opened
    reported: bool = False  # the consumer has seen it end


class StreamReaders:
    """Reads every vid_stride-th frame of each capture in a background thread; frames() yields
    (stream number, frame index, RGB image) round robin until every stream has ended or failed."""

    def __init__(
        self,
        captures: list[cv2.VideoCapture],
        first_frames_bgr: list[np.ndarray],
        names: list[str],
        live: list[bool],
        vid_stride: int,
    ) -> None:
        """captures are open and have delivered their frame 0 (first_frames_bgr); names label the log lines;
        live[k] says whether stream k may drop frames (webcam, URL) or must deliver all (a video file)."""
        self._vid_stride = vid_stride
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._streams = [
            _Stream(capture, name, is_live, (0, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
            for capture, bgr, name, is_live in zip(captures, first_frames_bgr, names, live)
        ]

    def frames(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(stream number, frame index in that stream, (H, W, 3) uint8 RGB), one new frame per stream
        per round; a stream that fails mid-way is reported once and the others go on."""
        for k, stream in enumerate(self._streams):
            stream.thread = threading.Thread(target=self._read, args=(stream,), name=f"stream{k}", daemon=True)
            stream.thread.start()
        try:
            while True:
                with self._changed:
                    self._changed.wait_for(self._news_or_all_ended)
                    ready = [(k, s.newest) for k, s in enumerate(self._streams) if s.newest is not None]
                    for stream in self._streams:
                        stream.newest = None
                        if stream.done and not stream.reported:
                            self._report_end(stream)
                    self._changed.notify_all()  # a video file's thread waits for its frame to be taken
                    all_ended = all(s.reported for s in self._streams)
                for k, (index, image_rgb) in ready:
                    yield k, index, image_rgb
                if all_ended:  # a stream's last frame is left before it is marked done: none is lost
                    return
        finally:
            self.close()

    def _news_or_all_ended(self) -> bool:
        """The consumer's wake-up condition: a frame to take, an end to report, or nothing left at all."""
        streams = self._streams
        news = any(s.newest is not None or (s.done and not s.reported) for s in streams)
        return news or all(s.reported for s in streams)

    def _report_end(self, stream: _Stream) -> None:
        stream.reported = True
        if stream.error:
            LOGGER.warning(f"WARNING: {stream.name} failed after {stream.frames_grabbed} frames ({stream.error})")
        elif stream.live and not self._stop.is_set():
            LOGGER.warning(f"WARNING: {stream.name} stopped sending frames after {stream.frames_grabbed} frames")

    def _read(self, stream: _Stream) -> None:
        """The thread of one stream: grab every frame, decode every vid_stride-th."""
        index = 1
        try:
            while not self._stop.is_set():
                keep = index % self._vid_stride == 0
                if keep:
                    ok, image_bgr = stream.capture.read()
                else:
                    ok, image_bgr = stream.capture.grab(), None
                if not ok:
                    break
                if image_bgr is not None:
                    image_rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
                    with self._changed:
                        if not stream.live:
                            self._changed.wait_for(lambda: stream.newest is None or self._stop.is_set())
                        stream.newest = (index, image_rgb)
                        self._changed.notify_all()
                index += 1
        except Exception as error:  # a decoder or backend failure ends this stream only
            stream.error = f"{type(error).__name__}: {error}"
        finally:
            stream.capture.release()
            with self._changed:
                stream.frames_grabbed = index
                stream.done = True
                self._changed.notify_all()

    def close(self) -> None:
        """Stop every thread and release every capture (a thread blocked in a read releases its own on return)."""
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        for stream in self._streams:
            if stream.thread is None:
                stream.capture.release()
            else:
                stream.thread.join(JOIN_TIMEOUT_S)
