"""average.py against a hand-computed weighted average, its refusals, and BatchNorm recalibration
against statistics computed directly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

import average
import detect
import val
from models.parse import read_model_yaml
from models.yolo import DetectionModel
from utils.checkpoint.format import FORMAT, FORMAT_VERSION, model_from_checkpoint, trained_amp
from utils.config_files import resolve_config_path
from utils.data.config import load_dataset_config
from utils.data.dataset import Batch
from utils.data.loader import build_dataloader, build_train_dataset, build_val_loader, mosaic_pool_of
from utils.data.synthetic_shapes import CLASS_NAMES
from utils.device import autocast, to_model_input
from utils.errors import UserError
from utils.hyp import load_hyp
from utils.precision import inference_precision
from utils.train.averaging import recalibrate_batchnorm


def write_checkpoint(path: Path, seed: int, nc: int = len(CLASS_NAMES), dtype: torch.dtype = torch.float32) -> dict:
    """A checkpoint of our format holding a yolov5n with random weights and BatchNorm statistics
    (float64 ones as train.py --float64 writes)."""
    torch.manual_seed(seed)
    model = DetectionModel(read_model_yaml(resolve_config_path("yolov5n.yaml", "models")), nc=nc).to(dtype)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.dtype.is_floating_point and "anchors" not in name:
                tensor.copy_(torch.rand_like(tensor) + 0.5 if "running_var" in name else torch.randn_like(tensor) * 0.1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "epoch": seed,
        "model_yaml": model.yaml,
        "names": list(CLASS_NAMES)[:nc],
        "hyp": load_hyp("scratch-low.yaml"),
        "opt": {"imgsz": 64, "batch_size": 4},
        "ema": state,
        "model": {k: v + 1.0 if v.dtype.is_floating_point else v for k, v in state.items()},
        "updates": 10 * seed,
        "ema_decay": 0.9999,
        "ema_tau": 2000.0,
    }
    torch.save(checkpoint, path)
    return checkpoint


def recalibrate_args(weights, data: Path, out: Path) -> list[str]:
    """average.py's arguments to average `weights` into `out` with BatchNorm recomputed on `data`."""
    return [
        "--weights",
        *map(str, weights),
        "--data",
        str(data),
        "--recalibrate-bn",
        "--workers",
        "0",
        "--out",
        str(out),
    ]


@pytest.fixture
def three_checkpoints(tmp_path) -> list[Path]:
    paths = [tmp_path / f"{name}.pt" for name in "abc"]
    for seed, path in enumerate(paths, start=1):
        write_checkpoint(path, seed)
    return paths


