"""The files of processes training separately: each rank's own state in a file of its own beside
rank 0's checkpoint, written and removed in an order that leaves a coherent set at every moment,
and read back by that rank alone (also from checkpoints of the layout before them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.processes import in_processes
from utils.checkpoint.format import save_checkpoint
from utils.dist import World
from utils.errors import TrainingStopped, UserError
from utils.train.separate_processes import ProcessFiles, own_process_state, process_file_name, resumed_state


def own_state(rank: int, save: int) -> dict:
    """What rank `rank` keeps of its own at save `save`: tensors that say both."""
    return {
        "model": {"w": torch.full((3,), 10.0 * rank + save)},
        "optimizer": {"state": {}, "param_groups": []},
        "scaler": None,
        "rng": {"torch": torch.tensor([rank, save], dtype=torch.uint8)},
        "hyp": {"lr0": 0.01 * rank},
    }


def _saves(
    rank: int, world_size: int, weights: Path, saves: list[tuple[int, str]], killed: bool, unwritable: bool
) -> None:
    """Each (save, stem) as a run writes it: every rank's own file, then rank 0's last.pt (and
    epochN.pt) naming them, then the files no checkpoint names removed; `killed`: the last save
    stops after the processes' files, as if killed before rank 0's checkpoint; `unwritable`: the
    last save's rank 1 cannot write its file, which stops training on rank 0 before last.pt."""
    world = World(rank=rank, size=world_size)
    files = ProcessFiles(weights, world)
    if unwritable and rank == 1:
        files.weights_dir = weights / "last.pt" / "folder"  # under a file: no file can be written there
    if unwritable and rank == 0:
        with pytest.raises(TrainingStopped, match=f"could not write .*last.pt/folder/last.rank1.*intact.*{weights}"):
            files.write("last", None)
        return
    if unwritable:
        files.write("last", own_state(rank, 0))
        return
    for number, (save, stem) in enumerate(saves):
        record = files.write(stem, None if world.is_main else own_state(rank, save))
        if killed and number == len(saves) - 1:
            return
        if world.is_main:
            checkpoint = {"save": save, "hyp": {"lr0": 0.0}, "process_files": record}
            save_checkpoint(weights / "last.pt", checkpoint)
            if stem != "last":
                save_checkpoint(weights / f"{stem}.pt", checkpoint)
        files.saved()


def run_saves(
    weights: Path, saves: list[tuple[int, str]], processes: int = 3, killed: bool = False, unwritable: bool = False
) -> None:
    in_processes(processes, _saves, weights, saves, killed, unwritable)


def rank_files(weights: Path) -> set[str]:
    return {path.name for path in weights.glob("*.rank*.pt")}


def read(weights: Path, checkpoint_name: str, rank: int, processes: int = 3) -> dict:
    path = weights / checkpoint_name
    return own_process_state(torch.load(path, weights_only=True), path, World(rank=rank, size=processes))


def test_each_rank_reads_back_its_own_state_and_only_named_files_are_kept(tmp_path):
    """Three processes, four saves (the second also an epoch1.pt, as --save-period writes it), then
    one killed after the processes' files: last.pt names the fourth save's files, epoch1.pt keeps
    its own, and each rank reads back exactly what it wrote there; the next save removes last.pt's
    previous files and those the kill left, and keeps epoch1.pt's."""
    weights = tmp_path / "weights"
    run_saves(weights, [(1, "last"), (2, "epoch1"), (3, "last"), (4, "last"), (5, "last")], killed=True)
    last, epoch1 = (torch.load(weights / name, weights_only=True) for name in ("last.pt", "epoch1.pt"))
    named = {
        process_file_name(c["process_files"]["stem"], rank, c["process_files"]["token"])
        for c in (last, epoch1)
        for rank in (1, 2)
    }
    assert named <= rank_files(weights) and len(named) == 4
    assert last["process_files"]["processes"] == 3
    for rank in (1, 2):
        for name, save in (("last.pt", 4), ("epoch1.pt", 2)):
            state, expected = read(weights, name, rank), own_state(rank, save)
            assert torch.equal(state["model"]["w"], expected["model"]["w"])
            assert torch.equal(state["rng"]["torch"], expected["rng"]["torch"]) and state["hyp"] == expected["hyp"]
    assert read(weights, "last.pt", 0) is None  # rank 0's state is the checkpoint's own

    assert len(rank_files(weights) - named) == 2  # the killed save's
    run_saves(weights, [(6, "last")])  # a resumed run's first save
    assert len(rank_files(weights)) == 4 and named - rank_files(weights) == {
        process_file_name("last", rank, last["process_files"]["token"]) for rank in (1, 2)
    }
    assert torch.equal(read(weights, "last.pt", 1)["model"]["w"], own_state(1, 6)["model"]["w"])


