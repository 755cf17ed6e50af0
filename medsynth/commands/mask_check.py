"""``medsynth mask-check``: is a (manipulated) lesion mask plausible? The mask gate of ``augment``."""

from __future__ import annotations

import argparse
import logging
from collections import Counter

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "mask-check",
        help="check lesion label maps: nesting, inside the brain, slivers, volumes, midline",
        description=(
            "Check label maps (the project's labels 0..4) with the mask gate of medsynth augment: tumour "
            "and cavity nested in the lesion, the lesion inside the brain, no slivers, class volumes within "
            "the training cohort's range (with --dataset-dir), and no midline crossing that the source "
            "(--source) did not have. Prints one verdict per file and the reasons counted; exit code 1 if "
            "any is rejected."
        ),
    )
    parser.add_argument("labels", nargs="+", help="label map NIfTI files")
    parser.add_argument(
        "--brain-mask", default=None, help="brain mask of the label maps (default: label > 0)"
    )
    parser.add_argument(
        "--source",
        default=None,
        help="the unmanipulated label map (for the midline, sliver and nesting rules)",
    )
    parser.add_argument(
        "--dataset-dir",
        default=None,
        help="training cohort whose class volumes give the range (default: none)",
    )
    parser.add_argument(
        "--cache-dir", default="runs/cache", help="cache of the cohort (default: %(default)s)"
    )
    parser.add_argument("--volume-margin", type=float, default=0.25)
    parser.add_argument("--min-component-voxels", type=int, default=20)
    parser.add_argument("--max-core-exposure", type=float, default=0.5)
    parser.add_argument(
        "--core-exposure-margin",
        type=float,
        default=0.1,
        help="with --source: its exposure plus this is allowed",
    )
    parser.set_defaults(func=run_mask_check)


def run_mask_check(args: argparse.Namespace) -> int:
    import nibabel as nib
    import numpy as np

    from medsynth.synthetic.masks import LesionMaskPlausibility, LesionVolumeRange

    volume_range = None
    if args.dataset_dir is not None:
        from medsynth.data.cohort import resolve_cohort

        manifest = resolve_cohort(args.dataset_dir, args.cache_dir, build_atlas=False)
        train = manifest[manifest["split"] == "train"]
        volume_range = LesionVolumeRange.from_label_files(train["label"], args.volume_margin)
    validator = LesionMaskPlausibility(
        volume_range, args.min_component_voxels, args.max_core_exposure, args.core_exposure_margin
    )

    def load(path: str) -> tuple[np.ndarray, nib.Nifti1Image]:
        try:
            image = nib.load(path)
            return np.asanyarray(image.dataobj), image
        except (OSError, ValueError) as error:
            raise ValueError(f"file {path}: cannot read it as NIfTI ({error})") from error

    brain = load(args.brain_mask)[0] >= 0.5 if args.brain_mask else None
    source = load(args.source)[0] if args.source else None
    reasons: Counter = Counter()
    for path in args.labels:
        label, image = load(path)
        voxel = float(np.prod(image.header.get_zooms()[:3]))
        verdict = validator(label, brain, source, voxel)
        reasons[verdict.reason or "accepted"] += 1
        print(f"{path}: {'plausible' if verdict.accepted else f'{verdict.reason}: {verdict.detail}'}")
    print(", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items())))
    return 0 if set(reasons) == {"accepted"} else 1
