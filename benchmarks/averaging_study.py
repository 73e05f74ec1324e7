"""What weight averaging buys on the embedded dataset: raw weights, the default EMA (YOLOv5's step
ramp), the EMA with a half-life in images, the best post-hoc EMA and SWA of the last epochs, each
with BatchNorm statistics as averaged and recomputed on training batches, over several seeds and
run lengths. Prints the tables and writes a plot.

    python benchmarks/averaging_study.py --epochs 30 150 --seeds 0 1 2

Smallest run (the CI smoke test: a generated dataset, 64 px, one epoch, one width):

    python benchmarks/averaging_study.py --data shapes.yaml --imgsz 64 --batch-size 4 --workers 0 \
        --epochs 1 --seeds 0 --snapshots 2 --swa-epochs 1 --widths 0.07 --project /tmp/study --plot /tmp/study.png

One train.py run per (run length, seed) tracks everything at once: --average ema-images
power-0.07, --posthoc-ema 20, --swa-epochs 10 --swa-source raw (add --val raw ema-images to a
run for per-epoch curves of the raw weights and the image EMA: it changes no trained weight). Finished runs are kept
(an interrupted one resumes from its last.pt) and each run's evaluations are cached in its
study.json, so the script can be run again to add seeds or run lengths. Every number is an
evaluation on the val split as train.py validated (utils/train/as_trained.py), so val.py on the
same weights prints it. The post-hoc width is chosen on the same val split it is reported on (as
average.py --sweep does): an optimistic choice, said in the table; the sweep table shows each
fixed width too. The power EMA of width 0.07 tracked directly during training is compared with
its reconstruction from the snapshots (the exactness of post-hoc EMA on a trained model).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from statistics import mean

import torch
from matplotlib.figure import Figure

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.state_dicts import relative_difference  # noqa: E402
from benchmarks.train_options import add_training_arguments, training_options  # noqa: E402
from utils.checkpoint.format import averaged_checkpoint, load_checkpoint, model_from_checkpoint  # noqa: E402
from utils.data.config import load_dataset_config  # noqa: E402
from utils.device import select_device  # noqa: E402
from utils.train.as_trained import evaluate_as_trained, val_loader_as_trained  # noqa: E402
from utils.train.averaging import TrainingBatches  # noqa: E402
from utils.train.posthoc_sweep import (  # noqa: E402
    SWEEP_WIDTHS,
    PosthocRun,
    prepared_model,
    reconstructed_checkpoint,
    sweep,
)

METHODS = {  # key -> label
    "raw": "raw weights",
    "ema": "EMA, YOLOv5's step ramp (default)",
    "ema-images": "EMA, half-life in images (--ema images)",
    "posthoc": "post-hoc EMA, best width on val",
    "swa": "SWA of the last epochs (--swa-epochs, raw weights)",
}
SHORT = {
    "raw": "raw",
    "ema": "EMA, steps\n(default)",
    "ema-images": "EMA,\nimages",
    "posthoc": "post-hoc\n(best)",
    "swa": "SWA",
}
BN_LABELS = {"average": "BN averaged", "recalibrate": "BN recomputed"}  # the order of the tables
TRACKED = ("--average", "ema-images", "power-0.07")


def train(run_dir: Path, epochs: int, seed: int, args: argparse.Namespace) -> None:
    """Train the run (or finish an interrupted one) unless it is done."""
    if (run_dir / "weights" / "swa.pt").exists():
        return
    last = run_dir / "weights" / "last.pt"
    if last.exists():
        command = ["train.py", "--resume", str(last)]
    else:
        command = [
            "train.py",
            "--data",
            args.data,
            "--epochs",
            str(epochs),
            "--seed",
            str(seed),
            *TRACKED,
            "--posthoc-ema",
            str(args.snapshots),
            "--swa-epochs",
            str(args.swa_epochs),
            "--swa-source",
            "raw",
            *training_options(args),
            "--project",
            str(run_dir.parent),
            "--name",
            run_dir.name,
            "--exist-ok",
        ]
    print(f"training {run_dir.name}...", flush=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{run_dir.name}.log", "a") as log:
        result = subprocess.run([sys.executable, *command], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode:
        sys.exit(f"training {run_dir.name} failed: see {run_dir.parent / f'{run_dir.name}.log'}")


def evaluate_run(run_dir: Path, args: argparse.Namespace) -> dict:
    """Every method in both BatchNorm modes, the post-hoc sweep and the exactness check (cached)."""
    cache = run_dir / "study.json"
    if cache.exists():
        return json.loads(cache.read_text())
    device = select_device("")
    run = PosthocRun.open(run_dir)
    data = load_dataset_config(args.data)
    probe = model_from_checkpoint(run.last, "ema")
    loader = val_loader_as_trained(run.last, probe, data, workers=2)
    batches = TrainingBatches(run.last, data, probe.nc, run.epoch, max_images=0)  # the whole split, as measured
    weights = run_dir / "weights"
    swa = torch.load(weights / "swa.pt", map_location="cpu", weights_only=True)
    sources = {
        "raw": run.last["model"],
        "ema": run.last["ema"],
        "ema-images": load_checkpoint(weights / "ema-images.pt")["ema"],
        "swa": swa["swa"]["module"],  # the plain average; swa.pt's weights have BatchNorm recomputed
    }
    result = {"epochs": int(run.last["opt"]["epochs"]), "seed": int(run.last["opt"]["seed"])}
    for method, state in sources.items():
        for bn in BN_LABELS:
            checkpoint = averaged_checkpoint(run.last, state, method)
            model = prepared_model(checkpoint, bn, batches, device)
            metrics = evaluate_as_trained(model, checkpoint, loader, device).metrics
            result[f"{method}/{bn}"] = [metrics.map50, metrics.map50_95]
            print(f"{run_dir.name} {method} {BN_LABELS[bn]}: {metrics.map50_95:.4f}", flush=True)
    result["sweep"] = {}
    for bn in BN_LABELS:
        rows, best = sweep(run, list(args.widths), bn=bn, batches=batches, loader=loader, device=device)
        result["sweep"][bn] = [[r.sigma_rel, r.metrics.map50, r.metrics.map50_95, r.metrics.fitness] for r in rows]
        top = max(rows, key=lambda r: r.metrics.fitness)
        result[f"posthoc/{bn}"] = [top.metrics.map50, top.metrics.map50_95, top.sigma_rel]
        print(f"{run_dir.name} post-hoc {BN_LABELS[bn]}: {top.metrics.map50_95:.4f} at {top.sigma_rel:g}", flush=True)
    # Exactness: the 0.07 power EMA tracked during training against its reconstruction (BatchNorm as combined).
    tracked = load_checkpoint(weights / "power-0.07.pt")
    rebuilt = reconstructed_checkpoint(run, 0.07)
    maps = []
    for checkpoint in (tracked, rebuilt):
        model = prepared_model(checkpoint, "average", None, device)
        maps.append(evaluate_as_trained(model, checkpoint, loader, device).metrics.map50_95)
    result["exactness"] = {
        "weight_error": relative_difference(rebuilt["ema"], tracked["ema"]),
        "profile_residual": rebuilt["posthoc"]["residual"],
        "map_tracked": maps[0],
        "map_rebuilt": maps[1],
    }
    cache.write_text(json.dumps(result, indent=1))
    return result


def sweep_means(results: list[dict], bn: str) -> list[tuple[float, float]]:
    """(width, mAP@0.5:0.95 mean over the runs) for the widths every run's sweep tried."""
    by_width = [{w: m for w, _, m, _ in r["sweep"][bn]} for r in results]
    common = sorted(set.intersection(*(set(b) for b in by_width)))
    return [(w, mean(b[w] for b in by_width)) for w in common]


