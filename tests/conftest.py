"""Shared fixtures: a tiny shapes dataset (generated once per session) and helpers to run the CLIs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from utils.config_files import REPO_ROOT
from utils.data.synthetic_shapes import CLASS_NAMES, generate_shapes_dataset


def make_shapes_dataset(folder: Path, num_train: int, num_val: int, seed: int) -> Path:
    """Generate a small shapes dataset in folder/shapes and return its dataset YAML."""
    root = folder / "shapes"
    generate_shapes_dataset(root, num_train=num_train, num_val=num_val, seed=seed, image_size=(64, 128))
    data_yaml = folder / "shapes.yaml"
    data_yaml.write_text(
        yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val", "names": list(CLASS_NAMES)})
    )
    return data_yaml


@pytest.fixture(scope="session", autouse=True)
def precision_cache(tmp_path_factory) -> Path:
    """--amp auto's verdicts (utils/precision.py) go to a folder of the session's, shared by its runs
    (subprocesses too), never to the user's cache folder."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMA_YOLO_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """16 train / 8 val generated images and their dataset YAML; returns the YAML path."""
    return make_shapes_dataset(tmp_path_factory.mktemp("data"), num_train=16, num_val=8, seed=1)


# A quick run on the tiny dataset: 64 px, batches of 4 (4 per epoch), no workers, no plots.
TINY_TRAINING = ("--imgsz", "64", "--batch-size", "4", "--workers", "0", "--no-plots")


def tiny_train_args(data: Path, project: Path, *extra: str) -> list[str]:
    """train.py's arguments for a quick run of the tiny dataset into `project`; `extra` may override."""
    return ["--data", str(data), *TINY_TRAINING, "--project", str(project), *extra]


def run_script(script: str, *args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts in a fresh interpreter, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / script), *args],
        cwd=cwd or REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset, tmp_path_factory) -> Path:
    """A finished 2-epoch run on the tiny dataset (epoch0.pt, epoch1.pt, last.pt, best.pt); returns its folder.
    Tests copy what they change: the run is shared."""
    import train  # a script's main(), as the command line runs it

    project = tmp_path_factory.mktemp("tiny_run")
    assert train.main(tiny_train_args(tiny_dataset, project, "--epochs", "2", "--save-period", "1")) == 0
    return project / "exp"
