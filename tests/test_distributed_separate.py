"""SWAP and filter grafting under torchrun: processes that train separately, their checkpoints, resumes and averages."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from tests.conftest import REPO_ROOT, run_script
from tests.processes import (
    in_processes,
    interrupted_checkpoint,
    load,
    process_files,
    put_back,
    run_command,
    torchrun,
)
from utils.dist import World
from utils.hyp import load_hyp
from utils.train.grafting import graft, graft_from_next_process
from utils.train.separate_processes import own_process_state

# SWAP (--swap-epoch): two gloo processes train as one for 2 epochs, then each alone for 2. A
# global batch of 4: 4 micro-batches of 2 per process and epoch; a process alone accumulates to
# the nominal batch on its own, so a long warmup (swap_hyp) keeps its windows short enough to
# step, and checkpoint, inside an epoch.
SWAP_TINY = (
    "--epochs",
    "4",
    "--swap-epoch",
    "2",
    "--imgsz",
    "64",
    "--batch-size",
    "4",
    "--workers",
    "1",
    "--deterministic",
    "--optimizer",
    "SGD",
    "--no-plots",
    "--save-period",
    "1",
    "--cfg",
    "yolov5n.yaml",
)
BATCHNORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def swap_hyp(tmp_path_factory) -> str:
    """YOLOv5's hyp with a 100-epoch warmup: accumulation windows of 1-2 micro-batches throughout."""
    hyp = yaml.safe_load((REPO_ROOT / "hyp" / "scratch-low.yaml").read_text())
    path = tmp_path_factory.mktemp("hyp") / "long-warmup.yaml"
    path.write_text(yaml.safe_dump({**hyp, "warmup_epochs": 100}))
    return str(path)


