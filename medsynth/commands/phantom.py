"""``medsynth phantom``: generate the built-in digital phantom cohort (no download needed)."""

from __future__ import annotations

import argparse
import logging

from medsynth.data.manifest import DEFAULT_SPLIT_FRACTIONS

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "phantom",
        help="generate a digital phantom glioma cohort (T1w, Gd-T1w, T2w, FLAIR, APTw + labels)",
        description=(
            "Generate synthetic glioma patients from the MNI152 template shipped with nilearn: "
            "'ready' writes model-grid volumes, labels, a manifest and a train-split atlas; 'raw' writes "
            "scanner-like exams (skull, bias field, misalignment, a T1w DICOM series) with ground truth. "
            "Deterministic for a seed; rerunning skips finished patients."
        ),
    )
    parser.add_argument("--out", required=True, help="output cohort folder")
    parser.add_argument("--patients", type=int, required=True, help="number of patients")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    parser.add_argument(
        "--layout", choices=("ready", "raw"), default="ready", help="output layout (default ready)"
    )
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        metavar=("X", "Y", "Z"),
        default=(256, 256, 15),
        help="model grid over the 210 x 210 x 66 mm APTw slab (default 256 256 15 = 0.82 x 0.82 x 4.4 mm)",
    )
    parser.add_argument(
        "--splits",
        type=float,
        nargs=3,
        metavar=("TRAIN", "VAL", "TEST"),
        default=DEFAULT_SPLIT_FRACTIONS,
        help="patient-level split fractions (default 0.7 0.15 0.15)",
    )
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medsynth.data.phantom import generate_phantom_cohort

    result = generate_phantom_cohort(
        args.out,
        args.patients,
        seed=args.seed,
        layout=args.layout,
        shape=tuple(args.shape),
        split_fractions=tuple(args.splits),
        workers=args.workers,
        progress=not args.no_progress,
    )
    logger.info("phantom cohort written: %s", result)
    print(result)
    return 0
