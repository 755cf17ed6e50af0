"""The ``medsynth`` command line.

Each module in :mod:`medsynth.commands` adds one subcommand through a ``register(subparsers)``
function that sets ``func`` on its parser; ``func(args)`` returns the exit code. Adding a
capability means adding a module there, nothing else.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

import medsynth
import medsynth.commands
from medsynth.utils.errors import input_problem_in
from medsynth.utils.logging import setup_logging

logger = logging.getLogger("medsynth")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medsynth",
        description="Synthesize fully labelled multi-sequence brain MRI from lesion masks.",
    )
    parser.add_argument("--version", action="version", version=f"medsynth {medsynth.__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input problem too")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_info in sorted(pkgutil.iter_modules(medsynth.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"medsynth.commands.{module_info.name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return run_reporting_input_problems(args.func, args, getattr(args, "debug", False))


def run_reporting_input_problems(func, args: argparse.Namespace, debug: bool = False) -> int:
    """``func(args)`` as an exit code; an input problem is one logged line and exit code 2 (with
    ``debug`` its traceback is kept). The CLIs of ``medsynth`` and ``python -m preprocessing`` share it."""
    try:
        return int(func(args) or 0)
    except Exception as error:
        # Input problems are the user's to fix: say what is wrong without a traceback. MONAI's bundle
        # runner wraps them ("Failed to evaluate ..."), so the cause chain is searched for one.
        problem = input_problem_in(error)
        if problem is None or debug:
            raise
        if not getattr(problem, "_medsynth_reported", False):  # an entry point may have said it already
            logger.error("%s", problem)
        return 2


if __name__ == "__main__":
    sys.exit(main())
