"""YOLOv5's detection loss: target assignment by anchor shape, CIoU box loss, objectness and class BCE."""

from __future__ import annotations

import torch
from torch import nn

from models.head import Detect
from utils.boxes import complete_iou
from utils.dist import World

# Objectness weight per level, small strides first (YOLOv5's values for 3 and 5 levels).
LEVEL_BALANCE = {3: [4.0, 1.0, 0.4]}
LEVEL_BALANCE_DEFAULT = [4.0, 1.0, 0.25, 0.06, 0.02]
NEIGHBOUR_MARGIN = 0.5  # a target also claims the adjacent cells its centre is within 0.5 of


class FocalBCE(nn.Module):
    """Focal loss around BCE-with-logits (used when the hyp's fl_gamma > 0), summed like the
    BCE it replaces (DetectionLoss divides the sums by counts over all ranks)."""

    def __init__(self, bce: nn.BCEWithLogitsLoss, gamma: float, alpha: float = 0.25):
        super().__init__()
        self.bce, self.gamma, self.alpha = bce, gamma, alpha
        self.bce.reduction = "none"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.bce(logits, target)
        prob = logits.sigmoid()
        p_t = target * prob + (1 - target) * (1 - prob)
        alpha = target * self.alpha + (1 - target) * (1 - self.alpha)
        return (loss * alpha * (1.0 - p_t) ** self.gamma).sum()


