"""Reading an image file into pixels: OpenCV, with Pillow for the files OpenCV cannot decode."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps


def read_image_rgb(path: Path) -> np.ndarray | None:
    """(H, W, 3) uint8 RGB with the EXIF orientation applied, or None when neither decoder reads it.

    OpenCV is the fast path. Pillow, which verified the file when the dataset was scanned, reads
    what OpenCV refuses (EXIF-rotated TIFFs and some TIFF compressions with the OpenCV wheels of
    PyPI), so an image the scan accepted is never lost to a decoder difference."""
    image = cv2.imread(str(path))
    if image is not None:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    try:
        with Image.open(path) as pil_image:
            return np.ascontiguousarray(ImageOps.exif_transpose(pil_image).convert("RGB"))
    except Exception:  # Pillow raises many types for a bad file; all mean "undecodable"
        return None
