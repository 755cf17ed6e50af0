"""One prepared run on a GPU machine: training and inference throughput, and quality on real data.

Made for a short lease of one GPU (about 10 minutes per call): every section runs in one call,
each measures its variants in one run, and the script stops starting sections when its time
budget is spent. ``benchmarks/gpu_run.sh`` installs the project first (carried wheels) and runs it.

Sections:

1. **Training throughput**: samples per second of the real ``SynthesisGANTrainer`` iteration for
   CG-SAMR and SAMR at 256 x 256, batch 8, papers' network sizes: naive (fp32 eager, NCHW, plain
   Adam) against the project's fast settings (channels-last, fused Adam, cuDNN benchmark, bf16
   autocast through the Workflow's ``amp``), and for CG-SAMR also with ``torch.compile``; the memory
   peak of each, and the largest batch that fits at 256 x 256 (fast settings).
2. **Inference**: one 15-slice 256 x 256 volume, naive against ``optimize_for_inference``
   (``auto`` and bf16), with each variant's largest error against the fp32 reference.
3. **Quality on real data**: CG-SAMR with ``paper.json``'s networks at 256 x 256 trained on
   ``--brats`` (the 8 cases of ``../shared/data/brats2018_dev``: 6 train, 1 val, 1 test, split from
   the seed) for as many epochs as fit in ``--train-seconds`` at the measured rate, then the
   evaluate workflow: the test split's Table I and two sample grids.

Output: a short table at the end; under ``--out`` (``$OUT`` when set) ``summary.json``, the test
table (``table1_test.md`` and ``table1_test_cases.csv``), ``metrics.json`` and two sample grids, at
most 8 files. ``--dry-run`` runs the same code at tiny sizes on the CPU with a tiny phantom cohort,
so the script is known to work before a GPU is lent (``tests/test_gpu_run.py``).

Usage::

    OUT=/tmp/gpu bash benchmarks/gpu_run.sh          # on the GPU machine (installs, then this)
    python benchmarks/gpu_run.py --dry-run --out /tmp/dry   # anywhere, a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_synthesis import bench_network, machine_info
from bench_training_step import bench_training, build_trainer, make_batch

from medsynth.utils.bundles import bundle_config_files
from medsynth.utils.io import save_json
from medsynth.utils.logging import setup_logging

logger = logging.getLogger("gpu_run")

REPO = Path(__file__).resolve().parents[1]
PAPER_SIZES: dict[str, dict] = {}  # the networks' defaults are the papers' sizes
TINY_SIZES = {
    "generator": {"base_width": 4, "num_res_blocks": 1},
    "discriminator": {"base_filters": 8, "num_layers": 2},
    "segmenter": {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 1},
}
TINY_BUNDLE = {
    "phantom_patients": 4,
    "phantom_shape": [40, 40, 6],
    "image_size": 32,
    "base_width": 4,
    "num_res_blocks": 1,
    "d_base_filters": 8,
    "d_num_layers": 2,
    "unet_channels": [4, 8, 16, 32, 64],
    "batch_size": 2,
}


class Budget:
    """Seconds left of the run; sections are skipped (and say so) once it is spent."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, section: str, needs: float) -> bool:
        if self.left() >= needs:
            return True
        logger.warning("skipping %s: %.0f s left, it needs about %.0f s", section, self.left(), needs)
        return False


def _settings(args: argparse.Namespace, **overrides) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **overrides})


def training_section(args: argparse.Namespace, device: torch.device, sizes: dict) -> list[dict]:
    """Samples per second of every variant, for both networks; CG-SAMR also compiled."""
    rows = []
    for network in ("cgsamr", "samr"):
        rows += bench_training(_settings(args, compile=False), device, network, sizes)
    if args.compile:
        compiled = bench_training(_settings(args, compile=True), device, "cgsamr", sizes)
        rows += [
            dict(row, variant=f"{row['variant']}+compile") for row in compiled if row["variant"] != "naive"
        ]
    return rows


