"""SWA (--swa-epochs) against a direct average of the saved per-epoch weights, --val-raw's columns,
--no-ema, and val.py / detect.py on swa.pt."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

import detect
import val
from tests.conftest import run_script

pytestmark = pytest.mark.slow
TINY = ("--imgsz", "64", "--batch-size", "4", "--workers", "1", "--no-plots")


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def swa_run(tiny_dataset, tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("swa")
    result = run_script(
        "train.py",
        "--data",
        str(tiny_dataset),
        "--epochs",
        "3",
        *TINY,
        "--swa-epochs",
        "2",
        "--val-raw",
        "--save-period",
        "1",
        "--project",
        str(project),
        "--name",
        "exp",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return project / "exp"


def test_swa_is_the_average_of_the_last_epochs_ema(swa_run):
    swa = load(swa_run / "weights" / "swa.pt")
    epochs = [load(swa_run / "weights" / f"epoch{e}.pt")["ema"] for e in (1, 2)]
    assert swa["swa"]["updates"] == 2
    for name, tensor in swa["swa"]["module"].items():
        if tensor.dtype.is_floating_point:
            expected = (epochs[0][name].double() + epochs[1][name].double()) / 2
            assert (tensor.double() - expected).abs().max() < 1e-6, name
    # swa.pt's weights: the same average, with BatchNorm statistics recomputed on the training images
    recalibrated = [n for n in swa["ema"] if "running_" in n]
    assert recalibrated and not any(torch.allclose(swa["ema"][n], swa["swa"]["module"][n]) for n in recalibrated)
    for name in swa["ema"]:
        if "running_" not in name and swa["ema"][name].dtype.is_floating_point:
            torch.testing.assert_close(swa["ema"][name], swa["swa"]["module"][name], rtol=0, atol=0)
    assert "SWA of the ema weights at the end of the last 2 epochs" in swa["source"]


def test_val_raw_adds_the_raw_model_columns(swa_run, tiny_dataset, capsys):
    """results.csv's raw/ columns hold the raw model's metrics: the last row's are what val.py
    --raw prints for last.pt's model weights (at 3 tiny epochs both are still near 0: the
    modules evaluated and the column mapping are pinned in test_train_cli.py)."""
    with open(swa_run / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"raw/precision", "raw/recall", "raw/mAP_0.5", "raw/mAP_0.5:0.95"} <= set(rows[0])
    assert len(rows) == 3
    assert (
        val.main(
            [
                "--weights",
                str(swa_run / "weights" / "last.pt"),
                "--data",
                str(tiny_dataset),
                "--raw",
                "--no-plots",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    row = next(line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["all"])
    columns = ("precision", "recall", "mAP_0.5", "mAP_0.5:0.95")
    assert [float(v) for v in row[3:7]] == [float(f"{float(rows[-1][f'raw/{c}']):.3g}") for c in columns]


def test_val_and_detect_read_swa_pt(swa_run, tiny_dataset, tmp_path, capsys):
    swa = swa_run / "weights" / "swa.pt"
    assert val.main(["--weights", str(swa), "--data", str(tiny_dataset), "--no-plots", "--workers", "0"]) == 0
    assert "SWA of the ema weights" in capsys.readouterr().out
    images = tiny_dataset.parent / "shapes" / "images" / "val"
    assert detect.main(["--weights", str(swa), "--source", str(images), "--nosave", "--project", str(tmp_path)]) == 0


def test_no_ema_saves_the_raw_weights_and_says_so(tiny_dataset, tmp_path):
    result = run_script(
        "train.py",
        "--data",
        str(tiny_dataset),
        "--epochs",
        "1",
        *TINY,
        "--no-ema",
        "--project",
        str(tmp_path),
        "--name",
        "raw",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    last = load(tmp_path / "raw" / "weights" / "last.pt")
    assert "--no-ema: no weight averaging" in result.stdout
    assert last["ema_decay"] == 0.0 and last["opt"]["no_ema"]
    for name, tensor in last["model"].items():
        assert torch.equal(last["ema"][name], tensor), name


@pytest.mark.parametrize("raw", [False, True], ids=["ema", "raw"])
def test_fine_tuning_starts_from_the_chosen_weights_and_rebuilds_the_head(swa_run, tiny_dataset, tmp_path, raw):
    """--weights (ours) with another class count (--single-cls: 1 instead of 6): every tensor but
    the Detect head's output layers comes from the checkpoint's EMA (or model with --raw)."""
    result = run_script(
        "train.py",
        "--weights",
        str(swa_run / "weights" / "last.pt"),
        "--data",
        str(tiny_dataset),
        "--single-cls",
        "--epochs",
        "1",
        *TINY,
        "--freeze",
        "10",
        "--project",
        str(tmp_path),
        "--name",
        "tune",
        *(["--raw"] if raw else []),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    weights = "model" if raw else "ema"
    assert f"tensors from {swa_run / 'weights' / 'last.pt'} ({weights} weights)" in result.stdout
    assert "detects 6 classes" in result.stdout and "output layers start afresh" in result.stdout
    moved, total = map(int, result.stdout.split("Transferred ")[1].split(" tensors")[0].split("/"))
    assert total - moved == 6  # the three output convolutions' weights and biases
    source, tuned = load(swa_run / "weights" / "last.pt")[weights], load(tmp_path / "tune" / "weights" / "last.pt")
    frozen = "model.0.conv.weight"  # --freeze 10 keeps the backbone's convolutions as they were transferred
    assert torch.equal(tuned["model"][frozen], source[frozen])
    assert not torch.equal(source[frozen], load(swa_run / "weights" / "last.pt")["ema" if raw else "model"][frozen])


def test_resume_continues_the_swa_average(swa_run, tmp_path):
    """A run resumed from its epoch-1 checkpoint (one of two SWA snapshots taken) ends with the
    same SWA average as the run that went straight through."""
    last = tmp_path / "exp" / "weights" / "last.pt"
    last.parent.mkdir(parents=True)
    shutil.copy(swa_run / "weights" / "epoch1.pt", last)
    shutil.copy(swa_run / "opt.yaml", last.parent.parent)  # a run folder of its own, to continue in
    assert load(last)["swa"]["updates"] == 1
    result = run_script("train.py", "--resume", str(last))
    assert result.returncode == 0, result.stdout + result.stderr
    resumed, straight = load(last.parent / "swa.pt")["swa"], load(swa_run / "weights" / "swa.pt")["swa"]
    assert resumed["updates"] == straight["updates"] == 2
    for name, tensor in straight["module"].items():
        if tensor.dtype.is_floating_point:
            assert (resumed["module"][name].double() - tensor.double()).abs().max() < 1e-6, name
