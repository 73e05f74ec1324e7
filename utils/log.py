"""Console logging: the project's one logger, set up once per process (quiet on torchrun ranks other than 0)."""

from __future__ import annotations

import logging
import sys

LOGGER = logging.getLogger("emayolo")


def setup_logging(rank: int = 0) -> None:
    """Plain messages on stdout, as the command-line tools print them; under torchrun, ranks
    other than 0 print only errors, prefixed with their rank (rank 0 says everything once)."""
    logging.basicConfig(
        format="%(message)s" if rank == 0 else f"[rank {rank}] %(message)s",
        level=logging.INFO if rank == 0 else logging.ERROR,
        stream=sys.stdout,
        force=True,
    )


def interactive() -> bool:
    """Progress bars only on a terminal: in logs and CI they would print every refresh."""
    return sys.stderr.isatty()
