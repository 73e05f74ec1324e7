"""Images reach the detector as their file would: every PIL mode and numpy dtype/shape the API takes
decodes to the pixels the same image gives when written to a file and read by path, values that
cannot be an image are refused by name, and thin, empty or unlistable inputs do not crash detect.py,
export.py or the API."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image

import detect
import export
from utils.data.augment import letterbox
from utils.data.decode import read_image_rgb
from utils.errors import UserError
from utils.infer.predictor import Detector, as_rgb

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (12, 16, 3), dtype=np.uint8)  # the pixels every case is made from
GREY = RNG.integers(0, 256, (12, 16), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (12, 16), dtype=np.uint8)


def pil_image(mode: str) -> Image.Image:
    """A 16x12 image in `mode`, made from RGB or GREY (I, I;16*, F: GREY at their own scale)."""
    if mode == "1":
        return Image.fromarray(GREY > 127)
    if mode == "I":
        return Image.fromarray(GREY.astype(np.int32), "I")
    if mode.startswith("I;16"):
        order = ">" if mode == "I;16B" else "<"
        return Image.frombytes(mode, (16, 12), (GREY.astype(np.uint32) * 257).astype(f"{order}u2").tobytes())
    if mode == "F":
        return Image.fromarray((GREY / 255).astype(np.float32), "F")
    if mode in ("L", "LA", "La"):
        grey = Image.fromarray(GREY)
        return grey if mode == "L" else Image.merge("LA", (grey, Image.fromarray(ALPHA))).convert(mode)
    if mode == "PA":
        return Image.fromarray(RGB).convert("P").convert("PA")
    rgba = Image.merge("RGBA", (*Image.fromarray(RGB).split(), Image.fromarray(ALPHA)))
    return rgba if mode == "RGBA" else Image.fromarray(RGB).convert(mode)


# What a user saves a mode as where no format writes it (PNG or TIFF).
SAVED_AS = {"HSV": "RGB", "RGBa": "RGBA", "La": "LA"}
# Modes whose pixels are known exactly: GREY at their own scale.
GREY_MODES = ("L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def write_and_read(image: Image.Image, folder: Path) -> np.ndarray:
    """The reference: `image` written to a file (PNG, else TIFF) and read by path as detect.py reads it."""
    image = image.convert(SAVED_AS[image.mode]) if image.mode in SAVED_AS else image
    for suffix in (".png", ".tiff"):
        path = folder / f"image{suffix}"
        try:
            image.save(path)
        except (OSError, ValueError):
            continue
        return read_image_rgb(path)
    raise AssertionError(f"no format writes mode {image.mode}")


MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "HSV", "I", "I;16", "I;16B", "I;16L", "F"]
MODES += ["LA", "La", "PA", "RGBX", "RGBa"]


@pytest.mark.parametrize("mode", MODES)
def test_a_pil_image_decodes_as_its_file(mode, tmp_path):
    image = pil_image(mode)
    assert image.mode == mode
    decoded, _ = as_rgb(image)
    reference = write_and_read(image, tmp_path)
    assert decoded.dtype == np.uint8 and decoded.shape == (12, 16, 3)
    np.testing.assert_allclose(decoded, reference, atol=1)  # colour conversions may round differently
    if mode in GREY_MODES:  # the file itself read right, too (a float TIFF read black, a 32-bit one white)
        np.testing.assert_array_equal(reference, np.repeat(GREY[..., None], 3, axis=2))


def test_a_lab_image_keeps_its_colours():
    """OpenCV reads a CIELab TIFF by its own conversion, so Pillow's LAB is compared with the RGB it came from."""
    decoded, _ = as_rgb(Image.fromarray(RGB).convert("LAB"))
    assert np.abs(decoded.astype(int) - RGB).max() <= 20  # 8-bit LAB loses some precision


def array_case(dtype: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(the array passed, the 8-bit array of the same image written to a file): GREY or RGB, with ALPHA
    as the fourth channel, at dtype's scale; 0 channels means (H, W)."""
    pixels = GREY if channels in (0, 1) else RGB
    if channels == 1:
        pixels = pixels[..., None]
    if channels == 4:
        pixels = np.concatenate((RGB, ALPHA[..., None]), axis=2)
    if dtype == "uint8":
        return pixels, pixels
    if dtype == "uint16":  # written as a 16-bit file: its own reference, read by OpenCV
        return pixels.astype(np.uint16) * 257, pixels.astype(np.uint16) * 257
    if dtype == "bool":
        return pixels > 127, (pixels > 127).astype(np.uint8) * 255
    if dtype == "float255":
        return pixels.astype(np.float32), pixels
    return (pixels / 255).astype(dtype), pixels  # float32, float64 in [0, 1]


@pytest.mark.parametrize("channels", [0, 1, 3, 4])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32", "float64", "float255", "bool"])
def test_an_array_decodes_as_its_file(dtype, channels, tmp_path):
    array, file_pixels = array_case(dtype, channels)
    path = tmp_path / "image.png"
    bgr = (
        file_pixels if file_pixels.ndim == 2 or file_pixels.shape[2] == 1 else file_pixels[..., [2, 1, 0, 3][:channels]]
    )
    assert cv2.imwrite(str(path), bgr)
    decoded, _ = as_rgb(array)
    assert decoded.dtype == np.uint8 and decoded.shape == (12, 16, 3)
    np.testing.assert_array_equal(decoded, read_image_rgb(path))


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.full((8, 8, 3), np.nan, np.float32), "NaN or infinity"),
        (np.full((8, 8), np.inf), "NaN or infinity"),
        (np.full((8, 8, 3), -0.5, np.float32), r"must be in \[0, 1\] or \[0, 255\]"),
        (np.full((8, 8, 3), 300, np.int32), "must be 0-255"),
        (np.zeros((8, 8, 5), np.uint8), r"got shape \(8, 8, 5\)"),
        (np.zeros((8, 8, 2), np.uint8), r"got shape \(8, 8, 2\)"),
        (np.zeros((1, 8, 8, 3), np.uint8), r"got shape \(1, 8, 8, 3\)"),
        (np.zeros((8, 8, 3), np.complex64), "not a pixel type"),
        (np.zeros((0, 8, 3), np.uint8), "8x0 pixels"),
    ],
)
def test_arrays_that_cannot_be_images_are_refused_by_name(array, message):
    with pytest.raises(UserError, match=message):
        as_rgb(array)


