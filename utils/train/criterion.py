"""The training loss of a model: YOLOv5's for the anchor-based head, the task-aligned one for the anchor-free head."""

from __future__ import annotations

from models.yolo import DetectionModel
from utils.dist import World
from utils.errors import UserError
from utils.train.anchor_free_loss import AnchorFreeLoss
from utils.train.loss import DetectionLoss


def build_criterion(
    model: DetectionModel, hyp: dict, img_size: int, label_smoothing: float = 0.0, world: World | None = None
) -> DetectionLoss | AnchorFreeLoss:
    """The loss for `model`'s head; `.names` are its three items as results.csv names them."""
    if model.needs_anchor_fit:
        raise UserError(
            f"the model YAML gives `anchors: {model.yaml['anchors']}`, a count: the anchors must be fitted to the "
            "training labels (AutoAnchor, at the start of a new train.py run) before the model can be trained"
        )
    if model.anchor_free:
        return AnchorFreeLoss(model.detect_head, hyp, world=world)
    return DetectionLoss(model.detect_head, hyp, img_size, label_smoothing=label_smoothing, world=world)
