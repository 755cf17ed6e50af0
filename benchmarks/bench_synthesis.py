"""Benchmark: synthesize one volume (15 axial slices, 256 x 256, 5 sequences) with SAMR / CG-SAMR.

Compares, in ONE run and on the same 15-slice batch, the naive network (float32, eager mode,
default NCHW memory format, ``torch.no_grad``) with the variants of
:func:`medsynth.inference.accelerate.optimize_for_inference`. Repeats are interleaved (naive, variant
1, variant 2, ..., naive, ...) so that a change of machine load hits all variants alike; medians are
reported, with the max absolute output difference to the naive network and the load average.
When an optimized variant runs the volume in micro-batches (the compiled CPU variants), the naive
network is also timed on the same micro-batches ("naive, chunks of k"), so that the table tells what
the micro-batching alone brings.

The weights are random (speed does not depend on them), but made realistic for the tolerance check:
PyTorch's default convolution initialisation (outputs spread over [-1, 1] instead of the ~0.01 of
the training-time N(0, 0.02) init), random batch-norm affine parameters, and running statistics
accumulated by training-mode forward passes, so that batch-norm folding is tested on real statistics.

Usage::

    python benchmarks/bench_synthesis.py --out bench_synthesis.json
    python benchmarks/bench_synthesis.py --device cuda --precisions fp32,bf16 --backends eager,compile
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

from medsynth.inference import random_slices
from medsynth.inference.accelerate import max_abs_difference, optimize_for_inference
from medsynth.networks import CGSAMRGenerator, SAMRGenerator, SynthesisInferenceNetwork
from medsynth.utils.device import cpu_bf16_flags, cpu_model
from medsynth.utils.io import save_json
from medsynth.utils.logging import setup_logging

logger = logging.getLogger("bench_synthesis")

GENERATORS: dict[str, type[nn.Module]] = {"cgsamr": CGSAMRGenerator, "samr": SAMRGenerator}


def realistic_random_state(
    network: nn.Module, calibration: torch.Tensor, passes: int = 4, seed: int = 0
) -> nn.Module:
    """Random weights with non-trivial batch-norm statistics, in place; returns ``network`` in eval mode.

    Convolutions get PyTorch's default initialisation, batch norms random affine parameters, and
    the running statistics are the cumulative averages over ``passes`` training-mode forwards of
    ``calibration`` (plus noise), as after training.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in network.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            module.reset_parameters()
        elif isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.copy_(torch.empty_like(module.weight).uniform_(0.5, 1.5, generator=generator))
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.2)
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration passes
    network.train()
    with torch.no_grad():
        for _ in range(passes):
            network(calibration + 0.1 * torch.randn(calibration.shape, generator=generator))
    return network.eval()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    runners: dict[str, Callable[[], torch.Tensor]], repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of every runner, the runners alternating within each repeat."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    _synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            _synchronize(device)
            start = time.perf_counter()
            run()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def machine_info(device: torch.device) -> dict:
    """Where the numbers come from."""
    info = {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "processor": cpu_model(),
        "cpu_bf16_flags": cpu_bf16_flags(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def bench_network(name: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """All rows (naive first) of one network."""
    torch.manual_seed(args.seed)
    generator = GENERATORS[name](num_sequences=args.sequences)
    network = SynthesisInferenceNetwork(generator)
    volume = random_slices(args.slices, args.size, args.sequences, seed=args.seed)
    realistic_random_state(network, random_slices(2, 64, args.sequences, seed=args.seed + 1), seed=args.seed)
    network = network.to(device)
    volume = volume.to(device)

    def naive() -> torch.Tensor:
        with torch.no_grad():
            return network(volume)

    start = time.perf_counter()
    reference = naive()
    _synchronize(device)
    naive_first = time.perf_counter() - start
    runners: dict[str, Callable[[], torch.Tensor]] = {"naive": naive}
    rows = [
        {
            "network": name,
            "variant": "naive",
            "backend": "-",
            "precision": "fp32",
            "build_s": 0.0,
            "first_call_s": naive_first,
            "max_abs_diff": 0.0,
            "micro_batch": args.slices,
        }
    ]
    for precision in args.precisions:
        for backend in args.backends:
            label = f"{backend}/{precision}"
            logger.info("%s: building %s", name, label)
            optimized = optimize_for_inference(network, volume, device, precision=precision, backend=backend)
            output = optimized(volume)
            runners[label] = lambda optimized=optimized: optimized(volume)
            rows.append(
                {
                    "network": name,
                    "variant": label,
                    "backend": optimized.backend,  # differs from the request after a fallback
                    "precision": optimized.precision,
                    "build_s": optimized.build_seconds,
                    "first_call_s": optimized.build_seconds,
                    "max_abs_diff": max_abs_difference(output, reference),
                    "rewrites": optimized.rewrites,
                    "micro_batch": optimized.fixed_batch or args.slices,
                }
            )
    # The same micro-batching applied to the naive network, for an honest account of what it brings.
    micro_batches = sorted({row["micro_batch"] for row in rows[1:] if row["micro_batch"] != args.slices})
    for micro_batch in micro_batches:
        label = f"naive, chunks of {micro_batch}"

        def naive_chunked(micro_batch: int = micro_batch) -> torch.Tensor:
            with torch.no_grad():
                return torch.cat([network(chunk) for chunk in volume.split(micro_batch)])

        runners[label] = naive_chunked
        rows.append(
            {
                "network": name,
                "variant": label,
                "backend": "-",
                "precision": "fp32",
                "build_s": 0.0,
                "first_call_s": 0.0,
                "max_abs_diff": max_abs_difference(naive_chunked(), reference),
                "micro_batch": micro_batch,
            }
        )
    logger.info("%s: timing %d variants x %d repeats", name, len(runners), args.repeats)
    load_before = os.getloadavg()
    times = interleaved_medians(runners, args.repeats, args.warmup, device)
    load_after = os.getloadavg()
    naive_median = statistics.median(times["naive"])
    for row in rows:
        seconds = times[row["variant"]]
        row.update(
            median_s=statistics.median(seconds),
            times_s=seconds,
            speedup=naive_median / statistics.median(seconds),
            load_avg_1min=[load_before[0], load_after[0]],
            output_range=[float(reference.min()), float(reference.max())],
            output_std=float(reference.float().std()),
        )
    return rows


def _fallback_note(row: dict) -> str:
    """`` (fallback: <backend>)`` when the optimizer fell back to another backend than the one asked for."""
    if row["backend"] in ("-", row["variant"].split("/")[0]):
        return ""
    return f" (fallback: {row['backend']})"


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| network | variant | slices per call | median s / volume | speed-up vs naive | max abs diff "
        "| build + first call s | load avg (1 min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['network']} | {row['variant']}"
            f"{_fallback_note(row)}"
            f" | {row['micro_batch']}"
            f" | {row['median_s']:.2f} | {row['speedup']:.2f}x | {row['max_abs_diff']:.1e}"
            f" | {row['first_call_s']:.1f} | {row['load_avg_1min'][0]:.1f} -> {row['load_avg_1min'][1]:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant (median reported)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="untimed calls per variant before timing, besides the first call (untimed, reported apart)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--networks", default="cgsamr,samr", help="comma-separated: cgsamr, samr")
    parser.add_argument(
        "--backends",
        default="eager,compile",
        help="comma-separated optimize_for_inference backends: auto, eager, jit, compile",
    )
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument(
        "--fresh-compile-cache",
        action="store_true",
        help="compile into a new, empty inductor cache (cold compile times instead of cached ones)",
    )
    parser.add_argument("--slices", type=int, default=15, help="slices of the volume (all in one batch)")
    parser.add_argument("--size", type=int, default=256, help="in-plane size")
    parser.add_argument("--sequences", type=int, default=5, help="MR sequences")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.networks = [n for n in args.networks.split(",") if n]
    args.backends = [b for b in args.backends.split(",") if b]
    args.precisions = [p for p in args.precisions.split(",") if p]
    unknown = sorted(set(args.networks) - set(GENERATORS))
    if unknown:
        parser.error(f"unknown network(s) {unknown}; choose from {sorted(GENERATORS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fresh_compile_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_synthesis_inductor_")
    device = torch.device(args.device)
    info = machine_info(device)
    info["command"] = " ".join([os.path.basename(sys.executable)] + sys.argv)
    info["load_avg_start"] = list(os.getloadavg())
    rows: list[dict] = []
    for name in args.networks:
        rows.extend(bench_network(name, args, device))
    info["load_avg_end"] = list(os.getloadavg())
    table = markdown_table(rows)
    print(
        f"\n{args.slices} slices x {args.size}^2, {args.sequences} sequences, {info['device']}, "
        f"{info['threads']} threads, torch {info['torch']}, {info['date_utc']}\n"
    )
    print(table)
    if args.out:
        save_json(
            {"machine": info, "settings": {k: v for k, v in vars(args).items()}, "results": rows}, args.out
        )
        logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
