"""``medsynth cohort``: resolve a dataset into a validated manifest and summarise it."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from medsynth.data.manifest import DEFAULT_SPLIT_FRACTIONS

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = os.environ.get("MEDSYNTH_CACHE", str(Path.home() / ".cache" / "medsynth"))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cohort",
        help="resolve a dataset (phantom, ready folder, BraTS folder, CSV) into a validated manifest",
        description=(
            "Recognise DATASET (omit it for a generated phantom cohort; a folder with manifest.csv; a BraTS "
            "folder; a CSV listing patients), derive what is missing (label maps, brain masks, splits, "
            "group atlas; none without train patients, e.g. --split-fractions 0 0 1 for a cohort kept whole "
            "for "
            "testing a model), validate every patient and print patients and slices per split."
        ),
    )
    parser.add_argument(
        "dataset", nargs="?", default=None, help="dataset folder or CSV (omit for a phantom cohort)"
    )
    parser.add_argument(
        "--cache-dir", default=DEFAULT_CACHE_DIR, help="generated and derived files (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the phantom and of assigned splits")
    parser.add_argument(
        "--out", type=Path, default=None, help="also write the manifest here (paths relative to it)"
    )
    parser.add_argument(
        "--split-fractions",
        type=float,
        nargs=3,
        default=DEFAULT_SPLIT_FRACTIONS,
        metavar=("TRAIN", "VAL", "TEST"),
    )
    parser.add_argument("--phantom-patients", type=int, default=12)
    parser.add_argument("--phantom-shape", type=int, nargs=3, default=(256, 256, 15), metavar=("X", "Y", "Z"))
    parser.add_argument("--slice-selection", choices=("all", "brain", "lesion"), default="brain")
    parser.add_argument("--min-brain-fraction", type=float, default=0.05)
    parser.add_argument(
        "--label-convention",
        default="medsynth",
        help="what a CSV's label values mean: medsynth (0-4), brats, brats2023 or a JSON mapping file",
    )
    parser.add_argument("--no-validate", action="store_true", help="skip the per-patient file checks")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medsynth.data.cohort import cohort_summary, resolve_cohort
    from medsynth.data.manifest import sequences_of, write_manifest

    manifest = resolve_cohort(
        args.dataset,
        args.cache_dir,
        seed=args.seed,
        split_fractions=tuple(args.split_fractions),
        phantom_patients=args.phantom_patients,
        phantom_shape=tuple(args.phantom_shape),
        validate=not args.no_validate,
        label_convention=args.label_convention,
    )
    if args.out is not None:
        write_manifest(manifest, args.out)
        logger.info("manifest written to %s", args.out)
    summary = cohort_summary(manifest, args.slice_selection, args.min_brain_fraction)
    print(f"sequences: {', '.join(sequences_of(manifest))}")
    print(summary.to_string())
    return 0
