"""Benchmark: one full CG-SAMR training step (generator, 6 discriminators and U-Net updates).

The step is :class:`medsynth.engines.SynthesisGANTrainer`'s own iteration (its ``_iteration``,
called directly on a prepared batch) with the real losses (LSGAN, feature matching, shape
consistency, confidence map) at the papers' weights and Adam(lr 2e-4, betas (0.5, 0.999)).

Variants, measured in ONE run on the same batch, steps interleaved (naive, optimized, ...):

* ``naive``: float32, eager, default (NCHW) memory format, plain (for-each) Adam,
  ``cudnn.benchmark`` off;
* ``optimized``: channels-last weights and batches, fused Adam where the device supports it,
  ``cudnn.benchmark`` on (CUDA); optionally ``--compile`` (``torch.compile`` of the three networks);
* ``optimized+bf16``: also the trainer's ``amp=True`` with bfloat16 (the Workflow's mixed precision:
  autocast of the forwards), on devices that compute in bf16 natively (CUDA GPUs from Ampere on;
  CPUs with AVX512-BF16 or AMX, whose flags the output reports).

The samples/s with and without bf16 are reported. Every variant starts from the same
weights; the step time is the median over ``--repeats`` steps after ``--warmup`` steps.

Usage::

    python benchmarks/bench_training_step.py --image-size 128 --batch-size 4 --threads 2 --out train_cpu.json
    python benchmarks/bench_training_step.py --device cuda --out train_cuda.json   # 256 x 256, batch 8
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_synthesis import interleaved_medians, machine_info

from medsynth.engines import SynthesisGANTrainer
from medsynth.inference import random_slices
from medsynth.losses import (
    PAPER_LOSS_WEIGHTS,
    ConfidenceMapLoss,
    FeatureMatchingLoss,
    LeastSquaresAdversarialLoss,
    ShapeConsistencyLoss,
)
from medsynth.networks import (
    CGSAMRGenerator,
    LabelWiseMultiScaleDiscriminator,
    SAMRGenerator,
    make_lesion_unet,
)
from medsynth.utils.device import native_bf16
from medsynth.utils.io import save_json
from medsynth.utils.logging import setup_logging

logger = logging.getLogger("bench_training_step")


def make_batch(batch_size: int, size: int, num_sequences: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random batch with the keys the trainer expects: mask, atlas, image (in [-1, 1]), label."""
    x = random_slices(batch_size, size, num_sequences, seed=seed)
    mask, atlas = x[:, :5], x[:, 5:]
    generator = torch.Generator().manual_seed(seed + 1)
    image = torch.rand((batch_size, num_sequences, size, size), generator=generator) * 2 - 1
    return {"mask": mask, "atlas": atlas, "image": image, "label": mask.argmax(1, keepdim=True)}


def _adam(parameters, fused: bool) -> torch.optim.Adam:
    options = {"lr": 2e-4, "betas": (0.5, 0.999)}
    if fused:
        try:
            return torch.optim.Adam(parameters, fused=True, **options)
        except (RuntimeError, ValueError) as error:  # fused Adam is not built for every device
            logger.warning("fused Adam unavailable (%s); using the for-each implementation", error)
    return torch.optim.Adam(parameters, foreach=True, **options)


def build_trainer(
    networks: dict[str, nn.Module],
    device: torch.device,
    *,
    channels_last: bool,
    fused_adam: bool,
    bf16: bool,
    compile_networks: bool,
    confidence: bool = True,
) -> SynthesisGANTrainer:
    """A trainer on copies of ``networks`` (same initial weights for every variant)."""
    nets = {name: copy.deepcopy(net).to(device) for name, net in networks.items()}
    if channels_last:
        nets = {name: net.to(memory_format=torch.channels_last) for name, net in nets.items()}
    optimizers = {name: _adam(list(net.parameters()), fused_adam) for name, net in nets.items()}
    if compile_networks:
        nets = {name: torch.compile(net) for name, net in nets.items()}
    weights = PAPER_LOSS_WEIGHTS
    return SynthesisGANTrainer(
        device=device,
        max_epochs=1,
        train_data_loader=[None],
        generator=nets["generator"],
        discriminator=nets["discriminator"],
        segmenter=nets["segmenter"],
        g_optimizer=optimizers["generator"],
        d_optimizer=optimizers["discriminator"],
        u_optimizer=optimizers["segmenter"],
        adversarial_loss=LeastSquaresAdversarialLoss(),
        feature_matching_loss=FeatureMatchingLoss(),
        shape_consistency_loss=ShapeConsistencyLoss(),
        confidence_loss=ConfidenceMapLoss().to(device) if confidence else None,
        weight_feature_matching=weights["feature_matching"],
        weight_shape_consistency=weights["shape_consistency"],
        weight_confidence=weights["confidence"],
        amp=bf16,
    )


