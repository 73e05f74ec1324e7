"""utils/infer: every frame of a video (or every vid_stride-th), output names that never collide,
streams read side by side, one clear error for a source that cannot be opened, videos written back."""

from __future__ import annotations

import functools
import http.server
import logging
import socket
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from utils.errors import UserError
from utils.infer.capture import open_capture
from utils.infer.sources import Frame, open_source
from utils.infer.streams import StreamReaders
from utils.infer.video_writer import VideoWriter

WIDTH, HEIGHT, FPS = 64, 48, 10.0


def make_clip(path: Path, num_frames: int = 12, size: tuple[int, int] = (WIDTH, HEIGHT), fps: float = FPS) -> Path:
    """A tiny mp4v clip whose frame i shows the number i."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert writer.isOpened()
    for i in range(num_frames):
        image = np.full((size[1], size[0], 3), 20 * i % 256, np.uint8)
        cv2.putText(image, str(i), (4, size[1] - 8), cv2.FONT_HERSHEY_SIMPLEX, 1, (255, 255, 255), 2)
        writer.write(image)
    writer.release()
    return path


def make_image(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((HEIGHT, WIDTH, 3), value, np.uint8))
    return path


def reference_frames(path: Path) -> list[np.ndarray]:
    """Every frame of a video as cv2.VideoCapture decodes it, in RGB: what the source must yield."""
    capture, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, image = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames


def read_all(source: str, **kwargs) -> list[Frame]:
    with open_source(source, **kwargs) as frames:
        return list(frames)


def stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("stream")]


def test_a_clip_yields_every_frame_as_decoded(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4")
    expected = reference_frames(clip)
    assert len(expected) == 12
    frames = read_all(str(clip))
    assert [f.frame_index for f in frames] == list(range(12))
    assert all(np.array_equal(f.image_rgb, e) for f, e in zip(frames, expected))
    first = frames[0]
    assert first.image_rgb.shape == (HEIGHT, WIDTH, 3) and first.image_rgb.dtype == np.uint8
    assert (first.kind, first.source, first.output_name) == ("video", str(clip), Path("clip.mp4"))
    assert first.fps == pytest.approx(FPS)
    assert frames[4].description == f"video 1/1 (frame 5/12) {clip}"  # one input, of 12 frames


def test_vid_stride_keeps_every_nth_frame_at_a_lower_frame_rate(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4")
    expected = reference_frames(clip)
    frames = read_all(str(clip), vid_stride=3)
    assert [f.frame_index for f in frames] == [0, 3, 6, 9]
    assert all(np.array_equal(f.image_rgb, expected[f.frame_index]) for f in frames)
    assert frames[0].fps == pytest.approx(FPS / 3)
    with pytest.raises(UserError, match="--vid-stride 0: must be at least 1"):
        open_source(str(clip), vid_stride=0)


def test_a_folder_of_an_image_and_a_video_yields_both_under_their_own_names(tmp_path):
    make_image(tmp_path / "in" / "clip.jpg")
    make_clip(tmp_path / "in" / "clip.mp4", num_frames=5)
    make_clip(tmp_path / "in" / "clip.avi", num_frames=3)  # would also become clip.mp4
    (tmp_path / "in" / "notes.csv").write_text("not media\n")  # ignored in a folder
    frames = read_all(str(tmp_path / "in"))
    names = {(Path(f.source).name, f.kind): f.output_name for f in frames}
    assert names == {
        ("clip.avi", "video"): Path("clip_2.mp4"),  # clip.mp4 keeps its own name
        ("clip.jpg", "image"): Path("clip.jpg"),
        ("clip.mp4", "video"): Path("clip.mp4"),
    }
    assert [" ".join(f.description.split()[:2]) for f in frames if f.frame_index == 0] == [
        "video 1/3",
        "image 2/3",
        "video 3/3",
    ]
    assert sum(f.kind == "video" for f in frames) == 8


def test_images_with_the_same_name_in_different_folders_keep_distinct_names(tmp_path):
    make_image(tmp_path / "in" / "a" / "x.jpg", 10)
    make_image(tmp_path / "in" / "b" / "x.jpg", 200)
    make_image(tmp_path / "in" / "b" / "x.png", 90)  # same stem: its label file would collide
    frames = read_all(str(tmp_path / "in" / "**" / "*.*"))
    assert [f.output_name.as_posix() for f in frames] == ["a/x.jpg", "b/x.jpg", "b/x_2.png"]
    assert [int(f.image_rgb[0, 0, 0]) for f in frames] == [10, 200, 90]
    assert [f.description for f in frames][0] == f"image 1/3 {tmp_path / 'in' / 'a' / 'x.jpg'}"


def test_a_streams_file_yields_every_frame_of_each_listed_clip(tmp_path):
    first = make_clip(tmp_path / "one" / "clip.mp4", num_frames=12)
    second = make_clip(tmp_path / "two" / "clip.mp4", num_frames=7, size=(32, 24))
    listing = tmp_path / "cams.streams"
    listing.write_text(f"# two cameras\n\none/clip.mp4\n{second}  # absolute\n")
    frames = read_all(str(listing))
    assert {f.description.split()[1] for f in frames} == {"0", "1"}  # two streams
    by_source = {s: [f for f in frames if f.source == s] for s in (str(tmp_path / "one" / "clip.mp4"), str(second))}
    assert [len(v) for v in by_source.values()] == [12, 7]  # files only: nothing is dropped
    for path, got in zip((first, second), by_source.values()):
        assert [f.frame_index for f in got] == list(range(len(got)))
        assert all(np.array_equal(f.image_rgb, e) for f, e in zip(got, reference_frames(path)))
    assert {f.output_name for f in frames} == {Path("clip.mp4"), Path("clip_2.mp4")}
    assert {f.kind for f in frames} == {"stream"}
    assert frames[0].description == f"stream 0 (frame 1) {tmp_path / 'one' / 'clip.mp4'}"
    assert not stream_threads()


def test_vid_stride_applies_to_streams_and_closing_early_stops_their_threads(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4")
    listing = tmp_path / "cams.streams"
    listing.write_text(f"{clip}\n{clip}\n")
    frames = read_all(str(listing), vid_stride=4)
    assert sorted((f.output_name.as_posix(), f.frame_index) for f in frames) == [
        (name, i) for name in ("clip.mp4", "clip_2.mp4") for i in (0, 4, 8)
    ]
    assert frames[0].fps == pytest.approx(FPS / 4)
    with open_source(str(listing)) as source:
        next(source)
        assert stream_threads()
    assert not stream_threads()


def test_a_live_stream_that_ends_is_reported_and_the_others_go_on(tmp_path, caplog):
    short, long = make_clip(tmp_path / "short.mp4", num_frames=3), make_clip(tmp_path / "long.mp4", num_frames=12)
    captures = [open_capture(str(short), 5), open_capture(str(long), 5)]
    first = [c.read()[1] for c in captures]
    readers = StreamReaders(captures, first, ["stream 0 cam", "stream 1 file"], live=[True, False], vid_stride=1)
    with caplog.at_level(logging.WARNING):
        got = list(readers.frames())
    assert [i for k, i, _ in got if k == 1] == list(range(12))
    assert 1 <= sum(k == 0 for k, _, _ in got) <= 3  # a live stream keeps only its newest frame
    assert "stream 0 cam stopped sending frames after 3 frames" in caplog.text
    assert "stream 1" not in caplog.text  # a video file that ends is no failure


def one_line_error(source: str, **kwargs) -> str:
    with pytest.raises(UserError) as error:
        open_source(source, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_missing_camera_is_one_clear_error(capfd):
    assert one_line_error("99") == "--source 99: cannot open webcam 99 (no camera on this machine?)"
    assert capfd.readouterr().err == ""  # OpenCV's own warnings are silenced


def test_a_dead_stream_url_is_one_clear_error(tmp_path, capfd):
    message = one_line_error("rtsp://admin:secret@127.0.0.1:9/none")  # refused
    assert message == (
        "--source rtsp://***@127.0.0.1:9/none: cannot open the stream "
        "(unreachable, refused, not a video, or silent for 10 s)"
    )
    listing = tmp_path / "cams.txt"  # a .txt naming any URL is read as streams
    listing.write_text(f"{make_clip(tmp_path / 'ok.mp4')}\n# the door\nhttp://127.0.0.1:9/live.mjpg  # down\n")
    assert one_line_error(str(listing)).startswith(
        f"--source {listing}, line 3: http://127.0.0.1:9/live.mjpg: cannot open the stream"
    )
    assert capfd.readouterr().err == ""


def test_a_url_that_never_answers_fails_after_the_timeout():
    """A server that accepts the connection and then says nothing: OpenCV's own open timeout is 30 s;
    timeout_s makes it fail after about timeout_s."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        url = f"rtsp://127.0.0.1:{server.getsockname()[1]}/live"
        started = time.monotonic()
        assert "cannot open the stream" in one_line_error(url, timeout_s=1)
        assert time.monotonic() - started < 10  # a hang guard, not a benchmark: about 1 s is expected


