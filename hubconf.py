"""torch.hub's entry points, offline: nothing is downloaded. torch.hub's `load` with this repository's
folder, the entry name "custom", path=<a checkpoint or export.py file> and source="local" returns
a Detector (utils/infer/predictor.py), the inference path detect.py runs; the README's Python API
section shows the call.

    results = model(["a.jpg", rgb_array, pil_image])      # one Results per image
    results[0].boxes_xyxy, results[0].scores, results[0].classes, results[0].names
    results[0].save("out/")                                # drawn as detect.py draws
"""

from __future__ import annotations

from utils.infer.predictor import Detector

dependencies = ["torch", "torchvision", "cv2", "numpy", "PIL", "yaml"]  # torch.hub checks these are importable


def custom(path: str, device: str = "", **options) -> Detector:
    """A Detector for a checkpoint (its EMA weights; raw=True for the model weights) or an export
    at `path`. options: imgsz, conf_thres, iou_thres, max_det, classes, agnostic_nms, amp ('auto', 'bf16', 'fp16',
    'off'; default: as the run trained), trust_pickle."""
    return Detector(path, device=device, **options)
