"""train.py refuses bad options with one clear error before it creates the run folder."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

import train
from tests.conftest import REPO_ROOT, tiny_train_args
from utils.errors import UserError
from utils.precision import Precision
from utils.train import loop as training_loop
from utils.train.config import RunConfig, TrainOptions
from utils.train.results import results_row


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--imgsz", "16"], "--imgsz 16 is smaller than the model's stride 32: use at least 32"),
        (["--freeze", "25"], "would freeze the Detect head (layer 24)"),
        (["--workers", "-1"], "must not be negative"),
        (["--hyp", "no_such_hyp.yaml"], "cannot read hyperparameter file"),
        (["--cfg", "no_such_model.yaml"], "no model YAML no_such_model.yaml: give a path, or one of the shipped"),
        (["--weights", "no_such.pt"], "does not exist"),
        (["--raw"], "--raw picks the raw weights of the --weights checkpoint; give --weights too"),
        (["--swa-epochs", "2"], "--swa-epochs 2 must be between 0 and --epochs 1"),
        (["--cfg", "yolo11n.yaml", "--label-smoothing", "0.1"], "the anchor-free loss has none"),
        (["--cfg", "yolo11n.yaml", "--hyp", "scratch-low.yaml"], "missing dfl, which the anchor-free head's loss"),
        (["--cfg", "yolo11n.yaml", "--freeze", "24"], "would freeze the Detect head (layer 23)"),
        (["--label-smoothing", "1.5"], "--label-smoothing 1.5: must be in [0, 1)"),
        (["--label-smoothing", "nan"], "--label-smoothing nan: must be in [0, 1)"),
        (["--save-interval", "nan"], "--save-interval nan: must be in [0, inf)"),
        (["--seed", "-1"], "--seed -1: must be in [0, "),
    ],
)
def test_bad_options_leave_no_run_folder(tiny_dataset, tmp_path, extra, message):
    project = tmp_path / "runs"
    with pytest.raises(UserError) as error:
        train.main(["--data", str(tiny_dataset), "--project", str(project), "--epochs", "1", *extra])
    assert message in str(error.value)
    assert not project.exists() or not any(project.iterdir())


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="no last.pt found"):
        train.main(["--resume", "--project", str(tmp_path)])


def test_global_batch_must_split_evenly_over_torchrun_processes(monkeypatch, tiny_dataset):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; refused before any process group is joined
    with pytest.raises(UserError, match="--batch-size 3 is the global batch: it must be a multiple of the 2"):
        train.main(["--data", str(tiny_dataset), "--batch-size", "3"])


def test_results_row_puts_each_validated_model_in_its_columns():
    """--val raw power-0.07: the EMA's metrics go to metrics/, the raw model's to raw/, the power
    EMA's to power-0.07/, column for column (zeros in an epoch not validated)."""

    def result(p, r, m50, m):
        return SimpleNamespace(
            metrics=SimpleNamespace(precision=p, recall=r, map50=m50, map50_95=m), loss=np.array([0.1, 0.2, 0.3])
        )

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    names = ("box_loss", "obj_loss", "cls_loss")
    row = results_row(
        names,
        [1.0, 2.0, 3.0],
        result(0.5, 0.6, 0.7, 0.4),
        optimizer,
        ema_updates=7,
        others={"raw": result(0.3, 0.2, 0.25, 0.1), "power-0.07": result(0.35, 0.3, 0.3, 0.2)},
    )
    columns = ("precision", "recall", "mAP_0.5", "mAP_0.5:0.95")
    assert [row[f"metrics/{c}"] for c in columns] == [0.5, 0.6, 0.7, 0.4]
    assert [row[f"raw/{c}"] for c in columns] == [0.3, 0.2, 0.25, 0.1]
    assert [row[f"power-0.07/{c}"] for c in columns] == [0.35, 0.3, 0.3, 0.2]
    not_validated = results_row(names, [1.0, 2.0, 3.0], None, optimizer, 7, others={"raw": None})
    assert [not_validated[f"raw/{c}"] for c in columns] == [0.0] * 4
    assert row["ema/updates"] == 7 and row["val/cls_loss"] == 0.3
    assert not any(k.startswith("raw/") for k in results_row(names, [1.0, 2.0, 3.0], None, optimizer, 7))


