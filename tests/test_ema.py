"""The running averages (ModelEMA, the image-horizon EMA, the power EMA, SWA's uniform average)
against their formulas computed directly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from utils.errors import UserError
from utils.train.ema import (
    ImageEMA,
    ModelEMA,
    PowerEMA,
    UniformAverage,
    build_average,
    check_average_name,
    power_exponent,
    tracked_names,
)


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


def test_tensorflow_warmup_matches_its_formula():
    """hyp ema_warmup: tensorflow, TensorFlow's ExponentialMovingAverage(decay, num_updates):
    d = min(decay, (1 + n) / (10 + n)) at the n-th update, the cap reached after ~90,000 steps at 0.9999."""
    model = small_net()
    ema = build_average("ema-steps", model, {"ema_decay": 0.9999, "ema_tau": 2000.0, "ema_warmup": "tensorflow"})
    expected = {k: v.clone().double() for k, v in model.state_dict().items() if v.dtype.is_floating_point}
    for n in range(1, 6):
        perturb(model, seed=n)
        ema.update(model)
        d = (1 + n) / (10 + n)
        assert ema.current_decay() == pytest.approx(d, rel=1e-15)
        for key in expected:
            expected[key] = d * expected[key] + (1 - d) * model.state_dict()[key].double()
    for key, value in expected.items():
        torch.testing.assert_close(ema.module.state_dict()[key].double(), value, rtol=0, atol=1e-6, msg=key)
    assert ema.decay_after(10**6) == 0.9999 and ema.decay_after(89_990) == pytest.approx(89_991 / 90_000)
    # YOLOv5's ramp is still the default, also for a checkpoint's hyp written before ema_warmup existed
    default = build_average("ema-steps", small_net(), {"ema_decay": 0.9999, "ema_tau": 2000.0})
    assert default.decay_after(1) == pytest.approx(0.9999 * (1 - math.exp(-1 / 2000)))


def test_a_state_saved_before_the_warmup_setting_loads_as_yolov5s_ramp():
    model = small_net()
    old_state = {k: v for k, v in ModelEMA(model).state_dict().items() if k != "warmup"}
    restored = ModelEMA(small_net())
    restored.load_state_dict(old_state)
    assert restored.warmup == "exponential"
    tensorflow = ModelEMA(model, warmup="tensorflow")
    restored.load_state_dict(tensorflow.state_dict())
    assert restored.warmup == "tensorflow"
    with pytest.raises(ValueError, match="warmup must be one of"):
        ModelEMA(model, warmup="linear")


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


class Marker(nn.Module):
    """One float64 weight per optimizer step: before step k the weights are the k-th unit vector,
    so an average of the weights is the vector of the weights it gives each step."""

    def __init__(self, steps: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(steps, dtype=torch.float64), requires_grad=False)

    def set_step(self, k: int) -> None:
        self.w.zero_()
        self.w[k] = 1.0


def step_weights(average_factory, images_per_step: list[int]) -> np.ndarray:
    """The weight the average gives each step's model, after the steps of `images_per_step`."""
    model = Marker(len(images_per_step))
    average = average_factory(model)
    for k, images in enumerate(images_per_step):
        model.set_step(k)
        average.update(model, images)
    return average.module.w.numpy().copy()


def weight_per_image(weights: np.ndarray, images_per_step: list[int]) -> np.ndarray:
    """Each image's share: its step's weight spread over the step's images."""
    return np.repeat(weights / np.array(images_per_step), images_per_step)


def test_image_ema_matches_its_formula():
    model = small_net()
    ema = ImageEMA(model, half_life=1000.0, ramp=0.05)
    expected = {k: v.clone().double() for k, v in model.state_dict().items() if v.dtype.is_floating_point}
    seen = 0
    for n, images in enumerate((64, 64, 32, 64, 10_000, 64), start=1):
        perturb(model, seed=n)
        ema.update(model, images)
        seen += images
        d = 0.5 ** (images / min(1000.0, 0.05 * seen))
        for key, value in expected.items():
            expected[key] = d * value + (1 - d) * model.state_dict()[key].double()
        assert ema.current_decay(images) == pytest.approx(d, rel=1e-12) and ema.images == seen
    for key, value in expected.items():
        torch.testing.assert_close(ema.module.state_dict()[key].double(), value, rtol=0, atol=1e-6, msg=key)
    with pytest.raises(ValueError, match="number of images"):
        ema.update(model)