def spread(values: list[float]) -> float:
    """The range of the seeds' values."""
    return max(values) - min(values)


def report(epochs: int, results: list[dict]) -> list[tuple[str, str, float, float]]:
    """Print the table of one run length; returns (method, bn, mean, spread) rows for the plot."""
    seeds = [r["seed"] for r in results]
    print(f"\n### {epochs} epochs, seeds {', '.join(map(str, seeds))}: mAP@0.5:0.95 on val\n")
    print("| weights | BatchNorm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | spread | vs raw (paired) |")
    print("|---|---|" + "--:|" * (len(seeds) + 3))
    raw = [r["raw/average"][1] for r in results]
    rows = []
    for method, label in METHODS.items():
        for bn in BN_LABELS:
            values = [r[f"{method}/{bn}"][1] for r in results]
            gains = [v - base for v, base in zip(values, raw)]
            key = f"{method}/{bn}"
            chosen = ", ".join(f"{r[key][2]:g}" for r in results) if method == "posthoc" else ""
            width = f" (sigma_rel {chosen})" if chosen else ""
            print(
                f"| {label}{width} | {BN_LABELS[bn]} | "
                + " | ".join(f"{v:.4f}" for v in values)
                + f" | {mean(values):.4f} | {spread(values):.4f} | {mean(gains):+.4f} (min {min(gains):+.4f}) |"
            )
            rows.append((SHORT[method], bn, mean(values), spread(values)))
    print(f"\nPost-hoc sweep, mean mAP@0.5:0.95 over seeds, {epochs} epochs:\n")
    print("| sigma_rel | " + " | ".join(BN_LABELS[bn] for bn in BN_LABELS) + " |\n|--:|--:|--:|")
    means = {bn: dict(sweep_means(results, bn)) for bn in BN_LABELS}
    for width in means["average"]:
        print(f"| {width:g} | " + " | ".join(f"{means[bn][width]:.4f}" for bn in BN_LABELS) + " |")
    print("\nExactness: the power EMA of width 0.07 tracked in training against its reconstruction:\n")
    print("| seed | relative weight error | profile residual | mAP tracked | mAP rebuilt | difference |")
    print("|--:|--:|--:|--:|--:|--:|")
    for r in results:
        e = r["exactness"]
        print(
            f"| {r['seed']} | {e['weight_error']:.2e} | {e['profile_residual']:.2%} | {e['map_tracked']:.4f} | "
            f"{e['map_rebuilt']:.4f} | {e['map_rebuilt'] - e['map_tracked']:+.4f} |"
        )
    return rows


