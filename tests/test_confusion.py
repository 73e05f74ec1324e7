"""Confusion matrix on hand-worked cases: diagonal, confusions, misses and false positives."""

from __future__ import annotations

import numpy as np
import torch

from utils.eval.confusion import ConfusionMatrix


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)


def test_counts_of_a_worked_example():
    matrix = ConfusionMatrix(num_classes=3)
    gt = t([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]])
    gt_classes = torch.tensor([0, 1, 2, 2])
    pred = t(
        [
            [0, 0, 10, 10],  # class 0 on the class-0 box: correct
            [21, 21, 30, 30],  # class 2 on the class-1 box: confusion (IoU 0.81)
            [40, 40, 50, 50],  # class 2, but score 0.1: below conf_thres, ignored -> box 2 missed
            [80, 80, 90, 90],  # class 1 on background: false positive
            [0, 0, 10, 9],
        ]
    )  # duplicate on box 0 (IoU 0.9): box already taken -> false positive
    scores = torch.tensor([0.9, 0.8, 0.1, 0.7, 0.6])
    classes = torch.tensor([0, 2, 2, 1, 0])
    matrix.add_image(pred, scores, classes, gt, gt_classes)
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 0] = 1  # predicted 0, true 0
    expected[2, 1] = 1  # predicted 2, true 1
    expected[3, 2] = 2  # true 2 missed twice (low score, and the 60..70 box)
    expected[1, 3] = 1  # predicted 1 on background
    expected[0, 3] = 1  # the duplicate
    np.testing.assert_array_equal(matrix.matrix, expected)


def test_best_overlap_wins_and_empty_images():
    matrix = ConfusionMatrix(num_classes=2)
    gt = t([[0, 0, 10, 10]])
    # Two predictions on one box: the higher IoU takes it, whatever the scores.
    matrix.add_image(
        t([[0, 0, 10, 8], [0, 0, 10, 10]]), torch.tensor([0.9, 0.5]), torch.tensor([1, 0]), gt, torch.tensor([0])
    )
    assert matrix.matrix[0, 0] == 1 and matrix.matrix[1, 2] == 1
    matrix.add_image(t([]), torch.zeros(0), torch.zeros(0), gt, torch.tensor([1]))
    matrix.add_image(t([[5, 5, 6, 6]]), torch.tensor([0.5]), torch.tensor([1]), t([]), torch.zeros(0))
    assert matrix.matrix[2, 1] == 1 and matrix.matrix[1, 2] == 2
    assert matrix.matrix.sum() == 4