def test_val_raw_validates_the_ema_and_the_trained_weights_each_epoch(tiny_dataset, tmp_path, monkeypatch):
    """With --val-raw each epoch evaluates the EMA (for metrics/) and then the raw model the
    optimizer trains (for raw/, mapped in the test above): in the last epoch, exactly last.pt's
    'ema' and 'model' weights, which differ."""
    evaluated = []

    def recording_evaluate(model, *args, **kwargs):
        evaluated.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return train_evaluate(model, *args, **kwargs)

    train_evaluate = training_loop.evaluate
    monkeypatch.setattr(training_loop, "evaluate", recording_evaluate)
    assert train.main(tiny_train_args(tiny_dataset, tmp_path, "--epochs", "2", "--val-raw")) == 0
    last = torch.load(tmp_path / "exp" / "weights" / "last.pt", weights_only=True)
    assert len(evaluated) == 5  # the EMA and the raw model in each epoch, then best.pt
    ema_evaluated, raw_evaluated = evaluated[2], evaluated[3]
    assert all(torch.equal(ema_evaluated[k], v) for k, v in last["ema"].items())
    assert all(torch.equal(raw_evaluated[k], v) for k, v in last["model"].items())
    assert not all(torch.equal(last["ema"][k], v) for k, v in last["model"].items())


def test_noval_writes_best_pt_once_from_the_validated_last_epoch(tiny_dataset, tmp_path, monkeypatch):
    """With --noval only the last epoch is validated: the epochs before have no fitness, so they
    neither rewrite best.pt nor count for --patience."""
    renamed = []
    real_replace = os.replace

    def recording_replace(source, target):  # every checkpoint write ends in an atomic rename
        renamed.append(Path(target).name)
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", recording_replace)
    assert train.main(tiny_train_args(tiny_dataset, tmp_path, "--epochs", "3", "--noval", "--patience", "1")) == 0
    # best.pt: by the last epoch, then stripped at the end; last.pt: by each epoch (no early stop after epoch 1)
    assert renamed.count("best.pt") == 2 and renamed.count("last.pt") == 3
    best = torch.load(tmp_path / "exp" / "weights" / "best.pt", weights_only=True)
    assert best["epoch"] == 2 and best["best_epoch"] == 2


def epoch0_checkpoint(tiny_run: Path, tmp_path: Path) -> Path:
    """A copy of the shared run, to resume from the end of its first epoch."""
    run = tmp_path / "runs" / "exp"
    shutil.copytree(tiny_run, run)
    (run / "results.csv").write_text("".join((tiny_run / "results.csv").read_text().splitlines(True)[:2]))
    return run / "weights" / "epoch0.pt"


