"""``medsynth compare``: the synthesis methods side by side on one test split (CG-SAMR Tables I and
V, Fig. 6).

Every run is a training output folder and the bundle that trained it (``RUN=BUNDLE``; an ablation
is ``RUN=bundles/cg_samr/configs/ablations/<name>.json``, CG-SAMR with that override). The runs must
come from the same cohort and split: their model atlases (``models/atlas.json``, built from the
training patients) must be one atlas, and every evaluation must score the same patients. Each run
is evaluated with its bundle's ``evaluate`` workflow into ``OUT/<run>/`` (the run folders are not
touched; a finished evaluation of the same dataset and split is read back), and then:

* ``table1.{csv,md}``: Table I side by side (lesion pixel accuracy per class, SSIM, PSNR and the
  brain columns per sequence, one column group per method), with the project's table writer;
* ``table5.{csv,md}``: Table V's layout, the pixel accuracy in the whole lesion (edema, cavity and
  tumour together) per sequence and method, from the per-case counts;
* ``table4.{csv,md}``: for unpaired models (UCG-SAMR, CycleGAN, UNIT, SynSeg-Net), whose
  evaluation also scores the images -> mask direction, Table IV side by side (Dice, HD95,
  sensitivity, specificity per lesion class); Table I of those runs is the paper's Table III;
* ``fig6.png``: the same mask through every method next to the real images, with a zoomed lesion
  box and each method's absolute-error map.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medsynth.utils.hashing import file_digest
from medsynth.utils.io import require_writable_folder, save_json

logger = logging.getLogger(__name__)

__all__ = ["ComparedRun", "compare_runs", "lesion_accuracy_table", "parse_run"]

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BUNDLE = "bundles/cg_samr"
LESION_CLASSES = ("Edema", "Cavity", "Tumor")


@dataclass(frozen=True)
class ComparedRun:
    """A trained run and the bundle (plus an optional override file) that trained it."""

    name: str
    run_dir: Path
    bundle: Path
    override: Path | None = None

    def config_files(self, workflow: str) -> list[str]:
        from medsynth.utils.bundles import bundle_config_files

        files = bundle_config_files(self.bundle, workflow)
        if self.override is not None:
            files.insert(1, str(self.override))  # an ablation goes right after the base's first config
        return files


def parse_run(spec: str) -> ComparedRun:
    """``RUN_DIR``, ``RUN_DIR=BUNDLE_DIR`` or ``RUN_DIR=OVERRIDE.json`` (CG-SAMR with that override)."""
    run_text, _, bundle_text = spec.partition("=")
    run_dir = Path(run_text)
    if not (run_dir / "models" / "model.pt").is_file():
        raise FileNotFoundError(f"run {run_dir}: no trained model (models/model.pt); train it first")
    bundle, override = Path(bundle_text or REPO / DEFAULT_BUNDLE), None
    if bundle.suffix == ".json":
        if not bundle.is_file():
            raise FileNotFoundError(f"run {run_dir}: override file {bundle} not found")
        bundle, override = REPO / DEFAULT_BUNDLE, bundle
    if not (bundle / "configs" / "metadata.json").is_file():
        raise FileNotFoundError(f"run {run_dir}: {bundle} is not a bundle (no configs/metadata.json)")
    return ComparedRun(run_dir.name, run_dir, bundle, override)


def _training_atlas(run: ComparedRun) -> tuple[str, str]:
    """The fingerprint and source folder of the run's model atlas (its training cohort and split)."""
    path = run.run_dir / "models" / "atlas.json"
    if not path.is_file():
        raise FileNotFoundError(f"run {run.run_dir}: no models/atlas.json, so its training cohort is unknown")
    record = json.loads(path.read_text())
    sources = sorted({str(Path(p).parent) for p in record.get("source", {}).values()})
    return str(record.get("fingerprint")), ", ".join(sources)


def _require_same_training(runs: list[ComparedRun]) -> None:
    atlases = {run.name: _training_atlas(run) for run in runs}
    first_name, first = next(iter(atlases.items()))
    for name, atlas in atlases.items():
        if atlas[0] != first[0]:
            raise ValueError(
                f"runs {first_name} and {name} were trained on different cohorts or splits: their model "
                f"atlases differ (fingerprint {first[0]} from {first[1]}; {atlas[0]} from {atlas[1]})"
            )


