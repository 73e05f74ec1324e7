"""train.py refuses bad options with one clear error before it creates the run folder."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train
from utils.errors import UserError


@pytest.mark.parametrize("extra, message", [
    (["--imgsz", "16"], "--imgsz at least 32"),
    (["--freeze", "25"], "would freeze the Detect head (layer 24)"),
    (["--workers", "-1"], "must not be negative"),
    (["--hyp", "no_such_hyp.yaml"], "cannot read hyperparameter file"),
    (["--cfg", "no_such_model.yaml"], "cannot read model YAML"),
    (["--weights", "no_such.pt"], "does not exist"),
    (["--raw"], "--raw picks the raw weights of the --weights checkpoint; give --weights too"),
    (["--swa-epochs", "2"], "--swa-epochs 2 must be between 0 and --epochs 1"),
])
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


def test_results_row_puts_the_raw_model_metrics_in_the_raw_columns():
    """--val-raw: the EMA's metrics go to metrics/, the raw model's to raw/, column for column."""
    def result(p, r, m50, m):
        return SimpleNamespace(metrics=SimpleNamespace(precision=p, recall=r, map50=m50, map50_95=m),
                               loss=np.array([0.1, 0.2, 0.3]))
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    row = train.results_row([1.0, 2.0, 3.0], result(0.5, 0.6, 0.7, 0.4), optimizer, ema_updates=7, val_raw=True,
                            raw_result=result(0.3, 0.2, 0.25, 0.1))
    columns = ("precision", "recall", "mAP_0.5", "mAP_0.5:0.95")
    assert [row[f"metrics/{c}"] for c in columns] == [0.5, 0.6, 0.7, 0.4]
    assert [row[f"raw/{c}"] for c in columns] == [0.3, 0.2, 0.25, 0.1]
    assert row["ema/updates"] == 7 and row["val/cls_loss"] == 0.3
    assert not any(k.startswith("raw/") for k in train.results_row([1.0, 2.0, 3.0], None, optimizer, 7))


def test_val_raw_validates_the_ema_and_the_trained_weights_each_epoch(tiny_dataset, tmp_path, monkeypatch):
    """With --val-raw each epoch evaluates the EMA (for metrics/) and then the raw model the
    optimizer trains (for raw/, mapped in the test above): in the last epoch, exactly last.pt's
    'ema' and 'model' weights, which differ."""
    evaluated = []

    def recording_evaluate(model, *args, **kwargs):
        evaluated.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return train_evaluate(model, *args, **kwargs)

    train_evaluate = train.evaluate
    monkeypatch.setattr(train, "evaluate", recording_evaluate)
    assert train.main(["--data", str(tiny_dataset), "--epochs", "2", "--imgsz", "64", "--batch-size", "4",
                       "--workers", "0", "--no-plots", "--val-raw", "--project", str(tmp_path)]) == 0
    last = torch.load(tmp_path / "exp" / "weights" / "last.pt", weights_only=True)
    assert len(evaluated) == 5  # EMA and raw in each epoch, then best.pt
    ema_evaluated, raw_evaluated = evaluated[2], evaluated[3]
    assert all(torch.equal(ema_evaluated[k], v) for k, v in last["ema"].items())
    assert all(torch.equal(raw_evaluated[k], v) for k, v in last["model"].items())
    assert not all(torch.equal(last["ema"][k], v) for k, v in last["model"].items())
