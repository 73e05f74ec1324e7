"""Run a trained detector on images, videos, webcams and streams and save the results annotated.

    python detect.py --weights runs/train/exp/weights/best.pt --source path/to/images
    python detect.py --weights best.pt --source 'data/*.jpg' --save-txt --save-conf
    python detect.py --weights best.onnx --source clip.mp4 --vid-stride 2
    python detect.py --weights best.pt --source 0            # webcam 0
    python detect.py --weights best.pt --source rtsp://host/stream   # or list.streams, one source a line

Uses the checkpoint's EMA weights (--raw for the model weights), or a file export.py wrote.
Inference only: no loss, EMA or optimizer code is imported here; the Python API
(utils/infer/predictor.py Detector, hubconf.py) runs the same path.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from utils.errors import UserError, run_cli
from utils.infer.media_files import numbered
from utils.infer.predictor import Detector
from utils.infer.sources import Frame, open_source
from utils.infer.video_writer import VideoWriter
from utils.log import LOGGER, setup_logging
from utils.option_checks import check_class_ids, check_detection_options, check_range, warn_no_effect
from utils.output_paths import check_run_dir
from utils.precision import AUTO_FOR_INFERENCE, add_amp_arguments
from utils.run_dir import add_run_dir_arguments, next_run_dir


def label_name(frame: Frame) -> Path:
    """Where a frame's --save-txt labels go below labels/: an image's output name as .txt, frame 12
    (counted from 1, as logged) of clip.mp4 as clip_12.txt, YOLOv5's names."""
    name = frame.output_name
    if frame.kind == "image":
        return name.with_suffix(".txt")
    return name.with_name(f"{name.stem}_{frame.frame_index + 1}.txt")


def unused_name(path: Path, used: set[Path]) -> Path:
    """`path`, or path_2, path_3, ... when this run already wrote it (an image clip_3.jpg beside frame 3
    of clip.mp4), recorded in `used`."""
    candidate = numbered(path, used.__contains__)
    used.add(candidate)
    return candidate


