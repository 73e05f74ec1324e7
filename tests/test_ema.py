"""ModelEMA against its formula computed directly, and the step-skipping rules around it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from utils.train.ema import ModelEMA, UniformAverage


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU(), nn.Conv2d(4, 2, 1))


def perturb(model: nn.Module, seed: int) -> None:
    """Change parameters and BatchNorm statistics as a training step would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    model.train()(torch.randn(8, 3, 6, 6, generator=generator))  # BN running stats and num_batches_tracked


def test_update_matches_the_formula():
    model = small_net().to(memory_format=torch.channels_last)  # as train.py prepares the model
    ema = ModelEMA(model, decay=0.9999, tau=2000)
    expected = {k: v.clone().double() for k, v in model.state_dict().items()}
    for n in range(1, 6):
        perturb(model, seed=n)
        ema.update(model)
        d = 0.9999 * (1 - math.exp(-n / 2000))  # the counter is incremented before d is computed
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                expected[key] = d * expected[key] + (1 - d) * value.double()
            else:
                expected[key] = value.clone()
        assert ema.updates == n
        assert ema.current_decay() == pytest.approx(d, rel=1e-12)
    ema_state = ema.module.state_dict()
    for key, value in expected.items():
        if value.dtype == torch.float64:
            torch.testing.assert_close(ema_state[key].double(), value, rtol=0, atol=1e-6, msg=key)
        else:  # num_batches_tracked is copied, not averaged
            assert torch.equal(ema_state[key], value), key
    assert any("running_mean" in k for k in expected) and ema_state["1.num_batches_tracked"].item() == 5


def test_ema_module_is_a_frozen_eval_copy():
    model = small_net()
    ema = ModelEMA(model)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(ema.module.parameters(), model.parameters()))


def test_attributes_copied():
    model = small_net()
    model.names, model.nc, model.stride, model.hyp, model.yaml = (
        ["a", "b"],
        2,
        torch.tensor([8.0]),
        {"lr0": 0.01},
        {"nc": 2},
    )
    ema = ModelEMA(model)
    model.names = ["x", "y"]
    ema.copy_attributes(model)
    assert ema.module.names == ["x", "y"] and ema.module.nc == 2 and ema.module.hyp == {"lr0": 0.01}


def test_state_dict_round_trip():
    model = small_net()
    ema = ModelEMA(model, decay=0.999, tau=100)
    for n in range(3):
        perturb(model, n)
        ema.update(model)
    restored = ModelEMA(small_net())
    restored.load_state_dict(ema.state_dict())
    assert (restored.updates, restored.decay, restored.tau) == (3, 0.999, 100)
    for (k, a), b in zip(ema.module.state_dict().items(), restored.module.state_dict().values()):
        assert torch.equal(a, b), k


def test_update_follows_replaced_buffers_and_refuses_another_architecture():
    """The model's tensors are looked up afresh each update: a buffer replaced after the first
    update is the one averaged; a model whose state differs from the copy is refused."""
    model = small_net()
    ema = ModelEMA(model, updates=10_000)
    ema.update(model)
    model[1].running_mean = torch.full((4,), 7.0)  # assignment replaces the buffer object
    ema.update(model)
    d = ema.current_decay()
    assert torch.allclose(ema.module[1].running_mean, torch.zeros(4) * d + 7.0 * (1 - d), atol=1e-6)
    with pytest.raises(ValueError, match="keys differ"):
        ema.update(nn.Sequential(nn.Conv2d(3, 4, 3)))


def test_uniform_average_equals_torch_averaged_model():
    """UniformAverage (SWA's running mean on the EMA machinery) against torch's AveragedModel with
    its default equal-weight average, parameters and BatchNorm statistics alike; integer buffers
    (num_batches_tracked) are the model's latest, as in the EMA."""
    model = small_net()
    reference = torch.optim.swa_utils.AveragedModel(model, use_buffers=True)
    ours = UniformAverage(model)
    for step in range(4):
        perturb(model, seed=step)
        ours.update(model)
        reference.update_parameters(model)
    assert ours.updates == 4
    for (name, expected), actual in zip(reference.module.state_dict().items(), ours.module.state_dict().values()):
        if expected.dtype.is_floating_point:
            torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert torch.equal(actual, model.state_dict()[name]), name
