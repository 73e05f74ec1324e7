"""Validation shared over torchrun's processes gives exactly what one process gives."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.processes import (
    in_processes,
    load,
    run_command,
    torchrun,
)
from utils.checkpoint.format import model_from_checkpoint
from utils.data.config import load_dataset_config
from utils.data.loader import build_val_loader, val_shard_loader
from utils.dist import World
from utils.eval.evaluate import EvalResult, evaluate
from utils.train.criterion import build_criterion


def assert_same_evaluation(shared: EvalResult, alone: EvalResult) -> None:
    """Every metric, the loss, the per-class image counts and every prediction bit for bit."""
    for field in dataclasses.fields(alone.metrics):
        a, b = getattr(shared.metrics, field.name), getattr(alone.metrics, field.name)
        assert np.array_equal(a, b, equal_nan=True), field.name
    assert np.array_equal(shared.loss, alone.loss) and np.array_equal(shared.images_per_class, alone.images_per_class)
    assert shared.input_shape == alone.input_shape and shared.predictions.keys() == alone.predictions.keys()
    assert all(np.array_equal(shared.predictions[i], p) for i, p in alone.predictions.items())


def _evaluates_as_one_process(rank: int, world_size: int, run_dir: Path, data_yaml: Path, batch_size: int) -> None:
    world = World(rank=rank, size=world_size)
    checkpoint = load(run_dir / "weights" / "last.pt")
    # Rank 0 validates the run's EMA; the others hold the raw weights until rank 0's are broadcast.
    model = model_from_checkpoint(checkpoint, "ema" if world.is_main else "model")
    model = model.to(memory_format=torch.channels_last)
    world.copy_from_main_(list(model.state_dict().values()))
    data = load_dataset_config(data_yaml)
    loader = build_val_loader(
        data.val, data.nc, img_size=64, batch_size=batch_size, workers=0, hyp=checkpoint["hyp"], stride=32, world=world
    )
    settings = {
        "device": torch.device("cpu"),
        "amp_dtype": None,
        "loss_fn": build_criterion(model, checkpoint["hyp"], 64),
        "keep_predictions": True,
    }
    shared = evaluate(model, val_shard_loader(loader, world), world=world, **settings)
    if not world.is_main:
        assert shared is None
        return
    alone = evaluate(model, loader, **settings)
    assert sum(len(p) for p in alone.predictions.values()) > 0 and alone.loss.min() > 0
    assert_same_evaluation(shared, alone)


@pytest.mark.parametrize("processes, batch_size", [(2, 3), (3, 4)], ids=["uneven-shares", "a-rank-without-batches"])
def test_validation_shared_over_processes_gives_the_one_process_result(tiny_run, tiny_dataset, processes, batch_size):
    """The 8 val images in batches of 3 over 2 processes (rank 0 runs batches 0 and 2, rank 1
    batch 1), and in batches of 4 over 3 (rank 2 runs none): rank 0's result is one process's."""
    in_processes(processes, _evaluates_as_one_process, tiny_run, tiny_dataset, batch_size)


@pytest.mark.slow
def test_two_process_run_validates_as_one_process(tiny_dataset, tmp_path):
    """Each epoch's validation shared by 2 torchrun processes writes the results.csv row one
    process computes for the same weights and batches, to the file's 8 digits: last.pt's EMA
    (metrics/, val/) and rank 0's raw model (raw/, whose BatchNorm statistics, without
    --sync-bn, are rank 0's own). Batch 6: 3 per process, so val batches of 6 and 2, one on each
    process. After one epoch at 64 px no box is right yet (mAP 0): the val losses, means over both
    processes' batches, carry the check (the test above compares every predicted box)."""
    run_command(
        torchrun(
            *("--data", str(tiny_dataset), "--epochs", "1", "--imgsz", "64", "--batch-size", "6", "--workers", "0"),
            *("--no-amp", "--no-plots", "--val", "raw", "--project", str(tmp_path), "--name", "exp"),
        )
    )
    last = load(tmp_path / "exp" / "weights" / "last.pt")
    with open(tmp_path / "exp" / "results.csv", newline="") as f:
        row = list(csv.DictReader(f))[-1]
    data = load_dataset_config(tiny_dataset)
    loader = build_val_loader(data.val, data.nc, img_size=64, batch_size=6, workers=0, hyp=last["hyp"], stride=32)
    for weights, prefix in (("ema", "metrics/"), ("model", "raw/")):
        model = model_from_checkpoint(last, weights).to(memory_format=torch.channels_last)
        loss_fn = build_criterion(model, last["hyp"], 64) if weights == "ema" else None
        result = evaluate(model, loader, device=torch.device("cpu"), amp_dtype=None, loss_fn=loss_fn)
        m = result.metrics
        expected = dict(
            zip(("precision", "recall", "mAP_0.5", "mAP_0.5:0.95"), (m.precision, m.recall, m.map50, m.map50_95))
        )
        if loss_fn is not None:
            expected.update(zip(("val/box_loss", "val/obj_loss", "val/cls_loss"), result.loss.tolist()))
        for name, value in expected.items():
            column = name if name.startswith("val/") else prefix + name
            assert row[column] == f"{value:.8g}", (column, row[column], value)
    assert min(float(row[f"val/{n}"]) for n in ("box_loss", "obj_loss", "cls_loss")) > 0, row
