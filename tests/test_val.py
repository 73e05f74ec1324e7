"""val.py: by default it evaluates as train.py validated, so it reproduces the run's numbers."""

from __future__ import annotations

import re

import torch

import train
import val
from tests.conftest import tiny_train_args


def test_a_torchrun_checkpoint_is_validated_with_the_batch_training_validated_with(
    tiny_run, tiny_dataset, tmp_path, capsys
):
    """Rectangular validation groups images per batch, so the batch decides the shapes and the mAP.
    train.py validates with twice each process's batch; under torchrun --batch-size is the global
    batch. A checkpoint of 2 processes and --batch-size 4 (2 each) is validated in batches of 4."""
    state = torch.load(tiny_run / "weights" / "last.pt", weights_only=True)
    assert state["opt"]["batch_size"] == 4
    ddp = tmp_path / "ddp_last.pt"
    torch.save({**state, "world_size": 2}, ddp)  # as 2 torchrun processes write it
    for path, batch in ((tiny_run / "weights" / "last.pt", 8), (ddp, 4)):
        assert val.main(["--weights", str(path), "--data", str(tiny_dataset), "--no-plots", "--workers", "0"]) == 0
        output = capsys.readouterr().out
        assert f", batch {batch}, " in output
        assert re.search(rf"at shape \({batch}, 3, \d+, \d+\)", output), output  # 8 val images: full batches


def test_a_single_class_run_is_validated_as_it_trained(tiny_dataset, tmp_path, capsys):
    """val.py takes --single-cls, like the batch and size, from the run unless told otherwise."""
    assert train.main(tiny_train_args(tiny_dataset, tmp_path, "--epochs", "1", "--single-cls")) == 0
    capsys.readouterr()
    assert (
        val.main(
            [
                "--weights",
                str(tmp_path / "exp" / "weights" / "last.pt"),
                "--data",
                str(tiny_dataset),
                "--no-plots",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["all"]]
    assert rows and rows[0][2] == "25"  # all 25 val boxes, counted as one class
