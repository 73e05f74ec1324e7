"""Checkpoints: exact round trip under weights_only=True, atomic writes, clear refusals."""

from __future__ import annotations

import errno
import os
import pickle
import random

import numpy as np
import pytest
import torch

from models.yolo import build_model
from utils.checkpoint.format import (
    FORMAT_VERSION,
    averaged_checkpoint,
    batch_per_process,
    foreign_checkpoint,
    image_size,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    strip_for_inference,
    trained_amp,
    training_checkpoint,
    training_state,
    transfer_matching_weights,
)
from utils.errors import UserError
from utils.hyp import load_hyp
from utils.precision import Precision
from utils.train.ema import ModelEMA
from utils.train.loop_state import LoopState
from utils.train.loss import DetectionLoss
from utils.train.optim import build_optimizer
from utils.train.rng import restore_rng_state, rng_state
from utils.train.run import state_of
from utils.train.step import optimizer_step


@pytest.fixture(scope="module")
def trained_checkpoint():
    """A checkpoint after two real optimizer steps (momentum buffers, EMA updates, moved BN stats)."""
    torch.manual_seed(0)
    model = build_model("yolov5n.yaml", nc=3)
    hyp = load_hyp("scratch-low.yaml")
    model.names, model.hyp = ["a", "b", "c"], hyp
    optimizer = build_optimizer(model, "SGD", 0.01, 0.937, 5e-4)
    ema = ModelEMA(model)
    criterion = DetectionLoss(model.detect_head, hyp, 64)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.3]])
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=256.0)
    for _ in range(2):
        loss, _ = criterion(model(torch.rand(1, 3, 64, 64)), targets)
        scaler.scale(loss).backward()
        assert optimizer_step(optimizer, scaler, model)
        ema.update(model)
    loop = LoopState(epoch=5, batch=7, loss_sum=torch.tensor([0.1, 0.2, 0.3]), best_fitness=0.25, best_epoch=3)
    checkpoint = training_checkpoint(
        state_of(model, ema, optimizer, scaler=scaler, loop=loop),
        finished=False,
        model_yaml=model.yaml,
        names=model.names,
        hyp=hyp,
        opt={"epochs": 10, "imgsz": 64, "data": "x.yaml", "amp": "bf16"},
        world_size=1,
        precision=Precision("bf16", "cpu", "timed", {"fp32": 120.5, "bf16": 80.25}).to_dict(),
    )
    return model, ema, optimizer, checkpoint


def test_round_trip_with_weights_only(tmp_path, trained_checkpoint):
    model, ema, optimizer, checkpoint = trained_checkpoint
    path = tmp_path / "last.pt"
    save_checkpoint(path, checkpoint)
    raw = torch.load(path, map_location="cpu", weights_only=True)  # the plain library call users make
    loaded = load_checkpoint(path)
    assert raw.keys() == loaded.keys() == checkpoint.keys()
    for key in ("model", "ema"):
        source = (model if key == "model" else ema.module).state_dict()
        assert loaded[key].keys() == source.keys()
        for name, tensor in source.items():
            assert torch.equal(loaded[key][name], tensor) and loaded[key][name].dtype == tensor.dtype, name
    assert (
        loaded["updates"] == 2 and loaded["epoch"] == 4 and loaded["best_fitness"] == 0.25 and loaded["best_epoch"] == 3
    )
    restored_loop = LoopState.from_state_dict(loaded["loop"])
    assert (restored_loop.epoch, restored_loop.batch) == (5, 7)
    assert torch.equal(restored_loop.loss_sum, torch.tensor([0.1, 0.2, 0.3]))
    assert loaded["format_version"] == FORMAT_VERSION and loaded["names"] == ["a", "b", "c"]
    assert loaded["scaler"]["scale"] == 256.0 and loaded["scaler"]["_growth_tracker"] == 2
    restored = build_optimizer(build_model("yolov5n.yaml", nc=3), "SGD", 0.01, 0.937, 5e-4)
    restored.load_state_dict(loaded["optimizer"])
    restored_ema = ModelEMA(build_model("yolov5n.yaml", nc=3))
    restored_ema.load_state_dict(training_state(loaded)["ema"])
    assert restored_ema.updates == 2 and restored_ema.decay == ema.decay
    for a, b in zip(restored.state.values(), optimizer.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_rebuilt_model_gives_the_same_outputs(tmp_path, trained_checkpoint):
    _, ema, _, checkpoint = trained_checkpoint
    path = tmp_path / "best.pt"
    save_checkpoint(path, checkpoint)
    rebuilt = model_from_checkpoint(load_checkpoint(path), "ema").eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x)[0], ema.module(x)[0], rtol=0, atol=0)
    assert rebuilt.names == ["a", "b", "c"] and rebuilt.nc == 3


def test_rng_state_round_trip(tmp_path, trained_checkpoint):
    *_, checkpoint = trained_checkpoint
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save_checkpoint(tmp_path / "rng.pt", {**checkpoint, "rng": rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, trained_checkpoint, monkeypatch):
    *_, checkpoint = trained_checkpoint
    path = tmp_path / "last.pt"
    save_checkpoint(path, checkpoint)
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {**checkpoint, "epoch": 5})
    assert path.read_bytes() == before and not list(tmp_path.glob(".*tmp"))


class Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_refuses_foreign_and_broken_files(tmp_path, trained_checkpoint, capsys):
    *_, checkpoint = trained_checkpoint
    pickled = tmp_path / "yolov5s.pt"
    torch.save({"model": Payload()}, pickled, pickle_protocol=2)
    with pytest.raises(UserError, match="full unpickling"):
        load_checkpoint(pickled)
    assert "unpickled!" not in capsys.readouterr().out
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UserError, match="plain.pkl"):
        load_checkpoint(plain)
    good = tmp_path / "good.pt"
    save_checkpoint(good, checkpoint)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="unreadable"):
        load_checkpoint(truncated)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(UserError, match="format marker"):
        load_checkpoint(other)
    newer = tmp_path / "newer.pt"
    torch.save({**checkpoint, "format_version": FORMAT_VERSION + 1}, newer)
    with pytest.raises(UserError, match="format version"):
        load_checkpoint(newer)
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt")


def test_transfer_matches_by_name_and_shape(trained_checkpoint):
    *_, checkpoint = trained_checkpoint
    other_classes = build_model("yolov5n.yaml", nc=5)
    moved, total = transfer_matching_weights(other_classes, checkpoint)
    # Everything but the three Detect convolutions' weights and biases (their class count differs).
    assert moved == total - 6
    assert torch.equal(other_classes.state_dict()["model.0.conv.weight"], checkpoint["ema"]["model.0.conv.weight"])


