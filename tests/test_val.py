"""val.py: by default it evaluates as train.py validated, so it reproduces the run's numbers."""

from __future__ import annotations

import re

import torch

import val


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
