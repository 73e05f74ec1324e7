"""Detection confusion matrix: which class a prediction said against what was really there."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_iou


class ConfusionMatrix:
    """matrix[predicted, true] counts over images, with background as the last row and column.

    A prediction (score >= conf_thres) and a ground-truth box are paired when their IoU is at
    least iou_thres, whatever their classes, greedily by IoU, each box at most once (so a wrong
    class lands off the diagonal). Unpaired ground truth counts as predicted 'background' (last
    row); unpaired predictions as true 'background' (last column).
    """

    def __init__(self, num_classes: int, conf_thres: float = 0.25, iou_thres: float = 0.45):
        self.num_classes, self.conf_thres, self.iou_thres = num_classes, conf_thres, iou_thres
        self.matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)

    def add_image(
        self,
        pred_boxes_xyxy: torch.Tensor,
        pred_scores: torch.Tensor,
        pred_classes: torch.Tensor,
        gt_boxes_xyxy: torch.Tensor,
        gt_classes: torch.Tensor,
    ) -> None:
        """One image: predictions (N, 4), (N,), (N,); ground truth (M, 4), (M,); same coordinates."""
        keep = pred_scores >= self.conf_thres
        pred_boxes, pred_classes = pred_boxes_xyxy[keep], pred_classes[keep].long().cpu().numpy()
        gt_classes = gt_classes.long().cpu().numpy()
        background = self.num_classes
        pairs = np.zeros((0, 2), dtype=np.int64)
        if len(pred_boxes) and len(gt_boxes_xyxy):
            iou = box_iou(pred_boxes.double(), gt_boxes_xyxy.double()).cpu().numpy()
            candidates = np.argwhere(iou >= self.iou_thres)
            candidates = candidates[np.argsort(-iou[candidates[:, 0], candidates[:, 1]], kind="stable")]
            used_pred, used_gt, chosen = set(), set(), []
            for p, g in candidates:  # at most one pass over the overlapping pairs of one image
                if p not in used_pred and g not in used_gt:
                    used_pred.add(p)
                    used_gt.add(g)
                    chosen.append((p, g))
            pairs = np.array(chosen, dtype=np.int64).reshape(-1, 2)
        np.add.at(self.matrix, (pred_classes[pairs[:, 0]], gt_classes[pairs[:, 1]]), 1)
        missed_gt = np.setdiff1d(np.arange(len(gt_classes)), pairs[:, 1])
        np.add.at(self.matrix, (background, gt_classes[missed_gt]), 1)
        unmatched_pred = np.setdiff1d(np.arange(len(pred_classes)), pairs[:, 0])
        np.add.at(self.matrix, (pred_classes[unmatched_pred], background), 1)
