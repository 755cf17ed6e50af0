"""Does bf16 training hold the quality? The main job at equal epochs, fp32 against bf16, over seeds.

Runs the default ``train.json`` (phantom cohort, 16 epochs) once per seed and precision, each in its
own process and output folder (the phantom cohort of a seed is generated once and shared by its
two runs; a run that finished is read back on a rerun, so an interrupted study resumes), and
reports the validation Table I summary of each run, the wall time, and the spread between seeds
within each precision, against which the fp32-bf16 difference is to be read.

Usage::

    python benchmarks/bf16_training_quality.py --seeds 0 1 2 --work /tmp/bf16_study \\
        --out benchmarks/results/bf16_training_quality_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from medsynth.utils.device import cpu_bf16_flags, cpu_model
from medsynth.utils.io import save_json

REPO = Path(__file__).resolve().parents[1]
KEYS = (
    "mean_ssim",
    "mean_psnr",
    "mean_ssim_brain",
    "mean_mae_brain",
    "mean_edema_accuracy",
    "mean_tumor_accuracy",
)


def run_once(seed: int, amp: bool, work: Path, overrides: list[str]) -> dict:
    out = work / f"seed{seed}_{'bf16' if amp else 'fp32'}"
    finished = out / "study_row.json"
    if finished.is_file():  # resumable: a run that finished is read back, not repeated
        return json.loads(finished.read_text())
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "bundles/cg_samr/configs/train.json",
        "--output_dir", str(out), "--cache_dir", str(work / "cache"), "--seed", str(seed),
        "--amp", "true" if amp else "false", "--resume", "false", *overrides,
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"seed {seed}, amp {amp} failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((out / "metrics" / "metrics.json").read_text())
    row = {
        "seed": seed,
        "precision": "bf16" if amp else "fp32",
        "seconds": seconds,
        **{k: metrics[k] for k in KEYS},
    }
    save_json(row, finished)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder of the runs")
    parser.add_argument("--out", default="", help="JSON results")
    parser.add_argument("--set", nargs="*", default=[], help="further bundle overrides, --key value pairs")
    args = parser.parse_args(argv)
    rows = []
    for seed in args.seeds:
        for amp in (False, True):
            rows.append(run_once(seed, amp, args.work, args.set))
            print(json.dumps(rows[-1]), flush=True)
    print(
        f"\nCG-SAMR main job, 16 epochs, fp32 vs bf16 autocast; {cpu_model()}, "
        f"bf16 flags {cpu_bf16_flags() or 'none'}\n"
    )
    print(
        "| seed | precision | mean SSIM | mean PSNR | SSIM brain | MAE brain | edema acc. | tumour acc. "
        "| wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['seed']} | {row['precision']} | {row['mean_ssim']:.3f} | {row['mean_psnr']:.2f} | "
            f"{row['mean_ssim_brain']:.3f} | {row['mean_mae_brain']:.1f} | "
            f"{row['mean_edema_accuracy']:.1f} | "
            f"{row['mean_tumor_accuracy']:.1f} | {row['seconds']:.0f} |"
        )
    spread = {}
    for precision in ("fp32", "bf16"):
        values = [r for r in rows if r["precision"] == precision]
        spread[precision] = {
            k: (statistics.mean(r[k] for r in values), statistics.pstdev(r[k] for r in values)) for k in KEYS
        }
        spread[precision]["seconds"] = statistics.mean(r["seconds"] for r in values)
    differences = {k: spread["bf16"][k][0] - spread["fp32"][k][0] for k in KEYS}
    print("\n| metric | fp32 mean ± sd over seeds | bf16 mean ± sd | bf16 - fp32 |")
    print("|---|---|---|---|")
    for k in KEYS:
        (m32, s32), (m16, s16) = spread["fp32"][k], spread["bf16"][k]
        print(f"| {k} | {m32:.3f} ± {s32:.3f} | {m16:.3f} ± {s16:.3f} | {differences[k]:+.3f} |")
    ratio = spread["fp32"]["seconds"] / spread["bf16"]["seconds"]
    print(
        f"\nwall time: fp32 {spread['fp32']['seconds']:.0f} s, "
        f"bf16 {spread['bf16']['seconds']:.0f} s ({ratio:.2f}x)"
    )
    if args.out:
        record = {"cpu": cpu_model(), "cpu_bf16_flags": cpu_bf16_flags(), "rows": rows, "spread": spread}
        save_json({**record, "difference": differences, "wall_time_ratio": ratio}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
