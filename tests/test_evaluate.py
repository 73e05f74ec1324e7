"""Validation: evaluating the live EMA never changes it, and plots land where asked."""

from __future__ import annotations

import torch

from models.yolo import build_model
from utils.data.config import load_dataset_config
from utils.data.loader import build_val_loader
from utils.eval.evaluate import evaluate
from utils.hyp import load_hyp
from utils.train.ema import ModelEMA


def test_evaluate_leaves_the_ema_untouched(tiny_dataset, tmp_path):
    data = load_dataset_config(tiny_dataset)
    torch.manual_seed(0)
    model = build_model("yolov5n.yaml", nc=data.nc)
    ema = ModelEMA(model)
    ema.module.names = list(data.names)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    loader = build_val_loader(
        data.val, data.nc, img_size=64, batch_size=4, workers=0, hyp=load_hyp("scratch-low.yaml"), stride=32
    )
    result = evaluate(ema.module, loader, device=torch.device("cpu"), amp_dtype=torch.bfloat16, plot_dir=tmp_path)
    for key, value in ema.module.state_dict().items():
        assert value.dtype == before[key].dtype and torch.equal(value, before[key]), key
    assert not ema.module.training
    assert result.metrics.num_images == len(loader.dataset)
    assert (tmp_path / "val_batch0_labels.jpg").exists() and (tmp_path / "val_batch1_pred.jpg").exists()
