"""yolov5.utils.dataloaders.create_dataloader: the images of a folder and their YOLO labels, resized to
imgsz x imgsz (no augmentation, whatever `augment` and `hyp` say), in YOLOv5's batches."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from utils.data.decode import read_image_rgb
from utils.data.listing import label_path_for, list_image_paths


class FolderDataset(torch.utils.data.Dataset):
    def __init__(self, folder: str, imgsz: int):
        self.files = [Path(f) for f in list_image_paths([Path(folder)])[0]]
        self.imgsz = imgsz

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str, tuple]:
        """(3, imgsz, imgsz) uint8 RGB, (n, 6) [0, class, cx, cy, w, h] normalised, path, original (h, w)."""
        image = read_image_rgb(self.files[index])
        resized = cv2.resize(image, (self.imgsz, self.imgsz))
        label_file = label_path_for(self.files[index])
        labels = np.loadtxt(label_file, ndmin=2) if label_file.is_file() else np.zeros((0, 5))
        targets = torch.cat((torch.zeros(len(labels), 1), torch.from_numpy(labels).float().reshape(-1, 5)), 1)
        return torch.from_numpy(resized).permute(2, 0, 1).contiguous(), targets, str(self.files[index]), image.shape[:2]


def collate(samples: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
    images, targets, paths, shapes = zip(*samples)
    for index, image_targets in enumerate(targets):
        image_targets[:, 0] = index  # the image's index in the batch
    return torch.stack(images), torch.cat(targets), paths, shapes


def create_dataloader(
    path: str,
    imgsz: int,
    batch_size: int,
    stride: int,
    hyp: dict | None = None,
    augment: bool = False,
    workers: int = 8,
    prefix: str = "",
    shuffle: bool = False,
    seed: int = 0,
) -> tuple[torch.utils.data.DataLoader, FolderDataset]:
    dataset = FolderDataset(path, imgsz)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, dataset
