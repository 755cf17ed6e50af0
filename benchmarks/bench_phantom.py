"""Benchmark: time to generate a ``ready`` phantom cohort (default 20 patients, 256 x 256 x 15).

Target: at most 60 s for 20 patients on a 2-core machine. Prints a table and writes JSON; never fails
(the numbers are for people, not for the test suite).

    python benchmarks/bench_phantom.py --patients 20 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS = 60.0


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 15))
    parser.add_argument("--layout", choices=("ready", "raw"), default="ready")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=None, help="cohort folder (default: a temporary folder, removed after)"
    )
    parser.add_argument(
        "--json", default=str(Path(__file__).resolve().parent / "results" / "bench_phantom.json")
    )
    args = parser.parse_args(argv)

    from medsynth.data.phantom import generate_phantom_cohort

    temporary = args.out is None
    out = Path(tempfile.mkdtemp(prefix="bench_phantom_")) if temporary else Path(args.out)
    try:
        cpu_start, wall_start = _cpu_seconds(), time.perf_counter()
        generate_phantom_cohort(
            out,
            args.patients,
            seed=args.seed,
            layout=args.layout,
            shape=tuple(args.shape),
            workers=args.workers,
        )
        wall = time.perf_counter() - wall_start
        cpu = _cpu_seconds() - cpu_start
        size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    finally:
        if temporary:
            shutil.rmtree(out, ignore_errors=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    result = {
        "benchmark": "phantom",
        "layout": args.layout,
        "patients": args.patients,
        "workers": args.workers,
        "shape": list(args.shape),
        "wall_seconds": round(wall, 2),
        "seconds_per_patient": round(wall / args.patients, 3),
        "cpu_seconds": round(cpu, 2),
        "cpu_seconds_per_patient": round(cpu / args.patients, 3),
        "output_mb": round(size_mb, 1),
        "target_wall_seconds": TARGET_SECONDS if args.layout == "ready" and args.patients == 20 else None,
        "meets_target": wall <= TARGET_SECONDS if args.layout == "ready" and args.patients == 20 else None,
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(load, 2),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
    }
    width = max(len(k) for k in result)
    print("-" * (width + 24))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print("-" * (width + 24))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
