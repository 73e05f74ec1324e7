"""Filter grafting's rule on hand-made layers: entropy of the weights, the arctan coefficient, the
weighted sum of a layer's whole state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.yolo import build_model
from utils.hyp import load_hyp
from utils.train.grafting import graft, graft_coefficient, grafted_layers, weight_entropy


def test_entropy_of_hand_made_weights():
    spread = torch.arange(10.0)  # one value in each of 10 bins
    assert weight_entropy(spread, bins=10) == pytest.approx(math.log(10))
    assert weight_entropy(torch.tensor([-1.0, -1.0, 1.0, 1.0]), bins=10) == pytest.approx(math.log(2))
    assert weight_entropy(torch.tensor([0.0, 0.0, 0.0, 1.0]), bins=10) == pytest.approx(
        -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    )
    assert weight_entropy(torch.full((3, 3), 0.7), bins=10) == 0.0  # constant: one value, no information


def test_coefficient_is_the_papers_arctan_rule():
    """(A / pi) * arctan(c * (H_own - H_other)) + 0.5: an even mix for equal information, at most
    A / 2 away from it."""
    assert graft_coefficient(1.2, 1.2, a=0.4, c=500) == 0.5
    assert graft_coefficient(1.001, 1.0, a=0.4, c=500) == pytest.approx(0.4 / math.pi * math.atan(0.5) + 0.5)
    assert graft_coefficient(1.0, 1.001, a=0.4, c=500) == pytest.approx(0.5 - 0.4 / math.pi * math.atan(0.5))
    richer = graft_coefficient(math.log(10), 0.0, a=0.4, c=500)
    assert 0.69 < richer < 0.7


def hand_made(weight_values: torch.Tensor, offset: float) -> nn.Sequential:
    """A 1x1 convolution with the given weights and a BatchNorm whose state is all `offset`."""
    model = nn.Sequential(nn.Conv2d(2, 5, 1), nn.BatchNorm2d(5))
    with torch.no_grad():
        model[0].weight.copy_(weight_values.reshape(5, 2, 1, 1))
        model[0].bias.fill_(offset)
        for tensor in (model[1].weight, model[1].bias, model[1].running_mean, model[1].running_var):
            tensor.fill_(offset)
        model[1].num_batches_tracked.fill_(int(offset * 10))
    return model


def test_graft_mixes_each_layers_state_by_its_alpha():
    """The convolution of `own` holds far more information (10 distinct values) than the other's
    (two), so it keeps more of itself; its BatchNorm moves with it by the same alpha, running
    statistics included; integer buffers stay."""
    own = hand_made(torch.arange(10.0), offset=1.0)
    other = hand_made(torch.tensor([0.0, 1.0] * 5), offset=3.0)
    alpha = 0.4 / math.pi * math.atan(500 * (math.log(10) - math.log(2))) + 0.5
    own_conv = own[0].weight.detach().clone()

    assert graft(own, other.state_dict(), a=0.4, c=500, bins=10) == pytest.approx([alpha])
    torch.testing.assert_close(own[0].weight, alpha * own_conv + (1 - alpha) * other[0].weight, rtol=0, atol=1e-6)
    mixed = torch.full((5,), alpha * 1.0 + (1 - alpha) * 3.0)
    for tensor in (own[0].bias, own[1].weight, own[1].bias, own[1].running_mean, own[1].running_var):
        torch.testing.assert_close(tensor, mixed)
    assert int(own[1].num_batches_tracked) == 10

    # The other way round: the poorer layer takes more of the richer one.
    other_conv = other[0].weight.detach().clone()
    assert graft(other, hand_made(torch.arange(10.0), offset=1.0).state_dict(), a=0.4, c=500, bins=10) == (
        pytest.approx([1 - alpha])
    )
    torch.testing.assert_close(other[0].weight, (1 - alpha) * other_conv + alpha * own_conv, rtol=0, atol=1e-6)


def test_every_layer_of_a_detector_is_grafted_once():
    """In YOLOv5n every convolution and BatchNorm is a layer (the blocks around them are not), and
    each convolution has an alpha of its own."""
    model = build_model("yolov5n.yaml", nc=3)
    layers = grafted_layers(model)
    assert len(layers) == sum(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in model.modules())
    grafted_names = {f"{n}.weight" for n, m in model.named_modules() if m in layers}
    assert grafted_names == {k for k, _ in model.named_parameters() if k.endswith("weight")}
    twin = build_model("yolov5n.yaml", nc=3)
    assert len(graft(model, twin.state_dict(), a=0.4, c=500, bins=10)) == sum(
        isinstance(m, nn.Conv2d) for m in model.modules()
    )


def test_constants_come_from_the_hyp():
    hyp = load_hyp(None)
    assert (hyp["graft_a"], hyp["graft_c"], hyp["graft_bins"]) == (0.4, 500.0, 10)
