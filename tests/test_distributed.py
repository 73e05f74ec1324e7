"""torchrun / DDP on CPU (gloo): SyncBatchNorm and the loss's global means in two processes give
one process's numbers for the same global batch; end to end, two processes train, resume and
evaluate as one does."""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch import nn

from models.parse import read_model_yaml
from models.yolo import DetectionModel
from tests.conftest import REPO_ROOT, make_shapes_dataset, run_script
from utils.checkpoint.format import model_from_checkpoint
from utils.data import loader as loader_module
from utils.data.config import load_dataset_config
from utils.data.labels import list_image_files, scan_labels
from utils.data.loader import build_train_dataset, build_val_loader, val_shard_loader
from utils.dist import World
from utils.errors import UserError
from utils.eval.evaluate import EvalResult, evaluate
from utils.hyp import load_hyp
from utils.run_dir import checkpoint_to_resume
from utils.train.criterion import build_criterion
from utils.train.grafting import graft, graft_from_next_process
from utils.train.separate_processes import own_process_state, process_file_name
from utils.train.sync_bn import CPUSyncBatchNorm, convert_sync_batchnorm

MODELS = ("yolov5n.yaml", "yolo11n.yaml")  # both heads


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_two_processes(fn, *args) -> None:
    """Run fn(rank, world_size, *args) in two gloo processes; a failed assertion fails the test."""
    in_processes(2, fn, *args)


def in_processes(count: int, fn, *args) -> None:
    """Run fn(rank, world_size, *args) in `count` gloo processes; a failed assertion fails the test."""
    port = free_port()
    mp.start_processes(_join_and_run, args=(port, count, fn, args), nprocs=count, join=True, start_method="spawn")


def _join_and_run(rank: int, port: int, count: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=count)
    try:
        fn(rank, count, *args)
    finally:
        dist.destroy_process_group()


def _sync_bn_matches_full_batch(rank: int, world_size: int, momentum) -> None:
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3, momentum=momentum), nn.SiLU())
    synced = convert_sync_batchnorm(copy.deepcopy(reference), torch.device("cpu"))
    assert isinstance(synced[1], CPUSyncBatchNorm)
    x = torch.randn(6, 3, 9, 7, generator=torch.Generator().manual_seed(1)) * 3 + 1
    weights = torch.randn(6, 4, 7, 5, generator=torch.Generator().manual_seed(2))
    for _ in range(2):  # twice: running statistics move twice
        expected = reference(x)
        (expected * weights).sum().backward()
        share = slice(rank * 3, rank * 3 + 3)  # the first three images on rank 0, the last three on rank 1
        out = synced(x[share])
        torch.testing.assert_close(out, expected[share].detach(), rtol=1e-5, atol=1e-5)
        (out * weights[share]).sum().backward()
    for p in synced.parameters():  # a rank's gradient is its share; their sum is the full-batch gradient
        dist.all_reduce(p.grad)
    for (name, a), b in zip(reference.named_parameters(), synced.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(synced[1], name), getattr(reference[1], name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.03, None], ids=["momentum", "cumulative"])
def test_cpu_sync_batchnorm_equals_batchnorm_over_the_global_batch(momentum):
    """Outputs, parameter gradients and running statistics of a batch split over two ranks equal
    BatchNorm2d's over the whole batch in one process."""
    in_two_processes(_sync_bn_matches_full_batch, momentum)


