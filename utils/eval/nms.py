"""Non-maximum suppression of decoded YOLO outputs, through torchvision.ops.batched_nms."""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms

from utils.boxes import xywh_to_xyxy

MAX_BOXES_INTO_NMS = 30000  # per image, highest scores first


def default_iou_threshold(anchor_free: bool, inference: bool = False) -> float:
    """NMS IoU threshold of each family's reference: YOLOv5's 0.6 in val.py and 0.45 in detect.py,
    Ultralytics' 0.7 in both."""
    if anchor_free:
        return 0.7
    return 0.45 if inference else 0.6


def non_max_suppression(
    prediction: torch.Tensor,
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    max_det: int = 300,
    multi_label: bool = False,
    classes: list[int] | None = None,
    agnostic: bool = False,
    objectness: bool = True,
) -> tuple[list[torch.Tensor], int]:
    """Decoded predictions -> per image (n, 6) [x1, y1, x2, y2, score, class].

    With `objectness` (YOLOv5's head) predictions are (B, N, 5 + nc) and score = objectness x
    class probability; without (the anchor-free head) they are (B, N, 4 + nc) and score = class
    probability. With multi_label a box may be kept once per class
    above conf_thres (validation), otherwise only for its best class (inference). Returns the
    detections and how many images had more than MAX_BOXES_INTO_NMS candidates and were cut
    to the best-scoring ones (the caller reports it; no image is ever dropped).
    """
    output, num_truncated = [], 0
    for image_pred in prediction:
        if objectness:
            x = image_pred[image_pred[:, 4] > conf_thres].float()
            scores = x[:, 5:] * x[:, 4:5]
        else:
            x = image_pred[image_pred[:, 4:].amax(1) > conf_thres].float()
            scores = x[:, 4:]
        boxes = xywh_to_xyxy(x[:, :4])
        if multi_label:
            rows, cls = (scores > conf_thres).nonzero(as_tuple=True)
            boxes, conf = boxes[rows], scores[rows, cls]
        else:
            conf, cls = scores.max(dim=1)
            keep = conf > conf_thres
            boxes, conf, cls = boxes[keep], conf[keep], cls[keep]
        if classes is not None:
            keep = torch.isin(cls, torch.tensor(classes, device=cls.device))
            boxes, conf, cls = boxes[keep], conf[keep], cls[keep]
        if conf.numel() > MAX_BOXES_INTO_NMS:
            num_truncated += 1
            top = conf.topk(MAX_BOXES_INTO_NMS).indices
            boxes, conf, cls = boxes[top], conf[top], cls[top]
        keep = batched_nms(boxes, conf, torch.zeros_like(cls) if agnostic else cls, iou_thres)[:max_det]
        output.append(torch.cat((boxes[keep], conf[keep, None], cls[keep, None].float()), dim=1))
    return output, num_truncated
