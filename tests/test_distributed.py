"""torchrun / DDP on CPU (gloo): SyncBatchNorm and the loss's global means in two processes give
one process's numbers for the same global batch; end to end, two processes train, resume and
evaluate as one does."""

from __future__ import annotations

import copy
import csv
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from models.parse import read_model_yaml
from models.yolo import DetectionModel
from tests.conftest import REPO_ROOT, make_shapes_dataset, run_script
from tests.processes import (
    Node,
    free_port,
    in_two_processes,
    load,
    relative_differences,
    run_command,
    torchrun,
    torchrun_on_node,
    wait_for_checkpoint,
)
from utils.data import loader as loader_module
from utils.data.config import load_dataset_config
from utils.data.labels import scan_labels
from utils.data.listing import list_image_paths
from utils.data.loader import build_train_dataset
from utils.dist import World
from utils.errors import UserError
from utils.hyp import load_hyp
from utils.run_dir import checkpoint_to_resume
from utils.train.criterion import build_criterion
from utils.train.sync_bn import CPUSyncBatchNorm, convert_sync_batchnorm

MODELS = ("yolov5n.yaml", "yolo11n.yaml")  # both heads


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


@pytest.fixture
def two_machines(tmp_path) -> Iterator[list[Node]]:
    """Two machines simulated on this one (their own working folders, HOMEs, temporary and cache
    folders); whatever they still run is killed at the end."""
    nodes = [Node(tmp_path / f"node{rank}") for rank in range(2)]
    yield nodes
    for node in nodes:
        node.kill()


def run_files(run_dir: Path) -> list[str]:
    """The files of a run folder, but TensorBoard's event files (named after the time and the process)."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if not p.name.startswith("events.out."))


def launch_on(nodes: list[Node], *args: str) -> None:
    port = free_port()
    for rank, node in enumerate(nodes):
        node.start(torchrun_on_node(rank, port, *args))


@pytest.mark.slow
def test_two_machines_killed_mid_epoch_resume_to_the_one_machine_weights(
    ddp_and_single_runs, tiny_dataset, tmp_path, ddp_cfg, two_machines
):
    """README's command for two machines (torchrun --nnodes 2 --node-rank 0|1 --master-addr ...),
    one process each, the run folder on the shared disk (an absolute --project). A checkpoint at
    every step; once one is written mid-epoch, node 1 dies (SIGKILL to its torchrun and worker), node
    0's worker fails at its next collective, and both machines are launched again with --resume.
    Each rank continues at its place, and the run ends with one machine's two processes' weights
    and results.csv, bit for bit: node 1 trains on rank 1's shard (RANK, not its LOCAL_RANK 0,
    which would give it rank 0's), and the two shards make up each global batch as they do on one
    machine, where they give one process's EMA (test_two_processes_end_with_the_single_process_ema).
    Global rank 0 alone writes: nothing of the run lands in either machine's working folder, nor
    in node 1's HOME or cache folder. No process of either machine is left behind."""
    if ddp_cfg == "yolov5n.yaml":
        pytest.skip("test_stop_signals.py stops yolov5n under torchrun at random moments and resumes it bit for bit")
    ddp_dir = ddp_and_single_runs[0]
    nodes, project = two_machines, tmp_path / "shared" / "runs"
    last = project / "exp" / "weights" / "last.pt"
    launch_on(
        nodes,
        *("--data", str(tiny_dataset), "--epochs", "3", *DDP_TINY, "--cfg", ddp_cfg),
        *("--save-interval", "1e-6", "--project", str(project)),
    )
    wait_for_checkpoint(last, lambda loop: loop["batch"] > 0, nodes[0].process)
    nodes[1].kill()
    assert nodes[0].wait(timeout=120) != 0, nodes[0].output  # its worker failed: the other machine is gone
    assert nodes[0].left_running() == nodes[1].left_running() == []
    stopped = load(last)["loop"]  # where rank 0 stopped writing: the batch seen, or one more before the kill landed

    launch_on(nodes, "--resume", str(last))
    assert [node.wait() for node in nodes] == [0, 0], nodes[0].output + nodes[1].output
    # rank 0 wrote no later checkpoint once node 1 was gone: the run resumed where last.pt stood
    resumed_at = f"at epoch {stopped['epoch']} of 3" + (f", batch {stopped['batch']}" if stopped["batch"] else "")
    assert "Resuming" in nodes[0].output and resumed_at in nodes[0].output, nodes[0].output
    final, straight = load(last), load(ddp_dir / "weights" / "last.pt")
    assert final["updates"] == straight["updates"] and final["epoch"] == straight["epoch"] == 2
    for state in ("ema", "model"):  # the issue asks for 1e-8; float64 and --deterministic give bit equality
        for key, tensor in straight[state].items():
            assert torch.equal(final[state][key], tensor), (state, key)
    assert (project / "exp" / "results.csv").read_text() == (ddp_dir / "results.csv").read_text()

    assert [p.name for p in project.iterdir()] == ["exp"] and run_files(project / "exp") == run_files(ddp_dir)
    # In the machines' working folders, HOMEs and cache folders: rank 0's label caches in node 0's, and
    # matplotlib's font list (every process that imports it caches it under HOME), nothing else.
    written = [p for node in nodes for p in node.files() if "matplotlib" not in p.relative_to(node.root).parts]
    assert written and all(p.is_relative_to(nodes[0].cache / "labels") for p in written), written
    assert nodes[0].left_running() == nodes[1].left_running() == []


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["ddp-to-ddp", "ddp-to-single", "single-to-ddp"])
def test_resume_after_the_first_epoch(ddp_and_single_runs, tmp_path, direction, ddp_cfg):
    """The checkpoint written at the end of the first epoch resumes under torchrun to the
    uninterrupted 2-process run's weights, and across process counts (2 -> 1, 1 -> 2) to the run
    of the other kind (same global batch, so same steps). Two processes resume a bare --resume too:
    rank 0 finds the checkpoint under --project."""
    if ddp_cfg == "yolov5n.yaml":
        pytest.skip("the resume is the model's state whatever its head: yolo11n's checks it (CI time)")
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
def test_two_process_checkpoint_evaluates_in_one_process(ddp_and_single_runs, tiny_dataset, tmp_path, ddp_cfg):
    """val.py (one process) on the torchrun run's last.pt (float64 weights) prints the mAP rank 0
    logged for it, and detect.py runs it."""
    if ddp_cfg == "yolov5n.yaml":
        pytest.skip("a torchrun checkpoint loads as one whatever its head: yolo11n's checks it (CI time)")
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
    files = list_image_paths(data.train)[0]
    expected = scan_labels(files, data.nc, cache_path=None)
    assert dataset.scan.image_files == expected.image_files and dataset.scan.summary() == expected.summary()
    assert all(np.array_equal(a, b) for a, b in zip(dataset.scan.labels, expected.labels))


def test_rank_0_picks_the_checkpoint_to_resume_and_scans_the_training_split(tmp_path):
    """A bare --resume takes the newest last.pt on rank 0's disk (rank 1's may hold another run's), and
    rank 0's refusal is every rank's; rank 0 alone scans the training split, the others receive it."""
    data_yaml = make_shapes_dataset(tmp_path / "data", num_train=8, num_val=4, seed=3)
    in_two_processes(_rank_0_decides, tmp_path, data_yaml)
