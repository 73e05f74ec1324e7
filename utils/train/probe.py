"""A copy of a run's model training on synthetic batches, for what is measured before a run:
AutoBatch's memory per batch (utils/train/autobatch.py) and --amp auto's time per step
(utils/train/precision.py). The model itself, its BatchNorm statistics and the random number
generators are untouched."""

from __future__ import annotations

import copy

import torch

from models.yolo import DetectionModel
from utils.device import autocast
from utils.train.criterion import build_criterion
from utils.train.optim import build_optimizer
from utils.train.sync_bn import without_sync_batchnorm

BOXES_PER_IMAGE = 4


class TrainingProbe:
    """Training steps (forward, loss, backward, optimizer step at lr 0) of a copy of `model` in
    `weights_dtype` on `device`, with the run's loss and an optimizer of kind `optimizer`."""

    def __init__(
        self,
        model: DetectionModel,
        hyp: dict,
        *,
        img_size: int,
        device: torch.device,
        weights_dtype: torch.dtype,
        optimizer: str,
    ):
        # a copy on its own: plain BatchNorm (SyncBatchNorm would wait for the other ranks)
        self.model = without_sync_batchnorm(copy.deepcopy(model))
        if self.model.needs_anchor_fit:  # placeholder anchors (AutoAnchor fits them later) serve a timing
            head = self.model.detect_head
            self.model.set_anchors((head.anchors * head.stride.view(-1, 1, 1)).view(head.nl, -1).tolist())
        self.model.to(device, weights_dtype, memory_format=torch.channels_last).train()
        self.optimizer = build_optimizer(self.model, optimizer, lr=0.0, momentum=hyp["momentum"], weight_decay=0.0)
        self.criterion = build_criterion(self.model, hyp, img_size)
        self.scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")  # used for fp16 only
        self.img_size, self.device, self.weights_dtype = img_size, device, weights_dtype
        self.generator = torch.Generator().manual_seed(0)

    def step(self, batch: int, amp_dtype: torch.dtype | None) -> None:
        """One training step on `batch` random images with a few random boxes each."""
        generator, size = self.generator, self.img_size
        images = torch.rand(batch, 3, size, size, generator=generator, dtype=self.weights_dtype)
        images = images.to(self.device, memory_format=torch.channels_last)
        count = batch * BOXES_PER_IMAGE
        boxes = torch.rand(count, 4, generator=generator) * 0.4 + 0.3
        classes = torch.randint(0, int(self.model.nc), (count, 1), generator=generator).float()
        index = torch.arange(batch).repeat_interleave(BOXES_PER_IMAGE).float()[:, None]
        with autocast(self.device, amp_dtype):
            predictions = self.model(images)
        loss, _ = self.criterion(predictions, torch.cat((index, classes, boxes), 1))
        if amp_dtype == torch.float16:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The copy's weights and its optimizer's state (once a step has made it)."""
        state = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return list(self.model.parameters()), state