def _loss_gradient_matches_one_process(rank: int, world_size: int, cfg: str) -> None:
    torch.manual_seed(0)
    model = DetectionModel(read_model_yaml(cfg), nc=3).train()
    for module in model.modules():  # BatchNorm with fixed statistics: the batch split alone differs
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    hyp = load_hyp(None, anchor_free=model.anchor_free)
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor(
        [
            [0, 0, 0.5, 0.5, 0.3, 0.4],
            [0, 1, 0.2, 0.3, 0.1, 0.1],
            [1, 2, 0.6, 0.6, 0.5, 0.2],
            [3, 1, 0.4, 0.7, 0.2, 0.3],
            [3, 0, 0.7, 0.2, 0.25, 0.2],
            [3, 2, 0.5, 0.5, 0.9, 0.8],
        ]
    )
    single_loss, single_items = build_criterion(model, hyp, 64)(model(images), targets)
    single_loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    world = World(rank=rank, size=world_size, local_rank=rank, local_size=world_size)
    mine = slice(rank * 2, rank * 2 + 2)
    own = targets[(targets[:, 0] >= rank * 2) & (targets[:, 0] < rank * 2 + 2)].clone()
    own[:, 0] -= rank * 2  # image index within this rank's batch
    loss, items = build_criterion(model, hyp, 64, world=world)(model(images[mine]), own)
    loss.backward()
    for name, p in model.named_parameters():  # what DDP does: the mean of the ranks' gradients
        if name in expected:
            dist.all_reduce(p.grad)
            p.grad /= world_size
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    dist.all_reduce(items)  # the items are shares of the global loss
    torch.testing.assert_close(items, single_items, rtol=1e-5, atol=1e-7)


def _model_gradient_matches_in_float64(rank: int, world_size: int, cfg: str) -> None:
    torch.manual_seed(0)
    model = DetectionModel(read_model_yaml(cfg), nc=3).double().train()
    synced = convert_sync_batchnorm(copy.deepcopy(model), torch.device("cpu"))
    hyp = load_hyp(None, anchor_free=model.anchor_free)
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    targets = torch.tensor(
        [
            [0, 0, 0.5, 0.5, 0.3, 0.4],
            [1, 2, 0.6, 0.6, 0.5, 0.2],
            [2, 1, 0.4, 0.7, 0.2, 0.3],
            [3, 0, 0.7, 0.2, 0.25, 0.2],
            [3, 2, 0.5, 0.5, 0.9, 0.8],
        ]
    )
    build_criterion(model, hyp, 64)(model(images), targets)[0].backward()
    world = World(rank=rank, size=world_size, local_rank=rank, local_size=world_size)
    own = targets[(targets[:, 0] >= rank * 2) & (targets[:, 0] < rank * 2 + 2)].clone()
    own[:, 0] -= rank * 2
    build_criterion(synced, hyp, 64, world=world)(synced(images[rank * 2 : rank * 2 + 2]), own)[0].backward()
    # Relative to the tensor's gradient, or to a millionth of the whole gradient for the few whose
    # gradient is zero up to rounding (a BatchNorm bias whose shift a later BatchNorm removes).
    whole = torch.stack([a.grad.norm() for a in model.parameters() if a.requires_grad]).norm()
    for (name, a), b in zip(model.named_parameters(), synced.parameters()):
        if not a.requires_grad:  # the DFL's fixed bins
            continue
        dist.all_reduce(b.grad)
        b.grad /= world_size  # DDP's average
        assert float((b.grad - a.grad).norm() / torch.max(a.grad.norm(), 1e-6 * whole)) < 1e-9, name
    for (name, a), b in zip(model.named_buffers(), synced.buffers()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-9, atol=1e-12), name


@pytest.mark.parametrize("cfg", MODELS)
def test_sync_bn_and_loss_over_two_ranks_give_one_process_gradient_in_float64(cfg):
    """The whole detector in training mode, BatchNorm included: two ranks with SyncBatchNorm and
    the globally normalised loss take one process's gradient and BatchNorm statistics, to float64
    rounding (fp32 rounding is what remains in the end-to-end test below)."""
    in_two_processes(_model_gradient_matches_in_float64, cfg)


@pytest.mark.parametrize("cfg", MODELS)
def test_loss_over_two_ranks_gives_the_one_process_gradient(cfg):
    """Positives, cells and images counted over the ranks: the averaged gradient of two ranks with
    two images each equals one process's with the four images, though the ranks hold different
    numbers of targets (rank 0: three, rank 1: three of one image and none of the other)."""
    in_two_processes(_loss_gradient_matches_one_process, cfg)


