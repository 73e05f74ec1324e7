"""train.py's size options that the averaging studies pass on to their runs (for their smallest configuration)."""

from __future__ import annotations

import argparse

PASSED_ON = ("imgsz", "batch_size", "workers")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """--imgsz, --batch-size and --workers, each train.py's default unless given."""
    for name in PASSED_ON:
        option = f"--{name.replace('_', '-')}"
        parser.add_argument(option, type=int, default=None, help=f"train.py {option} (default: train.py's)")


def training_options(args: argparse.Namespace) -> list[str]:
    """train.py's --imgsz, --batch-size and --workers where given (else train.py's defaults)."""
    given = {f"--{name.replace('_', '-')}": getattr(args, name) for name in PASSED_ON}
    return [item for option, value in given.items() if value is not None for item in (option, str(value))]
