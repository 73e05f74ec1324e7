"""Pixels of an image as (H, W, 3) uint8 RGB, by one rule for files, numpy arrays and PIL images.

The rule: grey is repeated into three channels and an alpha channel dropped (as OpenCV reads files
and as Pillow converts); a PIL image has its EXIF orientation applied and its colour mode converted
by Pillow; bool is 0 or 255; uint16 (PIL's I;16 modes, 16-bit files) keeps its high byte, as OpenCV
reads a 16-bit PNG or TIFF; other integers must already be 0-255; floats in [0, 1] are scaled by
255 and other floats in [0, 255] rounded. Anything else (NaN, values out of range, a shape that is
not (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), no pixels at all) is a UserError saying which.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from utils.errors import UserError

# OpenCV >= 4.10 decodes straight to RGB (the same pixels as BGR then cvtColor, one copy fewer)
RGB_FLAG = (cv2.IMREAD_COLOR_RGB,) if hasattr(cv2, "IMREAD_COLOR_RGB") else ()
HIGH_DEPTH_MODES = ("I", "F")  # with I;16*: PIL modes whose pixels are not 8-bit, converted by the rule


def read_image_rgb(path: Path) -> np.ndarray | None:
    """(H, W, 3) uint8 RGB with the EXIF orientation applied, or None when neither decoder reads it.

    OpenCV is the fast path. Pillow, which verified the file when the dataset was scanned, reads
    what OpenCV refuses (EXIF-rotated TIFFs, some TIFF compressions with the OpenCV wheels of PyPI,
    float and 32-bit integer TIFFs), so an image the scan accepted is never lost to a decoder
    difference; its pixels follow the rule of pil_to_rgb."""
    image = cv2.imread(str(path), *RGB_FLAG)  # 16-bit files come back as their high byte, as pixels_to_rgb does
    if image is not None and image.size:
        return image if RGB_FLAG else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    try:
        with Image.open(path) as pil_image:
            return pil_to_rgb(pil_image)
    except Exception:  # Pillow raises many types for a bad file, and the rule a UserError; all mean "undecodable"
        return None


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """A PIL image of any mode -> (H, W, 3) uint8 RGB, EXIF orientation applied (see the module's rule)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in HIGH_DEPTH_MODES or image.mode.startswith("I;16"):
        return pixels_to_rgb(np.asarray(image))  # Pillow's own conversion would saturate them to white
    if image.mode == "La":  # premultiplied alpha: Pillow converts it to RGB only by way of LA
        image = image.convert("LA")
    return pixels_to_rgb(np.asarray(image.convert("RGB")))


def pixels_to_rgb(pixels: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 1) grey, (H, W, 3) RGB or (H, W, 4) RGBA of any pixel type -> (H, W, 3) uint8 RGB
    (see the module's rule)."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (3, 4))):
        raise UserError(
            f"an image array is (H, W) or (H, W, 1) grey, (H, W, 3) RGB or (H, W, 4) RGBA; got shape {pixels.shape}"
        )
    if not pixels.shape[0] or not pixels.shape[1]:
        raise UserError(f"the image is {pixels.shape[1]}x{pixels.shape[0]} pixels: nothing to detect on")
    pixels = to_uint8(pixels)
    if pixels.ndim == 2:
        return np.repeat(pixels[..., None], 3, axis=2)  # (a view of any strides, which cvtColor may refuse)
    return np.ascontiguousarray(pixels[..., :3])


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Pixel values as uint8 by the module's rule; values that cannot be pixels are a UserError."""
    dtype = pixels.dtype
    if dtype == np.uint8:
        return pixels
    if dtype == np.bool_:
        return pixels.astype(np.uint8) * 255
    if dtype.kind == "u" and dtype.itemsize == 2:  # any byte order (PIL's I;16B is big-endian)
        return (pixels >> 8).astype(np.uint8)
    if dtype.kind in "iu":
        low, high = int(pixels.min()), int(pixels.max())
        if low < 0 or high > 255:
            raise UserError(
                f"{dtype} pixel values must be 0-255 (uint16: 0-65535), but they span {low} to {high}: "
                "scale the image to one of those ranges"
            )
        return pixels.astype(np.uint8)
    if dtype.kind == "f":
        if not np.isfinite(pixels).all():
            raise UserError(f"{dtype} pixel values include NaN or infinity: not an image")
        low, high = float(pixels.min()), float(pixels.max())
        if low < 0 or high > 255:
            raise UserError(
                f"{dtype} pixel values must be in [0, 1] or [0, 255], but they span {low:g} to {high:g} "
                "(a normalised tensor? undo the normalisation first)"
            )
        return np.rint(pixels * (255.0 if high <= 1.0 else 1.0)).astype(np.uint8)
    raise UserError(f"{dtype} is not a pixel type: use uint8 (0-255), uint16, float (0-1 or 0-255) or bool")