class DetectionLoss:
    """Loss of raw Detect outputs against targets (M, 6) [image, class, cx, cy, w, h] normalised.

    Gains follow YOLOv5: box x 3/nl, cls x nc/80 x 3/nl, obj x (img_size/640)^2 x 3/nl.
    Returns (total loss x batch size, detached [box, obj, cls]).

    Under DistributedDataParallel (`world` of several ranks) the means are over the global batch:
    each rank divides its sums by the positives, cells and images counted on all ranks, and the
    total is multiplied by the world size, which DDP's gradient averaging divides out again. N
    ranks then compute the gradient of one process with the same global batch, and the [box,
    obj, cls] items are this rank's shares, whose sum over the ranks is the global loss.
    """

    names = ("box_loss", "obj_loss", "cls_loss")  # the loss items, as results.csv names them

    def __init__(
        self, head: Detect, hyp: dict, img_size: int, label_smoothing: float = 0.0, world: World | None = None
    ):
        nl, nc = head.nl, head.nc
        device = head.anchors.device
        self.box_gain = hyp["box"] * 3 / nl
        self.cls_gain = hyp["cls"] * nc / 80 * 3 / nl
        self.obj_gain = hyp["obj"] * (img_size / 640) ** 2 * 3 / nl
        self.anchor_t = hyp["anchor_t"]
        self.bce_cls = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([hyp["cls_pw"]], device=device), reduction="sum")
        self.bce_obj = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([hyp["obj_pw"]], device=device), reduction="sum")
        if hyp["fl_gamma"] > 0:
            self.bce_cls, self.bce_obj = (
                FocalBCE(self.bce_cls, hyp["fl_gamma"]),
                FocalBCE(self.bce_obj, hyp["fl_gamma"]),
            )
        self.positive, self.negative = 1.0 - 0.5 * label_smoothing, 0.5 * label_smoothing
        self.balance = LEVEL_BALANCE.get(nl, LEVEL_BALANCE_DEFAULT)
        self.head = head
        self.nc, self.nl, self.na = nc, nl, head.na
        self.world = world or World()

    def __call__(self, raw: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = [p.to(torch.promote_types(p.dtype, torch.float32)) for p in raw]  # float32 under any autocast
        device = raw[0].device
        box_sums, obj_sums, cls_sums, positives, cells = [], [], [], [], []
        assigned = self.assign_targets(raw, targets.to(device, raw[0].dtype))
        for level, (pred, (image, anchor, gy, gx, box, cls, anchor_wh)) in enumerate(zip(raw, assigned)):
            target_obj = torch.zeros(pred.shape[:4], dtype=pred.dtype, device=device)
            box_sum = cls_sum = torch.zeros((), dtype=pred.dtype, device=device)
            if len(image):
                p_xy, p_wh, _, p_cls = pred[image, anchor, gy, gx].split((2, 2, 1, self.nc), dim=1)
                p_xy = p_xy.sigmoid() * 2 - 0.5
                p_wh = (p_wh.sigmoid() * 2) ** 2 * anchor_wh
                p_box = torch.cat((p_xy, p_wh), dim=1)
                ciou = complete_iou(p_box, box)
                box_sum = (1.0 - ciou).sum()
                ciou = ciou.detach().clamp(0)
                target_obj[image, anchor, gy, gx] = ciou  # objectness target: how well the box fits
                if self.nc > 1:
                    target_cls = torch.full_like(p_cls, self.negative)
                    target_cls[torch.arange(len(cls), device=device), cls] = self.positive
                    cls_sum = self.bce_cls(p_cls, target_cls)
            box_sums.append(box_sum)
            cls_sums.append(cls_sum)
            obj_sums.append(self.bce_obj(pred[..., 4], target_obj) * self.balance[level])
            positives.append(len(image))
            cells.append(target_obj.numel())

        # Means over the global batch: counts summed over the ranks (unchanged in one process).
        counts = self.world.sum(torch.tensor([*positives, *cells, raw[0].shape[0]], dtype=torch.float64, device=device))
        positives_all, cells_all, images_all = counts[: self.nl].clamp(min=1), counts[self.nl : -1], counts[-1]
        dtype = raw[0].dtype
        loss_box = (torch.stack(box_sums) / positives_all).sum().to(dtype).reshape(1) * self.box_gain
        loss_obj = (torch.stack(obj_sums) / cells_all).sum().to(dtype).reshape(1) * self.obj_gain
        loss_cls = (torch.stack(cls_sums) / (positives_all * self.nc)).sum().to(dtype).reshape(1) * self.cls_gain
        scale = images_all.to(dtype) * self.world.size  # DDP averages gradients over the ranks
        return (loss_box + loss_obj + loss_cls) * scale, torch.cat((loss_box, loss_obj, loss_cls)).detach()

    def assign_targets(self, raw: list[torch.Tensor], targets: torch.Tensor) -> list[tuple]:
        """Per level: (image, anchor, grid y, grid x) indices of positives, their boxes (cx, cy
        relative to the cell, w, h in cells), classes, and the matched anchor sizes in cells.

        A target goes to every anchor whose width and height ratios to it are within anchor_t,
        in its own cell and in the two neighbouring cells nearest to its centre.
        """
        device = targets.device
        num_targets = targets.shape[0]
        anchor_ids = (
            torch.arange(self.na, device=device, dtype=targets.dtype).view(self.na, 1).expand(self.na, num_targets)
        )
        # (na, nt, 7): image, class, cx, cy, w, h, anchor index
        per_anchor = torch.cat((targets.expand(self.na, num_targets, 6), anchor_ids[..., None]), dim=2)
        offsets = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], device=device, dtype=targets.dtype)
        offsets *= NEIGHBOUR_MARGIN

        assigned = []
        for level, pred in enumerate(raw):
            anchors = self.head.anchors[level].to(device)  # (na, 2) in cells
            grid_h, grid_w = pred.shape[2], pred.shape[3]
            scale = torch.tensor([1, 1, grid_w, grid_h, grid_w, grid_h, 1], device=device, dtype=targets.dtype)
            t = per_anchor * scale  # boxes in grid cells
            if num_targets:
                ratio = t[..., 4:6] / anchors[:, None]
                t = t[torch.max(ratio, 1 / ratio).max(dim=2).values < self.anchor_t]
                xy = t[:, 2:4]
                xy_from_far_edge = torch.tensor([grid_w, grid_h], device=device) - xy
                left, up = ((xy % 1 < NEIGHBOUR_MARGIN) & (xy > 1)).T
                right, down = ((xy_from_far_edge % 1 < NEIGHBOUR_MARGIN) & (xy_from_far_edge > 1)).T
                use = torch.stack((torch.ones_like(left), left, up, right, down))
                t = t.repeat((5, 1, 1))[use]
                shift = (torch.zeros_like(xy)[None] + offsets[:, None])[use]
            else:
                t = per_anchor[0]
                shift = torch.zeros((0, 2), device=device)
            image, cls = t[:, 0].long(), t[:, 1].long()
            xy, wh, anchor = t[:, 2:4], t[:, 4:6], t[:, 6].long()
            cell = (xy - shift).long()
            gx, gy = cell[:, 0].clamp_(0, grid_w - 1), cell[:, 1].clamp_(0, grid_h - 1)
            box = torch.cat((xy - torch.stack((gx, gy), dim=1), wh), dim=1)
            assigned.append((image, anchor, gy, gx, box, cls, anchors[anchor]))
        return assigned
