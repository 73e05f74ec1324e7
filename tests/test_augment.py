"""Augmentation geometry: letterbox, perspective, flips and the mosaic keep boxes on their objects."""

from __future__ import annotations

import numpy as np

from utils.data.augment import (
    PAD_VALUE,
    box_candidates,
    flip_left_right,
    flip_up_down,
    letterbox,
    mosaic,
    random_perspective,
    random_warp,
)


def image_with_box(h=60, w=100, box=(20, 10, 50, 40)):
    image = np.full((h, w, 3), 30, np.uint8)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = 220
    return image, np.array([[1, *box]], np.float32)


def bright_extent(image) -> list[float]:
    ys, xs = np.nonzero(image[..., 0] > 128)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_letterbox_pads_centred_and_reports_geometry():
    image, _ = image_with_box()
    out, (sx, sy), (px, py) = letterbox(image, (128, 128))
    assert out.shape == (128, 128, 3)
    assert (sx, sy) == (128 / 100, 77 / 60) and (px, py) == (0, 25)
    assert (out[:25, :, 0] == PAD_VALUE).all() and (out[-26:, :, 0] == PAD_VALUE).all()  # 51 px split 25 / 26
    assert (out[25 : 25 + 77, :, 0] != PAD_VALUE).all()
    auto, _, (px, py) = letterbox(image, (128, 128), auto=True, stride=32)
    assert auto.shape == (96, 128, 3) and py == 9
    small, (sx, _), _ = letterbox(image, (256, 256), scaleup=False)
    assert sx == 1.0 and small.shape == (256, 256, 3)


def test_perspective_moves_boxes_with_the_pixels():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(10):
        image, labels = image_with_box()
        out, out_labels = random_perspective(image, labels, rng, degrees=0, translate=0.1, scale=0.3)
        if len(out_labels):  # a box pushed out of the frame is dropped
            np.testing.assert_allclose(out_labels[0, 1:], bright_extent(out), atol=2)
            checked += 1
    assert checked >= 5


def test_flips_mirror_boxes():
    image, labels = image_with_box()
    flipped, flipped_labels = flip_left_right(image, labels)
    np.testing.assert_allclose(flipped_labels[0, 1:], bright_extent(flipped))
    flipped, flipped_labels = flip_up_down(image, labels)
    np.testing.assert_allclose(flipped_labels[0, 1:], bright_extent(flipped))


def test_mosaic_places_every_box_on_its_object():
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(10):
        images, labels = zip(*(image_with_box(box=(10 + 5 * k, 8, 40 + 5 * k, 30)) for k in range(4)))
        out, out_labels = mosaic(list(images), list(labels), 100, rng, translate=0.1, scale=0.3)
        assert out.shape == (100, 100, 3) and len(out_labels) <= 4
        for _, x1, y1, x2, y2 in out_labels:  # inside each kept box, only the bright object (pixels at its edges blend)
            patch = out[int(y1) + 1 : int(y2) - 1, int(x1) + 1 : int(x2) - 1, 0]
            assert (patch > 128).all()
            checked += 1
    assert checked >= 10


def test_a_mosaic_draws_only_what_its_warp_reads_and_equals_the_whole_canvas():
    """The canvas is drawn only inside the warp's source region: the same output as drawing it all,
    for affine and perspective warps, at every scale."""
    for seed in range(40):
        rng = np.random.default_rng(seed)
        images = [rng.integers(0, 256, (int(rng.integers(20, 101)), 100, 3), dtype=np.uint8) for _ in range(4)]
        labels = [np.zeros((0, 5), np.float32)] * 4
        options = {"degrees": 20.0, "translate": 0.2, "scale": 0.9, "shear": 5.0, "perspective": 0.001 * (seed % 2)}
        out, _ = mosaic(images, labels, 100, np.random.default_rng(seed), **options)
        # The same draws, the whole canvas drawn first (the pixels outside the region made visible).
        rng = np.random.default_rng(seed)
        xc, yc = (int(v) for v in rng.uniform(50, 150, size=2))
        warp = random_warp(rng, (200, 200), border=(-50, -50), **options)
        whole = np.full((200, 200, 3), PAD_VALUE, np.uint8)
        for k, image in enumerate(images):
            h, w = image.shape[:2]
            x1, y1 = (xc - w, xc)[k % 2], (yc - h, yc)[k // 2]
            cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x1 + w, 200), min(y1 + h, 200)
            whole[cy1:cy2, cx1:cx2] = image[cy1 - y1 : cy2 - y1, cx1 - x1 : cx2 - x1]
        expected, _ = warp.apply(whole, labels[0])
        assert np.array_equal(out, expected), seed


def test_box_candidates_drop_slivers_and_lost_boxes():
    before = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 100, 100]], float)
    after = np.array([[0, 0, 10, 10], [0, 0, 1, 10], [0, 0, 3, 3], [0, 0, 5, 5]], float)
    assert box_candidates(before, after).tolist() == [True, False, False, False]
