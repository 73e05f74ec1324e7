"""Plots read after training and validation: curves, confusion matrix, label statistics, image grids.

Each function takes plain numpy / torch inputs and an output path, writes that one file and returns
nothing. Figures are `matplotlib.figure.Figure` objects drawn by the Agg canvas and never registered
with pyplot, so no global state leaks between calls; image grids are drawn with OpenCV.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import cv2
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PatchCollection
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

MEAN_COLOUR = "#0000ff"  # the all-classes curve: thick pure blue, apart from the class colours
MAX_GRID_WIDTH = 1920  # px, image batch grids
CONF_SHOWN = 0.25  # predictions at or below this confidence are left out of image grids


# 20 saturated colours that stay apart from each other on photos and on white; then hue steps
_PALETTE_HEX = (
    "e6194b",
    "3cb44b",
    "4363d8",
    "f58231",
    "911eb4",
    "42d4f4",
    "f032e6",
    "bfef45",
    "ffe119",
    "469990",
    "9a6324",
    "800000",
    "000075",
    "808000",
    "ff7f9f",
    "a97fff",
    "00c07f",
    "ffb870",
    "606060",
    "c0a000",
)


def class_colour(index: int) -> tuple[int, int, int]:
    """A distinct, stable BGR colour per class: the palette first, golden-angle hue steps beyond it."""
    if 0 <= index < len(_PALETTE_HEX):
        r, g, b = bytes.fromhex(_PALETTE_HEX[index])
        return b, g, r
    hue = int(index * 137.508) % 180
    bgr = cv2.cvtColor(np.uint8([[[hue, 200, 230]]]), cv2.COLOR_HSV2BGR)[0, 0]
    return int(bgr[0]), int(bgr[1]), int(bgr[2])


def _mpl_colour(index: int) -> tuple[float, float, float]:
    b, g, r = class_colour(index)
    return r / 255, g / 255, b / 255


def _figure(width_in: float, height_in: float, dpi: int = 150) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_path: Path) -> None:
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, bbox_inches="tight")
    fig.clear()  # the figure is unreferenced once we return; clearing frees its artists now


def _name(names: list[str], index: int) -> str:
    return names[index] if 0 <= index < len(names) else str(index)


def _smooth(values: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """Gaussian smoothing with edge padding, so the ends are not pulled towards zero."""
    radius = int(3 * sigma)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return np.convolve(np.pad(values, radius, mode="edge"), kernel / kernel.sum(), mode="valid")


def _read_csv(csv_path: Path) -> dict[str, np.ndarray]:
    """Column name (stripped) -> float values; empty or non-numeric cells become nan."""
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    header = [h.strip() for h in rows[0]] if rows else []

    def number(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            return math.nan

    values = [[number(c) for c in (r + [""] * len(header))[: len(header)]] for r in rows[1:] if r]
    table = np.array(values, dtype=float).reshape(len(values), len(header))
    return {name: table[:, i] for i, name in enumerate(header)}


def results_panels(columns: list[str]) -> list[tuple[str, list[str]]]:
    """Panels of results.png in order, as (column, the columns of other weights drawn with it).

    Train losses, then metrics, then val losses, then anything else; 'epoch', 'x/...' and 'ema/...' are
    left out. A column of other validated weights, 'raw/NAME' or 'power-0.05/NAME' (train.py --val),
    joins the panel of 'metrics/NAME' (or of 'NAME') when that column exists.
    """
    shown = [c for c in columns if c != "epoch" and not c.startswith(("x/", "ema/"))]
    partners: dict[str, list[str]] = {}
    for c in shown:
        prefix, _, rest = c.partition("/")
        if rest and prefix not in ("train", "metrics", "val"):
            target = next((t for t in (f"metrics/{rest}", rest) if t in shown and t != c), None)
            if target is not None:
                partners.setdefault(target, []).append(c)
    joined = {c for group in partners.values() for c in group}
    panels = [c for c in shown if c not in joined]
    group = {"train/": 0, "metrics/": 1, "val/": 2}
    panels.sort(key=lambda c: group.get(c.split("/")[0] + "/", 3))  # stable: file order within a group
    return [(c, partners.get(c, [])) for c in panels]


def plot_results(csv_path: Path, out_path: Path) -> None:
    """results.png from results.csv: one panel per column against epoch (2 x 5 for the usual 10 columns).

    Each panel shows the values with markers and a light smoothed line; a 'raw/...' (or other --val)
    column is drawn in the panel of its 'metrics/...' column as another line (legend 'EMA' / 'raw'). One row is enough.
    """
    data = _read_csv(csv_path)
    panels = results_panels(list(data))
    num_rows = max(1, math.ceil(len(panels) / 5))
    num_cols = max(1, math.ceil(len(panels) / num_rows))
    fig = _figure(2.6 * num_cols, 2.3 * num_rows, dpi=200)
    any_column = next(iter(data.values()), np.zeros(0))
    epochs = data.get("epoch", np.arange(len(any_column), dtype=float))
    if not panels:
        fig.text(0.5, 0.5, f"{Path(csv_path).name}: no columns to plot", ha="center", va="center")
    others = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
    for k, (column, joined) in enumerate(panels):
        ax = fig.add_subplot(num_rows, num_cols, k + 1)
        lines = [(column, "tab:blue", "EMA" if joined else None)]
        lines += [
            (name, "tab:green" if name.startswith("raw/") else others[i % len(others)], name.split("/")[0])
            for i, name in enumerate(joined)
        ]
        for name, colour, label in lines:
            finite = np.isfinite(data[name])
            x, y = epochs[finite], data[name][finite]
            ax.plot(x, y, marker=".", markersize=4, linewidth=1, color=colour, label=label)
            if name == column and len(y) > 2:
                ax.plot(x, _smooth(y), ":", linewidth=2, color="tab:orange", alpha=0.8)
        if len(epochs) < 2:  # one epoch: a readable integer axis around it instead of +-0.04
            ax.set_xlim(np.nansum(epochs) - 1, np.nansum(epochs) + 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        ax.set_title(column, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if joined:
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out_path)


def _class_curves(ax: Axes, x: np.ndarray, values: np.ndarray, labels: list[str]) -> np.ndarray | None:
    """One thin line per class with a finite value (labelled when labels are few); returns the class mean."""
    values = np.asarray(values, dtype=float).reshape(-1, len(x))
    valid = ~np.all(np.isnan(values), axis=1)  # all-nan row: class without ground truth
    few = len(values) < 21
    for i in np.flatnonzero(valid):
        ax.plot(
            x,
            values[i],
            linewidth=1,
            color=_mpl_colour(i) if few else "grey",
            alpha=0.9 if few else 0.5,
            label=labels[i] if few else None,
        )
    if not valid.any():
        ax.text(0.5, 0.5, "no class with labels", ha="center", va="center", transform=ax.transAxes)
        return None
    counts = np.isfinite(values[valid]).sum(axis=0)  # nan-mean without the empty-slice warning
    return np.divide(np.nansum(values[valid], axis=0), counts, out=np.full(len(x), np.nan), where=counts > 0)


def _finish_curves(fig: Figure, ax: Axes, xlabel: str, ylabel: str, title: str, out_path: Path) -> None:
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)  # outside: never over curves
    _save(fig, out_path)


def plot_pr_curve(
    recall_grid: np.ndarray, precision: np.ndarray, ap50: np.ndarray, names: list[str], out_path: Path
) -> None:
    """PR_curve.png: precision (nc, R) against recall_grid (R,) at IoU 0.5, per class and their mean."""
    recall_grid, ap50 = np.asarray(recall_grid, dtype=float), np.asarray(ap50, dtype=float)
    fig = _figure(8, 6)
    ax = fig.add_subplot()
    labels = [f"{_name(names, i)} {ap:.3f}" for i, ap in enumerate(ap50)]
    mean = _class_curves(ax, recall_grid, precision, labels)
    if mean is not None:
        map50 = np.nanmean(ap50) if np.isfinite(ap50).any() else math.nan
        ax.plot(recall_grid, mean, linewidth=3, color=MEAN_COLOUR, label=f"all classes {map50:.3f} mAP@0.5")
    _finish_curves(fig, ax, "Recall", "Precision", "Precision-Recall curve (IoU 0.5)", out_path)


def plot_metric_vs_conf(
    conf_grid: np.ndarray, values: np.ndarray, names: list[str], ylabel: str, out_path: Path
) -> None:
    """F1_curve.png / P_curve.png / R_curve.png: values (nc, C) against confidence (C,), per class and mean.

    The mean is labelled with its maximum and the confidence there; for F1 that best point is marked.
    """
    conf_grid = np.asarray(conf_grid, dtype=float)
    fig = _figure(8, 6)
    ax = fig.add_subplot()
    mean = _class_curves(ax, conf_grid, values, [_name(names, i) for i in range(len(values))])
    if mean is not None and np.isfinite(mean).any():
        best = int(np.nanargmax(mean))
        ax.plot(
            conf_grid,
            mean,
            linewidth=3,
            color=MEAN_COLOUR,
            label=f"all classes {mean[best]:.2f} at {conf_grid[best]:.3f}",
        )
        if ylabel.upper() == "F1":
            ax.axvline(conf_grid[best], color=MEAN_COLOUR, linestyle="--", linewidth=1)
            ax.plot(conf_grid[best], mean[best], "o", color=MEAN_COLOUR, markersize=8)
    _finish_curves(fig, ax, "Confidence", ylabel, f"{ylabel}-Confidence curve", out_path)


def normalize_columns(matrix: np.ndarray) -> np.ndarray:
    """Each column divided by its sum (a column summing to 0 stays 0), without warnings."""
    matrix = np.asarray(matrix, dtype=float)
    sums = matrix.sum(axis=0, keepdims=True)
    return np.divide(matrix, sums, out=np.zeros_like(matrix), where=sums > 0)


def plot_confusion_matrix(matrix: np.ndarray, names: list[str], out_path: Path, normalize: bool) -> None:
    """confusion_matrix(_normalized).png: matrix (nc+1, nc+1) = [predicted, true], background last.

    Rows (y) are predictions, columns (x) the truth; normalize divides each column by its sum.
    """
    values = normalize_columns(matrix) if normalize else np.asarray(matrix, dtype=float)
    n = len(values)
    labels = [_name(names, i) for i in range(n - 1)] + ["background"]
    side = min(max(6.0, 0.42 * n + 3), 16.0)  # 16 in keeps 80 classes legible without a 5000 px image
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else max(values.max(), 1))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03).set_label(
        "fraction of the true class" if normalize else "count"
    )
    font = 10 if n <= 10 else 8 if n <= 20 else 6 if n <= 50 else 5
    ax.set_xticks(range(n), labels, rotation=45, ha="right", rotation_mode="anchor", fontsize=font)
    ax.set_yticks(range(n), labels, fontsize=font)
    ax.set(xlabel="True", ylabel="Predicted")
    ax.set_title("Confusion matrix" + (" (columns normalised)" if normalize else " (counts)"))
    if n - 1 < 30:
        limit = image.norm.vmax
        for (row, col), v in np.ndenumerate(values):
            if v >= 0.005:  # empty cells stay blank so the pattern reads at a glance
                ax.text(
                    col,
                    row,
                    f"{v:.2f}" if normalize else f"{int(round(v))}",
                    ha="center",
                    va="center",
                    fontsize=font - 1,
                    color="white" if v > 0.55 * limit else "black",
                )
    _save(fig, out_path)


def plot_labels(labels: np.ndarray, names: list[str], out_path: Path) -> None:
    """labels.jpg from labels (n, 5) [class, cx, cy, w, h] normalised: class counts, centres, sizes, shapes."""
    labels = np.asarray(labels, dtype=float).reshape(-1, 5)
    classes = labels[:, 0].astype(int)
    nc = max(len(names), int(classes.max()) + 1 if len(classes) else 0)
    fig = _figure(15, 10)
    fig.suptitle(f"{len(labels)} boxes, {nc} classes")
    grid = fig.add_gridspec(2, 3, height_ratios=(1, 1.2))
    ax_count = fig.add_subplot(grid[0, :])  # full width: room for 80 rotated class names
    ax_xy, ax_wh, ax_box = (fig.add_subplot(grid[1, k]) for k in range(3))

    counts = np.bincount(classes, minlength=nc)
    ax_count.bar(range(nc), counts, color=[_mpl_colour(i) for i in range(nc)])
    ax_count.set_xticks(
        range(nc), [_name(names, i) for i in range(nc)], rotation=90, fontsize=min(10, max(4, 700 // max(nc, 1)))
    )
    ax_count.set(
        xlim=(-0.6, nc - 0.4),
        ylim=(0, max(counts.max(initial=0) * 1.05, 1)),
        ylabel="instances",
        title="instances per class",
    )
    ax_count.yaxis.set_major_locator(MaxNLocator(integer=True))
    if not len(labels):
        ax_count.text(0.5, 0.5, "no labels", ha="center", va="center", transform=ax_count.transAxes)

    for ax, (i, j), (xl, yl), title in (
        (ax_xy, (1, 2), ("x", "y"), "box centres (image orientation)"),
        (ax_wh, (3, 4), ("width", "height"), "box sizes"),
    ):
        hist, x_edges, y_edges = np.histogram2d(labels[:, i], labels[:, j], bins=50, range=[[0, 1], [0, 1]])
        mesh = ax.pcolormesh(x_edges, y_edges, hist.T, cmap="Blues", norm=PowerNorm(0.5, 0, max(hist.max(), 1)))
        fig.colorbar(mesh, ax=ax, fraction=0.046, pad=0.03).set_label("boxes per bin")
        ax.set(xlim=(0, 1), ylim=(1, 0) if ax is ax_xy else (0, 1), xlabel=xl, ylabel=yl, title=title)
        ax.set_aspect("equal")

    shown = labels if len(labels) <= 1000 else labels[np.random.default_rng(0).choice(len(labels), 1000, False)]
    boxes = [Rectangle((0.5 - w / 2, 0.5 - h / 2), w, h) for w, h in shown[:, 3:5]]
    ax_box.add_collection(
        PatchCollection(
            boxes, facecolor="none", linewidth=0.6, alpha=0.5, edgecolor=[_mpl_colour(int(c)) for c in shown[:, 0]]
        )
    )
    ax_box.set(
        xlim=(0, 1),
        ylim=(1, 0),
        xlabel="width (centred at 0.5)",
        ylabel="height (centred at 0.5)",
        title=f"box shapes, centred ({len(shown)} of {len(labels)})",
    )
    ax_box.set_aspect("equal")
    fig.tight_layout()
    _save(fig, out_path)


def draw_box(
    image_bgr: np.ndarray,
    xyxy: tuple[int, int, int, int],
    colour: tuple[int, int, int],
    caption: str,
    line_width: int,
    font_scale: float,
) -> None:
    """One box and its caption (above the box, else inside its top; kept inside the image), in place.
    An empty caption draws the box alone."""
    x1, y1, x2, y2 = xyxy
    cv2.rectangle(image_bgr, (x1, y1), (x2, y2), colour, line_width, cv2.LINE_AA)
    if not caption:
        return
    thickness = 1 if font_scale < 0.8 else 2
    (w, h), baseline = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
    top = y1 - h - baseline - 2 if y1 - h - baseline - 2 >= 0 else y1  # above the box, else inside its top
    left = max(min(x1, image_bgr.shape[1] - w - 2), 0)
    cv2.rectangle(image_bgr, (left, top), (left + w + 2, top + h + baseline + 2), colour, -1)
    text = (0, 0, 0) if 0.114 * colour[0] + 0.587 * colour[1] + 0.299 * colour[2] > 150 else (255, 255, 255)
    cv2.putText(
        image_bgr, caption, (left + 1, top + h + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale, text, thickness, cv2.LINE_AA
    )


def plot_image_batch(
    images: torch.Tensor | np.ndarray, targets: np.ndarray, names: list[str], out_path: Path, max_images: int = 16
) -> None:
    """A square JPEG grid of up to max_images images (B, 3, H, W) uint8 RGB with their boxes.

    targets (n, 6) [image index, class, cx, cy, w, h] normalised, or (n, 7) with a confidence last: then
    only boxes with conf > 0.25 are drawn, captioned 'name 0.87'. The grid is at most 1920 px wide.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:  # float batches: 0..1 or 0..255
        images = np.clip(images * (255 if images.max(initial=0) <= 1 else 1), 0, 255).astype(np.uint8)
    targets = np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets, dtype=float)
    targets = targets.reshape(-1, targets.shape[-1] if targets.size else 6)
    if targets.shape[1] == 7:
        targets = targets[targets[:, 6] > CONF_SHOWN]

    count = min(len(images), max_images)
    cols = max(1, math.ceil(math.sqrt(count)))
    rows = max(1, math.ceil(count / cols))
    height, width = images.shape[2:4]
    gap = 4
    scale = min(1.0, (MAX_GRID_WIDTH - (cols + 1) * gap) / (cols * width))
    tile_w, tile_h = max(1, int(width * scale)), max(1, int(height * scale))
    canvas = np.full((rows * tile_h + (rows + 1) * gap, cols * tile_w + (cols + 1) * gap, 3), 255, np.uint8)
    line_width = max(2, round(min(tile_w, tile_h) / 200))
    font_scale = max(0.4, min(tile_w, tile_h) / 700)
    for k in range(count):
        tile = np.ascontiguousarray(images[k].transpose(1, 2, 0)[:, :, ::-1])  # CHW RGB -> HWC BGR
        if scale < 1:
            tile = cv2.resize(tile, (tile_w, tile_h), interpolation=cv2.INTER_AREA)
        for row in targets[targets[:, 0] == k]:
            cls, cx, cy, w, h = int(row[1]), *row[2:6]
            xyxy = (
                round((cx - w / 2) * tile_w),
                round((cy - h / 2) * tile_h),
                round((cx + w / 2) * tile_w),
                round((cy + h / 2) * tile_h),
            )
            caption = _name(names, cls) + (f" {row[6]:.2f}" if len(row) == 7 else "")
            draw_box(tile, xyxy, class_colour(cls), caption, line_width, font_scale)
        top, left = gap + (k // cols) * (tile_h + gap), gap + (k % cols) * (tile_w + gap)
        canvas[top : top + tile_h, left : left + tile_w] = tile
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    if not cv2.imwrite(str(out_path), canvas, params):  # 4:4:4 keeps thin coloured lines their colour
        raise OSError(f"could not write {out_path}")


def plot_posthoc_sweep(widths: list[float], maps: list[float], best: float, out_path: Path) -> None:
    """mAP@0.5:0.95 against the relative width of post-hoc EMA reconstructions (average.py --sweep)."""
    fig = _figure(5, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(widths, maps, marker="o", markersize=4, linewidth=1.2, color="tab:blue")
    ax.axvline(best, linestyle=":", color="tab:orange", label=f"best: {best:g}")
    ax.set_xscale("log")
    ax.set_xlabel("relative width sigma_rel of the power EMA")
    ax.set_ylabel("mAP@0.5:0.95")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out_path)