def largest_batch(args: argparse.Namespace, device: torch.device, sizes: dict, limit: int) -> int:
    """The largest batch (doubling from ``args.batch_size``) whose fast-settings CG-SAMR step fits."""
    from medsynth.networks import CGSAMRGenerator, LabelWiseMultiScaleDiscriminator, make_lesion_unet

    n = args.sequences
    networks = {
        "generator": CGSAMRGenerator(num_sequences=n, **sizes.get("generator", {})),
        "discriminator": LabelWiseMultiScaleDiscriminator(5 + 4 * n, **sizes.get("discriminator", {})),
        "segmenter": make_lesion_unet(num_sequences=n, **sizes.get("segmenter", {})),
    }
    bf16 = device.type == "cuda"
    fits, batch = 0, args.batch_size
    while batch <= limit:
        trainer = data = None
        try:
            trainer = build_trainer(
                networks, device, channels_last=True, fused_adam=True, bf16=bf16, compile_networks=False
            )
            data = {
                k: v.to(device).contiguous(memory_format=torch.channels_last)
                for k, v in make_batch(batch, args.image_size, n).items()
            }
            trainer._iteration(trainer, data)
            fits = batch
        except torch.OutOfMemoryError:
            break
        finally:
            trainer = data = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        batch *= 2
    return fits


