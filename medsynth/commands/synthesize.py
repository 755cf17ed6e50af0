"""``medsynth synthesize``: run a bundle's ``inference.json`` (cohort or one lesion mask) from the CLI."""

from __future__ import annotations

import argparse
import logging

from medsynth.constants import MANIPULATIONS
from medsynth.utils.bundles import add_bundle_arguments

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synthesize",
        help="synthesize multi-sequence MRI volumes with a trained SAMR / CG-SAMR bundle",
        description=(
            "Run BUNDLE/configs/inference.json: synthesize every sequence for each patient of a dataset, or "
            "for one lesion mask (--mask-file) with its atlas (--atlas-dir), optionally after manipulating "
            "the mask. Outputs are NIfTI files in the geometry of each input label map."
        ),
    )
    add_bundle_arguments(parser, "the training output folder holding models/model.pt and models/atlas")
    parser.add_argument(
        "--checkpoint", default=None, help="weights file (default: OUTPUT_DIR/models/model.pt)"
    )
    parser.add_argument(
        "--dataset-dir", default=None, help="dataset of the cohort mode (default: the phantom cohort)"
    )
    parser.add_argument(
        "--splits", nargs="*", default=None, help="splits of the cohort to synthesize (default: all)"
    )
    parser.add_argument("--mask-file", default=None, help="one label map NIfTI (0..4)")
    parser.add_argument(
        "--atlas-dir",
        default=None,
        help="atlas NIfTIs on the grid of --mask-file (default: the model's atlas)",
    )
    parser.add_argument("--manipulation", choices=MANIPULATIONS, default="none")
    parser.add_argument("--donor-file", default=None, help="donor label map of --manipulation transplant")
    parser.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: cuda if available)")
    parser.set_defaults(func=run_synthesize)


def _overrides(args: argparse.Namespace) -> dict:
    from medsynth.utils.bundles import parse_overrides

    overrides = {}
    for key in (
        "output_dir",
        "dataset_dir",
        "mask_file",
        "atlas_dir",
        "donor_file",
        "manipulation",
        "splits",
    ):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    if args.checkpoint is not None:
        overrides["ckpt_path"] = args.checkpoint
    if args.device is not None:
        overrides["device"] = f"$torch.device('{args.device}')"
    return {**overrides, **parse_overrides(args.set)}


def run_synthesize(args: argparse.Namespace) -> int:
    from monai.bundle import run

    from medsynth.utils.bundles import bundle_config_files

    config_files = bundle_config_files(args.bundle, "inference")
    run(
        config_file=config_files, meta_file=str(args.bundle / "configs" / "metadata.json"), **_overrides(args)
    )
    return 0
