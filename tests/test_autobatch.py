"""AutoBatch (--batch-size -1): a measured batch that runs, is logged and resumed with; an
out-of-memory is one clear error naming a batch that fits."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

import train
from models.yolo import DetectionModel, build_model
from tests.conftest import tiny_train_args
from utils.errors import run_cli
from utils.hyp import load_hyp
from utils.peak_memory import cpu_peak_measurable
from utils.train import autobatch
from utils.train.autobatch import StepMemoryFit, measure_step_memory

needs_rss = pytest.mark.skipif(not cpu_peak_measurable(), reason="needs Linux's resident-set peak")
CPU = torch.device("cpu")


def auto_args(tiny_dataset, project, *extra: str) -> list[str]:
    args = tiny_train_args(tiny_dataset, project, *extra)
    args[args.index("--batch-size") + 1] = "-1"
    return args


@needs_rss
def test_a_step_is_measured_at_three_batches_and_the_line_grows_with_the_batch():
    model = build_model("yolov5n.yaml", nc=6)
    hyp = load_hyp(None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    fit = measure_step_memory(
        model, hyp, img_size=160, device=CPU, amp_dtype=None, weights_dtype=torch.float32, optimizer="SGD"
    )
    assert [batch for batch, _ in fit.measured] == [1, 2, 4]
    assert fit.slope > 0 and fit.measured[-1][1] > fit.measured[0][1]
    assert fit.weight_bytes == 4 * sum(p.numel() for p in model.parameters())
    assert fit.optimizer_state_bytes == fit.weight_bytes  # SGD's momentum
    # the run's own model, BatchNorm statistics and random numbers are untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


@needs_rss
@pytest.mark.slow
def test_autobatch_trains_with_the_measured_batch_logs_the_fit_and_resumes_with_it(
    tiny_dataset, tmp_path, monkeypatch, capsys
):
    """A budget measured for about 5 images of 64 px: the run logs the fit, trains with the batch
    it chose, records it, and a resumed run keeps it."""
    model = build_model("yolov5n.yaml", nc=6)
    probe = measure_step_memory(
        model, load_hyp(None), img_size=64, device=CPU, amp_dtype=None, weights_dtype=torch.float32, optimizer="AdamW"
    )
    held = autobatch.held_bytes(probe, averages=1, weights_resident=True, ddp=False)
    budget = held + probe.intercept + 5.5 * probe.slope
    monkeypatch.setattr(autobatch, "available_memory_bytes", lambda device: int(budget / 0.6))
    assert train.main(auto_args(tiny_dataset, tmp_path, "--epochs", "2", "--save-period", "1")) == 0
    chosen = yaml.safe_load((tmp_path / "exp" / "opt.yaml").read_text())["batch_size"]
    assert 1 <= chosen < 16  # the memory chose it, not the train split's 16 images
    log = capsys.readouterr().out
    assert f"a batch of {chosen} fills at most 60% of the" in log and "GiB per image" in log
    assert f"batch {chosen} x " in log  # the run trained with it
    last = torch.load(tmp_path / "exp" / "weights" / "last.pt", weights_only=True)
    assert last["opt"]["batch_size"] == chosen

    run = tmp_path / "again" / "exp"  # resumed from the end of the first epoch
    shutil.copytree(tmp_path / "exp", run)
    (run / "results.csv").write_text("".join((run / "results.csv").read_text().splitlines(True)[:2]))
    monkeypatch.setattr(autobatch, "available_memory_bytes", lambda device: 1)  # no second measurement
    assert train.main(["--resume", str(run / "weights" / "epoch0.pt"), "--workers", "0"]) == 0
    log = capsys.readouterr().out
    assert "AutoBatch" not in log and f"batch {chosen} x " in log


def test_the_line_never_falls_and_the_choice_leaves_the_run_its_state():
    noisy = autobatch._fit([(1, 30), (2, 20), (4, 25)], weight_bytes=10, optimizer_state_bytes=20)
    assert noisy.slope == pytest.approx(25 / 4) and noisy.intercept == 0  # through the origin and the largest
    fit = StepMemoryFit(((1, 150), (4, 450)), intercept=50, slope=100, weight_bytes=10, optimizer_state_bytes=20)
    assert autobatch.held_bytes(fit, averages=2, weights_resident=False, ddp=True) == 4 * 10 + 20
    assert fit.largest_batch(1050) == 10 and fit.largest_batch(149) == 0


@pytest.mark.parametrize("value", ["-2", "0"])
def test_batch_sizes_below_one_other_than_auto_are_refused(tiny_dataset, tmp_path, value):
    args = auto_args(tiny_dataset, tmp_path, "--epochs", "1")
    args[args.index("--batch-size") + 1] = value
    with pytest.raises(SystemExit) as code:
        run_cli(lambda: train.main(args), "train.py")
    assert code.value.code == 2


def fake_device(monkeypatch, per_image: int, capacity: int) -> None:
    """A device of `capacity` bytes on which a training step takes `per_image` bytes an image:
    larger steps raise CUDA's out-of-memory error, and AutoBatch's meter reads the same."""
    forward, largest = DetectionModel.forward, [0]

    def fake_forward(self, x):
        if self.training:
            largest[0] = max(largest[0], x.shape[0])
            if x.shape[0] * per_image > capacity:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, x)

    class FakeMeter:
        def __init__(self, device):
            pass

        def reset(self):
            largest[0] = 0

        def in_use(self):
            return 0

        def peak(self):
            return largest[0] * per_image

    monkeypatch.setattr(DetectionModel, "forward", fake_forward)
    monkeypatch.setattr(autobatch, "PeakMemory", FakeMeter)
    monkeypatch.setattr(autobatch, "available_memory_bytes", lambda device: capacity)


def test_out_of_memory_is_one_error_line_naming_a_batch_that_then_trains(tiny_dataset, tmp_path, monkeypatch, capsys):
    fake_device(monkeypatch, per_image=10**8, capacity=6 * 10**8 + 1)  # 6 images fit, 8 do not
    args = tiny_train_args(tiny_dataset, tmp_path, "--epochs", "1", "--batch-size", "8")
    with pytest.raises(SystemExit) as code:
        run_cli(lambda: train.main(args), "train.py")
    err = capsys.readouterr().err
    assert code.value.code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: cpu ran out of memory training at --imgsz 64")
    assert "a batch of 5 per process fits: train with --batch-size 5 " in lines[0]  # 90% of 6 images' memory
    assert train.main(tiny_train_args(tiny_dataset, tmp_path, "--epochs", "1", "--batch-size", "5")) == 0


def test_autobatch_stops_measuring_at_the_first_batch_that_runs_out(tiny_dataset, tmp_path, monkeypatch, capsys):
    fake_device(monkeypatch, per_image=10**8, capacity=3 * 10**8)  # batch 4 runs out: 1 and 2 are fitted
    assert train.main(auto_args(tiny_dataset, tmp_path, "--epochs", "1")) == 0
    assert "measured 0.0931 GiB at 1, 0.186 GiB at 2: 0.0931 GiB per image" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "exp" / "opt.yaml").read_text())["batch_size"] == 1  # 60% of 3 images
