"""Finding and reading the YAML files a user names: as given, or shipped in this repository."""

from __future__ import annotations

from pathlib import Path

import yaml

from utils.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_config_path(name_or_path: str | Path, folder: str, strip_prefix: str = "") -> Path:
    """The path as given when it exists (or is absolute), else the shipped REPO_ROOT/folder/<name>
    (also without `strip_prefix`, so YOLOv5's 'hyp.scratch-low.yaml' finds 'scratch-low.yaml')."""
    path = Path(name_or_path)
    if path.exists() or path.is_absolute():
        return path
    for name in (path.name, path.name.removeprefix(strip_prefix) if strip_prefix else None):
        if name and (REPO_ROOT / folder / name).exists():
            return REPO_ROOT / folder / name
    return path


def read_yaml(path: Path, what: str) -> object:
    """Parse a YAML file; an unreadable, undecodable or malformed file is a UserError naming it."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise UserError(f"cannot read {what} {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text") from None
    except yaml.YAMLError as error:
        raise UserError(f"{what} {path} is not valid YAML: {_one_line(error)}") from None


def _one_line(error: yaml.YAMLError) -> str:
    """PyYAML's error as 'problem at line L, column C' (its own text spans several lines)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem
