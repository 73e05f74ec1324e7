"""torch.hub entry points, offline:

    model = torch.hub.load("path/to/this/repo", "custom", path="runs/train/exp/weights/best.pt", source="local")
    results = model(["a.jpg", rgb_array, pil_image])      # one Results per image
    results[0].boxes_xyxy, results[0].scores, results[0].classes, results[0].names
    results[0].save("out/")                                # drawn as detect.py draws

`custom` returns a utils.infer.predictor.Detector, the inference path detect.py runs.
"""

from __future__ import annotations

from utils.infer.predictor import Detector

dependencies = ["torch", "torchvision", "cv2", "numpy", "PIL", "yaml"]  # torch.hub checks these are importable


def custom(path: str, device: str = "", **options) -> Detector:
    """A Detector for a checkpoint (its EMA weights; raw=True for the model weights) or an export
    at `path`. options: imgsz, conf_thres, iou_thres, max_det, classes, agnostic_nms, amp, trust_pickle."""
    return Detector(path, device=device, **options)
