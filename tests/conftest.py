"""Shared fixtures: a tiny shapes dataset (generated once per session) and helpers to run the CLIs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from utils.config_files import REPO_ROOT
from utils.synthetic_shapes import CLASS_NAMES, generate_shapes_dataset


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """16 train / 8 val generated images and their dataset YAML; returns the YAML path."""
    root = tmp_path_factory.mktemp("data") / "shapes"
    generate_shapes_dataset(root, num_train=16, num_val=8, seed=1, image_size=(64, 128))
    data_yaml = root.parent / "tiny.yaml"
    data_yaml.write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val",
                                         "names": list(CLASS_NAMES)}))
    return data_yaml


def run_script(script: str, *args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts in a fresh interpreter, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *args], cwd=cwd or REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
