"""AutoAnchor: YOLOv5's fit measures on a hand-computed case, the fit on boxes the default anchors
miss, where the fitted anchors go (model, YAML, EMA, checkpoints), `anchors: N` from YAML to val.py, and
the edge cases: sub-pixel labels, fewer label sizes than anchors, no labels."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import yaml

import train
from models.yolo import DetectionModel, build_model
from tests.conftest import REPO_ROOT, run_script, tiny_train_args
from utils.checkpoint.format import load_checkpoint, model_from_checkpoint, save_checkpoint, training_checkpoint
from utils.data.config import load_dataset_config
from utils.data.dataset import DetectionDataset
from utils.data.loader import build_train_dataset
from utils.errors import UserError
from utils.hyp import load_hyp
from utils.train.autoanchor import (
    GOOD_BPR,
    MIN_ANCHOR_SIZE,
    anchor_metrics,
    autoanchor,
    fit_anchors,
    label_sizes,
)
from utils.train.config import TrainOptions, options_for_run
from utils.train.criterion import build_criterion
from utils.train.ema import EMA_STEPS, build_average
from utils.train.run import state_of

IMG_SIZE = 64  # tiny_train_args' --imgsz


def write_elongated_dataset(folder: Path, seed: int = 0) -> Path:
    """16 train / 8 val 64x64 noise images, each with two boxes of aspect 10:1 and 1:10 whose long
    side is 30-95% of the image; returns the dataset YAML."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", 16), ("val", 8)):
        (folder / "images" / split).mkdir(parents=True)
        (folder / "labels" / split).mkdir(parents=True)
        for i in range(count):
            image = rng.integers(0, 256, (IMG_SIZE, IMG_SIZE, 3), dtype=np.uint8)
            cv2.imwrite(str(folder / "images" / split / f"{i}.jpg"), image)
            rows = []
            for wide in (True, False):
                long = rng.uniform(0.3, 0.95)
                w, h = (long, long / 10) if wide else (long / 10, long)
                cx, cy = rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2)
                rows.append(f"{int(wide)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
            (folder / "labels" / split / f"{i}.txt").write_text("\n".join(rows) + "\n")
    data_yaml = folder / "elongated.yaml"
    data_yaml.write_text(
        yaml.safe_dump({"path": str(folder), "train": "images/train", "val": "images/val", "names": ["tall", "wide"]})
    )
    return data_yaml


@pytest.fixture(scope="module")
def elongated(tmp_path_factory) -> Path:
    return write_elongated_dataset(tmp_path_factory.mktemp("elongated"))


@pytest.fixture(scope="module")
def elongated_train(elongated) -> DetectionDataset:
    return build_train_dataset(
        load_dataset_config(elongated),
        load_hyp(None),
        img_size=IMG_SIZE,
        seed=0,
        single_cls=False,
        cache="off",
        epochs=1,
    )


def pixel_anchors(model: DetectionModel) -> np.ndarray:
    head = model.detect_head
    return (head.anchors * head.stride.view(-1, 1, 1)).view(-1, 2).double().numpy()


def test_measures_on_a_hand_computed_case():
    """anchor_t 4: a label matches an anchor when no side differs by a factor of 4 or more."""
    wh = np.array([[10.0, 10.0], [40.0, 10.0], [100.0, 100.0]])
    anchors = np.array([[10.0, 10.0], [20.0, 20.0]])
    # 10x10 matches both (ratios 1 and 0.5); 40x10 only 20x20 (0.5; against 10x10 exactly 1/4, not above);
    # 100x100 neither (0.1, 0.2).
    bpr, per_target = anchor_metrics(wh, anchors, anchor_t=4.0)
    assert bpr == pytest.approx(2 / 3) and per_target == pytest.approx(3 / 3)
    # anchor_t 6: 40x10 matches both (0.25 > 1/6 too), 100x100 matches 20x20 (0.2 > 1/6).
    assert anchor_metrics(wh, anchors, anchor_t=6.0) == (1.0, pytest.approx(5 / 3))


def test_label_sizes_are_at_the_training_image_size():
    """A 200x100 image trains at 64x32: a half-size label is 32x16 px; a zero-size one is left out."""
    labels = [np.array([[0, 0.5, 0.5, 0.5, 0.5], [1, 0.5, 0.5, 0.0, 0.2]], np.float32), np.zeros((0, 5), np.float32)]
    shapes = np.array([[100, 200], [50, 50]])  # (height, width)
    np.testing.assert_allclose(label_sizes(labels, shapes, 64), [[32.0, 16.0]])


def test_fit_lifts_recall_on_elongated_boxes_deterministically(elongated_train):
    """yolov5n's anchors miss many 10:1 and 1:10 boxes at 64 px; the fit covers them, the same twice."""
    wh = label_sizes(elongated_train.labels, elongated_train.shapes, IMG_SIZE)
    bpr_before, _ = anchor_metrics(wh, pixel_anchors(build_model("yolov5n.yaml")), 4.0)
    first, second = fit_anchors(wh, 9, 4.0), fit_anchors(wh, 9, 4.0)
    bpr_after, per_target_after = anchor_metrics(wh, first, 4.0)
    assert bpr_before < GOOD_BPR < bpr_after, (bpr_before, bpr_after)
    assert np.array_equal(first, second)
    assert np.all(np.diff(first.prod(1)) >= 0)  # smallest first: small anchors go to small strides
    print(f"elongated boxes at 64 px: BPR {bpr_before:.3f} -> {bpr_after:.3f} ({per_target_after:.2f} anchors/target)")


def test_fitted_anchors_are_in_the_model_its_yaml_the_ema_and_a_checkpoint(elongated_train, tmp_path):
    hyp = load_hyp(None)
    models = [build_model("yolov5n.yaml", nc=2) for _ in range(2)]
    for model in models:
        autoanchor(model, elongated_train, IMG_SIZE, hyp["anchor_t"])
    model = models[0]
    assert torch.equal(models[1].detect_head.anchors, model.detect_head.anchors)  # deterministic
    wh = label_sizes(elongated_train.labels, elongated_train.shapes, IMG_SIZE)
    assert anchor_metrics(wh, pixel_anchors(model), hyp["anchor_t"])[0] > GOOD_BPR
    # The YAML lists them in pixels, per level; a model built from it alone has the same buffer.
    assert model.yaml["anchors"] == np.round(pixel_anchors(model), 1).reshape(3, 6).tolist()
    assert torch.equal(DetectionModel(model.yaml).detect_head.anchors, model.detect_head.anchors)
    # A checkpoint of the model and an EMA made after the fit (as TrainingRun makes it) gives them back.
    ema = build_average(EMA_STEPS, model, hyp)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    checkpoint = training_checkpoint(
        state_of(model, ema, optimizer),
        finished=True,
        model_yaml=model.yaml,
        names=["tall", "wide"],
        hyp=hyp,
        opt={},
        world_size=1,
    )
    save_checkpoint(tmp_path / "last.pt", checkpoint)
    loaded = load_checkpoint(tmp_path / "last.pt")
    for weights in ("ema", "model"):
        restored = model_from_checkpoint(loaded, weights)
        assert torch.equal(restored.detect_head.anchors, model.detect_head.anchors)


def test_a_good_fit_is_kept(tiny_dataset):
    """yolov5n's anchors fit the shapes dataset at 64 px (BPR 1): nothing changes."""
    hyp = load_hyp(None)
    data = load_dataset_config(tiny_dataset)
    dataset = build_train_dataset(data, hyp, img_size=IMG_SIZE, seed=0, single_cls=False, cache="off", epochs=1)
    model = build_model("yolov5n.yaml", nc=data.nc)
    anchors, model_yaml = model.detect_head.anchors.clone(), dict(model.yaml)
    autoanchor(model, dataset, IMG_SIZE, hyp["anchor_t"])
    assert torch.equal(model.detect_head.anchors, anchors) and model.yaml == model_yaml


def anchors_count_yaml(folder: Path, count: int = 3) -> Path:
    cfg = yaml.safe_load((REPO_ROOT / "models" / "yolov5n.yaml").read_text())
    path = folder / "yolov5n-anchors.yaml"
    path.write_text(yaml.safe_dump({**cfg, "anchors": count}, sort_keys=False))
    return path


def test_an_anchor_count_builds_placeholders_that_must_be_fitted(tmp_path, elongated_train):
    model = build_model(anchors_count_yaml(tmp_path, 2), nc=2)
    assert model.needs_anchor_fit and model.detect_head.anchors.shape == (3, 2, 2)
    with pytest.raises(UserError, match="anchors must be fitted"):
        build_criterion(model, load_hyp(None), IMG_SIZE)
    autoanchor(model, elongated_train, IMG_SIZE, 4.0)  # always fitted, whatever the placeholders' recall
    assert not model.needs_anchor_fit and len(model.yaml["anchors"]) == 3 and len(model.yaml["anchors"][0]) == 4


def label_set(sizes_px) -> SimpleNamespace:
    """The training set as AutoAnchor reads it (labels, shapes): one IMG_SIZE square image holding
    boxes of these (w, h) sizes in pixels."""
    wh = np.asarray(sizes_px, np.float64).reshape(-1, 2) / IMG_SIZE
    labels = np.concatenate([np.zeros((len(wh), 1)), np.full((len(wh), 2), 0.5), wh], 1).astype(np.float32)
    return SimpleNamespace(labels=[labels], shapes=np.array([[IMG_SIZE, IMG_SIZE]]))


def test_sub_pixel_labels_give_anchors_at_the_minimum_and_a_model_that_rebuilds(tmp_path, caplog):
    """Boxes of 0.02-0.04 px were once fitted 0.0 px anchors, which the YAML check refuses and the
    loss divides by: every side is now at least MIN_ANCHOR_SIZE, after the rounding the YAML records."""
    model = build_model(anchors_count_yaml(tmp_path), nc=1)
    sizes = np.random.default_rng(0).uniform(0.02, 0.04, (50, 2))
    autoanchor(model, label_set(sizes), IMG_SIZE, 4.0)
    assert "WARNING: AutoAnchor: all 50 labels are under 2 px at this image size" in caplog.text
    anchors = np.array(model.yaml["anchors"])
    assert not model.needs_anchor_fit and anchors.shape == (3, 6) and anchors.min() >= MIN_ANCHOR_SIZE
    rebuilt = DetectionModel(yaml.safe_load(yaml.safe_dump(model.yaml)))  # as val.py and --resume rebuild it
    assert rebuilt.yaml["anchors"] == model.yaml["anchors"] and not rebuilt.needs_anchor_fit
    # A 0.8 px box matches a 2 px anchor (ratio 0.4 > 1/4): the loss divides by it, and stays finite.
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.8 / IMG_SIZE, 0.8 / IMG_SIZE]])
    loss, _ = build_criterion(model, load_hyp(None), IMG_SIZE)(model(torch.rand(1, 3, IMG_SIZE, IMG_SIZE)), targets)
    assert torch.isfinite(loss).all()


