"""``medsynth compare``: synthesis methods side by side on one test split (Tables I and V, Fig. 6)."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="evaluate several trained synthesis runs on one split: Table I side by side, Table V, Fig. 6",
        description=(
            "Evaluate every run with the bundle that trained it (RUN=BUNDLE; RUN alone means "
            "bundles/cg_samr; RUN=OVERRIDE.json means CG-SAMR with that override, e.g. an ablation) on "
            "the same split, and "
            "write OUT/table1.{csv,md} (Table I side by side), OUT/table5.{csv,md} (lesion pixel accuracy "
            "per sequence, Table V's layout) and OUT/fig6.png. Runs trained on different cohorts or splits "
            "are refused."
        ),
    )
    parser.add_argument(
        "--runs", nargs="+", required=True, metavar="RUN[=BUNDLE]", help="training output folders"
    )
    parser.add_argument(
        "--dataset-dir",
        default=None,
        help="the cohort to score; give the training cohort's folder for runs not trained on the phantom "
        "(default: the bundles' dataset_dir, the phantom); training settings such as image_size go in --set",
    )
    parser.add_argument("--split", default="test", help="train, val, test or all (default: %(default)s)")
    parser.add_argument("--out", default="runs/compare", help="output folder (default: %(default)s)")
    parser.add_argument("--no-figure", action="store_true", help="skip fig6.png")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="ID=VALUE", help="config overrides for every run"
    )
    parser.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    from medsynth.studies.compare import compare_runs
    from medsynth.utils.bundles import parse_overrides

    written = compare_runs(
        args.runs, args.out, args.dataset_dir, args.split, parse_overrides(args.set), not args.no_figure
    )
    for name, path in written.items():
        logger.info("%s: %s", name, path)
    return 0
