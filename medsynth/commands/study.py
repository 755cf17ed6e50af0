"""``medsynth study STUDY.json``: the augmentation study (arms x seeds), resumable, with a report."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "study",
        help="run an augmentation study: segmentation U-Nets on real and real + synthetic data, seeds, CIs",
        description=(
            "Expand the study file's arms x seeds, make each synthetic cohort once per method and seed "
            "(medsynth augment), train and evaluate the lesion-segmentation bundle per cell, and write the "
            "Table II layout with 95 % bootstrap intervals, paired differences from the real-only arm, a "
            "plot "
            "and an HTML page into OUT/report. Rerun the same command to continue a killed study."
        ),
    )
    parser.add_argument("study_file", help="the study JSON (e.g. studies/phantom_demo.json)")
    parser.add_argument("--out", default=None, help="output folder (default: the file's out_dir)")
    parser.add_argument("--workers", type=int, default=1, help="Dask worker processes for the cells")
    parser.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler")
    parser.add_argument(
        "--score-cohort",
        default=None,
        metavar="DIR",
        help="instead of running the study, score every case of the cohort DIR with its finished cells' "
        "models (report in OUT/report_<cohort>_<digest>)",
    )
    parser.add_argument(
        "--cells", nargs="*", default=None, metavar="ARM/seedK", help="with --score-cohort: only these cells"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medsynth.studies import run_study, score_cohort

    if args.score_cohort is not None:
        page = score_cohort(args.study_file, args.score_cohort, args.cells, args.out)
    elif args.cells is not None:
        raise ValueError("--cells chooses the cells of --score-cohort; a study runs all its cells")
    else:
        page = run_study(args.study_file, args.out, args.workers, args.scheduler)
    logger.info("report: %s", page)
    return 0
