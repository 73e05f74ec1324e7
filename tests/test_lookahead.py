"""Lookahead: its trajectory against a direct computation, skipped steps, exact resume mid-cycle."""

from __future__ import annotations

import argparse
import io

import pytest
import torch
from torch import nn

import train
from tests.conftest import tiny_train_args
from utils.checkpoint.format import model_from_checkpoint
from utils.errors import UserError
from utils.train.lookahead import Lookahead, LookaheadAction
from utils.train.optim import build_optimizer
from utils.train.step import optimizer_step

TARGET = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
CURVATURE = torch.tensor([1.0, 3.0, 0.2], dtype=torch.float64)


def quadratic_step(model: nn.Linear, optimizer) -> None:
    """One step on 0.5 * sum(c * (w - target)^2), whose gradient is c * (w - target)."""
    loss = 0.5 * (CURVATURE * (model.weight[0] - TARGET) ** 2).sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def linear(start: float = 3.0) -> nn.Linear:
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(start)
    return model


@pytest.mark.parametrize("k, alpha", [(3, 0.5), (5, 0.8), (1, 1.0)])
def test_trajectory_equals_the_direct_computation(k, alpha):
    """SGD with momentum inside Lookahead, step by step against the paper's update written out:
    the inner optimizer (and its momentum) runs on; every k-th step slow += alpha (fast - slow)
    and fast = slow. k=1, alpha=1 is the inner optimizer alone."""
    lr, mu = 0.1, 0.9
    model = linear()
    optimizer = Lookahead(torch.optim.SGD(model.parameters(), lr=lr, momentum=mu), k=k, alpha=alpha)
    fast = torch.full((3,), 3.0, dtype=torch.float64)
    slow, buffer = fast.clone(), torch.zeros(3, dtype=torch.float64)
    for step in range(1, 14):
        quadratic_step(model, optimizer)
        gradient = CURVATURE * (fast - TARGET)
        buffer = gradient if step == 1 else mu * buffer + gradient  # torch's SGD: the first buffer is the gradient
        fast = fast - lr * buffer
        if step % k == 0:
            slow = slow + alpha * (fast - slow)
            fast = slow.clone()
        torch.testing.assert_close(model.weight[0].detach(), fast, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(optimizer.slow[0][0], slow, rtol=1e-12, atol=1e-12)
        assert optimizer.steps == step % k


def test_a_skipped_step_does_not_count():
    """Under GradScaler a step with an inf gradient is skipped: neither the fast weights nor the
    k-cycle move; finite steps are unscaled before the inner optimizer sees them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    optimizer = Lookahead(torch.optim.SGD(model.parameters(), lr=0.01), k=2, alpha=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(8, 4)

    scaler.scale(model(x).sum()).backward()
    model[0].weight.grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    assert optimizer_step(optimizer, scaler, model) is False
    assert optimizer.steps == 0 and all(torch.equal(a, p) for a, p in zip(before, model.parameters()))

    reference = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    reference.load_state_dict(model.state_dict())
    scaler.scale(model(x).mean()).backward()
    reference(x).mean().backward()
    assert torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()]) < 10  # below the clipping
    assert optimizer_step(optimizer, scaler, model) is True
    assert optimizer.steps == 1
    with torch.no_grad():
        for p, r in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, r - 0.01 * r.grad)  # the unscaled gradient, lr 0.01


def test_resume_in_the_middle_of_a_cycle_is_exact():
    """State saved after 4 steps of a 3-cycle (torch.save, weights_only load) and continued for 5
    more equals 9 steps without the break, bit for bit; Adam's moments travel too."""

    def setup():
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(5, 8), nn.SiLU(), nn.Linear(8, 1))
        return model, Lookahead(torch.optim.AdamW(model.parameters(), lr=0.05), k=3, alpha=0.6)

    data = torch.randn(9, 16, 5)

    def train(model, optimizer, batches):
        for x in batches:
            model(x).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    straight_model, straight = setup()
    train(straight_model, straight, data)

    model, optimizer = setup()
    train(model, optimizer, data[:4])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["optimizer"]["lookahead"]["steps"] == 1
    resumed_model, resumed = setup()
    resumed_model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["optimizer"])
    assert resumed.param_groups is resumed.optimizer.param_groups  # a schedule setting lr reaches the inner one
    train(resumed_model, resumed, data[4:])
    for a, b in zip(resumed_model.parameters(), straight_model.parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(resumed.slow, straight.slow)) and resumed.steps == straight.steps


def test_slow_weights_are_lent_to_the_model_and_taken_back():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    optimizer = Lookahead(torch.optim.SGD(model.parameters(), lr=0.5), k=10)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()  # fast != slow, mid-cycle
    fast = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    with optimizer.slow_weights():
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), optimizer.slow))
        assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers))
    assert all(torch.equal(p, f) for p, f in zip(model.parameters(), fast))


def test_a_state_without_lookahead_is_refused():
    model = nn.Linear(2, 1)
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UserError, match="no Lookahead state"):
        Lookahead(torch.optim.SGD(model.parameters(), lr=0.1)).load_state_dict(plain.state_dict())


@pytest.mark.parametrize(
    "argv, expected",
    [([], ()), (["--lookahead"], (5, 0.5)), (["--lookahead", "3"], (3, 0.5)), (["--lookahead", "4", "0.8"], (4, 0.8))],
)
def test_command_line_defaults(argv, expected):
    parser = argparse.ArgumentParser()
    parser.add_argument("--lookahead", nargs="*", action=LookaheadAction, default=())
    assert parser.parse_args(argv).lookahead == expected


@pytest.mark.parametrize("values", [["0"], ["5", "0"], ["5", "1.5"], ["2.5"], ["5", "0.5", "1"]])
def test_bad_settings_are_one_usage_error(values, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--lookahead", *values])
    assert exit_info.value.code == 2
    assert "--lookahead" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["slow", "fast"])
def test_the_ema_folds_in_the_chosen_weights(tiny_dataset, tmp_path, source):
    """A cycle longer than the run: the slow weights stay the initial ones. The EMA of the slow
    weights then never moves from them (its parameters equal the slow weights bit for bit, the
    model having trained away); the EMA of the fast weights follows the model."""
    args = tiny_train_args(tiny_dataset, tmp_path, "--epochs", "1", "--lookahead", "1000", "--lookahead-ema", source)
    assert train.main(args) == 0
    last = torch.load(tmp_path / "exp" / "weights" / "last.pt", weights_only=True)
    assert last["optimizer"]["lookahead"]["steps"] == last["updates"] > 0  # no synchronisation yet
    model = model_from_checkpoint(last, "model")
    names = {id(p): n for n, p in model.named_parameters()}
    in_order = [names[id(p)] for g in build_optimizer(model, "SGD", 0.1, 0.9, 0.0).param_groups for p in g["params"]]
    slow = dict(zip(in_order, last["optimizer"]["lookahead"]["slow"], strict=True))
    at_slow = [torch.equal(last["ema"][k], slow[k]) for k in in_order]
    moved = [not torch.equal(last["model"][k], slow[k]) for k in in_order]
    assert any(moved)
    assert all(at_slow) if source == "slow" else not any(a for a, m in zip(at_slow, moved) if m)