def test_image_ema_gives_each_image_the_same_weight_at_any_batch():
    """64 against 128 images per optimizer step (--batch-size 64 and 128, or 64 per process on 2
    processes: train.py counts a step's images over all ranks): block by block of 128 images, the
    image-horizon EMA weighs the images seen alike, where YOLOv5's step ramp does not."""
    total = 64 * 400
    small, large = [64] * (total // 64), [128] * (total // 128)

    def compare(factory) -> tuple[float, float]:
        """Total variation between the two weightings, block by block of 128 images, and the ratio
        of their mean image ages (images seen after an image: the average's horizon)."""
        a, b = (weight_per_image(step_weights(factory, steps), steps) for steps in (small, large))
        variation = 0.5 * np.abs(a.reshape(-1, 128).sum(axis=1) - b.reshape(-1, 128).sum(axis=1)).sum()
        ages = np.arange(total)[::-1] + 0.5
        age_a, age_b = (a * ages).sum(), (b * ages).sum()
        return variation, max(age_a, age_b) / min(age_a, age_b)

    image_ema = compare(lambda m: ImageEMA(m, half_life=443000.0, ramp=0.05))
    step_ema = compare(lambda m: ModelEMA(m, decay=0.9999, tau=2000))
    print(f"64 vs 128 images per step (variation, horizon ratio): image EMA {image_ema}, step ramp {step_ema}")
    assert image_ema[0] < 0.005 and image_ema[1] < 1.005  # measured 0.0005 and 1.002
    assert step_ema[0] > 0.05 and step_ema[1] > 1.5  # measured 0.062 and 1.68
    for images_per_step in (small, large):  # every average's weights sum to 1
        assert step_weights(lambda m: ImageEMA(m, 443000.0, 0.05), images_per_step).sum() == pytest.approx(1.0)


@pytest.mark.parametrize("sigma_rel, gamma", [(0.05, 16.97), (0.10, 6.94)])
def test_power_exponent_matches_the_paper(sigma_rel, gamma):
    """Karras et al. 2024 (section 3.1) give gamma 16.97 and 6.94 for sigma_rel 0.05 and 0.10."""
    assert power_exponent(sigma_rel) == pytest.approx(gamma, abs=0.005)
    g = power_exponent(sigma_rel)
    assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(sigma_rel, rel=1e-12)


def test_power_ema_weighs_steps_by_its_profile():
    """After t steps the power EMA weighs step k by (k^(g+1) - (k-1)^(g+1)) / t^(g+1)."""
    steps = 300
    gamma = power_exponent(0.07)
    weights = step_weights(lambda m: PowerEMA(m, 0.07), [16] * steps)
    k = np.arange(1, steps + 1, dtype=np.float64)
    np.testing.assert_allclose(weights, (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / steps ** (gamma + 1), rtol=1e-9)


def test_average_names():
    assert check_average_name("power-0.050") == "power-0.05"
    assert check_average_name("ema-images") == "ema-images"
    for bad in ("power-x", "ema", "swa"):
        with pytest.raises(UserError, match="unknown average"):
            check_average_name(bad)
    with pytest.raises(UserError, match=r"average 'power-0.5': a power EMA's relative width must be in \(0, 0.2887\)"):
        check_average_name("power-0.5")
    assert tracked_names(("ema-steps",), ("raw", "power-0.07"), posthoc=True) == (
        "ema-steps",
        "power-0.07",
        "power-0.05",
        "power-0.1",
    )


@pytest.mark.parametrize(
    "factory",
    [
        lambda m: ImageEMA(m, 500.0, 0.05),
        lambda m: PowerEMA(m, 0.1),
        lambda m: ModelEMA(m),
        lambda m: ModelEMA(m, warmup="tensorflow"),
    ],
)
def test_every_average_round_trips_its_state(factory):
    model = small_net()
    average = factory(model)
    for n in range(3):
        perturb(model, n)
        average.update(model, 64)
    restored = factory(small_net())
    restored.load_state_dict(average.state_dict())
    assert {k: v for k, v in restored.state_dict().items() if k != "module"} == {
        k: v for k, v in average.state_dict().items() if k != "module"
    }
    perturb(model, 9)
    average.update(model, 64)
    restored.update(model, 64)
    for (k, a), b in zip(average.module.state_dict().items(), restored.module.state_dict().values()):
        assert torch.equal(a, b), k