def inference_section(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """One volume: naive, optimize_for_inference auto and bf16, each with its error."""
    settings = _settings(
        args,
        slices=args.slices,
        size=args.image_size,
        precisions=["fp32", "bf16"],
        backends=["auto"],
        repeats=args.repeats,
        warmup=1,
    )
    return bench_network("cgsamr", settings, device)


def quality_section(
    args: argparse.Namespace, device: torch.device, seconds_per_step: float, work: Path
) -> dict:
    """Time-boxed CG-SAMR training on the real cohort, then the test split's Table I."""
    from monai.bundle import run

    bundle = REPO / "bundles" / "cg_samr"
    out = work / "quality"
    common: dict = {"output_dir": str(out), "cache_dir": str(work / "cache"), "seed": 0}
    if args.dry_run:
        common.update(TINY_BUNDLE, dataset_dir="")
        configs = bundle_config_files(bundle, "train")
        slices_per_epoch = 3 * 6  # a tiny phantom: about 3 train patients of 6 slices
    else:
        common.update(dataset_dir=str(args.brats), amp=device.type == "cuda")
        configs = bundle_config_files(bundle, "paper")
        slices_per_epoch = 6 * 125  # 6 BraTS train cases, about 125 brain slices each
    batch = common.get("batch_size", 8)
    epoch_seconds = seconds_per_step * max(1, slices_per_epoch // batch)
    epochs = max(1, int(args.train_seconds // max(epoch_seconds, 1e-6)))
    logger.info("quality run: %d epoch(s) of about %.0f s each", epochs, epoch_seconds)
    train = {
        **common,
        "num_epochs": epochs,
        "val_interval": epochs,
        "sample_interval": epochs,
        "resume": False,
    }
    start = time.perf_counter()
    run(config_file=configs, **train)
    train_seconds = time.perf_counter() - start
    evaluate = [*configs, str(bundle / "configs" / "evaluate.json")]
    run(config_file=evaluate, **{**common, "num_epochs": epochs, "eval_split": "test", "num_samples": 2})
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    return {
        "epochs": epochs,
        "train_seconds": train_seconds,
        "mean_ssim": metrics["mean_ssim"],
        "mean_psnr": metrics["mean_psnr"],
        "mean_ssim_brain": metrics.get("mean_ssim_brain"),
        "mean_mae_brain": metrics.get("mean_mae_brain"),
        "eval_dir": str(out / "eval"),
    }


def _copy_results(quality: dict | None, out: Path) -> None:
    if not quality:
        return
    eval_dir = Path(quality["eval_dir"])
    for name in ("table1_test.md", "table1_test_cases.csv", "metrics.json"):
        if (eval_dir / name).is_file():
            shutil.copyfile(eval_dir / name, out / name)
    for index, grid in enumerate(sorted((eval_dir / "samples").glob("*.png"))[:2]):
        shutil.copyfile(grid, out / f"sample_{index}.png")


def print_table(summary: dict) -> None:
    machine = summary["machine"]
    print(f"\nGPU run, {machine.get('gpu', machine['device'])}, torch {machine['torch']}")
    print("\n| training (256^2 unless dry run) | network | samples / s | speed-up | peak GiB |")
    print("|---|---|---|---|---|")
    for row in summary.get("training", []):
        peak = row.get("peak_memory_gib")
        print(
            f"| {row['variant']} | {row['network']} | {row['samples_per_s']:.1f} | {row['speedup']:.2f}x | "
            f"{'-' if peak is None else f'{peak:.1f}'} |"
        )
    if "largest_batch" in summary:
        print(f"\nlargest batch that fits (fast settings, CG-SAMR): {summary['largest_batch']}")
    print("\n| inference, one volume | s | volumes / s | speed-up | max abs diff |")
    print("|---|---|---|---|---|")
    for row in summary.get("inference", []):
        print(
            f"| {row['variant']} ({row['backend']}) | {row['median_s']:.3f} | {1 / row['median_s']:.1f} | "
            f"{row['speedup']:.2f}x | {row['max_abs_diff']:.1e} |"
        )
    quality = summary.get("quality")
    targets = summary.get("targets", {})
    if targets:
        two_x = "met" if targets["training_2x_met"] else "not met"
        rate = "met" if targets["cgsamr_300_samples_per_s_met"] else "not met"
        print(
            f"\ntargets: fastest CG-SAMR training {targets['fastest_variant']}, "
            f"{targets['speedup_over_naive']:.2f}x naive (2x: {two_x}), "
            f"{targets['samples_per_s']:.0f} samples/s (300: {rate})"
        )
    if quality:
        print(
            f"\nquality: {quality['epochs']} epoch(s) in {quality['train_seconds']:.0f} s; test mean SSIM "
            f"{quality['mean_ssim']:.3f}, PSNR {quality['mean_psnr']:.1f} dB, in the brain SSIM "
            f"{quality['mean_ssim_brain']:.3f}, MAE {quality['mean_mae_brain']:.1f}"
        )
    for note in summary.get("notes", []):
        print(f"note: {note}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, a tiny phantom cohort")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_run"), help="results folder ($OUT)")
    parser.add_argument("--budget-s", type=float, default=480, help="seconds for the whole run")
    parser.add_argument("--train-seconds", type=float, default=300, help="training time of the quality run")
    parser.add_argument(
        "--brats", type=Path, default=REPO / ".gpu_carry" / "brats2018_dev", help="real cohort"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile training variant")
    args = parser.parse_args(argv)
    tiny = args.dry_run
    args.compile = not args.no_compile and not tiny
    args.image_size = 32 if tiny else 256
    args.batch_size = 2 if tiny else 8
    args.repeats = 1 if tiny else 5
    args.warmup = 1 if tiny else 2
    args.sequences = 4  # BraTS: T1w, Gd-T1w, T2w, FLAIR
    args.slices = 3 if tiny else 15
    args.seed = 0
    args.no_bf16 = False
    if tiny:
        args.train_seconds = min(args.train_seconds, 1.0)
    return args


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        logger.error(
            "no GPU here (torch.cuda.is_available() is False): nothing measured; use --dry-run on a CPU"
        )
        return 3
    device = torch.device("cuda" if cuda and not args.dry_run else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    budget = Budget(args.budget_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = TINY_SIZES if args.dry_run else PAPER_SIZES
    summary: dict = {"machine": machine_info(device), "dry_run": args.dry_run, "notes": []}
    started = time.perf_counter()
    summary["training"] = training_section(args, device, sizes)
    best = min(
        (r for r in summary["training"] if r["network"] == "cgsamr"), key=lambda row: row["median_step_s"]
    )
    if budget.allows("largest batch", 60):
        summary["largest_batch"] = largest_batch(args, device, sizes, limit=8 if args.dry_run else 256)
    if budget.allows("inference", 60):
        summary["inference"] = inference_section(args, device)
    if not args.dry_run and not args.brats.is_dir():
        summary["notes"].append(
            f"no real cohort at {args.brats}: quality run skipped (prepare with gpu_run.sh)"
        )
    elif budget.allows("quality run", args.train_seconds + 60):
        with tempfile.TemporaryDirectory() as scratch:
            work = Path(scratch)
            summary["quality"] = quality_section(args, device, best["median_step_s"], work)
            _copy_results(summary["quality"], out)
    summary["seconds"] = time.perf_counter() - started
    summary["targets"] = {
        "fastest_variant": best["variant"],
        "speedup_over_naive": best["speedup"],
        "samples_per_s": best["samples_per_s"],
        "training_2x_met": best["speedup"] >= 2.0,
        "cgsamr_300_samples_per_s_met": best["samples_per_s"] >= 300,
    }
    save_json(summary, out / "summary.json")
    print_table(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