@pytest.fixture(scope="module")
def two_process_weights(tmp_path_factory) -> Path:
    """The weights folder of a save by two processes: last.pt and rank 1's file."""
    weights = tmp_path_factory.mktemp("two") / "weights"
    run_saves(weights, [(1, "last")], processes=2)
    return weights


def test_a_rank_that_cannot_write_stops_training_before_last_pt(two_process_weights, tmp_path):
    """Rank 0 stops with a TrainingStopped that names the file and the last.pt kept, as it was."""
    weights = tmp_path / "weights"
    weights.mkdir()
    for path in two_process_weights.iterdir():
        (weights / path.name).write_bytes(path.read_bytes())
    before = {path.name: path.read_bytes() for path in weights.iterdir()}
    run_saves(weights, [], processes=2, unwritable=True)
    assert {path.name: path.read_bytes() for path in weights.iterdir()} == before


@pytest.fixture
def checkpoint_of_two(two_process_weights, tmp_path) -> Path:
    """A copy of two_process_weights' last.pt with rank 1's file beside it; returns last.pt's path."""
    for path in two_process_weights.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    return tmp_path / "last.pt"


def test_resume_refuses_another_process_count_a_missing_file_and_a_file_of_another_save(checkpoint_of_two):
    last = checkpoint_of_two
    checkpoint = torch.load(last, weights_only=True)
    for rank in (0, 2):  # every rank knows the process count
        with pytest.raises(UserError, match="--nproc_per_node 2 \\(not 3\\)"):
            own_process_state(checkpoint, last, World(rank=rank, size=3))
    with pytest.raises(UserError, match="holds no states of its separate processes"):
        own_process_state({"hyp": {}}, last, World(rank=1, size=2))
    (own,) = last.parent.glob("last.rank1.*.pt")
    other = {**checkpoint, "process_files": {**checkpoint["process_files"], "token": "0123abcd"}}
    own.rename(
        last.parent / process_file_name("last", 1, "0123abcd")
    )  # the name of another save's, its content this one's
    with pytest.raises(UserError, match="written by another save"):
        own_process_state(other, last, World(rank=1, size=2))
    with pytest.raises(UserError, match="rank 1's own state, .* is missing"):
        own_process_state(checkpoint, last, World(rank=1, size=2))
    (last.parent / process_file_name("last", 1, "0123abcd")).write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(UserError, match="unreadable"):
        own_process_state(other, last, World(rank=1, size=2))


def test_resumed_state_gives_ranks_their_own_and_reads_the_layout_before_process_files(checkpoint_of_two, tmp_path):
    """Ranks 1.. resume their own model, optimizer, scaler, RNG and hyp, rank 0 the checkpoint's;
    a checkpoint of the earlier layout (every process's state in process_states) still resumes."""
    last = checkpoint_of_two
    checkpoint, state = torch.load(last, weights_only=True), {"model": "rank 0's", "loop": "shared"}
    assert resumed_state(state, checkpoint, last, World(rank=0, size=2), alone=True) == (state, {"lr0": 0.0})
    resumed, hyp = resumed_state(state, checkpoint, last, World(rank=1, size=2), alone=True)
    assert torch.equal(resumed["model"]["w"], own_state(1, 1)["model"]["w"]) and resumed["loop"] == "shared"
    assert hyp == {"lr0": 0.01}
    assert resumed_state(state, checkpoint, last, World(rank=1, size=2), alone=False) == (state, {"lr0": 0.0})

    earlier = {"hyp": {"lr0": 0.0}, "process_states": [own_state(1, 7)]}
    resumed, hyp = resumed_state(state, earlier, tmp_path / "old.pt", World(rank=1, size=2), alone=True)
    assert torch.equal(resumed["model"]["w"], own_state(1, 7)["model"]["w"]) and hyp == {"lr0": 0.01}
    with pytest.raises(UserError, match="--nproc_per_node 2"):
        resumed_state(state, earlier, tmp_path / "old.pt", World(rank=1, size=4), alone=True)
