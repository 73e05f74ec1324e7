"""Detector: the one inference path of detect.py and the Python API (hubconf.py). Load a checkpoint
or an export once, then call it on image files, numpy arrays or PIL images, one or a list."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from utils.boxes import letterbox_to_original
from utils.data.augment import PAD_VALUE, letterbox
from utils.data.decode import pil_to_rgb, pixels_to_rgb, read_image_rgb
from utils.device import autocast, parameter_dtype, select_device, to_model_input
from utils.errors import UserError
from utils.eval.nms import default_iou_threshold, non_max_suppression
from utils.infer.backends import ExportedModel, inference_image_size, load_weights
from utils.infer.capture import URL_PREFIXES
from utils.infer.media_files import batch_output_names
from utils.infer.results import Results
from utils.option_checks import check_class_ids, check_detection_options, class_id_list
from utils.precision import describe

# What Detector() accepts as one image.
ImageInput = str | Path | np.ndarray | Image.Image


class Detector:
    """A trained detector, loaded once (the EMA weights of a checkpoint, or an export.py file).

        detector = Detector("runs/train/exp/weights/best.pt")
        results = detector(["a.jpg", rgb_array, pil_image])    # one Results per image
        results[0].boxes_xyxy, results[0].scores, results[0].classes, results[0].save("out/")

    Arrays and PIL images are decoded by the rule a file follows (utils/data/decode.py): numpy arrays
    are (H, W) or (H, W, 1) grey, (H, W, 3) RGB or (H, W, 4) RGBA, uint8, uint16, bool or float
    (0-1 or 0-255); OpenCV's BGR images need `[..., ::-1]`. PIL images may be in any mode. Each image
    is letterboxed to `imgsz` (its longer side; padded to the stride, or to the fixed shape of a static
    export) and the boxes come back in its own pixels after NMS. Options are checked as detect.py's
    are: thresholds in [0, 1], max_det at least 1, classes the model detects (an int or a list).
    """

    def __init__(
        self,
        weights: str | Path,
        *,
        device: str | torch.device = "",
        imgsz: int | None = None,
        conf_thres: float = 0.25,
        iou_thres: float | None = None,
        max_det: int = 1000,
        classes: int | Sequence[int] | None = None,
        agnostic_nms: bool = False,
        raw: bool = False,
        amp: str | bool | None = None,
        trust_pickle: bool = False,
    ):
        check_detection_options(conf_thres, iou_thres, max_det, imgsz, api=True)
        classes = class_id_list(classes)
        self.device = device if isinstance(device, torch.device) else select_device(device)
        loaded = load_weights(weights, self.device, raw=raw, fuse=True, trust_pickle=trust_pickle)
        self.model, self.names = loaded.model, list(loaded.model.names)
        check_class_ids(classes, self.names, api=True)
        self.stride = int(self.model.stride.max())
        fixed = self.model.fixed_shape if isinstance(self.model, ExportedModel) else None
        self.fixed_shape = fixed[1:] if fixed else None  # (H, W) of a static export
        self.img_size = inference_image_size(loaded, imgsz, batch_size=1, device=self.device)
        # amp: 'auto', 'bf16', 'fp16' or 'off' as detect.py's --amp; None (or True) as the run trained; False: off
        requested = ({True: None, False: "off"}[amp]) if isinstance(amp, bool) else amp
        self.precision = loaded.precision(self.device, requested, batch_size=1, img_size=self.img_size)
        self.amp_dtype = self.precision.dtype
        self.description = loaded.description
        if not isinstance(self.model, ExportedModel):  # (an export's description names its precision)
            self.description += f", {describe(self.precision, parameter_dtype(self.model))}"
        self.conf_thres, self.max_det, self.classes, self.agnostic_nms = conf_thres, max_det, classes, agnostic_nms
        anchor_free = self.model.anchor_free
        self.iou_thres = default_iou_threshold(anchor_free, inference=True) if iou_thres is None else iou_thres

    def __call__(self, images: ImageInput | list[ImageInput]) -> list[Results]:
        """Detect on one image or a list (run as one batch): a Results per image."""
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            return []
        loaded = [as_rgb(item) for item in items]
        return self.detect([rgb for rgb, _ in loaded], [path for _, path in loaded])

    @torch.no_grad()
    def detect(self, images_rgb: list[np.ndarray], paths: list[str | None] | None = None) -> list[Results]:
        """(H, W, 3) uint8 RGB images -> a Results per image (one forward pass for all)."""
        boxed = [self._letterbox(rgb) for rgb in images_rgb]
        height = max(b[0].shape[0] for b in boxed)
        width = max(b[0].shape[1] for b in boxed)
        # Images of different shapes share the batch padded at the bottom and right: each keeps the
        # scale and offsets it has alone, so its boxes map back as they would.
        batch = torch.stack(
            [
                F.pad(
                    torch.from_numpy(b).permute(2, 0, 1),
                    (0, width - b.shape[1], 0, height - b.shape[0]),
                    value=PAD_VALUE,
                )
                for b, _, _ in boxed
            ]
        )
        tensor = to_model_input(batch, self.device, parameter_dtype(self.model))
        with autocast(self.device, self.amp_dtype):
            decoded, _ = self.model(tensor)
        detections, _ = non_max_suppression(
            decoded,
            self.conf_thres,
            self.iou_thres,
            max_det=self.max_det,
            classes=self.classes,
            agnostic=self.agnostic_nms,
            objectness=not self.model.anchor_free,
        )
        results = []
        paths = paths or [None] * len(images_rgb)
        for rgb, (_, scale_xy, pad_xy), det, path, name in zip(
            images_rgb, boxed, detections, paths, batch_output_names(paths)
        ):
            det = det.float().cpu()
            det[:, :4] = letterbox_to_original(det[:, :4], rgb.shape[:2], scale_xy, pad_xy)
            results.append(Results(rgb, det.numpy(), self.names, path, name))
        return results

    def _letterbox(self, rgb: np.ndarray) -> tuple[np.ndarray, tuple[float, float], tuple[int, int]]:
        if self.fixed_shape is not None:  # a static export: exactly its shape, centred
            return letterbox(rgb, self.fixed_shape, auto=False)
        return letterbox(rgb, (self.img_size, self.img_size), auto=True, stride=self.stride)


def as_rgb(image: ImageInput) -> tuple[np.ndarray, str | None]:
    """One input -> ((H, W, 3) uint8 RGB, its file path or None)."""
    if isinstance(image, (str, Path)):
        if str(image).lower().startswith(URL_PREFIXES):
            raise UserError(f"{image}: nothing is downloaded at run time; save the image and pass its path")
        rgb = read_image_rgb(Path(image))
        if rgb is None:
            raise UserError(f"{image}: not a readable image" if Path(image).is_file() else f"{image} does not exist")
        return rgb, str(image)
    if isinstance(image, Image.Image):
        return pil_to_rgb(image), None
    if isinstance(image, np.ndarray):
        return pixels_to_rgb(image), None
    raise TypeError(f"expected a file path, a numpy array or a PIL image, got {type(image).__name__}")
