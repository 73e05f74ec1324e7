"""--amp auto: on a CPU the faster of fp32 and bf16 autocast, by timing (faked here), cached per
CPU, torch, model, batch and size; recorded in the run for resume, val.py and detect.py."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import yaml

import train
import val
from models.yolo import build_model
from tests.conftest import tiny_train_args
from utils import precision as precision_module
from utils.checkpoint.format import load_checkpoint
from utils.dist import World
from utils.errors import UserError
from utils.hyp import load_hyp
from utils.infer.predictor import Detector
from utils.precision import Precision, Timing, choose_precision, inference_precision
from utils.train.precision import training_precision

CPU = torch.device("cpu")


class FakeClock:
    """time_steps faked: the milliseconds given per precision, and how often it was asked."""

    def __init__(self, fp32: float, bf16: float):
        self.ms, self.calls = {"fp32": fp32, "bf16": bf16}, 0

    def __call__(self, step, dtypes, rounds=3):
        self.calls += 1
        return dict(self.ms)


@pytest.fixture(autouse=True)
def verdict_cache(monkeypatch, tmp_path):
    """A cache folder of the test's own: a verdict another test cached would answer in place of its faked clock."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("EMA_YOLO_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU with bfloat16 kernels, whatever this one has."""
    monkeypatch.setattr(precision_module, "cpu_has_bf16_kernels", lambda: True)


def fake_clock(monkeypatch, fp32: float, bf16: float) -> FakeClock:
    clock = FakeClock(fp32, bf16)
    monkeypatch.setattr(precision_module, "time_steps", clock)
    return clock


def timing(batch: int = 16, img_size: int = 320) -> Timing:
    def never(dtype):
        raise AssertionError("the faked clock runs no step")

    return Timing("a training step", "training", {"nc": 3, "backbone": []}, batch, img_size, lambda: never)


def test_auto_keeps_fp32_where_bf16_is_slower_and_bf16_where_it_is_faster(bf16_cpu, monkeypatch):
    """The issue's Intel Xeon: bf16 393 ms, fp32 303 ms a step -> fp32; the EPYC's opposite -> bf16."""
    fake_clock(monkeypatch, fp32=303.0, bf16=393.0)
    slower = choose_precision("auto", CPU, timing(batch=16))
    assert (slower.amp, slower.dtype, slower.ms) == ("off", None, {"fp32": 303.0, "bf16": 393.0})
    assert "393 ms in bf16 autocast, 303 ms in fp32" in slower.reason
    fake_clock(monkeypatch, fp32=538.0, bf16=412.0)
    faster = choose_precision("auto", CPU, timing(batch=32))
    assert (faster.amp, faster.dtype) == ("bf16", torch.bfloat16)


def test_bf16_must_win_clearly_fp32_being_the_more_exact(bf16_cpu, monkeypatch):
    fake_clock(monkeypatch, fp32=100.0, bf16=97.0)
    assert choose_precision("auto", CPU, timing()).amp == "off"


def test_a_verdict_is_cached_per_cpu_model_batch_and_size(bf16_cpu, monkeypatch, verdict_cache):
    clock = fake_clock(monkeypatch, fp32=538.0, bf16=412.0)
    first = choose_precision("auto", CPU, timing(batch=8, img_size=96))
    again = choose_precision("auto", CPU, timing(batch=8, img_size=96))
    assert clock.calls == 1 and again.amp == first.amp == "bf16" and again.ms == first.ms
    assert "measured now" in first.reason and "measured earlier" in again.reason
    choose_precision("auto", CPU, timing(batch=4, img_size=96))  # another batch: timed anew
    choose_precision("auto", CPU, timing(batch=8, img_size=128))  # another size
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)  # another share of the machine
    choose_precision("auto", CPU, timing(batch=8, img_size=96))
    assert clock.calls == 4
    verdicts = json.loads((verdict_cache / "precision.json").read_text())["verdicts"]
    assert {v["key"]["batch"] for v in verdicts.values()} >= {4, 8}


def test_an_unreadable_cache_is_replaced_and_an_unwritable_one_only_costs_a_timing(
    bf16_cpu, monkeypatch, tmp_path, caplog
):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "precision.json").write_text("{not json")
    monkeypatch.setenv("EMA_YOLO_CACHE_DIR", str(cache))
    clock = fake_clock(monkeypatch, fp32=100.0, bf16=50.0)
    with caplog.at_level(logging.WARNING):
        assert choose_precision("auto", CPU, timing()).amp == "bf16"
    assert "ignoring the unreadable precision cache" in caplog.text
    assert json.loads((cache / "precision.json").read_text())["verdicts"]  # rewritten whole
    blocked = tmp_path / "a file"
    blocked.write_text("")
    monkeypatch.setenv("EMA_YOLO_CACHE_DIR", str(blocked / "cache"))  # a folder that cannot be made
    with caplog.at_level(logging.WARNING):
        chosen = choose_precision("auto", CPU, timing())
    assert chosen.amp == "bf16" and clock.calls == 2 and "cannot save the precision verdict" in caplog.text


