"""AutoAnchor: how well a YOLOv5-style model's anchors fit the training labels, and anchors fitted
to the labels (k-means, then evolution) when they fit badly or the model YAML gives `anchors: N`.

The measures are YOLOv5's. A label of size (w, h) and an anchor (aw, ah) match when
min(w/aw, aw/w, h/ah, ah/h) > 1 / anchor_t, the rule by which the loss gives targets to anchors
(utils/train/loss.py). Best possible recall (BPR): the share of labels that match at least one
anchor; anchors/target: the mean number of anchors a label matches.

Edge cases: no labelled box with a size is a UserError for `anchors: N` (nothing to fit them to)
and a warning otherwise (the YAML's anchors are kept); fewer distinct label sizes than anchors and
labels all under MIN_FIT_SIZE are fitted all the same, with a warning. Every fitted anchor side is
at least MIN_ANCHOR_SIZE pixels.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.cluster.vq import kmeans

from models.yolo import DetectionModel
from utils.data.dataset import DetectionDataset
from utils.dist import World
from utils.errors import UserError
from utils.log import LOGGER

GOOD_BPR = 0.98  # from this best possible recall on, the anchors are kept as they are
MIN_FIT_SIZE = 2.0  # pixels: labels smaller on both sides are left out of the fit (YOLOv5's limit)
# Pixels: no side of a fitted anchor is smaller, wherever it comes from (k-means, its fallbacks, the
# evolution, the rounding to 0.1 px the YAML records). The loss divides by the anchors and the YAML
# parser wants them > 0; 2 px is the limit the evolution has always clipped to (YOLOv5's too), so
# fits of ordinary labels do not change; it lies on the YAML's 0.1 px grid, so rounding keeps it;
# and a 2 px side still matches label sides down to 2 / anchor_t px (0.5 px at anchor_t 4).
MIN_ANCHOR_SIZE = MIN_FIT_SIZE
FIT_SEED = 0  # the same labels give the same anchors, whatever the run's --seed
GENERATIONS = 1000
MUTATION_PROBABILITY, MUTATION_SIGMA = 0.9, 0.1
KMEANS_RESTARTS = 30  # k-means runs from different starts; the one with the least distortion is kept


def label_sizes(labels: list[np.ndarray], shapes: np.ndarray, img_size: int) -> np.ndarray:
    """Label sizes (M, 2) w, h in pixels at the training image size: each image's normalised label
    sizes times its width and height scaled so that its longer side is img_size, as the training
    loader resizes it (without YOLOv5's random 0.9-1.1 scale per image: the figures are those of
    the labels as given). labels: per image (n, 5) [class, cx, cy, w, h] normalised; shapes: (N, 2)
    original (height, width). Labels of zero width or height are left out."""
    image_wh = shapes[:, ::-1].astype(np.float64) * (img_size / shapes.max(1, keepdims=True))
    wh = np.concatenate([lb[:, 3:5].astype(np.float64) * s for lb, s in zip(labels, image_wh)] + [np.zeros((0, 2))])
    return wh[(wh > 0).all(1)]


def _match_ratios(sizes: torch.Tensor, anchors: np.ndarray) -> torch.Tensor:
    """sizes (M, 2), anchors (K, 2) in pixels -> (M, K) min(w/aw, aw/w, h/ah, ah/h), 1 for equal sizes.
    In torch: the evolution computes this a thousand times, and torch's kernels are ~3x numpy's here."""
    ratio = sizes[:, None] / torch.as_tensor(anchors, dtype=sizes.dtype)[None]
    return torch.minimum(ratio, 1 / ratio).amin(2)


def anchor_metrics(wh: np.ndarray, anchors: np.ndarray, anchor_t: float) -> tuple[float, float]:
    """(best possible recall, anchors/target) of anchors (K, 2) for label sizes wh (M, 2), both in pixels."""
    matched = _match_ratios(torch.as_tensor(wh, dtype=torch.float64), anchors) > 1 / anchor_t
    return matched.any(1).sum().item() / len(wh), matched.sum().item() / len(wh)


def _fitness(sizes: torch.Tensor, anchors: np.ndarray, anchor_t: float) -> float:
    """YOLOv5's: the mean over labels of the best anchor's match ratio, counted where it matches.
    Summed by numpy (pairwise, in float64), whose result does not depend on the number of threads."""
    best = _match_ratios(sizes, anchors).amax(1).double().numpy()
    return float(np.where(best > 1 / anchor_t, best, 0.0).mean())


def fit_anchors(
    wh: np.ndarray, num_anchors: int, anchor_t: float, generations: int = GENERATIONS, seed: int = FIT_SEED
) -> np.ndarray:
    """num_anchors anchors (K, 2) in pixels, smallest area first, every side at least
    MIN_ANCHOR_SIZE, fitted to label sizes wh (M >= 1, 2): k-means on the sizes, then an evolution
    that keeps random multiplicative mutations of the anchors that raise their fitness. Seeded: the
    same sizes give the same anchors. Labels under MIN_FIT_SIZE pixels on both sides are left out;
    when all are, they are all fitted, with a warning, and the anchors stay near MIN_ANCHOR_SIZE."""
    if not len(wh):
        raise ValueError("fit_anchors needs at least one label size")
    tiny = (wh < MIN_FIT_SIZE).all(1)
    if tiny.all():
        LOGGER.warning(
            f"WARNING: AutoAnchor: all {len(wh)} labels are under {MIN_FIT_SIZE:g} px at this image size: "
            f"the anchors are held at {MIN_ANCHOR_SIZE:g} px or more, and boxes this small are hardly learned; "
            "check the labels' sizes (normalised w, h) or train at a larger --imgsz"
        )
    elif tiny.any():
        LOGGER.info(f"AutoAnchor: {tiny.sum()} of {len(wh)} labels are under {MIN_FIT_SIZE:g} px: left out of the fit")
        wh = wh[~tiny]
    anchors = _kmeans(wh, num_anchors, seed)
    sizes = torch.from_numpy(wh.astype(np.float32))
    anchors = _evolve(sizes, anchors, anchor_t, generations, np.random.default_rng(seed))
    return anchors[np.argsort(anchors.prod(1), kind="stable")]


def _kmeans(wh: np.ndarray, num_anchors: int, seed: int) -> np.ndarray:
    """Starting anchors (K, 2), every side at least MIN_ANCHOR_SIZE: k-means centres of the sizes
    (scipy's k-means, on sizes divided by their spread as it asks), or their quantiles when there
    are too few distinct sizes to cluster."""
    distinct = len(np.unique(wh, axis=0))
    if distinct <= num_anchors:  # too few distinct sizes to cluster: spread over their range
        if distinct < num_anchors:
            LOGGER.warning(
                f"WARNING: AutoAnchor: only {distinct} distinct label size(s) for {num_anchors} anchors: "
                "the anchors are spread over them, several alike"
            )
        return np.quantile(wh, np.linspace(0, 1, num_anchors), axis=0).clip(min=MIN_ANCHOR_SIZE)
    spread = wh.std(0)
    spread[spread == 0] = 1.0
    # An int `seed` is a fresh RandomState in every scipy since 1.10 (albumentations' minimum); `rng` came in 1.15.
    centres, _ = kmeans(wh / spread, num_anchors, iter=KMEANS_RESTARTS, seed=seed)
    centres = centres * spread
    if len(centres) < num_anchors:  # scipy drops clusters that end up empty
        missing = num_anchors - len(centres)
        centres = np.concatenate((centres, np.quantile(wh, np.linspace(0, 1, missing), axis=0)))
    return centres.clip(min=MIN_ANCHOR_SIZE)


def _evolve(
    sizes: torch.Tensor, anchors: np.ndarray, anchor_t: float, generations: int, rng: np.random.Generator
) -> np.ndarray:
    """Each generation scales a random subset of the anchor sides by random factors around 1 and keeps
    the result when its fitness is higher. Candidates are clipped to MIN_ANCHOR_SIZE pixels, so
    anchors given at least that stay so."""
    best = _fitness(sizes, anchors, anchor_t)
    for _ in range(generations):
        factors = np.ones_like(anchors)
        while (factors == 1).all():  # a generation that changes nothing would be wasted
            mutated = rng.random(anchors.shape) < MUTATION_PROBABILITY
            step = rng.random() * MUTATION_SIGMA * rng.standard_normal(anchors.shape)
            factors = (1 + mutated * step).clip(0.3, 3.0)
        candidate = (anchors * factors).clip(min=MIN_ANCHOR_SIZE)
        fitness = _fitness(sizes, candidate, anchor_t)
        if fitness > best:
            best, anchors = fitness, candidate
    return anchors


def _describe(anchors_px: np.ndarray, strides: list[float]) -> str:
    """One line per level: 'stride 8: 10x13, 16x30, 33x23' (pixels)."""
    levels = anchors_px.reshape(len(strides), -1, 2)
    return "\n".join(
        f"  stride {stride:g}: " + ", ".join(f"{w:g}x{h:g}" for w, h in level) for stride, level in zip(strides, levels)
    )


def _checked_anchors(model: DetectionModel, wh: np.ndarray, img_size: int, anchor_t: float) -> list | None:
    """The check against label sizes wh (M, 2) and, when it is needed, the fit: new per-level
    anchors in pixels for the model, or None to keep its own. A model whose YAML gives `anchors: N`
    is always fitted (autoanchor has refused it when there are no labels)."""
    head = model.detect_head
    strides = head.stride.tolist()
    if not len(wh):
        LOGGER.warning(
            "WARNING: AutoAnchor: the training labels hold no box with a size: the model YAML's anchors are kept"
        )
        return None
    count = head.nl * head.na
    if model.needs_anchor_fit:
        LOGGER.info(
            f"AutoAnchor: the model YAML gives `anchors: {head.na}`: fitting {count} anchors to {len(wh)} "
            f"training labels at {img_size} px..."
        )
    else:
        current = (head.anchors.detach().double().cpu() * head.stride.double().view(-1, 1, 1)).view(-1, 2).numpy()
        bpr, per_target = anchor_metrics(wh, current, anchor_t)
        summary = f"AutoAnchor: {per_target:.2f} anchors/target, {bpr:.3f} Best Possible Recall (BPR)"
        if bpr >= GOOD_BPR:
            LOGGER.info(f"{summary}. Current anchors are a good fit to the dataset")
            return None
        LOGGER.info(f"{summary}. Anchors are a poor fit to the dataset: fitting new anchors to it...")
    # To 0.1 px, as the YAML records them. MIN_ANCHOR_SIZE is on that grid, so no side drops below it;
    # the clip holds that whatever the constant.
    fitted = np.round(fit_anchors(wh, count, anchor_t), 1).clip(min=MIN_ANCHOR_SIZE)
    new_bpr, new_per_target = anchor_metrics(wh, fitted, anchor_t)
    if not model.needs_anchor_fit and new_bpr <= bpr:
        LOGGER.info(
            f"AutoAnchor: the fitted anchors reach {new_bpr:.3f} BPR, no better than {bpr:.3f}: "
            "the original anchors are kept"
        )
        return None
    before = "" if model.needs_anchor_fit else f" (were {per_target:.2f} anchors/target, {bpr:.3f} BPR)"
    LOGGER.info(
        f"AutoAnchor: new anchors, {new_per_target:.2f} anchors/target, {new_bpr:.3f} BPR{before}; "
        f"stored in the model, its YAML and its checkpoints (pixels):\n{_describe(fitted, strides)}"
    )
    return fitted.reshape(head.nl, -1).tolist()


def autoanchor(
    model: DetectionModel, dataset: DetectionDataset, img_size: int, anchor_t: float, world: World = World()
) -> None:
    """Check the anchor-based model's anchors against the training labels at img_size and, below
    GOOD_BPR best possible recall (or for `anchors: N`), replace them by fitted ones when those are
    better. Call it on every rank, before any average of the model is made: rank 0 checks and fits,
    the others take its anchors. `anchors: N` with no labelled box with a size is a UserError, on
    every rank (each holds the whole training set's labels)."""
    wh = label_sizes(dataset.labels, dataset.shapes, img_size)
    if not len(wh) and model.needs_anchor_fit:
        raise UserError(
            f"the model YAML gives `anchors: {model.yaml['anchors']}`, a count, but the training labels hold no "
            "box with a size to fit the anchors to; add labelled boxes to the train split, or list the anchor "
            "sizes in the YAML"
        )
    fitted = _checked_anchors(model, wh, img_size, anchor_t) if world.is_main else None
    fitted = world.from_main(fitted)
    if fitted is not None:
        model.set_anchors(fitted)