def test_resume_fills_loop_fields_a_checkpoint_predates(tiny_run, tiny_dataset, tmp_path):
    path = epoch0_checkpoint(tiny_run, tmp_path)
    state = torch.load(path, weights_only=True)
    del state["loop"]["bad_streak"]  # as written before that field existed
    torch.save(state, path)
    assert train.main(["--resume", str(path), "--workers", "0"]) == 0
    assert torch.load(path.parent / "last.pt", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("folder", ["copied", "weights"])
def test_resume_of_a_copied_checkpoint_writes_only_into_a_new_run_folder(tiny_run, tiny_dataset, tmp_path, folder):
    """A last.pt copied out of its run folder (into any folder, one called weights/ too) resumes
    into a new run folder under --project/--name; nothing is written beside the copy or above it."""
    source = epoch0_checkpoint(tiny_run, tmp_path)
    elsewhere = tmp_path / "downloads" / folder
    elsewhere.mkdir(parents=True)
    copy = elsewhere / "last.pt"
    shutil.copy(source, copy)
    assert (
        train.main(["--resume", str(copy), "--workers", "0", "--project", str(tmp_path / "resumed"), "--name", "again"])
        == 0
    )
    assert sorted(p.relative_to(tmp_path / "downloads").as_posix() for p in (tmp_path / "downloads").rglob("*")) == [
        folder,
        f"{folder}/last.pt",
    ]
    run = tmp_path / "resumed" / "again"
    opt = yaml.safe_load((run / "opt.yaml").read_text())
    assert (opt["project"], opt["name"]) == (str(tmp_path / "resumed"), "again")  # where it now lives
    rows = (run / "results.csv").read_text().splitlines()
    assert rows[1].startswith("1,") and len(rows) == 2  # epoch 1, the one left to train
    assert torch.load(run / "weights" / "last.pt", weights_only=True)["finished"]
    assert (run / "opt.yaml").is_file()  # a run folder of its own, which can be resumed in turn


def test_an_image_size_no_memory_can_hold_is_refused_before_anything_starts(tiny_dataset, tmp_path):
    with pytest.raises(UserError, match=r"training at --imgsz 10016 with a batch of 4 needs at least [\d,.]+ GiB"):
        train.main(tiny_train_args(tiny_dataset, tmp_path / "runs", "--epochs", "1", "--imgsz", "10000"))
    assert not (tmp_path / "runs").exists()


def dataset_without_labels(tiny_dataset: Path, tmp_path: Path, darknet: bool) -> Path:
    source = Path(yaml.safe_load(tiny_dataset.read_text())["path"])
    root = tmp_path / "unlabelled"
    shutil.copytree(source / "images", root / "images")
    if darknet:  # the labels beside the images, as Darknet lays them out
        for label in (source / "labels" / "train").glob("*.txt"):
            shutil.copy(label, root / "images" / "train" / label.name)
    shutil.copytree(source / "labels" / "val", root / "labels" / "val")
    data = tmp_path / "unlabelled.yaml"
    data.write_text(yaml.safe_dump({**yaml.safe_load(tiny_dataset.read_text()), "path": str(root)}))
    return data


@pytest.mark.parametrize("darknet", [False, True], ids=["no-labels", "darknet-layout"])
def test_a_train_split_without_labels_is_refused_saying_where_they_belong(tiny_dataset, tmp_path, darknet):
    data = dataset_without_labels(tiny_dataset, tmp_path, darknet)
    with pytest.raises(UserError, match="train: no labelled boxes in") as refused:
        train.main(tiny_train_args(data, tmp_path / "runs", "--epochs", "1"))
    message = str(refused.value)
    assert "Labels are read from a labels/ folder beside images/" in message
    assert str(tmp_path / "unlabelled" / "labels" / "train") in message
    assert ("16 .txt files lie beside the images instead" in message) == darknet
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_run_folder_held_by_a_live_run_is_refused(tiny_dataset, tmp_path):
    """Two runs on one --name with --exist-ok would interleave one results.csv: the second is refused."""
    first = subprocess.Popen(
        [
            sys.executable,
            str(REPO_ROOT / "train.py"),
            *tiny_train_args(tiny_dataset, tmp_path, "--epochs", "50", "--name", "shared", "--exist-ok"),
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        results = tmp_path / "shared" / "results.csv"
        deadline = time.time() + 120
        while not results.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.1)
        assert results.exists(), "the first run did not get going"
        with pytest.raises(UserError, match=f"{tmp_path / 'shared'} is in use by another live training run"):
            train.main(tiny_train_args(tiny_dataset, tmp_path, "--epochs", "1", "--name", "shared", "--exist-ok"))
        rows_now = results.read_text()
    finally:
        first.kill()
        first.wait()
    assert all(line.split(",")[0].isdigit() for line in rows_now.splitlines()[1:])
    assert (
        train.main(tiny_train_args(tiny_dataset, tmp_path, "--epochs", "1", "--name", "shared", "--exist-ok")) == 0
    )  # free again


def test_the_run_configuration_is_frozen_and_recorded_with_its_types(tiny_run):
    """opt.yaml and hyp.yaml hold the options and hyperparameters as the run used them, typed."""
    opt = yaml.safe_load((tiny_run / "opt.yaml").read_text())
    hyp = yaml.safe_load((tiny_run / "hyp.yaml").read_text())
    assert opt["optimizer"] == "AdamW" and opt["imgsz"] == 64 and opt["freeze"] == [0] and "resume" not in opt
    assert hyp["lr0"] == 0.003 and type(hyp["close_mosaic"]) is int
    checkpoint = torch.load(tiny_run / "weights" / "last.pt", weights_only=True)
    assert checkpoint["opt"] == opt and checkpoint["hyp"] == hyp
    precision = Precision.from_dict(checkpoint["precision"])
    assert precision.amp == opt["amp"] and precision.device_type == "cpu"
    options = TrainOptions(**{**opt, "freeze": tuple(opt["freeze"])})
    config = RunConfig(opt=options, hyp=hyp, data=None, world_size=1, precision=precision)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.opt.epochs = 3


@pytest.mark.parametrize(
    "args, message",
    [
        (("--no-ema", "--ema", "images"), "--no-ema turns the EMA off"),
        (("--posthoc-ema", "1"), "at least 2"),
        (("--average", "power-0.9"), "average 'power-0.9': a power EMA's relative width must be in"),
        (("--val", "ema-hours"), "unknown average 'ema-hours'"),
    ],
)
def test_averaging_options_are_checked(tiny_dataset, tmp_path, args, message):
    with pytest.raises(UserError, match=message):
        train.main(tiny_train_args(tiny_dataset, tmp_path, "--epochs", "1", *args))
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize(
    "processes, args, message",
    [
        ("1", ("--graft",), "--graft grafts the networks of several processes into each other: run under torchrun"),
        ("1", ("--swap-epoch", "1"), "--swap-epoch needs several processes to average"),
        ("2", ("--swap-epoch", "2"), "--swap-epoch 2 must be between 1 and --epochs - 1"),
        ("2", ("--swap-epoch", "1", "--sync-bn"), "--sync-bn would tie them"),
        ("2", ("--swap-epoch", "1", "--lookahead"), "--lookahead does not combine with --swap-epoch or --graft"),
        ("2", ("--graft", "--lookahead", "3"), "--lookahead does not combine with --swap-epoch or --graft"),
        ("2", ("--graft", "--swap-epoch", "1"), "it does not combine with --swap-epoch or --sync-bn"),
        ("2", ("--graft-hyp", "a.yaml", "b.yaml"), "give --graft too"),
        ("2", ("--graft", "--graft-hyp", "a.yaml"), "gives 1 hyp files for 2 processes"),
        ("2", ("--graft", "--graft-hyp", "a.yaml", "b.yaml", "--hyp", "c.yaml"), "--hyp would be unused"),
        ("2", ("--graft", "--batch-size", "3", "--graft-hyp", "a.yaml"), "gives 1 hyp files"),  # any batch
    ],
)
def test_separate_process_options_are_checked(monkeypatch, tiny_dataset, tmp_path, processes, args, message):
    """Refused before a process group is joined or anything is written (WORLD_SIZE as torchrun sets it)."""
    monkeypatch.setenv("WORLD_SIZE", processes)
    with pytest.raises(UserError, match=re.escape(message)):
        train.main(tiny_train_args(tiny_dataset, tmp_path, "--epochs", "2", *args))
    assert not (tmp_path / "exp").exists()