def test_fewer_label_sizes_than_anchors_are_fitted_with_a_warning(tmp_path, caplog):
    """3 labels of 2 distinct sizes for 9 anchors: the anchors cover both (some alike); one label alone too."""
    model = build_model(anchors_count_yaml(tmp_path), nc=1)
    sizes = np.array([[12.0, 30.0], [40.0, 9.0], [12.0, 30.0]])
    autoanchor(model, label_set(sizes), IMG_SIZE, 4.0)
    assert "WARNING: AutoAnchor: only 2 distinct label size(s) for 9 anchors" in caplog.text
    anchors = pixel_anchors(model)
    assert anchors.min() >= MIN_ANCHOR_SIZE and anchor_metrics(sizes, anchors, 4.0)[0] == 1.0
    assert torch.equal(DetectionModel(model.yaml).detect_head.anchors, model.detect_head.anchors)
    single = fit_anchors(np.array([[5.0, 1.5]]), 9, 4.0)
    assert single.shape == (9, 2) and single.min() >= MIN_ANCHOR_SIZE
    assert anchor_metrics(np.array([[5.0, 1.5]]), single, 4.0)[0] == 1.0


def test_no_labels_with_an_anchor_count_is_one_clear_error(tmp_path, caplog):
    """No box with a size (none, or only zero-width ones): `anchors: N` cannot be fitted, a one-line
    UserError; anchors the YAML lists are kept, with a warning."""
    no_boxes = SimpleNamespace(
        labels=[np.zeros((0, 5), np.float32), np.array([[0, 0.5, 0.5, 0.0, 0.3]], np.float32)],
        shapes=np.array([[IMG_SIZE, IMG_SIZE]] * 2),
    )
    model = build_model(anchors_count_yaml(tmp_path), nc=1)
    with pytest.raises(UserError) as error:
        autoanchor(model, no_boxes, IMG_SIZE, 4.0)
    assert str(error.value) == (
        "the model YAML gives `anchors: 3`, a count, but the training labels hold no box with a size to fit the "
        "anchors to; add labelled boxes to the train split, or list the anchor sizes in the YAML"
    )
    assert model.needs_anchor_fit
    listed = build_model("yolov5n.yaml", nc=1)
    anchors, model_yaml = listed.detect_head.anchors.clone(), dict(listed.yaml)
    autoanchor(listed, no_boxes, IMG_SIZE, 4.0)
    assert torch.equal(listed.detect_head.anchors, anchors) and listed.yaml == model_yaml
    assert "WARNING: AutoAnchor: the training labels hold no box with a size: the model YAML's anchors are kept" in (
        caplog.text
    )