def plot(tables: dict[int, list], sweeps: dict[int, list[dict]], out: Path) -> None:
    """Per run length: each method's mean with its seed range; and the post-hoc sweep curves."""
    fig = Figure(figsize=(6 * len(tables), 7.5), dpi=150)
    for column, (epochs, rows) in enumerate(tables.items()):
        ax = fig.add_subplot(2, len(tables), column + 1)
        labels = list(dict.fromkeys(label for label, *_ in rows))
        for offset, bn, colour in ((-0.2, "average", "tab:blue"), (0.2, "recalibrate", "tab:orange")):
            points = [(labels.index(label) + offset, m, s) for label, b, m, s in rows if b == bn]
            x, y, e = zip(*points)
            ax.errorbar(x, y, yerr=[v / 2 for v in e], fmt="o", color=colour, capsize=3, label=BN_LABELS[bn])
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(f"{epochs} epochs: mean over seeds, bar = seed range", fontsize=9)
        ax.set_ylabel("mAP@0.5:0.95")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax = fig.add_subplot(2, len(tables), len(tables) + column + 1)
        for bn, colour in (("average", "tab:blue"), ("recalibrate", "tab:orange")):
            widths, maps = zip(*sweep_means(sweeps[epochs], bn))
            ax.plot(
                widths,
                maps,
                "o-",
                color=colour,
                label=BN_LABELS[bn],
            )
        ax.set_xscale("log")
        ax.set_xticks(widths, [f"{w:g}" for w in widths], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("post-hoc EMA relative width sigma_rel")
        ax.set_ylabel("mAP@0.5:0.95 (mean over seeds)")
        ax.set_title(f"{epochs} epochs: post-hoc sweep", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"\nplot: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[30, 150])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--snapshots", type=int, default=20, help="--posthoc-ema N")
    parser.add_argument("--swa-epochs", type=int, default=10)
    parser.add_argument("--widths", type=float, nargs="+", default=list(SWEEP_WIDTHS), help="post-hoc sweep")
    parser.add_argument("--data", default="data/shapes.yaml")
    add_training_arguments(parser)
    parser.add_argument("--project", default="runs/averaging_study")
    parser.add_argument("--plot", default=None, help="where to write the plot (default: PROJECT/averaging_study.png)")
    args = parser.parse_args()
    project = (REPO / args.project).resolve()
    tables, sweeps = {}, {}
    for epochs in args.epochs:
        results = []
        for seed in args.seeds:
            run_dir = project / f"e{epochs}_s{seed}"
            train(run_dir, epochs, seed, args)
            results.append(evaluate_run(run_dir, args))
        tables[epochs], sweeps[epochs] = report(epochs, results), results
    plot(tables, sweeps, Path(args.plot) if args.plot else project / "averaging_study.png")


if __name__ == "__main__":
    main()
