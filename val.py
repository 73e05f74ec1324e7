"""Evaluate a checkpoint on a dataset split.

    python val.py --weights runs/train/exp/weights/best.pt --data data/shapes.yaml

evaluates the checkpoint's EMA weights (the model weights with --raw) and prints YOLOv5's
table: Class, Images, Instances, P, R, mAP50, mAP50-95 (per class with --verbose).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from utils.config_files import resolve_config_path
from utils.data.config import load_dataset_config
from utils.data.labels import write_data_report
from utils.data.loader import build_val_loader, validation_batch_size
from utils.device import parameter_dtype, select_device
from utils.errors import UserError, run_cli
from utils.eval.coco_json import cross_check_with_pycocotools
from utils.eval.evaluate import evaluate, results_table, save_validation_plots
from utils.hyp import load_hyp
from utils.infer.backends import inference_image_size, load_weights
from utils.log import LOGGER, setup_logging
from utils.option_checks import check_detection_options
from utils.output_paths import check_run_dir
from utils.precision import AUTO_FOR_INFERENCE, add_amp_arguments, describe
from utils.run_dir import add_run_dir_arguments, next_run_dir

DEFAULT_DATA = "data/shapes.yaml"  # the embedded dataset, generated on first use


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint's EMA weights on a dataset split.")
    parser.add_argument(
        "--weights",
        required=True,
        help="checkpoint (.pt) written by train.py, or an export.py file (.onnx, .torchscript)",
    )
    parser.add_argument(
        "--data",
        default=None,
        help=f"dataset YAML (default: the one the checkpoint was trained on, else {DEFAULT_DATA})",
    )
    parser.add_argument(
        "--imgsz",
        "--img",
        "--img-size",
        type=int,
        default=None,
        help="inference size in pixels (default: the checkpoint's training size)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="batch size (default: as train.py validated: twice the batch of each training process)",
    )
    parser.add_argument("--conf-thres", type=float, default=0.001, help="confidence threshold")
    parser.add_argument(
        "--iou-thres", type=float, default=None, help="NMS IoU threshold (default: 0.6 anchor-based, 0.7 anchor-free)"
    )
    parser.add_argument("--max-det", type=int, default=300, help="maximum detections per image")
    parser.add_argument("--task", default="val", choices=("train", "val", "test"), help="which split to evaluate")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0, or cpu")
    parser.add_argument("--workers", type=int, default=8, help="max dataloader workers")
    parser.add_argument(
        "--single-cls", action="store_true", help="treat the dataset as single-class (default: as the run trained)"
    )
    parser.add_argument("--verbose", action="store_true", help="print mAP per class (always when nc < 50)")
    parser.add_argument(
        "--save-json",
        action="store_true",
        help="write COCO-format predictions.json and cross-check the mAP with pycocotools",
    )
    parser.add_argument("--no-plots", action="store_true", help="do not save plots")
    parser.add_argument(
        "--no-rect",
        action="store_true",
        help="square --imgsz batches instead of rectangular ones (how a fixed-shape export runs: compare a .pt "
        "with one this way)",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow a pickled YOLOv5 or Ultralytics checkpoint as --weights (unpickling runs code: trusted files only)",
    )
    parser.add_argument("--raw", action="store_true", help="evaluate the raw model weights instead of the EMA")
    add_amp_arguments(parser, default=None, auto=AUTO_FOR_INFERENCE, half=True)
    add_run_dir_arguments(parser, "runs/val")
    return parser.parse_args(argv)


def dataset_to_evaluate(given: str | None, recorded: str | None, weights: str) -> str:
    """--data, else the dataset the checkpoint was trained on (said, as it is not the default), else
    DEFAULT_DATA; a recorded dataset not found from here is a UserError asking for --data."""
    if given:
        return given
    if not recorded:
        LOGGER.info(f"--data not given and {weights} records no dataset: evaluating on {DEFAULT_DATA}")
        return DEFAULT_DATA
    if not resolve_config_path(recorded, "data").is_file():
        raise UserError(
            f"--data not given, and {recorded}, the dataset {weights} was trained on, is not found from here: "
            "give --data"
        )
    LOGGER.info(f"--data not given: evaluating on {recorded}, the dataset {weights} was trained on")
    return recorded


def main(argv: list[str] | None = None) -> int:
    """val.py's command line: evaluate a checkpoint on a split and print the table."""
    opt = parse_args(argv)
    setup_logging()
    if (opt.batch_size is not None and opt.batch_size < 1) or opt.workers < 0:
        raise UserError("--batch-size must be at least 1, --workers not negative")
    check_detection_options(opt.conf_thres, opt.iou_thres, opt.max_det, opt.imgsz)
    saves = not opt.no_plots or opt.save_json
    if saves:  # the dataset's folders once its YAML is read
        check_run_dir(opt.project, opt.name, opt.exist_ok, [opt.weights])
    device = select_device(opt.device)
    loaded = load_weights(opt.weights, device, raw=opt.raw, trust_pickle=opt.trust_pickle)
    model = loaded.model
    fixed_shape = getattr(model, "fixed_shape", None)
    if fixed_shape is not None and fixed_shape[1] != fixed_shape[2]:
        raise UserError(
            f"{opt.weights} takes {fixed_shape[1]}x{fixed_shape[2]} inputs only, and val.py letterboxes to "
            "squares or rectangular batches: export it square (--imgsz S) or with --dynamic to validate it"
        )
    data = load_dataset_config(dataset_to_evaluate(opt.data, loaded.data, opt.weights))
    if saves:
        check_run_dir(
            opt.project, opt.name, opt.exist_ok, [opt.weights, data.source], [*data.train, *data.val, *data.test]
        )
    # By default as train.py validated: its --single-cls, batch, size and precision, so its results.csv row
    # is reproduced exactly.
    single_cls = opt.single_cls or loaded.single_cls
    nc = data.num_classes(single_cls)
    if nc != model.nc:
        raise UserError(f"{opt.weights} was trained for {model.nc} classes but {data.source} has {nc}")
    batch_size = validation_batch_size(loaded.batch_per_process) if opt.batch_size is None else opt.batch_size
    img_size = inference_image_size(loaded, opt.imgsz, batch_size, device)
    precision = loaded.precision(device, opt.amp, batch_size=batch_size, img_size=img_size)
    if fixed_shape is not None:
        LOGGER.info(
            f"{opt.weights} has a fixed input shape {fixed_shape}: square {img_size}x{img_size} batches (--no-rect), "
            "run in chunks of its batch; a --dynamic export validates with the rectangular batches a .pt uses"
        )
    split = {"train": data.train, "val": data.val, "test": data.test}[opt.task]
    if not split:
        raise UserError(f"{data.source} defines no {opt.task} split")
    names = list(model.names)
    loader = build_val_loader(
        split,
        data.nc,
        img_size=img_size,
        batch_size=batch_size,
        workers=opt.workers,
        hyp=loaded.hyp or load_hyp(None, model.anchor_free),
        stride=int(model.stride.max()),
        single_cls=single_cls,
        prefix=f"{opt.task}: ",
        pin_memory=device.type == "cuda",
        reported=saves,
        rect=fixed_shape is None and not opt.no_rect,
    )
    run_dir = next_run_dir(Path(opt.project), opt.name, opt.exist_ok) if saves else None
    if run_dir is not None:
        write_data_report(run_dir / "data_report.txt", [(opt.task, loader.dataset.scan)])
    result = evaluate(
        model,
        loader,
        device=device,
        amp_dtype=precision.dtype,
        conf_thres=opt.conf_thres,
        iou_thres=opt.iou_thres,
        max_det=opt.max_det,
        keep_predictions=opt.save_json,
        plot_dir=None if opt.no_plots else run_dir,
    )
    LOGGER.info(
        f"{opt.weights}: {loaded.description}, {img_size} px, batch {batch_size}, "
        f"{describe(precision, parameter_dtype(model))} ({precision.reason})"
    )
    LOGGER.info(results_table(result, names, verbose=opt.verbose or nc < 50))
    pre, infer, nms = result.speed_ms
    LOGGER.info(
        f"Speed: {pre:.1f}ms pre-process, {infer:.1f}ms inference, {nms:.1f}ms NMS per image "
        f"at shape {result.input_shape}"
    )
    if not opt.no_plots:
        save_validation_plots(result, names, run_dir)
    if opt.save_json:
        cross_check_with_pycocotools(result.predictions, result.metrics, loader.dataset, data, names, run_dir)
    if run_dir is not None:
        LOGGER.info(f"Results saved to {run_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main, "val.py")
