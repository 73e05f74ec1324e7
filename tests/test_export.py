"""export.py and utils/export: exported files give PyTorch's outputs (EMA weights, fused, eval) at
the shapes they were exported for, and at any batch and size with --dynamic; they carry metadata
that reads back; refusals are clear. A dynamic ONNX export takes 25-30 s on 2 cores (a static one 6):
those tests are slow."""

from __future__ import annotations

import json
import re
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

import export
import val
from models.yolo import build_model
from utils.checkpoint.format import (
    load_checkpoint,
    model_from_checkpoint,
    posthoc_snapshot,
    save_checkpoint,
    training_checkpoint,
)
from utils.errors import UserError
from utils.export.graph import DecodedOutput
from utils.export.metadata import read_export_metadata
from utils.export.torchscript_export import export_torchscript

NAMES = ["circle", "square", "triangle"]
MODELS = ["yolov5n.yaml", "yolo11n.yaml"]  # YOLOv5's anchor-based head, and the anchor-free one
SHAPES = [(1, 320, 320), (3, 256, 320)]  # (batch, height, width) a dynamic export is run at


def random_statistics(model: torch.nn.Module) -> None:
    """BatchNorm statistics away from their initial values, so that fusing them changes the weights."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A training checkpoint per model YAML, made without training: EMA and raw weights of different seeds."""
    folder, paths = tmp_path_factory.mktemp("checkpoints"), {}
    for cfg in MODELS:
        models = []
        for seed in (0, 1):  # the EMA, then the raw model
            torch.manual_seed(seed)
            models.append(build_model(cfg, nc=len(NAMES)))
            random_statistics(models[-1])
        ema, raw = models
        state = {
            "model": raw.state_dict(),
            "ema": {"module": ema.state_dict(), "updates": 10, "decay": 0.9999, "tau": 2000},
            "loop": {"epoch": 2, "best_fitness": 0.1, "best_epoch": 1},
            "averages": {},
            "optimizer": {},
            "scaler": {},
            "rng": {},
            "swa": None,
        }
        checkpoint = training_checkpoint(
            state,
            finished=True,
            model_yaml=ema.yaml,
            names=NAMES,
            hyp={"lr0": 0.01},
            opt={"imgsz": 64, "batch_size": 4},
            world_size=1,
        )
        paths[cfg] = folder / f"{Path(cfg).stem}.pt"
        save_checkpoint(paths[cfg], checkpoint)
    return paths


def run_export(weights: Path, *options: str) -> int:
    """export.py on the CPU, whatever the machine has: the tests compare with the CPU."""
    return export.main(["--weights", str(weights), "--device", "cpu", *options])


def copy_of(checkpoint: Path, folder: Path) -> Path:
    """The checkpoint as folder/best.pt: exports are written next to it."""
    return Path(shutil.copy(checkpoint, folder / "best.pt"))


def pytorch_model(weights: Path, which: str = "ema") -> torch.nn.Module:
    """The reference: the checkpoint's `which` weights in PyTorch, eval mode, fused."""
    return model_from_checkpoint(load_checkpoint(weights), which).eval().fuse()