# End to end under torchrun: two gloo processes against one process with the same global batch.
# Batch 8 of 16 images: 2 global batches per epoch, 4 images per rank. In float64: in fp32, one
# process with 2 threads instead of 1 already ends up to 2.4e-3 (relative) away in BatchNorm
# biases, whose gradients are small sums of large terms that cancel, so fp32 could not tell a
# 1e-3 error in the distributed arithmetic from rounding. In float64 the same runs agree to ~4e-12.
# SGD, whose steps are linear in the gradient, where Adam's would hide a wrongly scaled loss.
DDP_TINY = (
    "--imgsz",
    "64",
    "--batch-size",
    "8",
    "--workers",
    "1",
    "--sync-bn",
    "--deterministic",
    "--float64",
    "--optimizer",
    "SGD",
    "--no-plots",
    "--save-period",
    "1",
    "--swa-epochs",
    "2",
    "--average",  # the image-horizon EMA counts each step's images over both processes
    "ema-images",
    "power-0.07",
)
AGREEMENT = 1e-8  # relative, per tensor: the issue asks for 1e-4; float64 runs measured up to ~5e-12


def torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(REPO_ROOT / "train.py"),
        *args,
    ]


def run_command(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def relative_differences(a: dict, b: dict) -> dict[str, float]:
    """Per floating-point tensor: |a - b| / max(|b|, 1e-6) (Frobenius norms). The floor is for the
    few tensors that stay zero up to rounding: YOLO11's attention projection has a BatchNorm bias
    whose gradient is zero (the BatchNorms after it remove its shift), so it only gathers noise."""
    return {
        k: float((a[k].double() - v.double()).norm() / v.double().norm().clamp(min=1e-6))
        for k, v in b.items()
        if v.dtype.is_floating_point
    }


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module", params=MODELS)
def ddp_cfg(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def ddp_and_single_runs(tiny_dataset, tmp_path_factory, ddp_cfg) -> tuple[Path, Path]:
    """The same 3-epoch run under torchrun (2 processes) and in one process."""
    project = tmp_path_factory.mktemp("ddp")
    common = ("--data", str(tiny_dataset), "--epochs", "3", *DDP_TINY, "--cfg", ddp_cfg, "--project", str(project))
    run_command(torchrun(*common, "--name", "ddp"))
    run_command([sys.executable, str(REPO_ROOT / "train.py"), *common, "--name", "single"])
    return project / "ddp", project / "single"


def assert_same_ema(final: dict, expected: dict) -> None:
    assert final["updates"] == expected["updates"] > 0
    assert final["ema"].keys() == expected["ema"].keys()
    differences = relative_differences(final["ema"], expected["ema"])
    worst = max(differences, key=differences.get)
    print(f"EMA relative differences: largest {differences[worst]:.2e} ({worst})")
    for key, difference in differences.items():
        assert difference < AGREEMENT, (key, difference)


@pytest.mark.slow
def test_two_processes_end_with_the_single_process_ema(ddp_and_single_runs):
    """Same update count, and every EMA tensor equal to one process's up to float64 rounding; the
    checkpoint has no DDP 'module.' prefixes."""
    ddp_dir, single_dir = ddp_and_single_runs
    ddp, single = load(ddp_dir / "weights" / "last.pt"), load(single_dir / "weights" / "last.pt")
    assert not any(k.startswith("module.") for k in (*ddp["ema"], *ddp["model"]))
    assert_same_ema(ddp, single)
    # The tracked averages too: the same images counted per step (the whole global batch), so the
    # image-horizon EMA gives every image the same weight under 1 and 2 processes.
    train_images = 16  # conftest's tiny_dataset
    for name in ("ema-images", "power-0.07"):
        a, b = ddp["averages"][name], single["averages"][name]
        assert a["updates"] == b["updates"] == single["updates"] and a["images"] == b["images"] == 3 * train_images
        assert max(relative_differences(a["module"], b["module"]).values()) < AGREEMENT, name
    # SWA of the EMA: the same average; rank 0 recomputed its BatchNorm statistics alone, outside SyncBatchNorm
    ddp_swa, single_swa = load(ddp_dir / "weights" / "swa.pt")["swa"], load(single_dir / "weights" / "swa.pt")["swa"]
    assert ddp_swa["updates"] == single_swa["updates"] == 2
    assert max(relative_differences(ddp_swa["module"], single_swa["module"]).values()) < AGREEMENT


def interrupted_checkpoint(command: list[str], last: Path, wanted) -> dict[str, bytes]:
    """Run `command` (torchrun) until `last` holds a checkpoint whose loop state satisfies
    `wanted`, end the run there and return that checkpoint's bytes and those of the files of
    the other processes it names (processes training separately), by file name, as if killed
    right after writing them (put_back() writes them back). torchrun starts its workers in
    sessions of their own: it is told to end them (SIGTERM, which ends a Python process on the
    spot) and returns once they are gone."""
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline, found = time.time() + 300, None
    while found is None and process.poll() is None and time.time() < deadline:
        if last.exists():  # written atomically: always a whole file
            data = last.read_bytes()
            checkpoint = torch.load(io.BytesIO(data), weights_only=True)
            if wanted(checkpoint["loop"]):
                with contextlib.suppress(FileNotFoundError):  # a later checkpoint replaced them: look again
                    found = {last.name: data, **{p.name: p.read_bytes() for p in process_files(checkpoint, last)}}
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    assert found is not None, "the checkpoint waited for was not seen before the run ended"
    return found


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_the_same_weights(ddp_and_single_runs, tiny_dataset, tmp_path, ddp_cfg):
    """torchrun and its workers ended after the first checkpoint, written mid-epoch (a checkpoint
    at every step), then torchrun --resume: each rank continues at its place."""
    ddp_dir = ddp_and_single_runs[0]
    command = torchrun(
        "--data",
        str(tiny_dataset),
        "--epochs",
        "3",
        *DDP_TINY,
        "--cfg",
        ddp_cfg,
        "--save-interval",
        "1e-6",
        "--project",
        str(tmp_path),
        "--name",
        "killed",
    )
    last = tmp_path / "killed" / "weights" / "last.pt"
    put_back(interrupted_checkpoint(command, last, lambda loop: loop["batch"] > 0), last.parent)
    interrupted = load(last)
    print(f"resuming from the checkpoint at epoch {interrupted['loop']['epoch']}, batch {interrupted['loop']['batch']}")

    resumed = run_command(torchrun("--resume", str(last)))
    assert "Resuming" in resumed.stdout and "epoch 0 of 3, batch 1" in resumed.stdout, resumed.stdout
    final, straight = load(last), load(ddp_dir / "weights" / "last.pt")
    assert final["updates"] == straight["updates"] and final["epoch"] == straight["epoch"] == 2
    for state in ("ema", "model"):  # the issue asks for 1e-6; float64 and --deterministic give bit equality
        for key, tensor in straight[state].items():
            assert torch.equal(final[state][key], tensor), (state, key)


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["ddp-to-ddp", "ddp-to-single", "single-to-ddp"])
def test_resume_after_the_first_epoch(ddp_and_single_runs, tmp_path, direction):
    """The checkpoint written at the end of the first epoch resumes under torchrun to the
    uninterrupted 2-process run's weights, and across process counts (2 -> 1, 1 -> 2) to the run
    of the other kind (same global batch, so same steps). Two processes resume a bare --resume too:
    rank 0 finds the checkpoint under --project."""
    runs = dict(zip(("ddp", "single"), ddp_and_single_runs))
    source, target = direction.split("-to-")
    last = tmp_path / "exp" / "weights" / "last.pt"
    last.parent.mkdir(parents=True)
    shutil.copy(runs[source] / "weights" / "epoch0.pt", last)
    shutil.copy(runs[source] / "opt.yaml", last.parent.parent)  # a run folder of its own, to continue in
    resume = (
        torchrun("--resume", "--project", str(tmp_path))
        if direction == "ddp-to-ddp"
        else torchrun("--resume", str(last))
        if target == "ddp"
        else [sys.executable, str(REPO_ROOT / "train.py"), "--resume", str(last)]
    )
    run_command(resume)
    final, expected = load(last), load(runs[target] / "weights" / "last.pt")
    assert_same_ema(final, expected)
    assert max(relative_differences(final["model"], expected["model"]).values()) < AGREEMENT


@pytest.mark.slow
def test_two_process_checkpoint_evaluates_in_one_process(ddp_and_single_runs, tiny_dataset, tmp_path):
    """val.py (one process) on the torchrun run's last.pt (float64 weights) prints the mAP rank 0
    logged for it, and detect.py runs it."""
    ddp_dir = ddp_and_single_runs[0]
    detected = run_script(
        "detect.py",
        "--weights",
        str(ddp_dir / "weights" / "last.pt"),
        "--source",
        str(tiny_dataset.parent / "shapes" / "images" / "val"),
        "--project",
        str(tmp_path),
    )
    assert detected.returncode == 0 and "8 images" in detected.stdout, detected.stdout + detected.stderr
    result = run_script(
        "val.py",
        "--weights",
        str(ddp_dir / "weights" / "last.pt"),
        "--data",
        str(tiny_dataset),
        "--imgsz",
        "64",
        "--no-plots",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with open(ddp_dir / "results.csv", newline="") as f:
        last_row = list(csv.DictReader(f))[-1]
    row = next(line.split() for line in result.stdout.splitlines() if line.split()[:1] == ["all"])
    assert [float(v) for v in row[5:7]] == [
        float(f"{float(last_row[k]):.3g}") for k in ("metrics/mAP_0.5", "metrics/mAP_0.5:0.95")
    ]


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


def process_files(checkpoint: dict, path: Path) -> list[Path]:
    """The files beside `path` holding `checkpoint`'s other processes' states (none when they trained as one)."""
    record = checkpoint.get("process_files")
    if record is None:
        return []
    names = [process_file_name(record["stem"], rank, record["token"]) for rank in range(1, record["processes"])]
    return [path.parent / name for name in names]


def put_back(files: dict[str, bytes], folder: Path) -> None:
    """Write interrupted_checkpoint()'s files back into `folder`."""
    for name, data in files.items():
        (folder / name).write_bytes(data)


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


def _rank_0_decides(rank: int, world_size: int, tmp_path: Path, data_yaml: Path) -> None:
    world = World(rank=rank, size=world_size, local_rank=rank, local_size=world_size)
    # Each rank's own "disk": rank 1's holds a newer last.pt of another run.
    own_project = tmp_path / f"machine{rank}" / "runs"
    last = own_project / ("exp" if rank == 0 else "exp9") / "weights" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"checkpoint")
    os.utime(last, (time.time() - 100 * (1 - rank),) * 2)
    rank_0s = tmp_path / "machine0" / "runs" / "exp" / "weights" / "last.pt"
    assert checkpoint_to_resume(True, own_project, world) == rank_0s
    empty = tmp_path / f"machine{rank}" / "empty" if rank == 0 else own_project  # rank 0 finds none
    with pytest.raises(UserError, match=f"no last.pt found under {tmp_path / 'machine0' / 'empty'}"):
        checkpoint_to_resume(True, empty, world)
    # The training split: rank 0 scans it, rank 1 receives the scan.
    if rank == 1:
        loader_module.scan_split = lambda *args, **kwargs: pytest.fail("rank 1 scanned the split itself")
    data = load_dataset_config(str(data_yaml))
    hyp = load_hyp(None, anchor_free=False)
    dataset = build_train_dataset(data, hyp, img_size=64, seed=0, single_cls=False, cache="off", epochs=1, world=world)
    files = list_image_files(data.train)[0]
    expected = scan_labels(files, data.nc, cache_path=None)
    assert dataset.scan.image_files == expected.image_files and dataset.scan.summary() == expected.summary()
    assert all(np.array_equal(a, b) for a, b in zip(dataset.scan.labels, expected.labels))


def test_rank_0_picks_the_checkpoint_to_resume_and_scans_the_training_split(tmp_path):
    """A bare --resume takes the newest last.pt on rank 0's disk (rank 1's may hold another run's), and
    rank 0's refusal is every rank's; rank 0 alone scans the training split, the others receive it."""
    data_yaml = make_shapes_dataset(tmp_path / "data", num_train=8, num_val=4, seed=3)
    in_two_processes(_rank_0_decides, tmp_path, data_yaml)


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
