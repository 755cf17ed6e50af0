"""Command line: ``python -m preprocessing run ...`` and ``python -m preprocessing dicom2nifti ...``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from medsynth.data.manifest import DEFAULT_SPLIT_FRACTIONS
from medsynth.utils.logging import setup_logging

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m preprocessing",
        description="Preprocess raw brain MRI exams: co-registration (ANTs), skull stripping, N4, Nyul "
        "standardization and a train-split multivariate atlas, into the medsynth manifest layout.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input problem too")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="preprocess a cohort folder (one sub-folder per patient); resumable")
    run.add_argument(
        "--input",
        required=True,
        help="folder of patient folders (<seq>.nii.gz files, <seq>/ DICOM folders, or a raw DICOM exam "
        "whose series get their roles from the headers), or a BIDS dataset",
    )
    run.add_argument("--output", required=True, help="output folder (manifest.csv, <pid>/, atlas/, qc/)")
    run.add_argument("--workers", type=int, default=1, help="Dask worker processes (1: run in this process)")
    run.add_argument(
        "--scheduler", default=None, help="address of an existing Dask scheduler, e.g. tcp://host:8786"
    )
    run.add_argument("--seed", type=int, default=0, help="seed of the splits and registrations (default 0)")
    run.add_argument(
        "--reference", default="aptw", help="reference sequence (default aptw; falls back to gd_t1w)"
    )
    run.add_argument(
        "--transform", choices=("rigid", "affine"), default="rigid", help="co-registration model"
    )
    run.add_argument(
        "--splits", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"), default=DEFAULT_SPLIT_FRACTIONS
    )
    run.add_argument(
        "--label-glob",
        action="append",
        default=None,
        help="pattern (relative to a patient folder) of the expert label; repeatable "
        "(default label.nii.gz, seg.nii.gz; the phantom's truth: truth/label.nii.gz)",
    )
    run.add_argument(
        "--label-space",
        default=None,
        help="sequence whose world space the label is in (default: the reference)",
    )
    run.add_argument("--atlas-transform", choices=("Rigid", "Affine", "SyN"), default="Affine")
    run.add_argument("--atlas-iterations", type=int, default=2)
    run.add_argument(
        "--exclude-lesion", action="store_true", help="mask the label's lesion out of the registration metric"
    )
    run.add_argument("--no-qc", action="store_true", help="skip the QC figures")
    run.add_argument(
        "--drop-incomplete-sequences",
        action="store_true",
        help="leave a sequence that some patients lack out of the whole cohort (said once) instead of "
        "refusing those patients",
    )
    run.add_argument(
        "--tissue-maps",
        action="store_true",
        help="also make CSF, grey- and white-matter probability maps (ANTs Atropos inside the brain, "
        "lesion excluded): the input of the Shin et al. baseline (bundles/shin)",
    )
    run.add_argument(
        "--sequence-roles",
        default=None,
        metavar="FILE",
        help="JSON rules giving raw DICOM series their roles, tried before the defaults "
        "(preprocessing/sequence_roles.json documents the form)",
    )
    run.add_argument(
        "--volume",
        type=int,
        default=None,
        metavar="INDEX",
        help="take this volume of a multi-volume (4D) series instead of refusing it",
    )
    run.add_argument(
        "--bids-aptw",
        default="acq-APT",
        metavar="ENTITY",
        help="with a BIDS input: the key-value entity of the APTw files, any suffix (default acq-APT; "
        "BIDS has no APTw suffix)",
    )
    run.add_argument(
        "--bids-session", default=None, metavar="LABEL", help="with a BIDS input: the session to take"
    )
    run.add_argument("--no-bids-derivatives", action="store_true", help="do not write OUT/bids_derivatives")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.set_defaults(func=_run)

    d2n = sub.add_parser("dicom2nifti", help="convert the DICOM series of a folder to NIfTI + JSON sidecars")
    d2n.add_argument("input", help="DICOM folder (searched recursively, .dcm or .dcm.gz)")
    d2n.add_argument("output", help="output folder")
    d2n.add_argument("--series-number", type=int, default=None)
    d2n.add_argument("--overwrite", action="store_true")
    d2n.add_argument(
        "--free-text",
        action="store_true",
        help="copy SeriesDescription and ProtocolName into the sidecars and name files by protocol "
        "(free-text fields sites may fill with names; off by default: files are named by series number)",
    )
    d2n.add_argument(
        "--converter",
        choices=("pydicom", "dcm2niix"),
        default=None,
        help="dcm2niix (the default): every series of the folder through dcm2niix, mosaic and enhanced "
        "multi-frame included (anonymised, allow-listed sidecars); pydicom: the project's reader "
        "(classic single-frame series, strict slice-geometry checks; the default with --series-number, "
        "which selects one series)",
    )
    d2n.set_defaults(func=_dicom2nifti)
    return parser


def _run(args: argparse.Namespace) -> int:
    from preprocessing.bids import aptw_entity
    from preprocessing.pipeline import PipelineConfig
    from preprocessing.roles import load_role_rules
    from preprocessing.runner import CohortConfig, run_cohort

    # Settings files and values are checked before any patient is touched.
    load_role_rules(args.sequence_roles)
    aptw_entity(args.bids_aptw)

    pipeline = PipelineConfig(
        reference=args.reference,
        transform=args.transform,
        seed=args.seed,
        exclude_lesion=args.exclude_lesion,
        label_space=args.label_space,
        sequence_roles=args.sequence_roles,
        volume=args.volume,
    )
    if args.label_glob:
        pipeline.label_globs = tuple(args.label_glob)
    config = CohortConfig(
        pipeline=pipeline,
        split_fractions=tuple(args.splits),
        workers=args.workers,
        scheduler=args.scheduler,
        atlas_transform=args.atlas_transform,
        atlas_iterations=args.atlas_iterations,
        qc=not args.no_qc,
        progress=not args.no_progress,
        tissue_maps=args.tissue_maps,
        drop_incomplete_sequences=args.drop_incomplete_sequences,
        bids_aptw_entity=args.bids_aptw,
        bids_session=args.bids_session,
        bids_derivatives=not args.no_bids_derivatives,
    )
    result = run_cohort(args.input, args.output, config)
    print(f"manifest: {result.manifest}\ntimings: {result.timings}\nQC: {result.qc_page}")
    print(f"{len(result.patients)} patient(s) done, {len(result.failures)} failed")
    for pid, message in sorted(result.failures.items()):
        print(f"  FAILED {pid}: {message}")
    return 1 if result.failures or result.manifest is None else 0


def _dicom2nifti(args: argparse.Namespace) -> int:
    from preprocessing.dicom import convert_series

    if args.converter is None:
        args.converter = "dcm2niix" if args.series_number is None else "pydicom"
    if args.converter == "dcm2niix" and args.series_number is not None:
        raise ValueError("--series-number selects with --converter pydicom; dcm2niix converts every series")
    if args.converter == "dcm2niix":
        from preprocessing.dcm2niix import convert_with_dcm2niix

        written = convert_with_dcm2niix(
            args.input, args.output, free_text=args.free_text, overwrite=args.overwrite
        )
        for path in written:
            print(path)
        return 0

    template = "{series_number}_{protocol_name}" if args.free_text else "series_{series_number}"
    written = convert_series(
        args.input,
        args.output,
        series_number=args.series_number,
        overwrite=args.overwrite,
        name_template=template,
        free_text=args.free_text,
    )
    for path in written:
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    from medsynth.cli import run_reporting_input_problems

    return run_reporting_input_problems(args.func, args, args.debug)


if __name__ == "__main__":
    sys.exit(main())