@pytest.mark.parametrize("shape_hw", [(1, 5000), (5000, 1), (1, 1), (3, 4000)])
def test_thin_images_are_letterboxed(shape_hw):
    image = np.full((*shape_hw, 3), 200, np.uint8)
    boxed, (scale_x, scale_y), _ = letterbox(image, (640, 640), auto=True, stride=32)
    assert boxed.shape[0] % 32 == 0 and boxed.shape[1] % 32 == 0 and max(boxed.shape[:2]) <= 640
    assert scale_x > 0 and scale_y > 0


def test_the_api_detects_on_thin_images_and_refuses_an_empty_one(tiny_run):
    detector = Detector(tiny_run / "weights" / "best.pt", conf_thres=0.0, max_det=5)
    thin = [np.full((1, 3000, 3), 90, np.uint8), np.full((3000, 1), 90, np.uint8), RGB]
    results = detector(thin)
    assert len(results) == 3
    for result, image in zip(results, thin):
        h, w = image.shape[:2]
        boxes = result.boxes_xyxy
        assert ((boxes[:, [0, 2]] >= 0) & (boxes[:, [0, 2]] <= w)).all()
        assert ((boxes[:, [1, 3]] >= 0) & (boxes[:, [1, 3]] <= h)).all()
    with pytest.raises(UserError, match="0x3000 pixels: nothing to detect on"):
        detector(np.zeros((3000, 0, 3), np.uint8))


def zero_width_png(path: Path) -> None:
    """A PNG whose header says 0x4 pixels (Pillow and OpenCV refuse to write one)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 0, 4, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4)))


def test_detect_py_runs_a_folder_of_thin_and_empty_images(tiny_run, tiny_dataset, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    val = Path(yaml.safe_load(tiny_dataset.read_text())["path"]) / "images" / "val"
    (folder / "normal.jpg").write_bytes(next(iter(sorted(val.glob("*.jpg")))).read_bytes())
    cv2.imwrite(str(folder / "row.png"), np.full((1, 3000, 3), 90, np.uint8))
    cv2.imwrite(str(folder / "column.png"), np.full((3000, 1, 3), 90, np.uint8))
    zero_width_png(folder / "empty.png")
    args = ["--weights", str(tiny_run / "weights" / "best.pt"), "--source", str(folder), "--project", str(tmp_path)]
    assert detect.main([*args, "--conf-thres", "0.0", "--max-det", "5"]) == 0
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["column.png", "normal.jpg", "row.png"]
    assert cv2.imread(str(tmp_path / "exp" / "row.png")).shape[:2] == (1, 3000)
    log = capsys.readouterr().out
    assert "skipped" in log and "empty.png: not a readable image" in log
    assert "skipped 1 of 4 inputs" in log


def test_detect_py_refuses_an_unlistable_folder_before_any_work(tiny_run, tmp_path, monkeypatch):
    """Tests run as root, whom permissions do not stop: listing the folder is made to fail as it would."""
    folder = tmp_path / "locked"
    folder.mkdir()

    def refuse(self: Path):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", refuse)
    args = ["--weights", str(tiny_run / "weights" / "best.pt"), "--source", str(folder), "--project", str(tmp_path)]
    with pytest.raises(UserError, match=r"locked: cannot list it \(Permission denied\)"):
        detect.main(args)
    assert not (tmp_path / "exp").exists()


def test_export_py_refuses_a_size_whose_batch_cannot_fit(tiny_run, tmp_path, monkeypatch):
    """As train.py refuses it (utils/image_size.py), with the machine's memory made small."""
    weights = tmp_path / "best.pt"
    weights.write_bytes((tiny_run / "weights" / "best.pt").read_bytes())
    monkeypatch.setattr("utils.image_size.available_memory_bytes", lambda device: 2**20)
    with pytest.raises(UserError, match=r"--imgsz 640 needs at least .* GiB are available on cpu"):
        export.main(["--weights", str(weights), "--imgsz", "640", "--device", "cpu"])
    assert not weights.with_suffix(".torchscript").exists()
