"""yolov5.models.yolo.Model: our DetectionModel, built from the model YAML at `cfg`."""

from __future__ import annotations

from models.parse import read_model_yaml
from models.yolo import DetectionModel


class Model(DetectionModel):
    def __init__(self, cfg: str, ch: int = 3, nc: int | None = None):
        super().__init__(read_model_yaml(cfg), in_channels=ch, nc=nc)