def _evaluate(run: ComparedRun, out: Path, dataset_dir: str | None, split: str, overrides: dict) -> Path:
    """Run's evaluation of ``split`` into ``out`` (read back when it is there for the same data)."""
    from monai.bundle import run as run_bundle

    cases = out / f"table1_{split}_cases.csv"
    weights = run.run_dir / "models" / "model.pt"
    # What the evaluation depends on: a finished one is read back only while all of it is unchanged.
    record = {
        "weights": file_digest(weights),
        "config_files": run.config_files("evaluate"),
        "dataset": dataset_dir or "",
        "split": split,
        "overrides": overrides,
    }
    record_path = out / "compare_evaluation.json"
    if cases.is_file() and record_path.is_file() and json.loads(record_path.read_text()) == record:
        return out
    settings: dict[str, Any] = {"output_dir": str(run.run_dir), "eval_split": split, "eval_dir": str(out)}
    if dataset_dir is not None:
        settings["dataset_dir"] = dataset_dir
    run_bundle(config_file=run.config_files("evaluate"), **settings, **overrides)
    save_json(record, record_path)
    return out


def lesion_accuracy_table(cases: pd.DataFrame) -> pd.Series:
    """Table V's number per sequence: the percentage of correct pixels in the whole lesion (edema,
    cavity and tumour pixels pooled over every case), from an evaluation's per-case counts."""
    correct = sum(cases[f"{name}_correct"] for name in LESION_CLASSES)
    pixels = sum(cases[f"{name}_pixels"] for name in LESION_CLASSES)
    frame = pd.DataFrame({"sequence": cases["sequence"], "correct": correct, "pixels": pixels})
    totals = frame.groupby("sequence", sort=False)[["correct", "pixels"]].sum()
    accuracy = 100.0 * totals["correct"] / totals["pixels"].where(totals["pixels"] > 0)
    accuracy["Avg."] = accuracy.mean()
    return accuracy


def compare_runs(
    specs: list[str],
    out_dir: str | os.PathLike,
    dataset_dir: str | None = None,
    split: str = "test",
    overrides: dict | None = None,
    figure: bool = True,
) -> dict[str, Path]:
    """Evaluate ``specs`` (see :func:`parse_run`) on one split and write the comparison (module
    docstring); returns the written files by name."""
    from medsynth.metrics.tables import to_markdown, write_comparison_table
    from medsynth.utils.io import save_text

    runs = [parse_run(spec) for spec in specs]
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"two runs share a folder name {names}; give each method its own folder name")
    _require_same_training(runs)
    out = require_writable_folder(out_dir, "comparison folder")
    evaluations = {
        run.name: _evaluate(run, out / run.name, dataset_dir, split, overrides or {}) for run in runs
    }
    case_sets = {
        name: set(pd.read_csv(path / f"table1_{split}_cases.csv")["case"])
        for name, path in evaluations.items()
    }
    first = next(iter(case_sets.values()))
    for name, cases in case_sets.items():
        if cases != first:
            raise ValueError(
                f"run {name} was scored on other patients than {names[0]} ({sorted(cases ^ first)[:5]}): "
                "compare needs one split of one cohort"
            )
    tables = {
        name: pd.read_csv(path / f"table1_{split}.csv", index_col=0) for name, path in evaluations.items()
    }
    written = write_comparison_table(
        tables, out, "table1", caption=f"Table I: {split} split, {len(first)} patient(s)"
    )
    written = {f"table1_{kind}": path for kind, path in written.items()}
    lesion = pd.DataFrame(
        {
            name: lesion_accuracy_table(pd.read_csv(path / f"table1_{split}_cases.csv"))
            for name, path in evaluations.items()
        }
    ).T.round(1)
    lesion.columns = list(next(iter(tables.values())).index)  # the sequences' display names, then Avg.
    lesion.index.name = "Method"
    lesion.to_csv(out / "table5.csv")
    caption = "Lesion pixel accuracy (%), Table V layout"
    shown = lesion.map(lambda value: f"{value:.1f}")  # the papers' one decimal for every sequence
    save_text(to_markdown(shown, caption=caption) + "\n", out / "table5.md")
    written.update(table5_csv=out / "table5.csv", table5_md=out / "table5.md")
    # Table IV (the unpaired models' masks from images), side by side where the evaluations wrote it.
    masks = {
        name: pd.read_csv(path / f"table4_{split}.csv", index_col=0)
        for name, path in evaluations.items()
        if (path / f"table4_{split}.csv").is_file()
    }
    if masks:
        caption = f"Table IV: lesion masks from images, {split} split, {len(first)} patient(s)"
        table4 = write_comparison_table(masks, out, "table4", caption=caption)
        written.update({f"table4_{kind}": path for kind, path in table4.items()})
    if figure:
        written["fig6"] = comparison_figure(runs, out / "fig6.png", dataset_dir, split, overrides or {})
    save_json({"runs": [str(r.run_dir) for r in runs], "split": split, "dataset": dataset_dir or ""},
              out / "compare.json")  # fmt: skip
    logger.info("compared %d run(s) on the %s split: %s", len(runs), split, out)
    return written


