"""optimizer_step: a step with an inf/NaN gradient is skipped whole, a finite one is taken."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from utils.train.step import BufferSnapshot, optimizer_step


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU(), nn.Conv2d(4, 2, 1))


def backward_with_an_inf_gradient(model: nn.Module, scaler: torch.amp.GradScaler) -> None:
    scaler.scale(model(torch.randn(2, 3, 6, 6)).sum()).backward()
    model[0].weight.grad[0, 0, 0, 0] = float("inf")


@pytest.mark.parametrize("scaler_enabled", [True, False], ids=["GradScaler", "bf16-no-scaler"])
def test_skipped_step_leaves_the_weights_alone(scaler_enabled):
    """An inf/NaN gradient skips the optimizer step: the weights do not move (and the loop, told
    so, leaves the EMA alone: tests/test_hostile_inputs.py counts its updates)."""
    model = small_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=scaler_enabled, init_scale=1024.0)
    backward_with_an_inf_gradient(model, scaler)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert optimizer_step(optimizer, scaler, model) is False
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    if scaler_enabled:
        assert scaler.get_scale() == 512.0  # backed off, as after any skipped fp16 step
    assert all(p.grad is None for p in model.parameters())  # the bad gradients are not carried over


def test_finite_step_is_taken_clipped_and_zeroes_the_gradients():
    model = small_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    (model(torch.randn(2, 3, 6, 6)).sum() * 1e6).backward()  # a gradient far above the clipping norm
    before = [p.clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    assert optimizer_step(optimizer, torch.amp.GradScaler("cpu", enabled=False), model, max_grad_norm=10.0) is True
    moved = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    expected = torch.cat([g.flatten() for g in grads])
    torch.testing.assert_close(moved, expected * 10.0 / expected.norm())  # lr 1: the step is the clipped gradient
    assert all(p.grad is None for p in model.parameters())


def test_buffer_snapshot_undoes_a_forward():
    """A non-finite pass's BatchNorm statistics are put back as they were before it."""
    model = small_net().train()
    snapshot = BufferSnapshot(model)
    snapshot.take()
    before = [b.clone() for b in model.buffers()]
    model(torch.full((2, 3, 6, 6), float("nan")))
    assert not all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    snapshot.restore()
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))


@pytest.mark.parametrize("scaler_enabled", [True, False], ids=["GradScaler", "bf16-no-scaler"])
def test_a_window_with_a_non_finite_loss_skips_its_finite_step(scaler_enabled):
    """finite_loss False (a device flag the loop gathers over a window) skips a step whose
    gradients are finite: the weights stay, the gradients are dropped, and a GradScaler keeps its
    scale (it backs off for its own overflows, not for the loss); True takes the step."""
    model = small_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=scaler_enabled, init_scale=1024.0)
    scaler.scale(model(torch.randn(2, 3, 6, 6)).sum()).backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert optimizer_step(optimizer, scaler, model, finite_loss=torch.tensor(False)) is False
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    if scaler_enabled:
        assert scaler.get_scale() == 1024.0
    scaler.scale(model(torch.randn(2, 3, 6, 6)).sum()).backward()
    assert optimizer_step(optimizer, scaler, model, finite_loss=torch.tensor(True)) is True
    assert not torch.equal(model[0].weight, before["0.weight"])
