"""The detections of one image, as the Python API returns them and detect.py saves them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from utils.boxes import xyxy_to_xywhn
from utils.eval.plots import class_colour, draw_box
from utils.infer.media_files import numbered
from utils.output_paths import check_holds_no_inputs, check_writable_folder


@dataclass
class Results:
    """Detections on one image, in its original pixels.

    detections: (n, 6) float32 x1, y1, x2, y2, score, class; image_rgb: (H, W, 3) uint8 RGB;
    path: the file it came from (None for an array or a video frame); output_name: the name save() gives
    it, unique in its batch (media_files.batch_output_names, detect.py's rule)."""

    image_rgb: np.ndarray
    detections: np.ndarray
    names: list[str]
    path: str | None = None
    output_name: Path | None = None

    def __len__(self) -> int:
        return len(self.detections)

    @property
    def boxes_xyxy(self) -> np.ndarray:
        """(n, 4) x1, y1, x2, y2 in pixels."""
        return self.detections[:, :4]

    @property
    def scores(self) -> np.ndarray:
        return self.detections[:, 4]

    @property
    def classes(self) -> np.ndarray:
        """(n,) int class ids; names[c] is the name."""
        return self.detections[:, 5].astype(int)

    def summary(self) -> str:
        """'2 circle, 1 square' (in class order), or 'no detections'."""
        counts = np.bincount(self.classes, minlength=len(self.names)) if len(self) else []
        return ", ".join(f"{n} {self.names[c]}" for c, n in enumerate(counts) if n) or "no detections"

    def to_list(self) -> list[dict]:
        """One dict per detection: box (x1, y1, x2, y2 pixels), score, class, name."""
        return [
            {"box": [x1, y1, x2, y2], "score": score, "class": int(cls), "name": self.names[int(cls)]}
            for x1, y1, x2, y2, score, cls in self.detections.tolist()
        ]

    def plot(self, line_width: int | None = None, hide_labels: bool = False, hide_conf: bool = False) -> np.ndarray:
        """The image (BGR, as OpenCV writes it) with boxes and 'name 0.87' captions."""
        canvas = cv2.cvtColor(self.image_rgb, cv2.COLOR_RGB2BGR)
        lw = line_width or max(round(sum(canvas.shape[:2]) / 2 * 0.003), 2)
        for x1, y1, x2, y2, conf, cls in self.detections.tolist():
            name = self.names[int(cls)]
            caption = "" if hide_labels else name if hide_conf else f"{name} {conf:.2f}"
            draw_box(canvas, (int(x1), int(y1), int(x2), int(y2)), class_colour(int(cls)), caption, lw, lw / 3)
        return canvas

    def save(self, folder: str | Path, name: str | None = None, **plot_options) -> Path:
        """Write the annotated image into `folder` (made if missing) as `name` (default: output_name, else
        the source file's name, else image0.jpg; a default name never replaces a file already there, but
        becomes image0_2.jpg, ...) and return its path; a folder that holds the source image, or cannot
        be written, is a UserError. plot_options: those of plot()."""
        default = self.output_name or (Path(self.path).name if self.path else "image0.jpg")
        path = Path(folder) / name if name else numbered(Path(folder) / default, Path.exists)
        check_holds_no_inputs(folder, f"Results.save: {folder}", [self.path] if self.path else [])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            written = cv2.imwrite(str(path), self.plot(**plot_options))
        except OSError:
            written = False
        if not written:
            check_writable_folder(path.parent, f"Results.save: {path.parent}")
            raise OSError(f"could not write {path} (is its suffix an image format OpenCV writes?)")
        return path

    def yolo_lines(self, save_conf: bool = False) -> list[str]:
        """'cls cx cy w h [conf]' lines, normalised by the image size, as YOLO label files hold them."""
        height, width = self.image_rgb.shape[:2]
        lines = []
        for cls, xywhn, conf in zip(self.classes, xyxy_to_xywhn(self.boxes_xyxy, width, height), self.scores):
            text = f"{cls} " + " ".join(f"{v:.6f}" for v in xywhn)
            lines.append(text + (f" {conf:.6f}" if save_conf else ""))
        return lines
