"""``medsynth evaluate``: score a trained synthesis model on every case of any cohort, with its own atlas."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from medsynth.utils.bundles import add_bundle_arguments

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a trained synthesis bundle on a cohort (Table I, per-case rows, sample grids)",
        description=(
            "Run the bundle's evaluate workflow: Table I (pixel accuracy per lesion class, SSIM, PSNR, "
            "and SSIM, PSNR and MAE inside the brain) on the cases of --dataset-dir, with the atlas saved "
            "beside the model; no atlas is built for the cohort. Without --dataset-dir the training "
            "cohort's test split is scored."
        ),
    )
    add_bundle_arguments(parser, "the training output folder (models/model.pt, models/atlas)")
    parser.add_argument(
        "--dataset-dir", default=None, help="the cohort to score (default: the training cohort)"
    )
    parser.add_argument(
        "--split", default=None, help="train, val, test or all (default: test; all with --dataset-dir)"
    )
    parser.add_argument(
        "--atlas", default=None, help="'model' (default), 'cohort' or a folder of atlas files"
    )
    parser.add_argument("--resample-atlas", action="store_true", help="resample the atlas onto other grids")
    parser.add_argument(
        "--label-convention", default=None, help="medsynth, brats, brats2023 or a mapping file"
    )
    parser.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from monai.bundle import run

    from medsynth.utils.bundles import bundle_config_files, parse_overrides, require_trained_model

    require_trained_model(args.output_dir, "the model to score")
    overrides: dict[str, object] = {"output_dir": args.output_dir}
    if args.dataset_dir is not None:
        overrides["dataset_dir"] = args.dataset_dir
    overrides["eval_split"] = args.split or ("all" if args.dataset_dir is not None else "test")
    if args.atlas is not None:
        overrides["atlas"] = args.atlas
    if args.resample_atlas:
        overrides["resample_atlas"] = True
    if args.label_convention is not None:
        overrides["label_convention"] = args.label_convention
    config_files = bundle_config_files(args.bundle, "evaluate")
    meta_file = str(args.bundle / "configs" / "metadata.json")
    run(config_file=config_files, meta_file=meta_file, **overrides, **parse_overrides(args.set))
    logger.info("tables, per-case rows and sample grids in %s", Path(args.output_dir) / "eval")
    return 0
