"""Loss of the anchor-free head (YOLOv8/YOLO11): task-aligned assignment, class BCE against the
alignment targets, CIoU and distribution focal loss (Li et al. 2020, Generalized Focal Loss) on
the positive points, all normalised by the sum of the class targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert

from models.anchor_free_head import AnchorFreeDetect, distances_to_boxes, expected_distances
from utils.boxes import complete_iou_xyxy
from utils.dist import World
from utils.train.assigner import TaskAlignedAssigner


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, reg_max) bin logits against (N,) continuous targets in [0, reg_max - 1): cross-entropy
    to the two bins around the target, weighted by closeness (GFL's DFL) -> (N,)."""
    left = target.long()
    right_weight = target - left
    return (
        F.cross_entropy(logits, left, reduction="none") * (1 - right_weight)
        + F.cross_entropy(logits, left + 1, reduction="none") * right_weight
    )


def pad_targets(
    targets: torch.Tensor, batch_size: int, width: float, height: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M, 6) [image, class, cx, cy, w, h] normalised -> per image, in input order: labels (B, K)
    long, xyxy boxes in pixels (B, K, 4) and a mask (B, K) of real boxes (K = most boxes in one image)."""
    device = targets.device
    image = targets[:, 0].long()
    counts = torch.bincount(image, minlength=batch_size)
    k = int(counts.max()) if len(targets) else 0
    labels = torch.zeros((batch_size, k), dtype=torch.long, device=device)
    boxes = torch.zeros((batch_size, k, 4), dtype=targets.dtype, device=device)
    mask = torch.zeros((batch_size, k), dtype=torch.bool, device=device)
    if k:
        order = torch.argsort(image, stable=True)
        image = image[order]
        slot = torch.arange(len(image), device=device) - (torch.cumsum(counts, 0) - counts)[image]
        scale = torch.tensor([width, height, width, height], dtype=targets.dtype, device=device)
        labels[image, slot] = targets[order, 1].long()
        boxes[image, slot] = box_convert(targets[order, 2:6] * scale, "cxcywh", "xyxy")
        mask[image, slot] = True
    return labels, boxes, mask


class AnchorFreeLoss:
    """Loss of raw AnchorFreeDetect outputs against targets (M, 6) [image, class, cx, cy, w, h] normalised.

    Returns (total loss x batch size, detached [box, cls, dfl]), gains box/cls/dfl from the hyp.
    Under DistributedDataParallel the normaliser (the sum of the class targets) and the batch
    size are summed over the ranks and the total multiplied by the world size, so N ranks
    compute the gradient of one process with the same global batch (as DetectionLoss does for
    YOLOv5's loss).
    """

    names = ("box_loss", "cls_loss", "dfl_loss")  # the loss items, as results.csv names them

    def __init__(self, head: AnchorFreeDetect, hyp: dict, world: World | None = None):
        self.head = head
        self.nc, self.reg_max = head.nc, head.reg_max
        self.gains = (hyp["box"], hyp["cls"], hyp["dfl"])
        # Boxes narrower than the second level's stride are widened to it for the inside test (Ultralytics 8.4).
        min_side = float(head.stride[1] if head.nl > 1 else head.stride[0])
        self.assigner = TaskAlignedAssigner(topk=10, alpha=0.5, beta=6.0, min_side=min_side)
        self.world = world or World()

    def __call__(self, raw: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = [p.to(torch.promote_types(p.dtype, torch.float32)) for p in raw]  # fp16/bf16 outputs upcast
        b, dtype, device = raw[0].shape[0], raw[0].dtype, raw[0].device
        flat = torch.cat([p.view(b, self.head.no, -1) for p in raw], dim=2).transpose(1, 2)  # (B, A, no)
        box_logits, cls_logits = flat.split((4 * self.reg_max, self.nc), dim=2)
        points, strides = self.head.anchor_points([p.shape[2:] for p in raw], device)  # grid cells, pixels
        height, width = raw[0].shape[2] * self.head.stride[0].item(), raw[0].shape[3] * self.head.stride[0].item()
        gt_labels, gt_boxes, gt_mask = pad_targets(targets.to(device, dtype), b, width, height)

        bins = torch.arange(self.reg_max, device=device, dtype=dtype)
        distances = expected_distances(box_logits.view(b, -1, 4, self.reg_max), bins)  # (B, A, 4) in grid cells
        pred_boxes = distances_to_boxes(distances, points, xywh=False)
        assigned = self.assigner(
            cls_logits.detach().sigmoid(),
            pred_boxes.detach() * strides,
            points * strides,
            gt_labels,
            gt_boxes,
            gt_mask,
        )
        score_sum = self.world.sum(assigned.scores.sum().reshape(1)).clamp(min=1)
        loss_cls = F.binary_cross_entropy_with_logits(cls_logits, assigned.scores, reduction="sum") / score_sum
        loss_box = loss_dfl = torch.zeros(1, dtype=dtype, device=device)
        fg = assigned.foreground
        if fg.any():
            weight = assigned.scores.sum(-1)[fg]
            target_boxes = assigned.boxes / strides  # grid cells of each point's level
            ciou = complete_iou_xyxy(pred_boxes[fg], target_boxes[fg])
            loss_box = ((1.0 - ciou) * weight).sum() / score_sum
            point_xy = points.expand(b, -1, -1)[fg]
            x1y1, x2y2 = target_boxes[fg].chunk(2, dim=-1)
            target_distances = torch.cat((point_xy - x1y1, x2y2 - point_xy), dim=-1).clamp(0, self.reg_max - 1.01)
            dfl = distribution_focal_loss(box_logits[fg].reshape(-1, self.reg_max), target_distances.reshape(-1))
            loss_dfl = (dfl.view(-1, 4).mean(-1) * weight).sum() / score_sum
        items = torch.cat(
            [(loss * gain).reshape(1) for loss, gain in zip((loss_box, loss_cls.reshape(1), loss_dfl), self.gains)]
        )
        # The global batch's images (this rank's alone in one process), times the ranks DDP averages over.
        images = self.world.sum(torch.tensor([float(b)], dtype=torch.float64, device=device)).to(dtype)
        return items.sum() * images * self.world.size, items.detach()