@pytest.mark.parametrize("source", ["ema", "model"])
def test_weighted_average_equals_hand_computation(three_checkpoints, tmp_path, source):
    out = tmp_path / "avg.pt"
    assert (
        average.main(
            [
                "--weights",
                *map(str, three_checkpoints),
                "--coef",
                "0.5",
                "0.3",
                "0.2",
                "--source",
                source,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = torch.load(out, weights_only=True)
    inputs = [torch.load(p, weights_only=True)[source] for p in three_checkpoints]
    for name, tensor in result["ema"].items():
        if tensor.dtype.is_floating_point:
            expected = 0.5 * inputs[0][name].double() + 0.3 * inputs[1][name].double() + 0.2 * inputs[2][name].double()
            assert (tensor.double() - expected).abs().max() < 1e-6, name
        else:
            assert torch.equal(tensor, inputs[0][name]), name
    assert result["averaged"]["coefficients"] == [0.5, 0.3, 0.2] and result["finished"]


def test_uniform_by_default(three_checkpoints, tmp_path):
    out = tmp_path / "avg.pt"
    average.main(["--weights", *map(str, three_checkpoints[:2]), "--out", str(out)])
    a, b = (torch.load(p, weights_only=True)["ema"] for p in three_checkpoints[:2])
    key = "model.0.conv.weight"
    torch.testing.assert_close(torch.load(out, weights_only=True)["ema"][key], (a[key] + b[key]) / 2)


@pytest.mark.parametrize(
    "coef, message",
    [
        (["0.5", "0.6", "0.2"], r"--coef must sum to 1 \(an average\), but 0.5 \+ 0.6 \+ 0.2 = 1.3"),
        (["0.5", "0.5"], "--coef gives 2 coefficients for 3 checkpoints"),
        (["nan", "0.5", "0.5"], "--coef nan 0.5 0.5: coefficients of an average are finite and not negative"),
        (["2", "-0.5", "-0.5"], "--coef 2 -0.5 -0.5: coefficients of an average are finite and not negative"),
    ],
)
def test_bad_coefficients_are_refused(three_checkpoints, tmp_path, coef, message):
    with pytest.raises(UserError, match=message):
        average.main(["--weights", *map(str, three_checkpoints), "--coef", *coef, "--out", str(tmp_path / "x.pt")])
    assert not (tmp_path / "x.pt").exists()


def test_incompatible_checkpoints_are_refused_naming_the_tensor(three_checkpoints, tmp_path):
    other = tmp_path / "two_classes.pt"
    write_checkpoint(other, seed=9, nc=2)  # another class count: the Detect head's shapes differ
    with pytest.raises(
        UserError,
        match=r"two_classes.pt does not fit .*a.pt: its tensor 'model.24.m.0.weight' "
        r"has shape \(21, 64, 1, 1\), not \(33, 64, 1, 1\)",
    ):
        average.main(["--weights", str(three_checkpoints[0]), str(other), "--out", str(tmp_path / "x.pt")])
    assert not (tmp_path / "x.pt").exists()


def test_no_strict_keeps_mismatched_tensors_from_the_first_and_lists_them(three_checkpoints, tmp_path, capsys):
    other = tmp_path / "two_classes.pt"
    write_checkpoint(other, seed=9, nc=2)
    out = tmp_path / "avg.pt"
    average.main(["--weights", str(three_checkpoints[0]), str(other), "--no-strict", "--out", str(out)])
    result = torch.load(out, weights_only=True)
    first, second = (torch.load(p, weights_only=True)["ema"] for p in (three_checkpoints[0], other))
    kept = result["averaged"]["kept_from_first"]
    assert kept == [f"model.24.m.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    assert all(torch.equal(result["ema"][k], first[k]) for k in kept)
    torch.testing.assert_close(
        result["ema"]["model.0.conv.weight"], (first["model.0.conv.weight"] + second["model.0.conv.weight"]) / 2
    )
    assert "6 tensor(s) differ between the checkpoints and were kept from" in capsys.readouterr().out
    # What the file says it holds (val.py prints it) is not a plain average of the inputs.
    assert result["source"].endswith(f"; 6 tensor(s) that differ between them taken from {three_checkpoints[0]} alone")


def test_val_and_detect_read_the_average(three_checkpoints, tmp_path, tiny_dataset, capsys):
    out = tmp_path / "avg.pt"
    average.main(["--weights", *map(str, three_checkpoints), "--out", str(out)])
    assert val.main(["--weights", str(out), "--data", str(tiny_dataset), "--no-plots", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "average of ema weights: " + ", ".join(f"{p} x 0.333333" for p in three_checkpoints) in printed
    images = tiny_dataset.parent / "shapes" / "images" / "val"
    assert detect.main(["--weights", str(out), "--source", str(images), "--nosave", "--project", str(tmp_path)]) == 0


def test_batchnorm_recalibration_gives_the_statistics_of_the_data():
    """update_bn through recalibrate_batchnorm: running mean and variance become the plain average
    over the batches of each batch's mean and unbiased variance of the BatchNorm's input."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, bias=False)
    model = nn.Sequential(conv, nn.BatchNorm2d(4, momentum=0.03), nn.SiLU()).eval()
    generator = torch.Generator().manual_seed(1)
    batches = [
        Batch(
            torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=generator),
            torch.zeros(0, 6),
            torch.arange(n),
            torch.zeros(n, 4),
        )
        for n in (4, 4, 2)
    ]
    seen = recalibrate_batchnorm(model, batches, torch.device("cpu"), amp_dtype=None)
    with torch.no_grad():
        outputs = [conv(b.images.float() / 255) for b in batches]
    means = torch.stack([o.mean(dim=(0, 2, 3)) for o in outputs]).mean(0)
    variances = torch.stack([o.var(dim=(0, 2, 3), unbiased=True) for o in outputs]).mean(0)
    torch.testing.assert_close(model[1].running_mean, means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, variances, rtol=1e-5, atol=1e-6)
    assert seen == 10 and model[1].momentum == 0.03 and not model.training


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "float64"])
def test_recalibrated_average_keeps_the_averaged_weights_and_recomputes_batchnorm(tmp_path, tiny_dataset, dtype):
    """--recalibrate-bn: every parameter is the plain average, every BatchNorm's statistics are
    recomputed on the training images, in the checkpoints' dtype; val.py reads the result."""
    paths = [tmp_path / f"{name}.pt" for name in "ab"]
    for seed, path in enumerate(paths, start=1):
        write_checkpoint(path, seed, dtype=dtype)
    plain, recalibrated = tmp_path / "plain.pt", tmp_path / "recalibrated.pt"
    average.main(["--weights", *map(str, paths), "--out", str(plain)])
    average.main(recalibrate_args(paths, tiny_dataset, recalibrated))
    plain_state, result = torch.load(plain, weights_only=True), torch.load(recalibrated, weights_only=True)
    assert "BatchNorm statistics recomputed on 16 augmented training images" in result["source"]
    for name, tensor in result["ema"].items():
        assert tensor.dtype == plain_state["ema"][name].dtype
        if "running_" in name:
            assert not torch.allclose(tensor, plain_state["ema"][name]), name
        elif tensor.dtype.is_floating_point:
            assert torch.equal(tensor, plain_state["ema"][name]), name
    assert val.main(["--weights", str(recalibrated), "--data", str(tiny_dataset), "--no-plots", "--workers", "0"]) == 0


def test_recalibration_uses_the_augmented_batches_of_the_newest_checkpoints_epoch(tmp_path, tiny_dataset):
    """The statistics equal torch's update_bn over the training loader as it augmented the newest
    input's epoch, in the run's batch, and are far from those of the plain letterboxed images."""
    paths = [tmp_path / f"{name}.pt" for name in "ab"]
    for seed, path in enumerate(paths, start=1):  # epochs 1 and 2
        write_checkpoint(path, seed)
    out = tmp_path / "recalibrated.pt"
    average.main(recalibrate_args(paths, tiny_dataset, out))
    result = torch.load(out, weights_only=True)
    device, data = torch.device("cpu"), load_dataset_config(tiny_dataset)

    def statistics_over(batches) -> dict[str, torch.Tensor]:
        model = model_from_checkpoint(result, "ema").to(memory_format=torch.channels_last)
        with autocast(device, inference_precision(trained_amp(result), model, device, batch=4, img_size=64).dtype):
            update_bn((to_model_input(b.images, device) for b in batches), model)
        return {k: v for k, v in model.state_dict().items() if "running_" in k}

    expected = statistics_over(last_epoch_order(data, result["hyp"]))
    plain = statistics_over(
        build_val_loader(data.train, data.nc, img_size=64, batch_size=4, workers=0, hyp=result["hyp"], stride=32)
    )
    far = 0
    for name, tensor in expected.items():
        torch.testing.assert_close(result["ema"][name], tensor, rtol=1e-4, atol=1e-6, msg=name)
        far += not torch.allclose(result["ema"][name], plain[name], rtol=1e-2)
    assert far > len(expected) // 2, f"only {far} of {len(expected)} statistics differ from the plain images'"


def last_epoch_order(data, hyp: dict):
    """The tiny run's training batches of 4 in the seeded, augmented order of its last epoch (2 of 3)."""
    loader = build_dataloader(
        build_train_dataset(data, hyp, img_size=64, seed=0, single_cls=False, cache="off", epochs=3),
        batch_size=4,
        workers=0,
        shuffle=True,
        mosaic_pool=mosaic_pool_of(hyp),
    )
    loader.sampler.set_epoch(2)
    return loader


def test_bn_images_recalibrates_on_the_first_batches_of_the_seeded_order(tmp_path, tiny_dataset):
    """--bn-images N: the statistics equal torch's update_bn over the first batches (of the run's
    4 images) of the epoch's seeded order holding N images, the same on a second run; they differ
    from those of the whole split. A negative N is refused."""
    paths = [tmp_path / f"{name}.pt" for name in "ab"]
    for seed, path in enumerate(paths, start=1):  # epochs 1 and 2
        write_checkpoint(path, seed)
    capped, again, whole = tmp_path / "capped.pt", tmp_path / "again.pt", tmp_path / "whole.pt"
    average.main([*recalibrate_args(paths, tiny_dataset, capped), "--bn-images", "6"])
    average.main([*recalibrate_args(paths, tiny_dataset, again), "--bn-images", "6"])
    average.main([*recalibrate_args(paths, tiny_dataset, whole), "--bn-images", "0"])
    result, repeated, full = (torch.load(p, weights_only=True) for p in (capped, again, whole))
    assert "BatchNorm statistics recomputed on 8 augmented training images" in result["source"]
    assert "BatchNorm statistics recomputed on 16 augmented training images" in full["source"]
    data, device = load_dataset_config(tiny_dataset), torch.device("cpu")
    loader = last_epoch_order(data, result["hyp"])
    model = model_from_checkpoint(result, "ema").to(memory_format=torch.channels_last)
    first_two = [batch for _, batch in zip(range(2), loader)]
    with autocast(device, inference_precision(trained_amp(result), model, device, batch=4, img_size=64).dtype):
        update_bn((to_model_input(b.images, device) for b in first_two), model)
    statistics = [k for k in result["ema"] if "running_" in k]
    for name in statistics:
        torch.testing.assert_close(result["ema"][name], model.state_dict()[name], rtol=1e-4, atol=1e-6, msg=name)
        assert torch.equal(result["ema"][name], repeated["ema"][name]), name
    assert (
        sum(not torch.allclose(result["ema"][n], full["ema"][n], rtol=1e-3) for n in statistics) > len(statistics) // 2
    )
    with pytest.raises(UserError, match="--bn-images -1: a number of images"):
        average.main([*recalibrate_args(paths, tiny_dataset, tmp_path / "x.pt"), "--bn-images", "-1"])


def test_a_checkpoint_with_non_finite_weights_is_refused_by_name(three_checkpoints, tmp_path):
    broken = torch.load(three_checkpoints[1], weights_only=True)
    broken["ema"]["model.0.conv.weight"][0, 0, 0, 0] = float("nan")
    torch.save(broken, three_checkpoints[1])
    with pytest.raises(
        UserError,
        match=r"b.pt: its 'ema' weights hold NaN or inf in 'model.0.conv.weight'; leave it "
        "out of the average",
    ):
        average.main(["--weights", *map(str, three_checkpoints), "--out", str(tmp_path / "x.pt")])
    assert not (tmp_path / "x.pt").exists()


def test_an_input_is_never_overwritten_and_a_new_folder_is_made(three_checkpoints, tmp_path):
    before = three_checkpoints[0].read_bytes()
    with pytest.raises(UserError, match="a.pt is one of the --weights: write the average to a new file"):
        average.main(["--weights", *map(str, three_checkpoints), "--out", str(three_checkpoints[0])])
    assert three_checkpoints[0].read_bytes() == before
    out = tmp_path / "new" / "folder" / "avg.pt"
    assert average.main(["--weights", *map(str, three_checkpoints), "--out", str(out)]) == 0 and out.is_file()


def test_recalibration_options_without_recalibrate_bn_are_named(three_checkpoints, tmp_path, capsys):
    average.main(
        [
            "--weights",
            *map(str, three_checkpoints[:2]),
            "--data",
            "x.yaml",
            "--workers",
            "0",
            "--out",
            str(tmp_path / "avg.pt"),
        ]
    )
    assert "--recalibrate-bn was not given, so --data, --workers went unused" in capsys.readouterr().out


def test_a_yolov5_pickle_is_refused_without_suggesting_an_option_average_lacks(three_checkpoints, tmp_path):
    pickled = tmp_path / "yolov5s.pt"
    torch.save({"model": nn.Conv2d(1, 1, 1)}, pickled)
    with pytest.raises(UserError, match="full unpickling") as refused:
        average.main(["--weights", str(three_checkpoints[0]), str(pickled), "--out", str(tmp_path / "x.pt")])
    assert "add --trust-pickle" not in str(refused.value)


def test_the_class_count_error_names_the_count_it_compared(three_checkpoints, tmp_path, tiny_dataset):
    """Checkpoints of a --single-cls run are compared with 1 class, and the message says so."""
    for path in three_checkpoints:
        checkpoint = torch.load(path, weights_only=True)
        torch.save({**checkpoint, "opt": {**checkpoint["opt"], "single_cls": True}}, path)
    with pytest.raises(UserError, match=r"detect 6 classes but .* has 1 \(the run trained with --single-cls\)"):
        average.main(recalibrate_args(three_checkpoints, tiny_dataset, tmp_path / "x.pt"))