def _evaluation_parser(run: ComparedRun, dataset_dir: str | None, split: str, overrides: dict):
    """The run's ``evaluate`` config, set up as :func:`_evaluate` runs it."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(run.config_files("evaluate"))
    settings = {"output_dir": str(run.run_dir), "eval_split": split, **overrides}
    if dataset_dir is not None:
        settings["dataset_dir"] = dataset_dir
    parser.update(settings)
    return parser


def comparison_figure(
    runs: list[ComparedRun], path: Path, dataset_dir: str | None, split: str, overrides: dict
) -> Path:
    """Fig. 6 of CG-SAMR: the slice with the most lesion of the split, real images on top, every
    method's synthesis below, each sequence with a zoomed lesion box and the absolute error."""
    from medsynth.utils.checkpoints import load_checked_weights
    from medsynth.visualize.figures import save_grid

    parsers = {run.name: _evaluation_parser(run, dataset_dir, split, overrides) for run in runs}
    networks = {
        run.name: load_checked_weights(
            parsers[run.name].get_parsed_content("network_def"), run.run_dir / "models" / "model.pt"
        ).eval()
        for run in runs
    }
    # One cohort and split for all runs (checked): its slices are loaded once, from the config of a run
    # whose network takes tissue maps (Shin et al.) if there is one, so that the items carry them.
    takes_tissue = {name: bool(getattr(network, "tissue_maps", False)) for name, network in networks.items()}
    source = next((name for name, wanted in takes_tissue.items() if wanted), runs[0].name)
    dataset = parsers[source].get_parsed_content("validate#dataset")
    sequences = parsers[source].get_parsed_content("sequences")
    lesion = [int((dataset[i]["label"] >= 2).sum()) for i in range(len(dataset))]
    item = dataset[int(np.argmax(lesion))]
    real = item["image"].numpy()
    rows, titles, overlays = [], [], []
    box = _lesion_box(item["label"][0].numpy())
    with torch.no_grad():
        synthesised = {}
        for name, network in networks.items():
            x = torch.cat([item["mask"], item["atlas"], *([item["tissue"]] if takes_tissue[name] else [])])
            synthesised[name] = network(x[None])[0, : len(sequences)].float().numpy()
    for name, images in [("real", real), *synthesised.items()]:
        row, overlay = [], []
        for channel in range(len(sequences)):
            error = None if name == "real" else np.abs(images[channel] - real[channel])
            row += [images[channel], images[channel][box], error]
            overlay += [item["label"][0].numpy() if name == "real" else None, None, None]
        rows.append(row)
        overlays.append(overlay)
        titles.append(name)
    columns = [f"{s} {kind}" for s in sequences for kind in ("", "lesion box", "|error|")]
    ranges = [(-1.0, 1.0), (-1.0, 1.0), (0.0, 1.0)] * len(sequences)
    cmaps = ["gray", "gray", "magma"] * len(sequences)
    return save_grid(rows, path, row_titles=titles, col_titles=columns, vranges=ranges, cmaps=cmaps,
                     overlays=overlays, title=f"{item['patient_id']}, slice {item['slice_index']}",
                     panel_size=1.6)  # fmt: skip


def _lesion_box(label: np.ndarray, margin: int = 6) -> tuple[slice, slice]:
    """The lesion's bounding box grown by ``margin`` pixels (the whole slice without a lesion)."""
    where = np.argwhere(label >= 2)
    if where.size == 0:
        return slice(None), slice(None)
    low = np.maximum(where.min(axis=0) - margin, 0)
    high = np.minimum(where.max(axis=0) + margin + 1, label.shape)
    return slice(low[0], high[0]), slice(low[1], high[1])