def images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def assert_same_detections(output: np.ndarray | torch.Tensor, expected: torch.Tensor) -> None:
    """Boxes (pixels) within 1e-4 relative, scores within 1e-5: what float32 rounding leaves."""
    output, expected = np.asarray(output), expected.numpy()
    assert output.shape == expected.shape
    np.testing.assert_allclose(output[..., :4], expected[..., :4], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(output[..., 4:], expected[..., 4:], rtol=1e-4, atol=1e-5)


def expected_metadata(cfg: str, weights: Path, imgsz: list[int], batch: int, dynamic: bool, which: str) -> dict:
    return {
        "format": "ema-yolo-export",
        "format_version": 1,
        "names": NAMES,
        "nc": 3,
        "stride": 32,
        "imgsz": imgsz,
        "batch": batch,
        "dynamic": dynamic,
        "half": False,
        "anchor_free": cfg != "yolov5n.yaml",
        "weights": which,
        "device": "cpu",
        "source": f"{weights} (a training checkpoint)",
        "trained_amp": None,
        "train_imgsz": 64,
        "train_batch_per_process": 4,
        "single_cls": False,
        "hyp": {"lr0": 0.01},
    }


def assert_metadata(metadata: dict, expected: dict) -> None:
    assert {k: metadata[k] for k in expected} == expected
    datetime.fromisoformat(metadata["date"])
    json.dumps(metadata)  # plain JSON values only


@torch.no_grad()
@pytest.mark.parametrize("cfg", MODELS)
def test_a_trace_made_after_eager_runs_holds_at_other_shapes(cfg):
    """The heads cache their grids per size in eager mode: a trace made at a size the model has
    already run at (its grids cached) still decodes other batches and sizes as the model does."""
    torch.manual_seed(0)
    model = build_model(cfg, nc=3).eval()
    example = images(1, 256, 256)
    model(example)  # caches the grids of 256 x 256
    traced = torch.jit.trace(DecodedOutput(model), example, check_trace=False)
    for batch, height, width in SHAPES:
        x = images(batch, height, width, seed=1)
        assert torch.equal(traced(x), model(x)[0])


@torch.no_grad()
@pytest.mark.parametrize("cfg", MODELS)
def test_dynamic_torchscript_equals_pytorch_at_other_batches_and_sizes(cfg, checkpoints, tmp_path):
    weights = copy_of(checkpoints[cfg], tmp_path)
    before = weights.read_bytes()
    assert run_export(weights, "--include", "torchscript", "--dynamic", "--imgsz", "320") == 0
    assert weights.read_bytes() == before  # the checkpoint is only read
    path = tmp_path / "best.torchscript"
    module, reference = torch.jit.load(str(path)), pytorch_model(weights)
    for batch, height, width in SHAPES:
        x = images(batch, height, width)
        assert_same_detections(module(x), reference(x)[0])
    metadata = read_export_metadata(path)
    assert_metadata(metadata, expected_metadata(cfg, weights, [320, 320], 1, dynamic=True, which="ema"))
    extra = {"config.json": ""}
    torch.jit.load(str(path), _extra_files=extra, map_location="cpu")  # the documented way to read it
    assert json.loads(extra["config.json"]) == metadata


@torch.no_grad()
def test_raw_exports_the_model_weights_beside_the_ema_export(checkpoints, tmp_path):
    """Without --imgsz the checkpoint's training size (64); without --dynamic the metadata says static."""
    cfg = "yolov5n.yaml"
    weights = copy_of(checkpoints[cfg], tmp_path)
    for extra in ([], ["--raw"]):
        assert run_export(weights, *extra) == 0  # torchscript by default
    x = images(1, 64, 64)
    ema_file, raw_file = tmp_path / "best.torchscript", tmp_path / "best-raw.torchscript"
    ema_output, raw_output = torch.jit.load(str(ema_file))(x), torch.jit.load(str(raw_file))(x)
    assert_same_detections(ema_output, pytorch_model(weights, "ema")(x)[0])
    assert_same_detections(raw_output, pytorch_model(weights, "model")(x)[0])
    assert not torch.allclose(ema_output, raw_output)  # two different sets of weights came out
    for path, which in ((ema_file, "ema"), (raw_file, "model")):
        expected = expected_metadata(cfg, weights, [64, 64], 1, dynamic=False, which=which)
        assert_metadata(read_export_metadata(path), expected)


def test_a_trace_that_does_not_hold_at_other_shapes_is_not_exported_as_dynamic(tmp_path):
    class BakesTheBatch(torch.nn.Module):
        def forward(self, images):
            return (images.flatten(1)[:, :6] * float(images.shape[0]),)  # a Python number: a constant of the trace

    path = tmp_path / "baked.torchscript"
    with pytest.raises(UserError, match=r"does not hold at input shape \(2, 3, 64, 96\)"):
        export_torchscript(DecodedOutput(BakesTheBatch()), images(1, 32, 32), path, {"stride": 32}, dynamic=True)
    assert not path.exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--include", "onnx", "tflite"], "--include tflite: unknown format; export.py writes onnx, torchscript"),
        (["--half", "--device", "cpu"], "--half exports fp16, which needs a CUDA device"),
        (["--imgsz", "300"], "--imgsz 300: each side must be a multiple of the model's stride 32, e.g. --imgsz 288"),
        (["--imgsz", "320", "100"], "e.g. --imgsz 320 96"),
        (["--imgsz", "16"], "e.g. --imgsz 32"),
        (["--imgsz", "64", "64", "64"], "--imgsz takes one size or two (height width), got 3"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--include", "onnx", "--opset", "11"], "--opset 11: the ONNX exporter could not convert this model to it"),
    ],
)
def test_bad_options_are_one_clear_error_and_write_nothing(options, message, checkpoints, tmp_path):
    weights = copy_of(checkpoints["yolov5n.yaml"], tmp_path)
    with pytest.raises(UserError, match=re.escape(message)):
        run_export(weights, *options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]


