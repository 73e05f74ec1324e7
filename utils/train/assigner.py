"""Task-aligned assignment (TOOD, Feng et al. 2021) of ground-truth boxes to anchor points.

For every ground-truth box and every anchor point inside it (for this test only, as Ultralytics
8.4 does, box sides shorter than `min_side` are widened to it about the box centre), the alignment is
score^alpha x IoU^beta: the predicted probability of the box's class times the CIoU of the
predicted box with it. Each box takes its top-k anchor points by alignment; a point claimed by
several boxes goes to the one it overlaps most. The class target of a positive point is its
alignment normalised per box so that the box's best point gets that box's best IoU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import box_convert

from utils.boxes import complete_iou_xyxy


@dataclass
class Assignment:
    boxes: torch.Tensor  # (B, A, 4) xyxy of the assigned box, in the units of the inputs
    scores: torch.Tensor  # (B, A, nc) soft class targets, zero for background points
    foreground: torch.Tensor  # (B, A) bool
    gt_index: torch.Tensor  # (B, A) index of the assigned box among the image's boxes


class TaskAlignedAssigner:
    """Assign ground truth to anchor points by task alignment (top-k 10, alpha 0.5, beta 6.0 by default)."""

    def __init__(
        self,
        topk: int = 10,
        alpha: float = 0.5,
        beta: float = 6.0,
        min_side: float = 0.0,
        eps: float = 1e-9,
    ):
        self.topk, self.alpha, self.beta, self.eps = topk, alpha, beta, eps
        self.min_side = min_side

    @torch.no_grad()
    def __call__(
        self,
        scores: torch.Tensor,
        boxes: torch.Tensor,
        points: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_mask: torch.Tensor,
    ) -> Assignment:
        """scores (B, A, nc) probabilities, boxes (B, A, 4) predicted xyxy, points (A, 2) anchor
        points, gt_labels (B, M) long, gt_boxes (B, M, 4) xyxy, gt_mask (B, M) bool (False: padding)."""
        b, a, nc = scores.shape
        m = gt_labels.shape[1]
        if m == 0:
            return Assignment(
                boxes=torch.zeros_like(boxes),
                scores=torch.zeros_like(scores),
                foreground=torch.zeros((b, a), dtype=torch.bool, device=scores.device),
                gt_index=torch.zeros((b, a), dtype=torch.long, device=scores.device),
            )
        # Points strictly inside each box, its short sides widened to min_side: (B, M, A).
        centre_size = box_convert(gt_boxes, "xyxy", "cxcywh")
        centre_size[..., 2:] = centre_size[..., 2:].clamp(min=self.min_side)
        widened = box_convert(centre_size, "cxcywh", "xyxy")
        x1y1, x2y2 = widened[:, :, None, :2], widened[:, :, None, 2:]
        inside = torch.cat((points - x1y1, x2y2 - points), dim=-1).amin(-1) > self.eps
        candidate = inside & gt_mask[:, :, None]

        # Alignment of each (box, point) pair, zero where the point is not a candidate.
        class_score = torch.zeros((b, m, a), dtype=scores.dtype, device=scores.device)
        overlap = torch.zeros((b, m, a), dtype=boxes.dtype, device=boxes.device)
        image, box, point = candidate.nonzero(as_tuple=True)
        class_score[image, box, point] = scores[image, point, gt_labels[image, box]]
        overlap[image, box, point] = (
            complete_iou_xyxy(gt_boxes[image, box], boxes[image, point]).clamp(0).to(overlap.dtype)
        )
        alignment = class_score.pow(self.alpha) * overlap.pow(self.beta)

        # Each box's top-k points by alignment, among its candidates.
        top = alignment.topk(min(self.topk, a), dim=-1).indices
        positive = torch.zeros_like(candidate).scatter_(-1, top, True) & candidate

        # A point claimed by several boxes goes to the box it overlaps most.
        claimed_twice = positive.sum(1, keepdim=True) > 1
        best_box = torch.zeros_like(positive).scatter_(1, overlap.argmax(1, keepdim=True), True)
        positive = torch.where(claimed_twice, best_box, positive)

        foreground = positive.any(1)
        gt_index = positive.float().argmax(1)
        labels = gt_labels.gather(1, gt_index).clamp(min=0)
        assigned_boxes = gt_boxes.gather(1, gt_index[..., None].expand(b, a, 4))

        # Soft class targets: alignment scaled per box so its best point scores the box's best IoU.
        alignment = alignment * positive
        best_alignment = alignment.amax(-1, keepdim=True)
        best_overlap = (overlap * positive).amax(-1, keepdim=True)
        point_weight = (alignment * best_overlap / (best_alignment + self.eps)).amax(1)  # (B, A)
        one_hot = torch.nn.functional.one_hot(labels, nc).to(scores.dtype) * foreground[..., None]
        return Assignment(
            boxes=assigned_boxes,
            scores=one_hot * point_weight[..., None],
            foreground=foreground,
            gt_index=gt_index,
        )
