"""User-facing errors: a mistake in the user's input becomes one clear message and exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with a file or option the user gave; the message names it and says what to do."""


class TrainingStopped(UserError):
    """Training cannot go on safely (a checkpoint cannot be written, gradients keep blowing up);
    the message says what is kept on disk and how to continue."""


def run_cli(main: Callable[[], int | None], program: str) -> None:
    """Run a command-line entry point: UserError -> message on stderr and exit 2, Ctrl-C -> exit 130."""
    try:
        code = main()
    except UserError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\n{program}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
