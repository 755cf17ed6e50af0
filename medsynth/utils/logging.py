"""One readable logging format for the command-line tools."""

from __future__ import annotations

import logging


def setup_logging(verbosity: int = 0) -> None:
    """Configure the root logger: INFO by default, DEBUG with ``verbosity >= 1``."""
    level = logging.DEBUG if verbosity >= 1 else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