def test_a_cpu_without_bf16_kernels_is_not_timed(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_has_bf16_kernels", lambda: False)
    clock = fake_clock(monkeypatch, fp32=100.0, bf16=50.0)
    chosen = choose_precision("auto", CPU, timing())
    assert chosen.amp == "off" and clock.calls == 0 and "no bfloat16 kernels" in chosen.reason


def test_what_the_user_asks_for_is_not_timed(bf16_cpu, monkeypatch):
    clock = fake_clock(monkeypatch, fp32=100.0, bf16=50.0)
    assert choose_precision("off", CPU, timing()).amp == "off"
    assert choose_precision("bf16", CPU, timing()).amp == "bf16"
    assert choose_precision("auto", CPU, timing(), weights_dtype=torch.float64).amp == "off"
    assert clock.calls == 0
    with pytest.raises(UserError, match="fp16 autocast runs on CUDA only"):
        choose_precision("fp16", CPU, timing())
    with pytest.raises(UserError, match="--amp bf16 and --float64 contradict"):
        choose_precision("bf16", CPU, timing(), weights_dtype=torch.float64)


def test_the_timed_step_is_a_real_training_step_of_a_copy(bf16_cpu, monkeypatch):
    """The step --amp auto times trains a copy: the model, its BatchNorm statistics and the RNG are untouched."""
    timed = []

    def time_twice(step, dtypes, rounds=3):
        for dtype in dtypes:
            step(dtype)
            timed.append(dtype)
        return {"fp32": 10.0, "bf16": 20.0}

    monkeypatch.setattr(precision_module, "time_steps", time_twice)
    model = build_model("yolov5n.yaml", nc=3)  # anchors from the YAML; AutoAnchor has not run
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    chosen = training_precision(
        "auto",
        model,
        load_hyp(None, anchor_free=False),
        img_size=64,
        batch=2,
        optimizer="SGD",
        device=CPU,
        weights_dtype=torch.float32,
        world=World(),
    )
    assert chosen.amp == "off" and timed == [None, torch.bfloat16]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_a_resumed_run_keeps_its_recorded_precision_where_the_device_runs_it(monkeypatch):
    clock = fake_clock(monkeypatch, fp32=100.0, bf16=50.0)
    model, hyp = build_model("yolov5n.yaml", nc=3), load_hyp(None, anchor_free=False)
    options = {
        "img_size": 64,
        "batch": 2,
        "optimizer": "SGD",
        "device": CPU,
        "weights_dtype": torch.float32,
        "world": World(),
    }
    recorded = Precision("bf16", "cpu", "timed on the first run", {"fp32": 100.0, "bf16": 50.0})
    assert training_precision("bf16", model, hyp, recorded=recorded, **options) == recorded
    on_gpu = Precision("fp16", "cuda", "CUDA's default")  # resumed on a machine without its GPU
    monkeypatch.setattr(precision_module, "cpu_has_bf16_kernels", lambda: False)
    assert training_precision("fp16", model, hyp, recorded=on_gpu, **options).amp == "off"
    assert clock.calls == 0


@pytest.mark.parametrize(("fp32", "bf16", "amp"), [(303.0, 393.0, "off"), (538.0, 412.0, "bf16")])
def test_train_chooses_logs_and_records_and_val_and_detect_follow(
    bf16_cpu, monkeypatch, tiny_dataset, tmp_path, capsys, fp32, bf16, amp
):
    """python train.py on a CPU with bf16 kernels, bf16 timed slower or faster (faked): the run
    trains in the faster, says why, records it in opt.yaml and its checkpoints, and val.py and
    detect.py use it by default."""
    clock = fake_clock(monkeypatch, fp32=fp32, bf16=bf16)
    assert train.main(tiny_train_args(tiny_dataset, tmp_path, "--epochs", "1")) == 0
    log = capsys.readouterr().out
    described = {"off": "fp32", "bf16": "bfloat16 autocast"}[amp]
    expected = f"Precision: {described} (a training step of 4 images at 64 px took {bf16:.0f} ms in bf16 autocast, "
    assert expected + f"{fp32:.0f} ms in fp32, measured now" in log
    assert clock.calls == 1
    run = tmp_path / "exp"
    assert yaml.safe_load((run / "opt.yaml").read_text())["amp"] == amp
    for name in ("last.pt", "best.pt"):
        checkpoint = load_checkpoint(run / "weights" / name)
        assert checkpoint["opt"]["amp"] == checkpoint["precision"]["amp"] == amp
        assert checkpoint["precision"]["ms"] == {"fp32": fp32, "bf16": bf16}
    # val.py and detect.py: as the run trained, untimed; a user's --amp off still wins
    data = ["--data", str(tiny_dataset), "--no-plots", "--workers", "0"]
    assert val.main(["--weights", str(run / "weights" / "best.pt"), *data]) == 0
    assert f"{described} (as the run trained)" in capsys.readouterr().out
    detector = Detector(run / "weights" / "best.pt", device="cpu")
    assert detector.amp_dtype == (torch.bfloat16 if amp == "bf16" else None)
    assert detector.precision.amp == amp and detector.precision.reason == "as the run trained"
    assert Detector(run / "weights" / "best.pt", device="cpu", amp="off").amp_dtype is None
    assert clock.calls == 1


def test_a_checkpoint_from_before_amp_is_evaluated_by_the_rule_of_its_device(bf16_cpu, monkeypatch, tiny_run, tmp_path):
    """A run from before --amp recorded --no-amp or nothing: off, or auto on this device (timed)."""
    clock = fake_clock(monkeypatch, fp32=100.0, bf16=50.0)
    old = tmp_path / "old.pt"
    shutil.copy(tiny_run / "weights" / "best.pt", old)
    checkpoint = load_checkpoint(old)
    model = build_model("yolov5n.yaml", nc=len(checkpoint["names"]))
    model.yaml = checkpoint["model_yaml"]
    assert inference_precision("off", model, CPU, batch=8, img_size=64).amp == "off"
    assert inference_precision(None, model, CPU, batch=8, img_size=64).amp == "bf16"
    assert inference_precision("fp16", model, CPU, batch=8, img_size=64).amp == "bf16"  # CUDA's, timed here
    assert clock.calls == 1  # the second one is the same CPU, model, batch and size: cached
