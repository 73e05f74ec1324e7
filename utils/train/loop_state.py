"""Where training stands: the loop position and the running totals a resume must continue."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class LoopState:
    """The next epoch and batch to run, and what that epoch has counted so far.

    Saved in every checkpoint, so --resume continues at exactly that batch with the same totals."""

    epoch: int = 0
    batch: int = 0  # next micro-batch of the epoch
    optimizer_steps: int = 0  # steps taken or skipped since the start of training
    window: int = 0  # micro-batches accumulated since the last step (0 in a checkpoint)
    window_images: int = 0  # images in those micro-batches, on this process
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(3))  # the epoch's [box, obj, cls] so far
    skipped_steps: int = 0  # of this epoch, for a non-finite loss or gradient
    bad_streak: int = 0  # skipped steps in a row
    best_fitness: float = 0.0
    best_epoch: int = 0

    def record_step(self, taken: bool) -> None:
        self.optimizer_steps += 1
        self.window = self.window_images = 0
        self.skipped_steps += not taken
        self.bad_streak = 0 if taken else self.bad_streak + 1

    def start_next_epoch(self) -> None:
        self.epoch, self.batch, self.skipped_steps = self.epoch + 1, 0, 0
        self.loss_sum = torch.zeros_like(self.loss_sum)

    def state_dict(self) -> dict:
        return {
            **{f.name: getattr(self, f.name) for f in fields(self)},
            "loss_sum": self.loss_sum.detach().cpu().clone(),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> LoopState:
        """The state a checkpoint recorded; a field it predates takes its default."""
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})