class TrainingStep:
    """One trainer iteration on a fixed batch, under the variant's ``cudnn.benchmark`` setting."""

    def __init__(
        self, trainer: SynthesisGANTrainer, batch: dict[str, torch.Tensor], cudnn_benchmark: bool
    ) -> None:
        self.trainer = trainer
        self.batch = batch
        self.cudnn_benchmark = cudnn_benchmark

    def __call__(self) -> dict[str, float]:
        previous = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        try:
            return self.trainer._iteration(self.trainer, self.batch)
        finally:
            torch.backends.cudnn.benchmark = previous


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument("--image-size", type=int, default=256, help="in-plane size (multiple of 16)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--sequences", type=int, default=5)
    parser.add_argument(
        "--compile", action="store_true", help="also torch.compile the networks in the optimized variants"
    )
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.image_size % 16:
        parser.error(f"--image-size must be a multiple of 16 (the U-Net), got {args.image_size}")
    return args


def training_variants(args: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    """The variants of one run: naive, optimized and, where the device has native bf16, optimized+bf16."""
    cuda = device.type == "cuda"
    variants = {
        "naive": {
            "channels_last": False,
            "fused_adam": False,
            "bf16": False,
            "compile_networks": False,
            "cudnn_benchmark": False,
        },
        "optimized": {
            "channels_last": True,
            "fused_adam": True,
            "bf16": False,
            "compile_networks": args.compile,
            "cudnn_benchmark": cuda,
        },
    }
    if native_bf16(device) and not args.no_bf16:
        variants["optimized+bf16"] = dict(variants["optimized"], bf16=True)
    return variants


def bench_training(
    args: argparse.Namespace,
    device: torch.device,
    network: str = "cgsamr",
    sizes: dict[str, dict] | None = None,
) -> list[dict]:
    """One row per variant: median seconds per step, samples per second, speed-up over naive.

    ``sizes`` may give keyword arguments of the ``generator``, ``discriminator`` and ``segmenter``
    (default: the papers' sizes)."""
    torch.manual_seed(args.seed)
    n = args.sequences
    sizes = sizes or {}
    generator_class = {"cgsamr": CGSAMRGenerator, "samr": SAMRGenerator}[network]
    networks = {
        "generator": generator_class(num_sequences=n, **sizes.get("generator", {})),
        "discriminator": LabelWiseMultiScaleDiscriminator(
            in_channels=5 + 4 * n, **sizes.get("discriminator", {})
        ),
        "segmenter": make_lesion_unet(num_sequences=n, **sizes.get("segmenter", {})),
    }
    batch = make_batch(args.batch_size, args.image_size, n, seed=args.seed)
    batch_cl = {k: v.contiguous(memory_format=torch.channels_last) for k, v in batch.items()}
    batch, batch_cl = ({k: v.to(device) for k, v in b.items()} for b in (batch, batch_cl))
    variants = training_variants(args, device)
    steps = {}
    for name, options in variants.items():
        options = dict(options)
        cudnn_benchmark = options.pop("cudnn_benchmark")
        trainer = build_trainer(networks, device, confidence=network == "cgsamr", **options)
        steps[name] = TrainingStep(trainer, batch_cl if options["channels_last"] else batch, cudnn_benchmark)
    first_call, peak_memory = {}, {}
    for name, step in steps.items():  # the first step (compilation, allocator warm-up) timed apart
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak_memory[name] = torch.cuda.max_memory_allocated(device) / 2**30
        first_call[name] = time.perf_counter() - start
    load_before = os.getloadavg()
    times = interleaved_medians(steps, args.repeats, max(args.warmup - 1, 0), device)
    load_after = os.getloadavg()
    naive = statistics.median(times["naive"])
    rows = []
    for name, options in variants.items():
        median = statistics.median(times[name])
        rows.append(
            {
                "network": network,
                "variant": name,
                **options,
                "median_step_s": median,
                "times_s": times[name],
                "first_step_s": first_call[name],
                "samples_per_s": args.batch_size / median,
                "speedup": naive / median,
                "load_avg_1min": [load_before[0], load_after[0]],
                "peak_memory_gib": peak_memory.get(name),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = machine_info(device)
    info["command"] = " ".join([os.path.basename(sys.executable)] + sys.argv)
    logger.info(
        "CG-SAMR training step, batch %d, %d x %d, %s: %d warm-up + %d timed steps per variant",
        args.batch_size,
        args.image_size,
        args.image_size,
        device,
        args.warmup,
        args.repeats,
    )
    rows = bench_training(args, device)
    print(
        f"\nCG-SAMR training step (G + 6 D + U-Net), batch {args.batch_size}, {args.image_size}^2, "
        f"{info['device']} ({info['processor']}, bf16 flags {info['cpu_bf16_flags'] or 'none'}), "
        f"{info['threads']} threads, torch {info['torch']}, {info['date_utc']}\n"
    )
    print("| variant | median s / step | samples / s | speed-up vs naive | first step s | load avg (1 min) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['variant']} | {row['median_step_s']:.2f} | {row['samples_per_s']:.2f} | "
            f"{row['speedup']:.2f}x"
            f" | {row['first_step_s']:.1f} | {row['load_avg_1min'][0]:.1f} -> {row['load_avg_1min'][1]:.1f} |"
        )
    if args.out:
        save_json({"machine": info, "settings": vars(args), "results": rows}, args.out)
        logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
