"""Preprocessing benchmark: per-step / per-patient times, registration error and brain-mask Dice.

Cases:

* the real raw TCGA-FG-6692 exam (t1, t1c, t2, flair; no APTw, so the reference is t1c):
  per-step times (target: at most 90 s for the whole exam on 2 cores) and the skull-strip Dice
  against ``t1c_brainmask_reference.nii.gz``;
* one full-size phantom ``raw`` patient (APTw slab 256 x 256 x 15 at 0.82 x 0.82 x 4.4 mm, anatomical
  sequences at 1 x 1 x 1.2 mm with skull, bias and known rigid poses): per-step times, the
  co-registration error against the known transforms (mean / max displacement of the brain voxels
  of the reference grid, in mm and in reference voxels: ``|d / spacing|``), and the mask Dice;
* ``--compare-strategies``: on the phantom, each anatomical sequence registered *directly* to the
  APTw slab, against the hub scheme the pipeline uses (all to T2w, T2w to the slab).

Usage::

    python benchmarks/bench_preprocessing.py [--work /tmp/medsynth_bench] [--threads 2] [--skip-phantom]
        [--skip-tcga] [--compare-strategies] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

SHARED_DATA = Path(
    os.environ.get("MEDSYNTH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--work", default="/tmp/medsynth_bench", help="scratch folder (phantom cache, outputs)"
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="ITK / torch threads (default 2 = the target machine)"
    )
    parser.add_argument("--skip-tcga", action="store_true")
    parser.add_argument("--skip-phantom", action="store_true")
    parser.add_argument("--compare-strategies", action="store_true")
    parser.add_argument(
        "--fresh", action="store_true", help="delete previous outputs first (default: yes for outputs)"
    )
    parser.add_argument(
        "--json", default=None, help="where to write the results (default <work>/bench_preprocessing.json)"
    )
    return parser.parse_args()


def _step_table(timings_csv: Path) -> dict[str, float]:
    import pandas as pd

    frame = pd.read_csv(timings_csv)
    return {str(r.step): float(r.seconds) for r in frame.itertuples()}


def _run_one(raw: Path, out: Path, **pipeline_kwargs) -> tuple[dict[str, float], float]:
    import shutil

    from preprocessing.pipeline import PipelineConfig
    from preprocessing.runner import CohortConfig, run_cohort

    shutil.rmtree(out, ignore_errors=True)
    config = CohortConfig(
        pipeline=PipelineConfig(**pipeline_kwargs), workers=1, atlas_iterations=1, progress=False
    )
    start = time.perf_counter()
    result = run_cohort(raw, out, config)
    total = time.perf_counter() - start
    if result.failures:
        raise RuntimeError(f"benchmark patient failed: {result.failures}")
    return _step_table(out / "timings.csv"), total


def bench_tcga(work: Path) -> dict:
    import nibabel as nib
    import numpy as np

    from medsynth.metrics import binary_dice

    exam = SHARED_DATA / "tcga_fg_6692_raw"
    if not exam.is_dir():
        return {"skipped": f"{exam} not available"}
    raw = work / "tcga_raw"
    raw.mkdir(parents=True, exist_ok=True)
    link = raw / "TCGA-FG-6692"
    if not link.exists():
        os.symlink(exam, link)
    steps, total = _run_one(raw, work / "tcga_out")
    mask = (
        np.asanyarray(nib.load(work / "tcga_out" / "TCGA-FG-6692" / "TCGA-FG-6692_brainmask.nii.gz").dataobj)
        > 0
    )
    expected = np.asanyarray(nib.load(exam / "t1c_brainmask_reference.nii.gz").dataobj) > 0
    per_patient = sum(v for k, v in steps.items() if k != "qc")
    return {
        "steps_s": steps,
        "patient_s_without_qc": per_patient,
        "cohort_wall_s": total,
        "brain_mask_dice_vs_reference": binary_dice(mask, expected),
        "target_s": 90.0,
    }


def _registration_errors(raw_patient: Path, matrices: dict) -> dict:
    import nibabel as nib
    import numpy as np

    truth = json.loads((raw_patient / "truth" / "transforms.json").read_text())["sequences"]
    ref = nib.load(raw_patient / "aptw.nii.gz")
    spacing = np.asarray(ref.header.get_zooms()[:3], dtype=float)
    brain = np.asanyarray(nib.load(raw_patient / "truth" / "brain_mask.nii.gz").dataobj) > 0
    points = nib.affines.apply_affine(ref.affine, np.argwhere(brain))
    homogeneous = np.c_[points, np.ones(len(points))]
    rows = {}
    for sequence, matrix in matrices.items():
        expected = np.linalg.inv(np.asarray(truth[sequence]["to_reference"]))
        delta = (homogeneous @ (np.asarray(matrix) - expected).T)[:, :3]
        # ``spacing`` divides per world axis: the phantom slab grid is axis-aligned (diagonal affine).
        mm, vox = np.linalg.norm(delta, axis=1), np.linalg.norm(delta / spacing, axis=1)
        before = np.linalg.norm((homogeneous @ (np.eye(4) - expected).T)[:, :3], axis=1)
        rows[sequence] = {
            "mean_mm": float(mm.mean()),
            "max_mm": float(mm.max()),
            "mean_vox": float(vox.mean()),
            "max_vox": float(vox.max()),
            "header_only_mean_mm": float(before.mean()),
        }
    return rows


def bench_phantom(work: Path, compare: bool) -> dict:
    import nibabel as nib
    import numpy as np

    from medsynth.data.phantom import generate_phantom_cohort
    from medsynth.metrics import binary_dice
    from preprocessing.registration import load_transform

    raw = work / "phantom_raw"
    start = time.perf_counter()
    generate_phantom_cohort(raw, 1, seed=0, layout="raw", progress=False)
    generation = time.perf_counter() - start
    pid = "phantom_000"
    out = work / "phantom_out"
    steps, total = _run_one(raw, out, label_globs=("truth/label.nii.gz",))
    register = out / pid / "work" / "register"
    matrices = {s: load_transform(register / f"{s}_to_aptw.json") for s in ("t1w", "gd_t1w", "t2w", "flair")}
    mask = np.asanyarray(nib.load(out / pid / f"{pid}_brainmask.nii.gz").dataobj) > 0
    truth_mask = np.asanyarray(nib.load(raw / pid / "truth" / "brain_mask.nii.gz").dataobj) > 0
    result = {
        "generation_s": generation,
        "steps_s": steps,
        "cohort_wall_s": total,
        "patient_s_without_qc": sum(v for k, v in steps.items() if k != "qc"),
        "registration_error_hub_t2w": _registration_errors(raw / pid, matrices),
        "brain_mask_dice_vs_truth": binary_dice(mask, truth_mask),
    }
    if compare:
        from preprocessing.imageio import load_image
        from preprocessing.pipeline import PipelineConfig
        from preprocessing.registration import register_to_reference

        kwargs = PipelineConfig().registration_kwargs()
        reference = load_image(raw / pid / "aptw.nii.gz")
        direct, seconds = {}, {}
        for sequence in ("t1w", "gd_t1w", "t2w", "flair"):
            source = raw / pid / (sequence if sequence == "t1w" else f"{sequence}.nii.gz")
            tic = time.perf_counter()
            direct[sequence] = register_to_reference(load_image(source), reference, **kwargs).matrix
            seconds[sequence] = time.perf_counter() - tic
        result["registration_error_direct_to_aptw"] = _registration_errors(raw / pid, direct)
        result["direct_registration_s"] = seconds
    return result


def _print_table(title: str, steps: dict[str, float]) -> None:
    print(f"\n{title}")
    print(f"  {'step':<14}{'seconds':>10}")
    for step, seconds in steps.items():
        print(f"  {step:<14}{seconds:>10.1f}")


def main() -> int:
    args = _parse()
    # Thread counts must be set before ITK / torch start their pools.
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {"threads": args.threads, "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg()}
    if not args.skip_tcga:
        results["tcga"] = bench_tcga(work)
        if "steps_s" in results["tcga"]:
            _print_table("TCGA-FG-6692 (4 sequences, reference t1c)", results["tcga"]["steps_s"])
            print(
                f"  per patient (without QC): {results['tcga']['patient_s_without_qc']:.1f} s (target 90 s); "
                f"brain-mask Dice vs reference: {results['tcga']['brain_mask_dice_vs_reference']:.4f}"
            )
    if not args.skip_phantom:
        results["phantom"] = bench_phantom(work, args.compare_strategies)
        phantom = results["phantom"]
        _print_table("phantom raw patient (5 sequences, reference APTw slab)", phantom["steps_s"])
        print(
            f"  per patient (without QC): {phantom['patient_s_without_qc']:.1f} s; "
            f"brain-mask Dice vs truth: {phantom['brain_mask_dice_vs_truth']:.4f}"
        )
        for key in ("registration_error_hub_t2w", "registration_error_direct_to_aptw"):
            if key in phantom:
                print(f"\n  {key} (brain voxels of the APTw grid; voxel = 0.82 x 0.82 x 4.4 mm)")
                print(
                    f"  {'sequence':<10}{'mean mm':>9}{'max mm':>9}{'mean vox':>10}{'max vox':>9}"
                    f"{'header mm':>11}"
                )
                for sequence, row in phantom[key].items():
                    print(
                        f"  {sequence:<10}{row['mean_mm']:>9.2f}{row['max_mm']:>9.2f}{row['mean_vox']:>10.2f}"
                        f"{row['max_vox']:>9.2f}{row['header_only_mean_mm']:>11.2f}"
                    )
    results["load_average_end"] = os.getloadavg()
    path = Path(args.json) if args.json else work / "bench_preprocessing.json"
    path.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