@pytest.fixture(scope="module")
def swap_run(tiny_dataset, swap_hyp, tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("swap")
    result = run_command(
        torchrun(
            "--data", str(tiny_dataset), *SWAP_TINY, "--hyp", swap_hyp, "--project", str(project), "--name", "swap"
        )
    )
    assert "each of the 2 processes trains alone" in result.stdout, result.stdout
    return project / "swap"


@pytest.mark.slow
def test_swap_average_is_the_mean_of_the_processes_final_weights(swap_run):
    """swap.pt holds the mean of the two processes' final weights (last.pt: rank 0's own, rank 1's
    in the file it names), with BatchNorm statistics recomputed; the processes did train apart."""
    last, swap = load(swap_run / "weights" / "last.pt"), load(swap_run / "weights" / "swap.pt")
    assert last["process_files"]["processes"] == 2 and swap["swap"] == {"processes": 2, "swap_epoch": 2}
    rank0, rank1 = last["model"], rank1_state(swap_run / "weights" / "last.pt")["model"]
    weights = [k for k in rank0 if not k.endswith(BATCHNORM_STATISTICS)]
    assert any(not torch.equal(rank0[k], rank1[k]) for k in weights), "the processes never trained apart"
    for key in weights:
        torch.testing.assert_close(swap["ema"][key], (rank0[key] + rank1[key]) / 2, rtol=0, atol=0, msg=key)
    recomputed = [k for k in rank0 if k.endswith("running_mean")]
    assert any(not torch.equal(swap["ema"][k], (rank0[k] + rank1[k]) / 2) for k in recomputed)


def rank1_state(last: Path) -> dict:
    """Rank 1's own state of a 2-process checkpoint of processes training separately."""
    return own_process_state(load(last), last, World(rank=1, size=2))


def assert_same_processes(final: Path, straight: Path) -> None:
    """Both processes' final weights and rank 0's EMA equal the uninterrupted run's, bit for bit."""
    final_checkpoint, straight_checkpoint = load(final), load(straight)
    pairs = [(final_checkpoint[key], straight_checkpoint[key]) for key in ("model", "ema")]
    pairs.append((rank1_state(final)["model"], rank1_state(straight)["model"]))
    for resumed, expected in pairs:
        for key, tensor in expected.items():
            assert torch.equal(resumed[key], tensor), key


def resume_copy(run_dir: Path, epoch_file: str, tmp_path: Path) -> Path:
    """The run's epochN.pt (and the files of the other processes it names) as the last.pt of a
    run folder of its own (with its opt.yaml), resumed under torchrun."""
    last = tmp_path / "exp" / "weights" / "last.pt"
    last.parent.mkdir(parents=True)
    source = run_dir / "weights" / epoch_file
    shutil.copy(source, last)
    for path in process_files(load(source), source):
        shutil.copy(path, last.parent / path.name)
    shutil.copy(run_dir / "opt.yaml", last.parent.parent)
    run_command(torchrun("--resume", str(last)))
    return last


@pytest.mark.slow
@pytest.mark.parametrize("epoch_file", ["epoch0.pt", "epoch1.pt"], ids=["first-phase", "phase-boundary"])
def test_swap_resumes_from_either_phase(swap_run, tmp_path, epoch_file):
    """From the end of epoch 0 (DDP) or of epoch 1 (the last before each process trains alone,
    whose checkpoint already holds every process's state), a resume ends where the run did."""
    last = resume_copy(swap_run, epoch_file, tmp_path)
    assert_same_processes(last, swap_run / "weights" / "last.pt")
    assert torch.equal(
        load(last.parent / "swap.pt")["ema"]["model.0.conv.weight"],
        load(swap_run / "weights" / "swap.pt")["ema"]["model.0.conv.weight"],
    )


@pytest.mark.slow
def test_swap_killed_in_its_second_phase_resumes_bit_for_bit(swap_run, swap_hyp, tiny_dataset, tmp_path):
    """A checkpoint written mid-epoch in the second phase, each process with weights of its own,
    resumes under torchrun to the uninterrupted run's weights on both ranks and to its swap.pt;
    one process cannot resume it."""
    command = torchrun("--data", str(tiny_dataset), *SWAP_TINY, "--hyp", swap_hyp, "--save-interval", "1e-6")
    last = tmp_path / "killed" / "weights" / "last.pt"
    second_phase = interrupted_checkpoint(
        [*command, "--project", str(tmp_path), "--name", "killed"],
        last,
        lambda loop: loop["epoch"] >= 2 and loop["batch"] > 0,
    )
    put_back(second_phase, last.parent)

    alone = run_script("train.py", "--resume", str(last))
    assert alone.returncode == 2 and "--swap-epoch needs several processes" in alone.stderr, alone.stderr
    run_command(torchrun("--resume", str(last)))
    assert_same_processes(last, swap_run / "weights" / "last.pt")
    swap, expected = load(last.parent / "swap.pt")["ema"], load(swap_run / "weights" / "swap.pt")["ema"]
    assert all(torch.equal(swap[k], v) for k, v in expected.items())


def small_network(seed: int) -> nn.Module:
    """A conv + BatchNorm network whose weights and running statistics depend on `seed` alone."""
    torch.manual_seed(seed)
    network = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        network[1].running_mean.uniform_(-1, 1)
        network[1].weight.uniform_(0.5, 1.5)
    return network


def _graft_from_the_next_process(rank: int, world_size: int) -> None:
    hyp = load_hyp(None)
    own, expected = small_network(rank).to(memory_format=torch.channels_last), small_network(rank)  # as trained
    graft(expected, small_network((rank + 1) % world_size).state_dict(), hyp["graft_a"], hyp["graft_c"], 10)
    alphas = graft_from_next_process(own, World(rank=rank, size=world_size), hyp)
    assert len(alphas) == 2 and all(0.3 <= a <= 0.7 for a in alphas)
    for (name, a), b in zip(expected.state_dict().items(), own.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("processes", [2, 3])
def test_grafting_takes_in_the_next_process_network(processes):
    """Gloo processes with networks of their own: rank r ends as graft(own, rank r + 1's), the
    last as graft(own, rank 0's), the neighbour's state (BatchNorm statistics included) passed
    round the ring (three processes tell its direction apart)."""
    in_processes(processes, _graft_from_the_next_process)


@pytest.mark.slow
def test_graft_run_trains_a_network_per_process(tiny_dataset, tmp_path):
    """torchrun --graft with a hyp file per process: each process keeps its own hyp and weights
    (rank 1's in rank 0's checkpoint), grafting is logged after every epoch but the last, rank
    0's EMA is validated and saved, and the run resumes from its first epoch's checkpoint to the
    same weights on both processes."""
    hyp = yaml.safe_load((REPO_ROOT / "hyp" / "scratch-low.yaml").read_text())
    second = tmp_path / "second.yaml"
    second.write_text(yaml.safe_dump({**hyp, "lr0": 0.005}))
    result = run_command(
        torchrun(
            "--data",
            str(tiny_dataset),
            *SWAP_TINY[4:],  # SWAP_TINY without its --epochs 4 --swap-epoch 2
            "--epochs",
            "3",
            "--graft",
            "--graft-hyp",
            "hyp/scratch-low.yaml",
            str(second),
            "--project",
            str(tmp_path),
            "--name",
            "graft",
        )
    )
    assert result.stdout.count("Grafted the next process's network") == 2, result.stdout
    # Each network is a run of its own: batches of 4 from all 16 training images.
    assert "batch 4 in each of 2 processes x 16 accumulated, 4 batches per epoch" in result.stdout, result.stdout
    last_path = tmp_path / "graft" / "weights" / "last.pt"
    last, rank1_last = load(last_path), rank1_state(last_path)
    assert last["hyp"]["lr0"] == hyp["lr0"] and rank1_last["hyp"]["lr0"] == 0.005
    rank0, rank1 = last["model"], rank1_last["model"]
    assert any(not torch.equal(rank0[k], rank1[k]) for k in rank0 if k.endswith("conv.weight"))
    assert (tmp_path / "graft" / "weights" / "best.pt").exists()
    resumed = resume_copy(tmp_path / "graft", "epoch0.pt", tmp_path / "resumed")
    assert_same_processes(resumed, last_path)


# Validation shared over the ranks (utils/eval/evaluate.py over val_shard_loader): each rank runs
# whole batches of one process's pass with rank 0's weights, and rank 0 scores them in batch order.
