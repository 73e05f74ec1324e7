"""Plots: each writes a readable image whose pixels reflect the data (colours, positions, what is left out)."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest
import torch

from utils.eval.plots import (
    class_colour,
    normalize_columns,
    plot_confusion_matrix,
    plot_image_batch,
    plot_labels,
    plot_metric_vs_conf,
    plot_pr_curve,
    plot_results,
    results_panels,
)

NAMES = ["cat", "dog", "bird"]
MEAN_BGR = (255, 0, 0)  # the thick pure-blue all-classes curve
RAW_BGR = (44, 160, 44)  # matplotlib 'tab:green', the raw-model line in results.png


def read(path) -> np.ndarray:
    image = cv2.imread(str(path))
    assert image is not None, f"{path} is not a readable image"
    assert min(image.shape[:2]) >= 200
    return image


def count_colour(image: np.ndarray, bgr: tuple[int, int, int], tol: int = 30) -> int:
    return int(np.all(np.abs(image.astype(int) - bgr) <= tol, axis=2).sum())


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy 'Mean of empty slice', divide by zero, matplotlib
        yield


def write_csv(path, columns: list[str], rows: int) -> None:
    rng = np.random.default_rng(0)
    lines = [",".join(["epoch", *columns])]
    lines += [",".join([str(e), *(f"{v:.5f}" for v in rng.random(len(columns)))]) for e in range(rows)]
    path.write_text("\n".join(lines) + "\n")


STANDARD = [
    "train/box_loss",
    "train/obj_loss",
    "train/cls_loss",
    "metrics/precision",
    "metrics/recall",
    "metrics/mAP_0.5",
    "metrics/mAP_0.5:0.95",
    "val/box_loss",
    "val/obj_loss",
    "val/cls_loss",
]


def test_results_panels_order_and_raw_pairing():
    columns = [
        "epoch",
        "val/box_loss",
        "metrics/mAP_0.5",
        "train/box_loss",
        "x/lr0",
        "ema/updates",
        "raw/mAP_0.5",
        "power-0.05/mAP_0.5",
        "raw/unpaired",
    ]
    assert results_panels(columns) == [
        ("train/box_loss", []),
        ("metrics/mAP_0.5", ["raw/mAP_0.5", "power-0.05/mAP_0.5"]),
        ("val/box_loss", []),
        ("raw/unpaired", []),
    ]


def test_plot_results_draws_raw_line_only_when_present(tmp_path, no_warnings):
    write_csv(tmp_path / "plain.csv", STANDARD + ["x/lr0"], rows=20)
    write_csv(tmp_path / "raw.csv", STANDARD + ["x/lr0", "raw/mAP_0.5", "raw/mAP_0.5:0.95"], rows=20)
    plot_results(tmp_path / "plain.csv", tmp_path / "plain.png")
    plot_results(tmp_path / "raw.csv", tmp_path / "raw.png")
    plain, raw = read(tmp_path / "plain.png"), read(tmp_path / "raw.png")
    assert plain.shape[1] > 2 * plain.shape[0]  # 2 rows x 5 panels
    assert count_colour(plain, RAW_BGR, tol=10) == 0
    assert count_colour(raw, RAW_BGR, tol=10) > 200


def test_plot_results_single_row(tmp_path, no_warnings):
    write_csv(tmp_path / "results.csv", STANDARD, rows=1)
    plot_results(tmp_path / "results.csv", tmp_path / "results.png")
    read(tmp_path / "results.png")


def test_plot_pr_curve_skips_classes_without_labels(tmp_path, no_warnings):
    recall = np.linspace(0, 1, 101)
    precision = np.stack([1 - recall**4, 1 - recall**2, np.full(101, np.nan)])  # bird: no ground truth
    plot_pr_curve(recall, precision, np.array([0.8, 0.67, np.nan]), NAMES, tmp_path / "PR_curve.png")
    assert count_colour(read(tmp_path / "PR_curve.png"), MEAN_BGR) > 500

    nothing = np.full((3, 101), np.nan)  # no class has labels: no mean curve, no warning
    plot_pr_curve(recall, nothing, np.full(3, np.nan), NAMES, tmp_path / "empty.png")
    assert count_colour(read(tmp_path / "empty.png"), MEAN_BGR) == 0


def test_plot_metric_vs_conf(tmp_path, no_warnings):
    conf = np.linspace(0, 1, 1000)
    f1 = np.stack([4 * conf * (1 - conf), np.sin(np.pi * conf) * 0.7, np.full(1000, np.nan)])
    f1[1, :10] = np.nan  # a class whose curve starts late
    plot_metric_vs_conf(conf, f1, NAMES, "F1", tmp_path / "F1_curve.png")
    assert count_colour(read(tmp_path / "F1_curve.png"), MEAN_BGR) > 500


def test_normalize_columns_keeps_empty_columns_zero(no_warnings):
    matrix = np.array([[3, 0, 1], [1, 0, 0], [0, 0, 1]])
    np.testing.assert_allclose(normalize_columns(matrix), [[0.75, 0, 0.5], [0.25, 0, 0], [0, 0, 0.5]])


@pytest.mark.parametrize("normalize", [False, True])
def test_plot_confusion_matrix_orientation(tmp_path, normalize, no_warnings):
    """matrix[predicted, true]: predicted on y (rows, top to bottom), true on x (left to right)."""

    def dark_centre(matrix) -> np.ndarray:
        plot_confusion_matrix(matrix, NAMES, tmp_path / "cm.png", normalize=normalize)
        image = read(tmp_path / "cm.png")
        dark = np.argwhere(np.all(image < (140, 90, 50), axis=2))  # the darkest 'Blues' cells (and colour bar top)
        return dark.mean(axis=0) / image.shape[:2]

    predicted_cat_on_background = np.zeros((4, 4), dtype=int)
    predicted_cat_on_background[0, 3] = 50  # top right; column 1 stays all zero
    missed_cat = np.zeros((4, 4), dtype=int)
    missed_cat[3, 0] = 50  # bottom left
    (row_a, col_a), (row_b, col_b) = dark_centre(predicted_cat_on_background), dark_centre(missed_cat)
    assert row_a < row_b - 0.1 and col_a > col_b + 0.1


def test_plot_labels(tmp_path, no_warnings):
    rng = np.random.default_rng(0)
    labels = np.column_stack(
        [rng.integers(0, 3, 200), rng.uniform(0.2, 0.8, (200, 2)), rng.uniform(0.05, 0.3, (200, 2))]
    )
    plot_labels(labels, NAMES, tmp_path / "labels.jpg")
    plot_labels(np.zeros((0, 5)), NAMES, tmp_path / "empty.jpg")
    bar_bgr = class_colour(0)  # bars are filled in the class colour
    assert count_colour(read(tmp_path / "labels.jpg"), bar_bgr) > 1000
    assert count_colour(read(tmp_path / "empty.jpg"), bar_bgr) == 0


def outline_matches(image: np.ndarray, row: int, col: int, bgr: tuple[int, int, int]) -> bool:
    """Whether a pixel within 1 px of (row, col) along the row has the colour (JPEG tolerance)."""
    patch = image[row, col - 1 : col + 2].astype(int)
    return bool(np.any(np.all(np.abs(patch - bgr) <= 20, axis=1)))


def test_plot_image_batch_boxes_where_targets_say(tmp_path):
    images = torch.full((2, 3, 320, 400), 128, dtype=torch.uint8)  # blank grey, H != W
    gap = 4  # tile origin in the grid: (gap, gap) for image 0
    # dog in image 0: cx 0.5, w 0.5 -> x 100..300, y 80..240; bird (conf 0.1): x 0.15 * 400 = 60, rows 208..272
    preds = np.array([[0, 1, 0.5, 0.5, 0.5, 0.5, 0.9], [0, 2, 0.25, 0.75, 0.2, 0.2, 0.1]])
    plot_image_batch(images, preds, NAMES, tmp_path / "pred.jpg")
    image = read(tmp_path / "pred.jpg")
    assert image.shape == (320 + 2 * gap, 2 * 400 + 3 * gap, 3)  # 2 images: 2 columns, 1 row
    dog, bird = class_colour(1), class_colour(2)
    assert outline_matches(image, gap + 160, gap + 100, dog)
    assert outline_matches(image, gap + 160, gap + 300, dog)
    assert outline_matches(image.transpose(1, 0, 2), gap + 200, gap + 240, dog)  # bottom edge, read down a column
    assert not outline_matches(image, gap + 160, gap + 200, dog)  # inside the box: still grey
    assert not outline_matches(image, gap + 240, gap + 60, bird)  # conf 0.1 is left out

    preds[1, 6] = 0.9  # the same box, confident: now drawn (so the check above can fail)
    plot_image_batch(images.numpy(), preds, NAMES, tmp_path / "pred2.jpg")
    assert outline_matches(read(tmp_path / "pred2.jpg"), gap + 240, gap + 60, bird)


def test_plot_image_batch_grid_is_square_and_at_most_1920_wide(tmp_path):
    images = np.zeros((20, 3, 640, 480), dtype=np.uint8)
    images[0, 0] = 255  # image 0 is pure red in RGB
    targets = np.array([[k, k % 3, 0.5, 0.5, 0.3, 0.3] for k in range(20)])
    plot_image_batch(images, targets, NAMES, tmp_path / "batch.jpg", max_images=16)
    grid = read(tmp_path / "batch.jpg")
    height, width = grid.shape[:2]
    assert np.abs(grid[50, 50].astype(int) - (0, 0, 255)).max() < 20  # red once written as BGR
    assert width <= 1920 and width > 1800  # 4 x 480 px plus gaps does not fit: scaled down
    assert height == pytest.approx(width * 640 / 480, rel=0.02)  # 4 x 4 tiles of 640 x 480

    plot_image_batch(images[:1], np.zeros((0, 6)), NAMES, tmp_path / "one.jpg")  # no boxes at all
    assert read(tmp_path / "one.jpg").shape[:2] == (648, 488)
