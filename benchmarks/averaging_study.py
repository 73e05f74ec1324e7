"""What weight averaging buys on the embedded dataset: raw weights, the EMA, and SWA of each (with and
without BatchNorm recalibration), at the same number of epochs. Prints a table and writes a plot.

    python benchmarks/averaging_study.py [--epochs 30] [--swa-epochs 10] [--data data/shapes.yaml]

Two runs of train.py with the same seed (so the same training), --val-raw and --swa-epochs K:
one averaging the EMA weights, one the raw weights (--swa-source raw). Raw and EMA mAP per epoch
come from results.csv; each run's swa.pt is the average with BatchNorm recomputed, and its 'swa'
entry the plain average (BatchNorm statistics averaged too), both validated here as val.py does.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import torch
from matplotlib.figure import Figure

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from utils.checkpoint.format import (  # noqa: E402
    image_size,
    load_for_inference,
    training_option,
    validation_batch_size,
)
from utils.data.config import load_dataset_config  # noqa: E402
from utils.data.loader import build_val_loader  # noqa: E402
from utils.device import inference_amp_dtype, select_device  # noqa: E402
from utils.eval.evaluate import evaluate  # noqa: E402


def run(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(args[:2])} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def validated_map(weights: Path, data: str) -> float:
    """mAP@0.5:0.95 of a checkpoint's EMA entry on the val split, as `val.py --weights W --data D`
    computes it (its default device, the run's precision), unrounded."""
    device = select_device("")
    checkpoint, model = load_for_inference(weights, "ema", device)
    config = load_dataset_config(data)
    loader = build_val_loader(
        config.val,
        config.nc,
        img_size=image_size(checkpoint),
        batch_size=validation_batch_size(checkpoint),
        workers=2,
        hyp=checkpoint["hyp"],
        stride=int(model.stride.max()),
    )
    amp_dtype = inference_amp_dtype(model, device, enabled=not training_option(checkpoint, "no_amp", False))
    return evaluate(model, loader, device=device, amp_dtype=amp_dtype).metrics.map50_95


def plain_average_checkpoint(swa_path: Path) -> Path:
    """swa.pt with its plain average (BatchNorm statistics averaged, not recomputed) as the weights."""
    checkpoint = torch.load(swa_path, map_location="cpu", weights_only=True)
    plain = checkpoint["swa"]["module"]
    out = swa_path.with_name("swa_plain.pt")
    torch.save({**checkpoint, "ema": plain, "model": plain, "source": "SWA, BatchNorm statistics averaged"}, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--swa-epochs", type=int, default=10)
    parser.add_argument("--data", default="data/shapes.yaml")
    parser.add_argument("--project", default="runs/averaging_study")
    args = parser.parse_args()
    runs = {}
    for source in ("ema", "raw"):
        name = f"swa_{source}"
        print(f"training {name} ({args.epochs} epochs)...", flush=True)
        run(
            "train.py",
            "--data",
            args.data,
            "--epochs",
            str(args.epochs),
            "--val-raw",
            "--swa-epochs",
            str(args.swa_epochs),
            "--swa-source",
            source,
            "--project",
            args.project,
            "--name",
            name,
            "--exist-ok",
        )
        runs[source] = REPO / args.project / name

    with open(runs["ema"] / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    epochs = [int(float(r["epoch"])) for r in rows]
    ema = [float(r["metrics/mAP_0.5:0.95"]) for r in rows]
    raw = [float(r["raw/mAP_0.5:0.95"]) for r in rows]
    results = {"raw (last epoch)": raw[-1], "EMA (last epoch)": ema[-1]}
    for source, label in (("ema", "EMA"), ("raw", "raw")):
        swa = runs[source] / "weights" / "swa.pt"
        results[f"SWA of {label}, BatchNorm averaged"] = validated_map(plain_average_checkpoint(swa), args.data)
        results[f"SWA of {label}, BatchNorm recomputed"] = validated_map(swa, args.data)

    print(f"\n{args.data}, {args.epochs} epochs, SWA over the last {args.swa_epochs}; mAP@0.5:0.95 on val\n")
    print("| weights | mAP@0.5:0.95 |\n|---|--:|")
    for label, value in results.items():
        print(f"| {label} | {value:.4f} |")
    ahead = [e for e, a, b in zip(epochs, ema, raw) if a > b]
    print(
        f"\nEMA above raw at {len(ahead)} of {len(epochs)} epochs"
        + ("" if len(ahead) == len(epochs) else f" (not at {sorted(set(epochs) - set(ahead))})")
        + f"; at the end {ema[-1]:.4f} vs {raw[-1]:.4f} ({ema[-1] - raw[-1]:+.4f})"
    )

    fig = Figure(figsize=(7, 4), dpi=150)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(epochs, raw, marker=".", label="raw")
    ax.plot(epochs, ema, marker=".", label="EMA")
    for (label, value), style in zip(list(results.items())[2:], (":", "--", ":", "--")):
        ax.axhline(value, linestyle=style, linewidth=1, label=label, color="tab:green" if "EMA" in label else "tab:red")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mAP@0.5:0.95")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    out = REPO / args.project / "averaging_study.png"
    fig.tight_layout()
    fig.savefig(out)
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
