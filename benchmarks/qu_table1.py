"""Qu et al.'s Table 1 on any cohort: lesion segmenters trained on real data score the *unfiltered*
synthetic data of each lesion-guidance scheme (one segmenter; a shared encoder with one decoder per
modality; one segmenter per modality), against the real test split.

For each scheme, stage 2 of ``bundles/sfm_gan`` is trained with ``lesion_scheme`` set (stage 1 is
trained once and shared); the reference segmenters are the per-modality ones of the
``per_modality`` run, trained on real images only (the generation branch never updates them).
Every scheme's cohort is generated with both filters open, and each case is scored by the reference
segmenters: whole-lesion Dice and the L2 (MSE) between their label probabilities and the one-hot
label, averaged over the sequences. Writes ``OUT/table1.csv`` and ``OUT/table1.md``.

    python benchmarks/qu_table1.py --out runs/qu_table1 [--set num_epochs=2 ...] [--cases 40]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "sfm_gan" / "configs"
SCHEMES = ("single", "shared_encoder", "per_modality")
LABELS = {"single": "1 segmenter", "shared_encoder": "1 encoder + 1 decoder per modality",
          "per_modality": "1 segmenter per modality"}  # fmt: skip


def _run(files: list[Path], overrides: dict) -> None:
    from monai.bundle import run

    run(config_file=[str(f) for f in files], meta_file=str(CONFIGS / "metadata.json"), **overrides)


def _parser(files: list[Path], overrides: dict):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.read_meta(str(CONFIGS / "metadata.json"))
    parser.update(overrides)
    return parser


def score_real(parser, judge_path: Path) -> dict[str, float]:
    """The reference segmenters on the real test split's lesion slices: Dice and MSE, mean over sequences."""
    from medsynth.data.dataset import make_slice_dataset
    from medsynth.losses.qu import soft_label_loss
    from medsynth.synthetic.gates import lesion_dice

    segmenters = parser.get_parsed_content("segmenters_def")
    segmenters.load_state_dict(torch.load(judge_path, map_location="cpu", weights_only=True)["segmenters"])
    segmenters.eval()
    manifest, size = parser.get_parsed_content("manifest"), parser.get_parsed_content("image_size")
    dataset = make_slice_dataset(manifest, "test", image_size=size, slice_selection="lesion", cache="none")
    dice, mse = [], []
    with torch.no_grad():
        for index in range(len(dataset)):
            item = dataset[index]
            image, onehot = item["image"][None].float(), item["mask"][None].float()
            logits = [segmenters.segment(image[:, i : i + 1], i) for i in range(image.shape[1])]
            dice.append(np.mean([lesion_dice(x.argmax(1), onehot.argmax(1)) for x in logits]))
            mse.append(np.mean([float(soft_label_loss(x, onehot)) for x in logits]))
    return {"data": "real (test split)", "slices": len(dataset), "MSE": float(np.mean(mse)),
            "Dice": float(np.mean(dice))}  # fmt: skip


def main() -> None:
    from medsynth.utils.bundles import parse_overrides

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/qu_table1"))
    parser.add_argument("--cases", type=int, default=40, help="unfiltered synthetic cases per scheme")
    parser.add_argument("--set", nargs="*", default=[], help="bundle overrides ID=VALUE (both stages)")
    args = parser.parse_args()
    os.chdir(REPO)
    common = {"cache_dir": "runs/cache", **parse_overrides(args.set)}
    out = args.out.resolve()
    structure_dir = out / "structure"
    if not (structure_dir / "models" / "structure.pt").is_file():
        _run([CONFIGS / "train_structure.json"], {**common, "output_dir": str(structure_dir)})
    rows = []
    for scheme in SCHEMES:
        run_dir = out / scheme
        (run_dir / "models").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(structure_dir / "models" / "structure.pt", run_dir / "models" / "structure.pt")
        if not (run_dir / "models" / "generation.pt").is_file():
            _run([CONFIGS / "train.json"], {**common, "output_dir": str(run_dir), "lesion_scheme": scheme})
    judge_path = out / "per_modality" / "models" / "generation.pt"
    reference = _parser([CONFIGS / "train.json"], {**common, "output_dir": str(out / "per_modality")})
    rows.append({"scheme": "-", **score_real(reference, judge_path)})
    for scheme in SCHEMES:
        files = [CONFIGS / "train.json", CONFIGS / "synthesize.json"]
        settings = {
            **common,
            "output_dir": str(out / scheme),
            "lesion_scheme": scheme,
            "synthetic_dir": str(out / scheme / "unfiltered"),
            "num_cases": args.cases,
            "structure_filter_mae": 1.01,
            "dice_threshold": 0.0,
            "judge_def": {
                "_target_": "medsynth.networks.LesionSegmenters",
                "num_modalities": "@num_sequences",
                "num_classes": 5,
                "scheme": "per_modality",
                "features": "@segmenter_features",
            },  # fmt: skip
            "judge_path": str(judge_path),
        }
        summary = _parser(files, settings).get_parsed_content("builder").run()
        dice = summary["mean_dice_reaching_the_filter"] or {}
        rows.append({"scheme": LABELS[scheme], "data": "synthetic, unfiltered", "slices": summary["accepted"],
                     "MSE": summary["mean_label_mse_reaching_the_filter"],
                     "Dice": float(np.mean(list(dice.values()))) if dice else float("nan")})  # fmt: skip
    from medsynth.metrics.tables import to_markdown

    table = pd.DataFrame(rows).set_index("scheme")
    table.to_csv(out / "table1.csv")
    caption = "Table 1: segmenters trained on real data score each scheme"
    markdown = to_markdown(table.round(3), caption=caption)
    (out / "table1.md").write_text(markdown + "\n")
    (out / "table1_settings.json").write_text(
        json.dumps({"cases": args.cases, "overrides": common}, indent=2)
    )
    print(markdown)


if __name__ == "__main__":
    main()