def test_version_1_files_are_read_as_their_kind(tmp_path, trained_checkpoint):
    """Files written before the 'kind' key (format version 1) still load: a training checkpoint
    resumes, an average (swa.pt, average.py's output: a 'source' line and no optimizer) does not."""
    *_, checkpoint = trained_checkpoint
    version_1 = {k: v for k, v in checkpoint.items() if k != "kind"} | {"format_version": 1}
    torch.save(version_1, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["kind"] == "training" and loaded["format_version"] == FORMAT_VERSION
    assert training_state(loaded)["loop"]["batch"] == 7
    averaged = {**version_1, "optimizer": None, "scaler": None, "source": "SWA of the ema weights"}
    torch.save(averaged, tmp_path / "swa.pt")
    loaded = load_checkpoint(tmp_path / "swa.pt")
    assert loaded["kind"] == "average"
    with pytest.raises(UserError, match=r"an average of weights \(SWA of the ema weights\), which holds no training"):
        training_state(loaded)


def test_the_checkpoint_answers_for_its_run(trained_checkpoint):
    """Image size, batch per process (what BatchNorm saw, and what validation batches are sized
    from) and precision, as train.py used them; YOLOv5's defaults for a foreign file."""
    *_, checkpoint = trained_checkpoint
    assert image_size(checkpoint) == 64 and batch_per_process(checkpoint) == 16
    assert trained_amp(checkpoint) == checkpoint["opt"]["amp"] == checkpoint["precision"]["amp"]
    ddp = {**checkpoint, "opt": {**checkpoint["opt"], "batch_size": 64}, "world_size": 4}
    assert batch_per_process(ddp) == 16
    # A run from before --amp recorded --no-amp; without it, it used its device's autocast (not recorded)
    before_amp = {k: v for k, v in checkpoint["opt"].items() if k != "amp"}
    assert trained_amp({**checkpoint, "opt": {**before_amp, "no_amp": True}}) == "off"
    assert trained_amp({**checkpoint, "opt": {**before_amp, "no_amp": False}}) is None
    foreign = foreign_checkpoint({"nc": 3}, ["a", "b", "c"], {}, "a YOLOv5 file")
    assert image_size(foreign) == 640 and batch_per_process(foreign) == 16 and trained_amp(foreign) is None
    averaged = averaged_checkpoint({}, {}, "an average of nothing")  # a base without options
    assert image_size(averaged) == 640 and batch_per_process(averaged) == 16


def test_stripping_keeps_the_ema_alone_bit_for_bit(tmp_path):
    """best.pt as a finished run ships it. A yolov5s training checkpoint at 80 classes with SGD's
    momentum holds the weights three times over; stripped, the file is at most 1.05 x its EMA's
    fp32 tensors, holds them bit for bit, and refuses to resume or to give raw weights."""
    torch.manual_seed(0)
    model = build_model("yolov5s.yaml", nc=80)
    optimizer = build_optimizer(model, "SGD", 0.01, 0.937, 5e-4)
    ema = ModelEMA(model)
    for param in model.parameters():
        param.grad = torch.rand_like(param)
    optimizer.step()
    ema.update(model)  # the EMA now differs from the raw model
    loop = LoopState(epoch=3, best_fitness=0.5, best_epoch=2)
    names = [f"class{i}" for i in range(80)]
    path = tmp_path / "best.pt"
    full = training_checkpoint(
        state_of(model, ema, optimizer, loop=loop),
        finished=True,
        model_yaml=model.yaml,
        names=names,
        hyp=load_hyp("scratch-low.yaml"),
        opt={"imgsz": 64, "batch_size": 8},
        world_size=1,
    )
    save_checkpoint(path, full)
    ema_bytes = sum(t.numel() * t.element_size() for t in ema.module.state_dict().values())
    full_size = path.stat().st_size
    assert full_size > 2.9 * ema_bytes  # model, EMA and momentum buffers
    metrics = {"precision": 0.5, "recall": 0.4, "mAP_0.5": 0.3, "mAP_0.5:0.95": 0.2}
    assert strip_for_inference(path, metrics) == (full_size, path.stat().st_size)
    assert path.stat().st_size <= 1.05 * ema_bytes
    stripped = load_checkpoint(path)
    assert stripped["kind"] == "weights" and stripped["metrics"] == metrics
    assert (stripped["epoch"], stripped["best_epoch"], stripped["best_fitness"]) == (2, 2, 0.5)
    assert stripped["names"] == names and stripped["opt"] == full["opt"] and stripped["updates"] == 1
    assert not {"model", "optimizer", "scaler", "rng", "averages", "swa"} & stripped.keys()
    for name, tensor in ema.module.state_dict().items():
        assert torch.equal(stripped["ema"][name], tensor) and stripped["ema"][name].dtype == tensor.dtype, name
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        shipped = model_from_checkpoint(stripped, "ema").eval()
        torch.testing.assert_close(shipped(x)[0], ema.module.eval()(x)[0], rtol=0, atol=0)
    with pytest.raises(UserError, match="last.pt holds them.*no training state to resume"):
        training_state(stripped)
    with pytest.raises(UserError, match="holds no 'model' weights: it is a finished run's best weights"):
        model_from_checkpoint(stripped, "model", source=str(path))
    fine_tuned = build_model("yolov5s.yaml", nc=80)
    assert transfer_matching_weights(fine_tuned, stripped) == (len(ema.module.state_dict()),) * 2


def test_mapped_loading_reads_the_zip_format_and_falls_back_for_the_legacy_one(tmp_path, trained_checkpoint):
    """mmap=True (val.py, detect.py, export.py, average.py) gives the tensors the plain load gives;
    a file in torch's legacy format, which cannot be mapped, is read whole instead of refused."""
    *_, checkpoint = trained_checkpoint
    zipped, legacy = tmp_path / "zip.pt", tmp_path / "legacy.pt"
    save_checkpoint(zipped, checkpoint)
    torch.save(checkpoint, legacy, _use_new_zipfile_serialization=False)
    for path in (zipped, legacy):
        mapped = load_checkpoint(path, mmap=True)
        assert mapped.keys() == checkpoint.keys()
        for name, tensor in checkpoint["ema"].items():
            assert torch.equal(mapped["ema"][name], tensor), (path.name, name)
