"""The input size: rounded to the stride, and an impossible one refused before anything starts."""

from __future__ import annotations

from utils.image_size import round_image_size


def test_image_size_rounds_up_to_the_stride_and_says_so(caplog):
    assert round_image_size(320, 32) == 320 and "WARNING" not in caplog.text
    assert round_image_size(300, 32) == 320
    assert "--imgsz 300 is not a multiple of the max stride 32; using 320" in caplog.text