def test_a_file_that_is_no_model_checkpoint_is_refused(tmp_path):
    notes = tmp_path / "notes.pt"
    notes.write_text("not a checkpoint\n")
    with pytest.raises(UserError, match="is not a checkpoint"):
        run_export(notes)
    snapshot = tmp_path / "epoch0003.pt"
    save_checkpoint(snapshot, posthoc_snapshot(3, {}))
    with pytest.raises(UserError, match="is a post-hoc EMA snapshot"):
        run_export(snapshot)
    with pytest.raises(UserError, match="does not exist"):
        run_export(tmp_path / "absent.pt")


def test_files_that_are_not_our_exports_are_refused_in_one_line(checkpoints, tmp_path):
    import onnx

    conv, x = torch.nn.Conv2d(3, 4, 1).eval(), torch.rand(1, 3, 8, 8)
    foreign_onnx = tmp_path / "conv.onnx"
    torch.onnx.export(conv, (x,), str(foreign_onnx), dynamo=True, verbose=False)
    foreign_torchscript = tmp_path / "conv.torchscript"
    torch.jit.save(torch.jit.trace(conv, x), str(foreign_torchscript))
    text = tmp_path / "notes.onnx"
    text.write_text("some notes, not a model\n")
    other_format = onnx.load(str(foreign_onnx))
    for key, value in (("format", '"another-export"'), ("format_version", "1")):
        entry = other_format.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(other_format, str(tmp_path / "other.onnx"))
    refused = {
        foreign_onnx: "is not an export of this framework",
        foreign_torchscript: "is not an export of this framework",
        checkpoints["yolov5n.yaml"]: "is not an export of this framework",  # a zip archive, but a checkpoint
        tmp_path / "other.onnx": "is not an export of this framework",
        text: "is neither an ONNX file nor a TorchScript archive|is not an export of this framework",
        tmp_path / "absent.onnx": "does not exist",
    }
    for path, message in refused.items():
        with pytest.raises(UserError, match=message) as error:
            read_export_metadata(path)
        assert str(path) in str(error.value) and "\n" not in str(error.value)


@torch.no_grad()
@pytest.mark.slow
# The anchor-free head only (25 s a dynamic export on 2 cores): YOLOv5's head exports in the static ONNX test
# and at any shape through TorchScript, and benchmarks/bench_export.py runs its dynamic ONNX on a trained model.
@pytest.mark.parametrize("cfg", ["yolo11n.yaml"])
def test_dynamic_onnx_passes_the_checker_and_equals_pytorch_at_two_batches_and_sizes(cfg, checkpoints, tmp_path):
    import onnx
    import onnxruntime

    weights = copy_of(checkpoints[cfg], tmp_path)
    assert run_export(weights, "--include", "onnx", "--dynamic", "--imgsz", "320") == 0
    path = tmp_path / "best.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inputs,), (outputs,) = session.get_inputs(), session.get_outputs()
    assert (inputs.name, inputs.type, outputs.name) == ("images", "tensor(float)", "output0")
    assert isinstance(inputs.shape[0], str) and isinstance(inputs.shape[2], str) and isinstance(inputs.shape[3], str)
    reference = pytorch_model(weights)
    for batch, height, width in SHAPES:
        x = images(batch, height, width)
        (output,) = session.run(None, {"images": x.numpy()})
        assert_same_detections(output, reference(x)[0])
    metadata = read_export_metadata(path)
    assert_metadata(metadata, expected_metadata(cfg, weights, [320, 320], 1, dynamic=True, which="ema"))
    props = {entry.key: entry.value for entry in onnx.load(str(path)).metadata_props}
    assert props["format"] == '"ema-yolo-export"' and json.loads(props["names"]) == NAMES  # one JSON value per key


@torch.no_grad()
def test_static_onnx_takes_the_shape_it_was_exported_at(checkpoints, tmp_path):
    import onnx
    import onnxruntime

    cfg = "yolov5n.yaml"
    weights = copy_of(checkpoints[cfg], tmp_path)
    assert run_export(weights, "--include", "onnx", "--imgsz", "256", "320", "--batch-size", "2") == 0
    path = tmp_path / "best.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [2, 3, 256, 320]
    x = images(2, 256, 320)
    (output,) = session.run(None, {"images": x.numpy()})
    assert_same_detections(output, pytorch_model(weights)(x)[0])
    expected = expected_metadata(cfg, weights, [256, 320], 2, dynamic=False, which="ema")
    assert_metadata(read_export_metadata(path), expected)
    # val.py letterboxes to squares (or rectangular batches): a fixed non-square shape is refused before any work
    with pytest.raises(UserError, match=r"takes 256x320 inputs only.*export it square \(--imgsz S\) or with --dynamic"):
        val.main(["--weights", str(path), "--project", str(tmp_path / "val")])
    assert not (tmp_path / "val").exists()
