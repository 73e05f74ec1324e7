"""How big each checkpoint file of a run is, for n/s/x of both families at 80 classes: last.pt
(model, EMA, optimizer state) with SGD and with AdamW, best.pt as a finished run ships it
(stripped to its EMA) and with train.py --keep-optimizer (whole, as last.pt). Real files, written
by the functions train.py uses, no training (the sizes do not depend on the values).

    python benchmarks/bench_checkpoint_size.py [--cfg yolov5n.yaml ...] [--dir /path/on/the/training/disk]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.yolo import build_model  # noqa: E402
from utils.checkpoint.format import save_checkpoint, strip_for_inference, training_checkpoint  # noqa: E402
from utils.hyp import load_hyp  # noqa: E402
from utils.train.ema import ModelEMA  # noqa: E402
from utils.train.optim import build_optimizer  # noqa: E402
from utils.train.run import state_of  # noqa: E402

MODELS = ("yolov5n.yaml", "yolov5s.yaml", "yolov5x.yaml", "yolo11n.yaml", "yolo11s.yaml", "yolo11x.yaml")


def last_pt_size(model: torch.nn.Module, ema: ModelEMA, optimizer_name: str, path: Path) -> int:
    """Write last.pt as train.py does, once the optimizer has taken a step (its state exists); its size."""
    optimizer = build_optimizer(model, optimizer_name, 0.01, 0.937, 5e-4)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    checkpoint = training_checkpoint(
        state_of(model, ema, optimizer),
        finished=True,
        model_yaml=model.yaml,
        names=[f"class{i}" for i in range(80)],
        hyp=load_hyp("scratch-low.yaml"),
        opt={"imgsz": 640, "batch_size": 64},
        world_size=1,
    )
    save_checkpoint(path, checkpoint)
    model.zero_grad(set_to_none=True)
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", nargs="+", default=list(MODELS))
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}; MB = 10^6 bytes; nc=80\n")
    print(
        "| model | parameters | EMA tensors (fp32) | last.pt, SGD | last.pt, AdamW | best.pt (stripped) "
        "| stripped / EMA tensors | best.pt with --keep-optimizer |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for cfg in args.cfg:
            torch.manual_seed(0)
            model = build_model(cfg, nc=80)
            ema = ModelEMA(model)
            ema_bytes = sum(t.numel() * t.element_size() for t in ema.module.state_dict().values())
            adamw = last_pt_size(model, ema, "AdamW", Path(folder) / "adamw.pt")
            best = Path(folder) / "best.pt"
            sgd = last_pt_size(model, ema, "SGD", best)  # best.pt is last.pt's bytes until the run ends
            _, stripped = strip_for_inference(best)
            params = sum(p.numel() for p in model.parameters())
            print(
                f"| {cfg[:-5]} | {params / 1e6:.2f} M | {ema_bytes / 1e6:.1f} MB | {sgd / 1e6:.1f} MB | "
                f"{adamw / 1e6:.1f} MB | {stripped / 1e6:.1f} MB | {stripped / ema_bytes:.4f} | {sgd / 1e6:.1f} MB |"
            )
            del model, ema


if __name__ == "__main__":
    main()