def test_noautoanchor_with_an_anchor_count_is_one_clear_error(tiny_dataset, tmp_path):
    cfg = anchors_count_yaml(tmp_path)
    with pytest.raises(UserError) as error:
        train.main(tiny_train_args(tiny_dataset, tmp_path / "runs", "--cfg", str(cfg), "--noautoanchor"))
    assert "`anchors: 3`, a count: the anchors must be fitted" in str(error.value)
    assert "drop --noautoanchor" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "runs").exists()


def test_resume_reads_options_recorded_before_noautoanchor():
    """A checkpoint's options from before --noautoanchor existed resume with its default (AutoAnchor
    does not run on --resume either way: the anchors come back with the checkpoint)."""
    lists = {"freeze": [0], "average": [], "val": [], "lookahead": [], "graft_hyp": []}
    recorded = {field.name: 0 for field in dataclasses.fields(TrainOptions)} | lists
    defaults = {**recorded, "noautoanchor": False}
    old_options = {k: v for k, v in recorded.items() if k != "noautoanchor"}
    args = argparse.Namespace(**defaults, resume=True)
    opt = options_for_run(args, defaults, {"opt": old_options}, placement_from_command_line=False)
    assert opt.noautoanchor is False


@pytest.mark.slow
def test_an_anchor_count_trains_and_validates(elongated, tmp_path):
    """train.py fits `anchors: 3` before the EMA exists (the EMA's anchors are the model's), every
    checkpoint's YAML lists them, and val.py runs on best.pt."""
    cfg = anchors_count_yaml(tmp_path)
    assert train.main(tiny_train_args(elongated, tmp_path, "--cfg", str(cfg), "--epochs", "1")) == 0
    last = torch.load(tmp_path / "exp" / "weights" / "last.pt", weights_only=True)
    fitted = last["model"]["model.24.anchors"]
    assert torch.equal(last["ema"]["model.24.anchors"], fitted)
    assert torch.equal(DetectionModel(last["model_yaml"]).detect_head.anchors, fitted)
    assert last["opt"]["noautoanchor"] is False
    best = tmp_path / "exp" / "weights" / "best.pt"
    result = run_script(
        "val.py", "--weights", str(best), "--data", str(elongated), "--no-plots", "--project", str(tmp_path / "val")
    )
    assert result.returncode == 0, result.stderr
    assert any(line.split()[:1] == ["all"] for line in result.stdout.splitlines())
