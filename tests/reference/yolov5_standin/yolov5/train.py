"""yolov5.train: the harness imports it first (the real one sets up threads and OpenCV) and reads its version."""

from yolov5 import __version__  # noqa: F401
