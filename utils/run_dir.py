"""Run folders: runs/train/exp, exp2, ... and finding the newest checkpoint to resume."""

from __future__ import annotations

import argparse
from pathlib import Path

from utils.errors import UserError


def next_run_dir(project: Path, name: str, exist_ok: bool = False) -> Path:
    """project/name, or the first free project/name2, name3, ...; created here, so two runs
    started together never share a folder."""
    project.mkdir(parents=True, exist_ok=True)
    if exist_ok:
        (project / name).mkdir(exist_ok=True)
        return project / name
    n = 1
    while True:
        path = project / (name if n == 1 else f"{name}{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


def newest_last_checkpoint(search_dir: Path) -> Path:
    """The most recently written last.pt below search_dir (for a bare --resume)."""
    candidates = list(search_dir.glob("**/last.pt"))
    if not candidates:
        raise UserError(f"--resume: no last.pt found under {search_dir}; pass the checkpoint path")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def add_run_dir_arguments(parser: argparse.ArgumentParser, default_project: str) -> None:
    """YOLOv5's --project / --name / --exist-ok, shared by train.py, val.py and detect.py."""
    parser.add_argument("--project", default=default_project, help="save to project/name")
    parser.add_argument("--name", default="exp", help="save to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="reuse an existing project/name")
