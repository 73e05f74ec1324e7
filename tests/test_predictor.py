"""The Python API (Detector, torch.hub's `custom`) gives the boxes detect.py writes, for every input kind."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import detect
from utils.boxes import letterbox_to_original
from utils.checkpoint.format import load_for_inference
from utils.config_files import REPO_ROOT
from utils.data.augment import letterbox
from utils.device import to_model_input
from utils.errors import UserError
from utils.eval.nms import non_max_suppression
from utils.infer.predictor import Detector

OPTIONS = {"conf_thres": 0.0, "max_det": 20}  # a 2-epoch model is unsure: keep every score so boxes exist


@pytest.fixture(scope="module")
def val_images(tiny_dataset) -> list[Path]:
    return sorted((Path(yaml.safe_load(tiny_dataset.read_text())["path"]) / "images" / "val").glob("*.jpg"))[:3]


@pytest.fixture(scope="module")
def detector(tiny_run) -> Detector:
    return Detector(tiny_run / "weights" / "best.pt", **OPTIONS)


def test_hub_and_detector_give_the_labels_detect_py_writes(tiny_run, val_images, detector, tmp_path):
    weights = tiny_run / "weights" / "best.pt"
    args = ["--weights", str(weights), "--source", str(val_images[0].parent), "--project", str(tmp_path)]
    assert detect.main([*args, "--conf-thres", "0", "--max-det", "20", "--save-txt", "--save-conf"]) == 0
    hub_model = torch.hub.load(str(REPO_ROOT), "custom", path=str(weights), source="local", **OPTIONS)
    assert isinstance(hub_model, Detector)
    written = 0
    for image in val_images:
        label_file = tmp_path / "exp" / "labels" / image.with_suffix(".txt").name
        expected = label_file.read_text().splitlines() if label_file.exists() else []
        (own,) = detector(str(image))
        (hub,) = hub_model(image)
        assert own.yolo_lines(save_conf=True) == expected
        assert hub.yolo_lines(save_conf=True) == expected
        written += len(expected)
    assert written > 0  # the comparison covered boxes, not only empty files


def reference_detections(weights: Path, image: Path, img_size: int) -> np.ndarray:
    """detect.py's pipeline as it stood before Detector, written out from the library's parts:
    letterbox to the stride, fused EMA model, NMS, boxes mapped back to the image."""
    checkpoint, model = load_for_inference(weights, "ema", torch.device("cpu"))
    model.fuse()
    rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
    boxed, scale_xy, pad_xy = letterbox(rgb, (img_size, img_size), auto=True, stride=int(model.stride.max()))
    tensor = to_model_input(torch.from_numpy(np.ascontiguousarray(boxed.transpose(2, 0, 1)))[None], torch.device("cpu"))
    with torch.no_grad():
        decoded, _ = model(tensor)
    (det,), _ = non_max_suppression(decoded, 0.0, 0.45, max_det=OPTIONS["max_det"], objectness=True)
    det[:, :4] = letterbox_to_original(det[:, :4], rgb.shape[:2], scale_xy, pad_xy)
    return det.numpy()


def test_detector_equals_the_pipeline_written_out(tiny_run, val_images, detector):
    for image in val_images:
        (result,) = detector(image)
        expected = reference_detections(tiny_run / "weights" / "best.pt", image, detector.img_size)
        assert len(expected) > 0
        np.testing.assert_allclose(result.detections, expected, rtol=1e-6, atol=1e-4)


def test_paths_arrays_and_pil_images_give_the_same_detections(detector, val_images):
    path = val_images[0]
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    (from_path,) = detector(path)
    (from_array,) = detector(rgb)
    (from_pil,) = detector(Image.open(path))
    assert len(from_path) > 0
    np.testing.assert_array_equal(from_array.detections, from_path.detections)
    np.testing.assert_array_equal(from_pil.detections, from_path.detections)
    assert from_path.path == str(path) and from_array.path is None
    assert from_path.image_rgb.shape == rgb.shape


def test_a_batch_gives_each_image_its_own_detections(detector, val_images):
    """A list runs as one batch; each image's boxes match those it gets alone (same letterbox,
    batched convolutions round differently)."""
    batch = detector([str(p) for p in val_images])
    assert len(batch) == len(val_images)
    for image, result in zip(val_images, batch):
        (alone,) = detector(str(image))
        assert result.path == str(image)
        np.testing.assert_allclose(result.detections, alone.detections, atol=1e-3)


def test_images_of_different_shapes_share_a_batch(detector, val_images):
    rgb = cv2.cvtColor(cv2.imread(str(val_images[0])), cv2.COLOR_BGR2RGB)
    tall = np.ascontiguousarray(rgb.transpose(1, 0, 2))  # the same content, portrait
    (alone_wide,), (alone_tall,) = detector(rgb), detector(tall)
    wide, tall_result = detector([rgb, tall])
    np.testing.assert_allclose(wide.detections, alone_wide.detections, atol=1e-3)
    np.testing.assert_allclose(tall_result.detections, alone_tall.detections, atol=1e-3)
    assert (tall_result.boxes_xyxy[:, [0, 2]] <= tall.shape[1]).all()
    assert (tall_result.boxes_xyxy[:, [1, 3]] <= tall.shape[0]).all()


def test_results_save_draws_on_the_original_image(detector, val_images, tmp_path):
    (result,) = detector(val_images[0])
    saved = result.save(tmp_path / "out")
    assert saved == tmp_path / "out" / val_images[0].name
    drawn = cv2.imread(str(saved))
    assert drawn.shape == cv2.imread(str(val_images[0])).shape
    assert result.summary() != "no detections"
    first = result.to_list()[0]
    assert first["name"] == result.names[first["class"]] and first["box"] == result.boxes_xyxy[0].tolist()


def test_inputs_the_api_refuses(detector, tmp_path):
    with pytest.raises(UserError, match="nothing is downloaded at run time"):
        detector("https://example.com/a.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match="broken.jpg: not a readable image"):
        detector(tmp_path / "broken.jpg")
    with pytest.raises(UserError, match="missing.jpg does not exist"):
        detector(tmp_path / "missing.jpg")
    with pytest.raises(UserError, match="NaN or infinity"):  # tests/test_image_inputs.py has the rest
        detector(np.full((32, 32, 3), np.nan, dtype=np.float32))
    with pytest.raises(TypeError, match="expected a file path, a numpy array or a PIL image"):
        detector(torch.zeros(3, 32, 32))
