"""Benchmark: synthetic cases per minute of ``medsynth augment`` for a trained CG-SAMR bundle.

Runs the bundle's augment workflow (``inference.json`` + ``augment.json``) on the same candidates
(the same seed) once per inference setting, each into its own fresh folder, in one process:

* **plain**: the network as trained (``inference_backend none``, float32);
* **auto**: ``inference_backend auto`` (on CPU: ``torch.compile``), float32;
* **auto+bf16**: the same in bfloat16.

Reported per setting: the wall time of the run (set-up, compilation and the gates included),
accepted cases and candidates, cases per minute, and the median seconds per candidate (from the
candidates' records, without the set-up). The CPU model and its bf16 flags are recorded.

Usage (after the main job)::

    python benchmarks/bench_augment.py --output-dir runs/cg_samr --cases 20 \\
        --out benchmarks/results/augment_cpu.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from medsynth.utils.device import cpu_bf16_flags, cpu_model
from medsynth.utils.io import save_json

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "plain": {"inference_backend": "none", "precision": "fp32"},
    "auto": {"inference_backend": "auto", "precision": "fp32"},
    "auto+bf16": {"inference_backend": "auto", "precision": "bf16"},
}


def run_setting(name: str, args: argparse.Namespace, work: Path) -> dict:
    from monai.bundle import ConfigParser

    from medsynth.utils.bundles import bundle_config_files

    parser = ConfigParser()
    parser.read_config(bundle_config_files(REPO / args.bundle, "augment"))
    parser.read_meta(str(REPO / args.bundle / "configs" / "metadata.json"))
    out = work / name.replace("+", "_")
    overrides = {
        "output_dir": args.output_dir,
        "augment_dir": str(out),
        "num_cases": args.cases,
        "augment_seed": args.seed,
        "device": f"$torch.device('{args.device}')",
        **SETTINGS[name],
    }
    if args.cache_dir:
        overrides["cache_dir"] = args.cache_dir
    parser.update(overrides)
    start = time.perf_counter()
    summary = parser.get_parsed_content("augmenter").run()
    seconds = time.perf_counter() - start
    per_candidate = [json.loads(p.read_text())["seconds"] for p in (out / ".state").glob("*.json")]
    return {
        "setting": name,
        **SETTINGS[name],
        "wall_seconds": seconds,
        "accepted": summary["accepted"],
        "candidates": summary["candidates"],
        "cases_per_minute": 60.0 * summary["accepted"] / seconds,
        "median_seconds_per_candidate": statistics.median(per_candidate),
        "rejected": summary["rejected"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="bundles/cg_samr")
    parser.add_argument("--output-dir", required=True, help="the trained bundle's output folder")
    parser.add_argument(
        "--cache-dir", default="", help="the training run's cache_dir (default: the bundle's)"
    )
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", default="", help="JSON results")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_augment_"))
    try:
        rows = [run_setting(name, args, work) for name in args.settings]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_model()
    print(f"\nmedsynth augment, {args.cases} cases, {device}, bf16 flags {cpu_bf16_flags() or 'none'}\n")
    print("| setting | wall s | accepted / candidates | cases / min | median s / candidate | vs plain |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        ratio = row["cases_per_minute"] / rows[0]["cases_per_minute"] if rows[0]["cases_per_minute"] else 0.0
        print(
            f"| {row['setting']} | {row['wall_seconds']:.1f} | {row['accepted']} / {row['candidates']} | "
            f"{row['cases_per_minute']:.1f} | {row['median_seconds_per_candidate']:.2f} | {ratio:.2f}x |"
        )
    if args.out:
        save_json(
            {"device": device, "cpu_bf16_flags": cpu_bf16_flags(), "cases": args.cases, "rows": rows},
            args.out,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
