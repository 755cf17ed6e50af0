"""Benchmark: output error of the optimized inference variants on a TRAINED bundle network and real inputs.

``bench_synthesis.py`` measures speed on random weights; this script checks what the faster variants
cost in accuracy where it matters: the bundle's trained checkpoint, fed with the slices of real
cohort patients, prepared exactly as ``inference.json`` prepares them. The network, checkpoint and
cohort come from the bundle's own ``inference.json`` with the given overrides, so whatever the
bundle was trained with is what is measured.

Per variant it reports, on the [-1, 1] image scale over every pixel of every sequence: the max and
mean absolute difference to the eager float32 network, and the fraction of pixels off by more than
2/255 and by more than 16/255 of the image range (16/255 is the papers' pixel-accuracy threshold).

Usage (after the default training run of the CG-SAMR bundle)::

    python benchmarks/bench_inference_error.py --bundle cg_samr --split all --patients 3 --threads 2 --out
    benchmarks/results/inference_error_cpu.json
    python benchmarks/bench_inference_error.py --bundle cg_samr --override dataset_dir=/data/brats
    output_dir=runs/brats
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from torch import nn

from medsynth.inference.accelerate import optimize_for_inference
from medsynth.utils.bundles import bundle_config_files
from medsynth.utils.io import save_json
from medsynth.utils.logging import setup_logging

logger = logging.getLogger("bench_inference_error")

REPO = Path(__file__).resolve().parents[1]
PAPER_ACCURACY_THRESHOLD = 16 / 255 * 2  # 16 of 255 grey levels, on the [-1, 1] scale


class _InputRecorder(nn.Module):
    """Passes inputs through to ``network`` and keeps a copy of each batch."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.network(x)


def _parse_override(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def real_network_inputs(
    parser: ConfigParser, network: nn.Module, patients: int, split: str
) -> tuple[torch.Tensor, list[str]]:
    """The network inputs ``inference.json`` builds for (at most) the first ``patients`` of ``split``
    (``"all"``: the whole cohort), and those patients' ids: the bundle's own ``preprocessing`` and
    ``inferer`` run with a recorder in place of the network, so the inputs are prepared exactly as in
    a real inference run (orientation, in-plane fitting, atlas scaling, neighbour stacking)."""
    recorder = _InputRecorder(network).eval()
    parser["inferer"]["backend"] = "none"
    parser["splits"] = None if split == "all" else [split]
    preprocessing = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    cases = parser.get_parsed_content("cases")[:patients]
    for case in cases:
        item = preprocessing(dict(case))
        inferer(item["image"][None], recorder)
    return torch.cat(recorder.inputs), [case["case"] for case in cases]


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--bundle", default="cg_samr", help="bundle folder name under bundles/")
    cli.add_argument(
        "--override", nargs="*", default=[], help="inference.json overrides, key=value (JSON values)"
    )
    cli.add_argument("--patients", type=int, default=2, help="patients whose slices are used (at most)")
    cli.add_argument("--split", default="test", help="split the patients come from, or 'all'")
    cli.add_argument(
        "--variants", default="compile/fp32,eager/bf16,compile/bf16", help="comma-separated backend/precision"
    )
    cli.add_argument("--threads", type=int, default=None)
    cli.add_argument("--out", default="", help="JSON output file")
    args = cli.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    os.chdir(REPO)  # the configs' macros name files relative to the repository root
    parser = ConfigParser()
    parser.read_config(bundle_config_files(REPO / "bundles" / args.bundle, "inference"))
    parser.update(dict(_parse_override(text) for text in args.override))
    checkpoint = Path(parser.get_parsed_content("ckpt_path"))
    if not checkpoint.is_file():
        logger.error(
            "no trained checkpoint at %s: train the bundle first (or pass --override output_dir=...)",
            checkpoint,
        )
        return 1
    network = parser.get_parsed_content("network_def").cpu()
    network.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    network.eval()
    x, patient_ids = real_network_inputs(parser, network, args.patients, args.split)
    with torch.inference_mode():
        reference = network(x)
    logger.info("%d real slices of patient(s) %s, checkpoint %s", x.shape[0], patient_ids, checkpoint)

    rows = []
    for variant in args.variants.split(","):
        backend, precision = variant.split("/")
        optimized = optimize_for_inference(
            network, x[: parser["batch_size"]], "cpu", backend=backend, precision=precision
        )
        difference = (optimized(x) - reference).abs()
        rows.append(
            {
                "variant": variant,
                "used": f"{optimized.backend}/{optimized.precision}",
                "max_abs_diff": float(difference.max()),
                "mean_abs_diff": float(difference.mean()),
                "fraction_beyond_2_of_255": float((difference > 2 / 255 * 2).float().mean()),
                "fraction_beyond_16_of_255": float((difference > PAPER_ACCURACY_THRESHOLD).float().mean()),
            }
        )
    print(
        f"\n{args.bundle}, {checkpoint}, {x.shape[0]} slices of {x.shape[-1]}^2 ({len(patient_ids)} "
        f"patient(s)), {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC\n"
    )
    print("| variant (used) | max abs diff | mean abs diff | pixels > 2/255 | pixels > 16/255 |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['variant']} ({row['used']}) | {row['max_abs_diff']:.2e} | {row['mean_abs_diff']:.2e}"
            f" | {row['fraction_beyond_2_of_255']:.1e} | {row['fraction_beyond_16_of_255']:.1e} |"
        )
    if args.out:
        save_json(
            {
                "bundle": args.bundle,
                "checkpoint": str(checkpoint),
                "slices": int(x.shape[0]),
                "patients": len(patient_ids),
                "rows": rows,
            },
            args.out,
        )
        logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
