"""The files a run leaves: best.pt stripped to its EMA at the end (the weights val.py and detect.py
use, the same results as the whole checkpoint of its epoch), last.pt whole, --keep-optimizer."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import detect
import train
import val
from tests.conftest import tiny_train_args
from utils.errors import UserError

METRICS = ("precision", "recall", "mAP_0.5", "mAP_0.5:0.95")


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def whole_checkpoint_of_best(run: Path) -> Path:
    """The epochN.pt (tiny_run saves every epoch) written with best.pt, before the run's end stripped it."""
    return run / "weights" / f"epoch{load(run / 'weights' / 'best.pt')['epoch']}.pt"


def test_a_finished_runs_best_pt_is_the_ema_of_its_epoch_alone(tiny_run):
    best, whole = load(tiny_run / "weights" / "best.pt"), load(whole_checkpoint_of_best(tiny_run))
    assert (
        best["kind"] == "weights"
        and whole["kind"] == "training"
        and load(tiny_run / "weights" / "last.pt")["optimizer"]
    )
    assert not {"model", "optimizer", "scaler", "rng", "averages"} & best.keys()
    assert best["ema"].keys() == whole["ema"].keys()
    for name, tensor in whole["ema"].items():
        assert torch.equal(best["ema"][name], tensor) and best["ema"][name].dtype == tensor.dtype, name
    assert {t.dtype for t in best["ema"].values() if t.is_floating_point()} == {torch.float32}
    assert (best["epoch"], best["best_epoch"], best["best_fitness"]) == (
        whole["epoch"],
        whole["best_epoch"],
        whole["best_fitness"],
    )
    with open(tiny_run / "results.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if int(r["epoch"]) == best["epoch"])
    assert best["metrics"] == {name: float(row[f"metrics/{name}"]) for name in METRICS}
    ema_bytes = sum(t.numel() * t.element_size() for t in best["ema"].values())
    assert (tiny_run / "weights" / "best.pt").stat().st_size <= 1.05 * ema_bytes


def table_rows(output: str, names: list[str]) -> list[str]:
    """The rows of val.py's table: all, then one per class."""
    return [line for line in output.splitlines() if line.split()[:1] and line.split()[0] in ("all", *names)]


@pytest.mark.slow
def test_val_and_detect_give_the_same_results_from_the_stripped_and_the_whole_file(
    tiny_run, tiny_dataset, tmp_path, capsys
):
    stripped, whole = tiny_run / "weights" / "best.pt", whole_checkpoint_of_best(tiny_run)
    names = load(stripped)["names"]
    tables, predictions = [], []
    for weights, name in ((stripped, "stripped"), (whole, "whole")):
        arguments = ["--weights", str(weights), "--data", str(tiny_dataset), "--no-plots", "--workers", "0"]
        assert val.main([*arguments, "--verbose", "--save-json", "--project", str(tmp_path), "--name", name]) == 0
        tables.append(table_rows(capsys.readouterr().out, names))
        predictions.append(json.loads((tmp_path / name / "predictions.json").read_text()))
    assert len(tables[0]) == 1 + len(names) and tables[0] == tables[1]
    assert predictions[0] and predictions[0] == predictions[1]  # every box and score
    images = tiny_dataset.parent / "shapes" / "images" / "val"
    labels = []
    for weights, name in ((stripped, "stripped"), (whole, "whole")):
        arguments = ["--weights", str(weights), "--source", str(images), "--conf-thres", "0.001"]
        project = ["--project", str(tmp_path / "detect"), "--name", name]
        assert detect.main([*arguments, "--save-txt", "--save-conf", *project]) == 0
        labels.append({p.name: p.read_text() for p in sorted((tmp_path / "detect" / name / "labels").glob("*.txt"))})
    assert labels[0] and labels[0] == labels[1]


def test_a_stripped_best_pt_neither_resumes_nor_gives_raw_weights(tiny_run, tiny_dataset, tmp_path):
    """--resume and --weights --raw on it: one error each, saying what to do instead, before any run folder."""
    best = tiny_run / "weights" / "best.pt"
    with pytest.raises(UserError, match=r"--resume .*best\.pt: .*the run's last\.pt holds them.*no training state"):
        train.main(["--resume", str(best)])
    with pytest.raises(UserError, match="--raw: .*holds no raw model weights.*Leave out --raw to start from its EMA"):
        train.main(tiny_train_args(tiny_dataset, tmp_path, "--weights", str(best), "--raw"))
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_keep_optimizer_keeps_best_pt_whole_and_a_stripped_file_fine_tunes(tiny_run, tiny_dataset, tmp_path, capsys):
    """A run started from a stripped best.pt takes all of its EMA; with --keep-optimizer its own
    best.pt (its one epoch, the best) stays the whole checkpoint last.pt is."""
    best = tiny_run / "weights" / "best.pt"
    extra = ("--epochs", "1", "--weights", str(best), "--keep-optimizer")
    assert train.main(tiny_train_args(tiny_dataset, tmp_path, *extra)) == 0
    tensors = len(load(best)["ema"])
    assert f"Transferred {tensors}/{tensors} tensors from {best} (ema weights)" in capsys.readouterr().out
    weights = tmp_path / "exp" / "weights"
    assert (weights / "best.pt").read_bytes() == (weights / "last.pt").read_bytes()
    kept = load(weights / "best.pt")
    assert kept["kind"] == "training" and kept["optimizer"]["state"] and kept["model"].keys() == kept["ema"].keys()