def test_paths_that_are_not_media_are_one_clear_error(tmp_path):
    assert one_line_error(str(tmp_path / "nope.jpg")).startswith(f"--source {tmp_path / 'nope.jpg'} does not exist")
    (tmp_path / "notes.csv").write_text("a,b\n")
    assert one_line_error(str(tmp_path / "notes.csv")).startswith(
        f"--source {tmp_path / 'notes.csv'} is neither an image"
    )
    (tmp_path / "empty").mkdir()
    assert one_line_error(str(tmp_path / "empty")).startswith(
        f"--source {tmp_path / 'empty'}: no images or videos in it"
    )
    assert "no images or videos" in one_line_error(str(tmp_path / "*.jpg"))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    assert (
        one_line_error(str(broken))
        == f"--source {broken}: cannot read the video (damaged, or a codec this OpenCV build lacks)"
    )
    (tmp_path / "empty.streams").write_text("# nothing\n\n")
    assert "lists no sources" in one_line_error(str(tmp_path / "empty.streams"))
    (tmp_path / "bad.streams").write_text(f"{tmp_path / 'notes.csv'}\n")
    assert one_line_error(str(tmp_path / "bad.streams")).endswith(
        f"line 1: {tmp_path / 'notes.csv'}: cannot read it as a video"
    )


