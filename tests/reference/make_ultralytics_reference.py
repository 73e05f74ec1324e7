"""Compute reference numbers from the installed `ultralytics` package (imported, never copied).

Run once, in a separate venv holding `ultralytics` 8.4 (benchmarks/bench_accuracy.py says how to
make one), with a font in $YOLO_CONFIG_DIR and its Ultralytics/ subfolder:
    YOLO_OFFLINE=1 YOLO_CONFIG_DIR=DIR VENV/bin/python tests/reference/make_ultralytics_reference.py

Writes tests/reference/ultralytics_8_4.json, which tests/test_ultralytics_models.py and
tests/test_anchor_free_loss.py read. Builds every model from its YAML name only: no weights are
loaded. Deterministic inputs come from fixed_values.py beside this file.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import sys
import time

os.environ.setdefault("YOLO_OFFLINE", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import fixed_values as fv  # noqa: E402
import torch  # noqa: E402
import ultralytics  # noqa: E402
from ultralytics.cfg import DEFAULT_CFG_DICT, get_cfg  # noqa: E402
from ultralytics.nn.modules import block as U_block  # noqa: E402
from ultralytics.nn.modules import conv as U_conv  # noqa: E402
from ultralytics.nn.modules import head as U_head  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402
from ultralytics.utils import loss as U_loss  # noqa: E402
from ultralytics.utils import tal as U_tal  # noqa: E402

OUT = os.path.join(HERE, "ultralytics_8_4.json")
MODELS = [
    *(f"yolov5{s}u" for s in "nsmlx"),
    *(f"yolov8{s}" for s in "nsmlx"),
    *(f"yolo11{s}" for s in "nsmlx"),
]
WITH_STATE_DICT = {"yolov5nu", "yolov8n", "yolo11n", "yolo11m"}
WITH_LAYERS = {"yolov5nu", "yolov8n", "yolo11n"}
FORWARD_MODELS = ["yolov5nu", "yolov8n", "yolo11n"]
OUT_STEP = 97
GRAD_STEP = 53

torch.set_num_threads(2)


def build(name: str, nc: int = 80) -> DetectionModel:
    return DetectionModel(f"{name}.yaml", nc=nc, verbose=False)


def n_params(m: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in m.parameters()))


def digest(sd: dict) -> str:
    text = "\n".join(f"{k} {list(v.shape)}" for k, v in sd.items())
    return hashlib.sha256(text.encode()).hexdigest()


def stats(t: torch.Tensor, step: int) -> dict:
    d = t.detach().to(torch.float64)
    flat = d.reshape(-1)
    return {
        "shape": list(t.shape),
        "sum": float(d.sum()),
        "abs_sum": float(d.abs().sum()),
        "sq_sum": float((d * d).sum()),
        "sample_step": step,
        "samples": [float(x) for x in flat[::step]],
    }


def layer_table(model: DetectionModel) -> list:
    """[i, f, type, params, out_shape_at_64, extra] per top-level layer."""
    shapes = {}
    hooks = []
    for i, m in enumerate(model.model):

        def hook(mod, inp, out, i=i):
            if isinstance(out, torch.Tensor):
                shapes[i] = list(out.shape)

        hooks.append(m.register_forward_hook(hook))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, fv.IMAGE_SIZE, fv.IMAGE_SIZE))
    for h in hooks:
        h.remove()
    rows = []
    for i, m in enumerate(model.model):
        extra = {}
        first = next((c for c in m.modules() if isinstance(c, torch.nn.Conv2d)), None)
        if first is not None:
            extra["first_conv_in"] = first.in_channels
        if hasattr(m, "m") and isinstance(m.m, (torch.nn.ModuleList, torch.nn.Sequential)):
            extra["n_blocks"] = len(m.m)
            extra["block_types"] = sorted({type(b).__name__ for b in m.m})
        if hasattr(m, "c"):
            extra["hidden_c"] = int(m.c)
        if isinstance(m, U_block.SPPF):
            extra["sppf"] = {
                "k": m.m.kernel_size,
                "n": getattr(m, "n", 3),
                "add": getattr(m, "add", False),
                "cv1_act": type(m.cv1.act).__name__,
            }
        if isinstance(m, U_head.Detect):
            extra["detect"] = {
                "nc": m.nc,
                "reg_max": m.reg_max,
                "nl": m.nl,
                "legacy": bool(m.legacy),
                "box_hidden_c2": m.cv2[0][0].conv.out_channels,
                "cls_hidden_c3": m.cv3[0][-1].in_channels,
                "cls_branch_types": [type(x).__name__ for x in m.cv3[0]],
                "end2end": bool(getattr(m, "one2one_cv2", None) is not None),
                "in_channels": [seq[0].conv.in_channels for seq in m.cv2],
            }
        rows.append([i, m.f, type(m).__name__, int(m.np), shapes.get(i), extra])
    model.train()
    return rows


def model_entry(name: str) -> dict:
    model = build(name)
    sd = model.state_dict()
    fused = copy.deepcopy(model).fuse(verbose=False)
    e = {
        "params": n_params(model),
        "fused_params": n_params(fused),
        "num_keys": len(sd),
        "digest": digest(sd),
        "stride": [float(s) for s in model.stride],
        "detect_legacy": bool(model.model[-1].legacy),
        "num_layers": len(model.model),
    }
    if name in WITH_STATE_DICT:
        e["state_dict"] = [[k, list(v.shape)] for k, v in sd.items()]
    if name in WITH_LAYERS:
        e["layers"] = layer_table(model)
        bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        e["batchnorm"] = {"eps": bn.eps, "momentum": bn.momentum}
        e["activation"] = type(model.model[0].act).__name__
    return e


def forward_entry(name: str) -> dict:
    model = build(name)
    fv.fill_state_dict(model)
    model.eval()
    img = fv.fixed_image()
    with torch.no_grad():
        y = model(img)
    if isinstance(y, torch.Tensor):
        fmt, pred = "tensor (1, 4+nc, A)", y
    else:
        fmt = (
            f"{type(y).__name__} of {len(y)}: [0] decoded tensor (1, 4+nc, A) = xywh pixels + class sigmoid; "
            f"[1] {type(y[1]).__name__} with keys {sorted(y[1]) if isinstance(y[1], dict) else '?'} (raw head outputs)"
        )
        pred = y[0]
    e = {"output_format": fmt, **stats(pred, OUT_STEP)}
    fused = copy.deepcopy(model).fuse(verbose=False)
    fused.eval()
    with torch.no_grad():
        yf = fused(img)
    pf = yf if isinstance(yf, torch.Tensor) else yf[0]
    e["fused"] = stats(pf, OUT_STEP)
    e["fused_max_abs_diff"] = float((pf.double() - pred.double()).abs().max())
    return e


def loss_entry(case_name: str, case: dict) -> dict:
    b, nc, scale = case["batch"], case["nc"], case["scale"]
    model = build("yolov8n", nc=nc)  # weights unused: only Detect's nc/reg_max/stride and the device are read
    model.args = get_cfg()  # the trainer sets model.args = its args (default.yaml: box 7.5, cls 0.5, dfl 1.5)
    model.criterion = model.init_criterion()  # v8DetectionLoss(model) with tal_topk=10, tal_topk2=None
    crit = model.criterion
    assert type(crit) is U_loss.v8DetectionLoss, type(crit)

    feats = [f.requires_grad_(True) for f in fv.loss_case_feats(b, nc, scale)]
    rm = fv.REG_MAX
    # What Detect.forward returns in training mode: box channels first, then class channels, per level concatenated
    preds = {
        "boxes": torch.cat([f[:, : 4 * rm].reshape(b, 4 * rm, -1) for f in feats], -1),
        "scores": torch.cat([f[:, 4 * rm :].reshape(b, nc, -1) for f in feats], -1),
        "feats": feats,
    }
    labels = torch.tensor(case["labels"], dtype=torch.float32)
    batch = {
        "img": torch.zeros(b, 3, fv.IMAGE_SIZE, fv.IMAGE_SIZE),
        "batch_idx": labels[:, 0].clone(),
        "cls": labels[:, 1:2].clone(),
        "bboxes": labels[:, 2:6].clone(),
    }

    captured = {}
    assigner = crit.assigner
    orig_forward = assigner.forward

    def spy(pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt, **extra):
        out = orig_forward(pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt, **extra)
        captured["in"] = {
            "anc_points": anc_points.clone(),
            "gt_labels": gt_labels.clone(),
            "gt_bboxes": gt_bboxes.clone(),
            "mask_gt": mask_gt.clone(),
        }
        captured["out"] = tuple(o.clone() for o in out)
        return out

    assigner.forward = spy
    loss_vec, items = model.loss(batch, preds)  # the trainer's call (compile path); == model.criterion(preds, batch)
    assigner.forward = orig_forward
    total = loss_vec.sum()  # the trainer: self.loss = loss.sum(); then backward
    total.backward()

    target_labels, target_bboxes, target_scores, fg_mask, target_gt_idx = captured["out"]
    fg = fg_mask.nonzero().tolist()
    fg_b, fg_a = fg_mask.nonzero(as_tuple=True)
    e = {
        "batch_size": b,
        "nc": nc,
        "scale": scale,
        "loss_vector_as_returned": [float(x) for x in loss_vec.detach()],
        "loss_vector_note": "criterion returns a 3-vector (box, cls, dfl) already multiplied by batch size",
        "total": float(total.detach()),
        "total_note": "trainer sums the returned vector: total = (box+cls+dfl gains applied) * batch_size",
        "items": {k: float(v) for k, v in items.items()},
        "items_order": list(items.keys()),
        "items_note": "detached, gains applied, NOT multiplied by batch size",
        "grads": [stats(f.grad, GRAD_STEP) for f in feats],
        "assigner": {
            "fg": fg,
            "num_fg": len(fg),
            "target_gt_idx": target_gt_idx[fg_b, fg_a].tolist(),
            "target_labels": target_labels[fg_b, fg_a].tolist(),
            "target_bboxes": target_bboxes[fg_b, fg_a].tolist(),
            "target_scores": target_scores.double().tolist(),
            "target_scores_sum": float(target_scores.sum()),
            "target_scores_sum_clamped_used_in_loss": float(target_scores.sum().clamp(min=1)),
            "gt_bboxes_xyxy_pixels": captured["in"]["gt_bboxes"].tolist(),
            "gt_labels": captured["in"]["gt_labels"].squeeze(-1).tolist(),
            "mask_gt": captured["in"]["mask_gt"].squeeze(-1).tolist(),
            "anchor_points_pixels_first_last": [
                captured["in"]["anc_points"][0].tolist(),
                captured["in"]["anc_points"][-1].tolist(),
            ],
            "num_anchors": int(captured["in"]["anc_points"].shape[0]),
        },
    }
    return e, crit


def criterion_settings(crit) -> dict:
    a = crit.assigner
    sig = inspect.signature(U_tal.TaskAlignedAssigner.__init__)
    return {
        "class": f"{type(crit).__module__}.{type(crit).__name__}",
        "construction": "DetectionModel('yolov8n.yaml', nc=case nc); model.args = get_cfg(); "
        "model.init_criterion() -> v8DetectionLoss(model) (tal_topk=10, tal_topk2=None)",
        "hyp": {"box": crit.hyp.box, "cls": crit.hyp.cls, "dfl": crit.hyp.dfl},
        "loss_names": list(crit.loss_names),
        "reg_max": crit.reg_max,
        "use_dfl": crit.use_dfl,
        "stride": [float(s) for s in crit.stride],
        "class_weights": None if crit.class_weights is None else crit.class_weights.tolist(),
        "bce": repr(crit.bce),
        "assigner": {
            "class": f"{type(a).__module__}.{type(a).__name__}",
            "used": {
                "topk": a.topk,
                "topk2": a.topk2,
                "num_classes": a.num_classes,
                "alpha": a.alpha,
                "beta": a.beta,
                "stride": list(a.stride),
                "stride_val": a.stride_val,
                "eps": a.eps,
            },
            "constructor_signature": str(sig),
            "constructor_defaults": {
                k: (None if p.default is inspect.Parameter.empty else p.default)
                for k, p in sig.parameters.items()
                if k != "self"
            },
            "overlap": "CIoU (bbox_iou(..., CIoU=True)) clamped at 0, for both alignment metric and conflicts",
            "tiny_gt_rule": "in select_candidates_in_gts, a gt side shorter than stride_val is widened to "
            "stride_val about its centre (for the inside test only)",
        },
        "bbox_loss": {
            "class": type(crit.bbox_loss).__name__,
            "dfl_class": type(crit.bbox_loss.dfl_loss).__name__ if crit.bbox_loss.dfl_loss else None,
            "dfl_reg_max": crit.bbox_loss.dfl_loss.reg_max if crit.bbox_loss.dfl_loss else None,
            "dfl_target_clamp_max": (crit.bbox_loss.dfl_loss.reg_max - 1 - 0.01) if crit.bbox_loss.dfl_loss else None,
            "bbox2dist_clamp_max": (crit.reg_max - 1 - 0.01),
            "iou": "CIoU, xyxy, weighted by per-anchor target score sum, divided by max(target_scores_sum, 1)",
        },
    }


def signatures() -> dict:
    out = {}
    for mod, names in (
        (U_head, ["Detect"]),
        (U_block, ["C3k2", "C3k", "C2f", "C3", "Bottleneck", "SPPF", "C2PSA", "PSABlock", "Attention", "DFL"]),
        (U_conv, ["Conv", "DWConv", "Concat"]),
        (U_tal, ["TaskAlignedAssigner"]),
        (U_loss, ["v8DetectionLoss", "BboxLoss", "DFLoss"]),
    ):
        for n in names:
            out[n] = str(inspect.signature(getattr(mod, n).__init__))
    return out


DEFAULT_KEYS = [
    "lr0",
    "lrf",
    "momentum",
    "weight_decay",
    "warmup_epochs",
    "warmup_momentum",
    "warmup_bias_lr",
    "box",
    "cls",
    "dfl",
    "hsv_h",
    "hsv_s",
    "hsv_v",
    "degrees",
    "translate",
    "scale",
    "shear",
    "perspective",
    "flipud",
    "fliplr",
    "mosaic",
    "mixup",
    "copy_paste",
    "close_mosaic",
    "nbs",
    "optimizer",
    "cos_lr",
    "cutmix",
    "bgr",
    "epochs",
    "batch",
    "imgsz",
    "amp",
    "multi_scale",
]

OPTIMIZER_AUTO = (
    "optimizer=auto ignores lr0 and momentum from the config. It estimates the number of optimizer steps as "
    "ceil(dataset images / max(batch, nbs)) * epochs (i.e. counted at the nominal batch of 64, not raw iterations). "
    "If that is more than 10000 it picks MuSGD (Muon for 2-D/4-D weights mixed with Nesterov SGD) at lr 0.01, "
    "momentum 0.9; otherwise, which is the case for a short run of a few thousand iterations, it picks AdamW with "
    "lr = 0.002 * 5 / (4 + nc) rounded to 6 decimals (nc from the dataset, 10 if unknown; e.g. nc=80 -> 0.000119, "
    "nc=3 -> 0.001429, nc=1 -> 0.002) and betas (0.9, 0.999). It also sets warmup_bias_lr to 0 so biases warm up "
    "from 0 like the other groups. AdamW groups carry no 'momentum' key, so the warmup_momentum ramp has no effect. "
    "Three parameter groups: conv/linear weights with weight decay, normalisation-layer weights without decay, "
    "biases without decay (AdamW's decoupled decay). Weight decay: accumulate = max(round(nbs / batch), 1) and the "
    "decay actually used is weight_decay * batch * accumulate / nbs (about weight_decay when batch divides 64, "
    "e.g. batch 16 -> accumulate 4 -> 0.0005). "
    "During warmup (round(min(warmup_epochs, epochs - 1) * batches per epoch) "
    "iterations, no 100-iteration floor) "
    "accumulate ramps from 1 to its nominal value and lrs ramp linearly from 0 (bias from warmup_bias_lr) to "
    "lr0 * lf(epoch). LR schedule per epoch: linear lf(e) = (1 - e/epochs) * (1 - lrf) + lrf unless cos_lr. "
    "Gradients are clipped to total norm 10 before each optimizer step; an EMA with decay 0.9999 * (1 - exp(-updates "
    "/ 2000)) follows each step."
)


def main() -> None:
    t0 = time.time()
    ref = {
        "version": ultralytics.__version__,
        "torch": torch.__version__,
        "generator": "make_ultralytics_reference.py (imports ultralytics; inputs from fixed_values.py)",
        "constants": {
            "IMAGE_SIZE": fv.IMAGE_SIZE,
            "STRIDES": list(fv.STRIDES),
            "REG_MAX": fv.REG_MAX,
            "out_sample_step": OUT_STEP,
            "grad_sample_step": GRAD_STEP,
        },
        "signatures": signatures(),
    }
    ref["models"] = {}
    for name in MODELS:
        t = time.time()
        ref["models"][name] = model_entry(name)
        print(
            f"{name}: {ref['models'][name]['params']:,} params, fused {ref['models'][name]['fused_params']:,} "
            f"({time.time() - t:.1f}s)",
            flush=True,
        )

    ref["forward"] = {}
    for name in FORWARD_MODELS:
        ref["forward"][name] = forward_entry(name)
        print(
            f"forward {name}: sum {ref['forward'][name]['sum']:.6g} fused diff "
            f"{ref['forward'][name]['fused_max_abs_diff']:.3g}",
            flush=True,
        )

    ref["loss"] = {}
    crit = None
    for cname, case in fv.LOSS_CASES.items():
        ref["loss"][cname], crit = loss_entry(cname, case)
        print(
            f"loss {cname}: total {ref['loss'][cname]['total']:.6g} items {ref['loss'][cname]['items']} "
            f"fg {ref['loss'][cname]['assigner']['num_fg']}",
            flush=True,
        )
    ref["loss_settings"] = criterion_settings(crit)

    ref["defaults"] = {k: DEFAULT_CFG_DICT[k] for k in DEFAULT_KEYS}
    ref["defaults"]["optimizer_auto"] = OPTIMIZER_AUTO
    ref["wall_seconds"] = round(time.time() - t0, 1)
    with open(OUT, "w") as f:
        json.dump(ref, f, separators=(",", ":"))
    print(f"wrote {OUT} in {ref['wall_seconds']}s")


if __name__ == "__main__":
    main()
