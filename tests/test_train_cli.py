"""train.py refuses bad options with one clear error before it creates the run folder."""

from __future__ import annotations

import pytest

import train
from utils.errors import UserError


@pytest.mark.parametrize("extra, message", [
    (["--imgsz", "16"], "--imgsz at least 32"),
    (["--freeze", "25"], "would freeze the Detect head (layer 24)"),
    (["--workers", "-1"], "must not be negative"),
    (["--hyp", "no_such_hyp.yaml"], "cannot read hyperparameter file"),
    (["--cfg", "no_such_model.yaml"], "cannot read model YAML"),
    (["--weights", "no_such.pt"], "does not exist"),
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