def test_a_list_file_that_cannot_be_read_as_text_is_one_clear_error(tmp_path, monkeypatch):
    latin1 = tmp_path / "cams.txt"
    latin1.write_bytes("0\ncaméra.mp4\n".encode("latin-1"))
    assert one_line_error(str(latin1)) == f"--source {latin1}: cannot read the list file (line 2 is not UTF-8 text)"
    (tmp_path / "x.streams").mkdir()
    assert one_line_error(str(tmp_path / "x.streams")) == (
        f"--source {tmp_path / 'x.streams'}: cannot read the list file (Is a directory)"
    )
    locked = tmp_path / "locked.streams"
    locked.write_text("0\n")

    def denied(self, *args, **kwargs):  # tests may run as root, whom chmod does not stop
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    assert one_line_error(str(locked)) == f"--source {locked}: cannot read the list file (Permission denied)"


def test_unreadable_inputs_of_a_folder_are_skipped_and_counted(tmp_path, caplog):
    make_image(tmp_path / "in" / "good.jpg")
    (tmp_path / "in" / "bad.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "in" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    with caplog.at_level(logging.WARNING):
        frames = read_all(str(tmp_path / "in"))
    assert [Path(f.source).name for f in frames] == ["good.jpg"]
    assert [r.getMessage() for r in caplog.records] == [
        f"WARNING: skipped {tmp_path / 'in' / 'bad.jpg'}: not a readable image",
        f"WARNING: skipped {tmp_path / 'in' / 'broken.mp4'}: cannot open the video "
        "(damaged, or a codec this OpenCV build lacks)",
        "WARNING: skipped 2 of 3 inputs that could not be read",  # once, after the last frame
    ]


def test_a_txt_list_of_files_is_read_as_files(tmp_path):
    make_image(tmp_path / "a.jpg")
    make_clip(tmp_path / "sub" / "b.mp4", num_frames=2)
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg\nsub/b.mp4\n")
    frames = read_all(str(listing))
    assert [(f.kind, f.output_name.as_posix()) for f in frames] == [
        ("image", "a.jpg"),
        ("video", "sub/b.mp4"),
        ("video", "sub/b.mp4"),
    ]


def test_written_videos_read_back_with_their_frames_size_and_rate(tmp_path):
    make_clip(tmp_path / "in" / "clip.mp4", num_frames=12)
    make_clip(tmp_path / "in" / "other.mp4", num_frames=5, size=(32, 24))
    run = tmp_path / "run"
    with open_source(str(tmp_path / "in"), vid_stride=2) as source, VideoWriter() as videos:
        for frame in source:
            image_bgr = cv2.cvtColor(frame.image_rgb, cv2.COLOR_RGB2BGR)
            videos.write(run / frame.output_name, image_bgr, frame.fps, one_at_a_time=frame.kind == "video")
            if frame.output_name.name == "other.mp4":  # a new video finished the previous one
                assert reference_frames(run / "clip.mp4")
    for name, (count, width, height) in {"clip.mp4": (6, WIDTH, HEIGHT), "other.mp4": (3, 32, 24)}.items():
        capture = cv2.VideoCapture(str(run / name))
        assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(FPS / 2)
        assert (capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (width, height)
        capture.release()
        assert len(reference_frames(run / name)) == count


def test_a_clip_written_back_has_as_many_frames_of_the_same_size(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", num_frames=12)
    with open_source(str(clip)) as source, VideoWriter() as videos:
        for frame in source:
            videos.write(tmp_path / "run" / frame.output_name, frame.image_rgb[..., ::-1], frame.fps)
    written = reference_frames(tmp_path / "run" / "clip.mp4")
    assert len(written) == 12 and written[0].shape == (HEIGHT, WIDTH, 3)
    assert np.abs(written[5].astype(int) - reference_frames(clip)[5]).mean() < 8  # mp4v is lossy, but the same picture


def test_stream_videos_stay_open_side_by_side_and_odd_sizes_are_resized(tmp_path, caplog):
    def black(height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
        return np.zeros((height, width, 3), np.uint8)

    with caplog.at_level(logging.WARNING), VideoWriter() as videos:
        for i in range(4):  # interleaved, as streams come
            videos.write(tmp_path / "a.mp4", black(), 5.0)
            videos.write(tmp_path / "b.mp4", black(HEIGHT * 2, WIDTH * 2) if i == 2 else black(24, 32), 5.0)
        videos.write(tmp_path / "c.mp4", black(), 5.0, one_at_a_time=True)
        videos.write(tmp_path / "d.mp4", black(), 5.0, one_at_a_time=True)  # finishes c.mp4 only
        with pytest.raises(ValueError, match="c.mp4 was already finished"):
            videos.write(tmp_path / "c.mp4", black(), 5.0, one_at_a_time=True)
        videos.write(tmp_path / "a.mp4", black(), 5.0)
        with pytest.raises(ValueError, match="needs a frame rate"):
            videos.write(tmp_path / "e.mp4", black(), None)
    assert "b.mp4: frames of (128, 96) resized to the first's (32, 24)" in caplog.text
    assert [len(reference_frames(tmp_path / n)) for n in ("a.mp4", "b.mp4", "c.mp4", "d.mp4")] == [5, 4, 1, 1]
    assert reference_frames(tmp_path / "b.mp4")[2].shape == (24, 32, 3)


def test_an_http_url_is_read_as_a_live_stream(tmp_path):
    """A clip served over HTTP on this machine: read through FFmpeg as a stream, newest frames only."""
    clip = make_clip(tmp_path / "clip.mp4")

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(QuietHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
        url = f"http://127.0.0.1:{port}/clip.mp4"
        frames = read_all(url)
        server.shutdown()
    expected = reference_frames(clip)
    assert 1 <= len(frames) <= 12 and frames[0].frame_index == 0
    assert all(np.array_equal(f.image_rgb, expected[f.frame_index]) for f in frames)
    assert (frames[0].kind, frames[0].source) == ("stream", url)
    assert frames[0].output_name == Path(f"127_0_0_1_{port}_clip.mp4")
    assert frames[0].description == f"stream 0 (frame 1) {url}"
