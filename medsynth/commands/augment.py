"""``medsynth augment``: N gated synthetic cases from a trained synthesis bundle, as a cohort."""

from __future__ import annotations

import argparse
import logging

from medsynth.utils.bundles import add_bundle_arguments

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "augment",
        help="make a synthetic cohort: manipulated training masks turned into gated, labelled cases",
        description=(
            "Run the bundle's augment workflow (inference.json + augment.json): draw training patients and "
            "random lesion manipulations (mirror, grow, shrink, transplant), check each new mask, synthesise "
            "every sequence with CG-SAMR's confidence maps, run the segmentation, memorisation and intensity "
            "gates, and write the accepted cases with provenance as a cohort (manifest.csv). Resumable: "
            "rerun the same command to continue."
        ),
    )
    add_bundle_arguments(parser, "the training output folder holding models/model.pt and models/atlas")
    parser.add_argument(
        "--dataset-dir", default=None, help="the training cohort (default: the phantom cohort)"
    )
    parser.add_argument("--cases", type=int, default=50, help="accepted cases wanted (default: %(default)s)")
    parser.add_argument(
        "--out", default=None, help="the synthetic cohort's folder (default: OUTPUT_DIR/synthetic)"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the draws (default: the bundle's seed)"
    )
    parser.add_argument("--workers", type=int, default=1, help="Dask worker processes (default: %(default)s)")
    parser.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler")
    parser.add_argument("--export", choices=("nnunet", "brats"), default=None, help="also write this layout")
    parser.add_argument(
        "--export-real", action="store_true", help="the export also holds the real training cases"
    )
    parser.add_argument(
        "--segmentation-threshold",
        type=_threshold,
        default=None,
        help="Dice of the segmentation gate, or 'auto' (default): 0.9 of the segmenter's Dice on the real "
        "training patients",
    )
    parser.add_argument(
        "--segmenter",
        default=None,
        help="weights of a lesion segmenter (default: the model's jointly trained U-Net)",
    )
    parser.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: cuda if available)")
    parser.set_defaults(func=run_augment)


def _threshold(text: str) -> str | float:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a Dice in [0, 1], got {text!r}") from None


def augment_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The bundle overrides of the command's options."""
    from medsynth.utils.bundles import parse_overrides

    overrides: dict[str, object] = {"output_dir": args.output_dir, "num_cases": args.cases}
    optional = {
        "dataset_dir": args.dataset_dir,
        "augment_dir": args.out,
        "augment_seed": args.seed,
        "scheduler": args.scheduler,
        "export": args.export,
        "segmentation_threshold": args.segmentation_threshold,
        "segmenter_path": args.segmenter,
    }
    overrides.update({key: value for key, value in optional.items() if value is not None})
    overrides["workers"] = args.workers
    if args.export_real:
        overrides["export_real"] = True
    if args.device is not None:
        overrides["device"] = f"$torch.device('{args.device}')"
    return {**overrides, **parse_overrides(args.set)}


def run_augment(args: argparse.Namespace) -> int:
    from monai.bundle import run

    from medsynth.utils.bundles import bundle_config_files, require_trained_model

    require_trained_model(args.output_dir, "the synthesis model")
    if args.cases < 1:
        raise ValueError(f"--cases must be at least 1, got {args.cases}")
    run(
        config_file=bundle_config_files(args.bundle, "augment"),
        meta_file=str(args.bundle / "configs" / "metadata.json"),
        **augment_overrides(args),
    )
    return 0