def check_options(opt: argparse.Namespace) -> None:
    """Refuse values out of range and warn about options that act on nothing, before the model loads."""
    check_detection_options(opt.conf_thres, opt.iou_thres, opt.max_det, opt.imgsz)
    check_range("--line-thickness", opt.line_thickness, 1, meaning="pixels")
    if any(c < 0 for c in opt.classes or ()):
        raise UserError(f"--classes {' '.join(map(str, opt.classes))}: class ids are not negative")
    warn_no_effect(
        {"--save-conf": opt.save_conf and not opt.save_txt},
        "it adds confidences to --save-txt's labels, and --save-txt is off",
    )
    warn_no_effect(
        {
            "--line-thickness": opt.line_thickness is not None,
            "--hide-labels": opt.hide_labels,
            "--hide-conf": opt.hide_conf,
        }
        if opt.nosave
        else {"--hide-conf": opt.hide_conf and opt.hide_labels},
        "--nosave draws no images" if opt.nosave else "--hide-labels hides the captions, confidences and all",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Detect objects in images, videos and streams with a trained checkpoint.")
    p.add_argument("--weights", required=True, help="checkpoint (.pt) written by train.py, or an export.py file")
    p.add_argument(
        "--source",
        required=True,
        help="image or video file, folder, glob pattern (quote it), webcam index (0), stream URL "
        "(rtsp://, rtmp://, http(s)://) or a .streams file of several",
    )
    p.add_argument(
        "--imgsz",
        "--img",
        "--img-size",
        type=int,
        default=None,
        help="inference size (default: the checkpoint's training size)",
    )
    p.add_argument("--conf-thres", type=float, default=0.25, help="confidence threshold")
    p.add_argument(
        "--iou-thres", type=float, default=None, help="NMS IoU threshold (default: 0.45 anchor-based, 0.7 anchor-free)"
    )
    p.add_argument("--max-det", type=int, default=1000, help="maximum detections per image")
    p.add_argument("--classes", nargs="+", type=int, help="keep only these class ids")
    p.add_argument("--agnostic-nms", action="store_true", help="class-agnostic NMS")
    p.add_argument("--device", default="", help="cuda device, i.e. 0, or cpu")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow a pickled YOLOv5 or Ultralytics checkpoint as --weights (unpickling runs code: trusted files only)",
    )
    p.add_argument("--raw", action="store_true", help="use the raw model weights instead of the EMA")
    add_amp_arguments(p, default=None, auto=AUTO_FOR_INFERENCE, half=True)
    p.add_argument("--save-txt", action="store_true", help="save results as YOLO label files")
    p.add_argument("--save-conf", action="store_true", help="add confidences to --save-txt labels")
    p.add_argument("--nosave", action="store_true", help="do not save annotated images")
    p.add_argument("--line-thickness", type=int, default=None, help="box line width in pixels")
    p.add_argument("--hide-labels", action="store_true", help="draw boxes without captions")
    p.add_argument("--hide-conf", action="store_true", help="captions without confidences")
    p.add_argument("--vid-stride", type=int, default=1, help="video and stream frame-rate stride: every Nth frame")
    add_run_dir_arguments(p, "runs/detect")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """detect.py's command line: detect, draw and save for every image and video frame of the source."""
    opt = parse_args(argv)
    setup_logging()
    check_options(opt)
    check_run_dir(opt.project, opt.name, opt.exist_ok)  # before the model loads; the inputs once the source opens
    detector = Detector(
        opt.weights,
        device=opt.device,
        imgsz=opt.imgsz,
        conf_thres=opt.conf_thres,
        iou_thres=opt.iou_thres,
        max_det=opt.max_det,
        agnostic_nms=opt.agnostic_nms,
        raw=opt.raw,
        amp=opt.amp,
        trust_pickle=opt.trust_pickle,
    )
    check_class_ids(opt.classes, detector.names)  # named as the command line names them, then set
    detector.classes = opt.classes
    plot_options = {"line_width": opt.line_thickness, "hide_labels": opt.hide_labels, "hide_conf": opt.hide_conf}
    num_frames = num_detections = 0
    label_files: set[Path] = set()
    # A source that cannot be opened fails here, before any output is made.
    with open_source(opt.source, opt.vid_stride) as frames, VideoWriter() as videos:
        check_run_dir(opt.project, opt.name, opt.exist_ok, frames.files, frames.folders)
        run_dir = next_run_dir(Path(opt.project), opt.name, opt.exist_ok)
        started = time.perf_counter()
        for frame in frames:
            t0 = time.perf_counter()
            (result,) = detector.detect([frame.image_rgb], [frame.source if frame.kind == "image" else None])
            num_frames, num_detections = num_frames + 1, num_detections + len(result)
            LOGGER.info(f"{frame.description}: {result.summary()}, {(time.perf_counter() - t0) * 1e3:.1f}ms")
            if not opt.nosave:
                if frame.kind == "image":
                    result.save(run_dir / frame.output_name.parent, frame.output_name.name, **plot_options)
                else:
                    # a video file's output is complete once the next input starts; streams interleave
                    video = run_dir / frame.output_name
                    videos.write(video, result.plot(**plot_options), frame.fps, one_at_a_time=frame.kind == "video")
            if opt.save_txt and len(result):  # as YOLOv5: no file for an image without detections
                label_file = unused_name(run_dir / "labels" / label_name(frame), label_files)
                label_file.parent.mkdir(parents=True, exist_ok=True)
                label_file.write_text("".join(f"{line}\n" for line in result.yolo_lines(opt.save_conf)))
    elapsed = time.perf_counter() - started
    LOGGER.info(
        f"{num_frames} images and frames, {num_detections} detections, "
        f"{elapsed / max(num_frames, 1) * 1e3:.1f} ms per image ({detector.description})"
    )
    LOGGER.info(f"Results saved to {run_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main, "detect.py")
