"""``medsynth study STUDY.json``: the papers' augmentation study as one resumable command.

A study file (JSON) lists the arms, the seeds, the segmentation settings and the dataset::

    {
      "name": "phantom_demo", "dataset_dir": "", "cache_dir": "runs/cache",
      "out_dir": "runs/studies/phantom_demo", "seeds": [0, 1, 2], "split_seed": 0,
      "reference_arm": "real",
      "segmentation": {"bundle": "bundles/lesion_seg", "overrides": {"num_epochs": 100}},
      "synthesis": {"cg_samr": {"bundle": "bundles/cg_samr", "output_dir": "runs/cg_samr", "cases": 50}},
      "arms": [
        {"name": "real"},
        {"name": "cg_samr_25", "method": "cg_samr", "percent": 25, "mode": "random"},
        {"name": "classic_50", "classic": true, "percent": 50},
        {"name": "cg_samr_50_conf", "method": "cg_samr", "percent": 50, "confidence_weighted": true}
      ]
    }

A synthesis method with ``"workflow": "synthesize"`` makes its cohort from noise through
``bundles/sfm_gan`` (Qu et al.) instead of ``medsynth augment``.

The runner expands arms x seeds into cells; makes each synthetic cohort once per method and seed
(``medsynth augment`` through the synthesis bundle, its draws seeded by the seed, from the training
split of ``split_seed``, the split the synthesis model was trained on); trains and evaluates the
lesion-segmentation bundle per cell, each in ``out_dir/cells/<arm>/seed<k>/``, on the real test
split; and aggregates (:mod:`.aggregate`) into ``out_dir/report/``. A cell is finished when its
``cell.json`` exists: a killed study reruns only the unfinished cells (and those resume from their
checkpoints). Cells run on Dask workers with ``workers > 1`` or a scheduler address.
:func:`score_cohort` (``medsynth study STUDY.json --score-cohort DIR``) scores every case of another
cohort with the finished cells' models and reports it the same way.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from medsynth.utils.io import require_writable_folder, save_json
from medsynth.utils.parallel import start_client

logger = logging.getLogger(__name__)

__all__ = ["Cell", "StudySpec", "cell_folder", "cell_overrides", "expand_cells", "run_study", "score_cohort"]

REPO = Path(__file__).resolve().parents[2]
CELL_RECORD = "cell.json"


@dataclass
class StudySpec:
    """A study file's content (see the module docstring)."""

    name: str
    arms: list[dict]
    seeds: list[int]
    dataset_dir: str = ""
    cache_dir: str = "runs/cache"
    out_dir: str = ""
    split_seed: int = 0
    reference_arm: str = "real"
    segmentation: dict = field(default_factory=dict)
    synthesis: dict = field(default_factory=dict)
    source: str = ""

    @classmethod
    def read(cls, path: str | os.PathLike) -> StudySpec:
        path = Path(path)
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"study file {path}: {error}") from error
        missing = [key for key in ("name", "arms", "seeds") if key not in record]
        if missing:
            raise ValueError(f"study file {path}: missing {missing}")
        unknown = set(record) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"study file {path}: unknown entries {sorted(unknown)}")
        spec = cls(**record, source=str(path))
        spec.out_dir = spec.out_dir or str(Path("runs") / "studies" / spec.name)
        spec.check()
        return spec

    def check(self) -> None:
        names = [arm.get("name") for arm in self.arms]
        if None in names or len(set(names)) != len(names):
            raise ValueError(f"study {self.name}: every arm needs a unique name, got {names}")
        for arm in self.arms:
            method = arm.get("method")
            if method and method not in self.synthesis:
                raise ValueError(
                    f"study {self.name}: arm {arm['name']} uses method {method!r}, not in 'synthesis'"
                )
            if (method or arm.get("classic")) and ("percent" in arm) == ("multiple" in arm):
                raise ValueError(
                    f"study {self.name}: arm {arm['name']} needs exactly one of percent or multiple"
                )
            if arm.get("confidence_weighted") and not method:
                raise ValueError(
                    f"study {self.name}: arm {arm['name']} is confidence-weighted but has no synthesis method"
                )
        if self.reference_arm not in names:
            raise ValueError(f"study {self.name}: the reference arm {self.reference_arm!r} is not an arm")


@dataclass
class Cell:
    """One arm at one seed."""

    arm: dict
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arm['name']}/seed{self.seed}"

    @property
    def amount(self) -> float:
        return float(self.arm.get("percent", self.arm.get("multiple", 0.0)))


def expand_cells(spec: StudySpec) -> list[Cell]:
    """Arms x seeds, arm-major."""
    return [Cell(arm, int(seed)) for arm in spec.arms for seed in spec.seeds]


def _bundle_files(bundle: str, workflow: str) -> list[str]:
    from medsynth.utils.bundles import bundle_config_files

    return bundle_config_files(REPO / bundle, workflow)


# How a synthesis workflow is driven: the id that builds the cohort, the ids of its folder and
# seed, and the summary it writes. "augment": a mask-to-image bundle's `medsynth augment` (new masks
# from training patients); "synthesize": bundles/sfm_gan's cases from noise (Qu et al.).
SYNTHESIS_WORKFLOWS: dict[str, tuple[str, str, str, str]] = {
    "augment": ("augmenter", "augment_dir", "augment_seed", "augment_summary.json"),
    "synthesize": ("builder", "synthetic_dir", "synthesis_seed", "noise_summary.json"),
}


def make_synthetic_cohort(spec: StudySpec, method: str, seed: int) -> str:
    """The synthetic cohort of ``method`` at ``seed`` (made once; both cohort builders resume themselves).

    The method's ``workflow`` (:data:`SYNTHESIS_WORKFLOWS`, default ``"augment"``) says which.
    """
    from monai.bundle import ConfigParser

    settings = spec.synthesis[method]
    workflow = settings.get("workflow", "augment")
    if workflow not in SYNTHESIS_WORKFLOWS:
        raise ValueError(
            f"synthesis {method}: unknown workflow {workflow!r}; known: {sorted(SYNTHESIS_WORKFLOWS)}"
        )
    builder_id, folder_id, seed_id, summary_name = SYNTHESIS_WORKFLOWS[workflow]
    out = Path(spec.out_dir) / "synthetic" / f"{method}_seed{seed}"
    if (out / summary_name).is_file():
        summary = json.loads((out / summary_name).read_text())
        if summary.get("accepted", 0) >= int(settings.get("cases", 50)):
            return str(out)
    bundle = settings.get("bundle", "bundles/cg_samr")
    parser = ConfigParser()
    parser.read_config(_bundle_files(bundle, workflow))
    parser.read_meta(str(REPO / bundle / "configs" / "metadata.json"))
    parser.update(
        {
            "output_dir": settings["output_dir"],
            "dataset_dir": spec.dataset_dir,
            "cache_dir": spec.cache_dir,
            folder_id: str(out),
            seed_id: seed,
            "num_cases": int(settings.get("cases", 50)),
            **settings.get("overrides", {}),
        }
    )
    parser.get_parsed_content(builder_id).run()
    return str(out)


def cell_folder(spec: StudySpec, cell: Cell) -> Path:
    """``out_dir/cells/<arm>/seed<k>``: the cell's training run."""
    return Path(spec.out_dir) / "cells" / cell.arm["name"] / f"seed{cell.seed}"


def cell_overrides(spec: StudySpec, cell: Cell, synthetic_dir: str = "") -> dict[str, Any]:
    """The segmentation bundle's settings of ``cell`` (its training and every evaluation of it)."""
    overrides: dict[str, Any] = {
        "output_dir": str(cell_folder(spec, cell)),
        "dataset_dir": spec.dataset_dir,
        "cache_dir": spec.cache_dir,
        "seed": cell.seed,
        "split_seed": spec.split_seed,
        **spec.segmentation.get("overrides", {}),
    }
    if synthetic_dir:
        overrides["synthetic_dir"] = synthetic_dir
    if cell.arm.get("classic"):
        overrides["classic_augmentation"] = True
    if cell.arm.get("confidence_weighted"):
        overrides["confidence_weighting"] = True
    if "percent" in cell.arm:
        overrides["synthetic_percent"] = float(cell.arm["percent"])
    if "multiple" in cell.arm:
        overrides["synthetic_multiple"] = float(cell.arm["multiple"])
    overrides["mixing_mode"] = cell.arm.get("mode", "random")
    if "real_fraction" in cell.arm:
        overrides["real_fraction"] = float(cell.arm["real_fraction"])
    return overrides


def _segmentation_bundle(spec: StudySpec) -> tuple[str, str]:
    """The segmentation bundle folder and its metadata file."""
    bundle = spec.segmentation.get("bundle", "bundles/lesion_seg")
    return bundle, str(REPO / bundle / "configs" / "metadata.json")


def run_cell(spec: StudySpec, cell: Cell, synthetic_dir: str = "") -> dict[str, Any]:
    """Train and evaluate the segmentation bundle for ``cell`` (or read back its finished record)."""
    from monai.bundle import run

    folder = cell_folder(spec, cell)
    record_path = folder / CELL_RECORD
    if record_path.is_file():
        return json.loads(record_path.read_text())
    start = time.perf_counter()
    bundle, meta = _segmentation_bundle(spec)
    overrides = cell_overrides(spec, cell, synthetic_dir)
    run(config_file=_bundle_files(bundle, "train"), meta_file=meta, **overrides)
    run(config_file=_bundle_files(bundle, "evaluate"), meta_file=meta, **overrides)
    record = {
        "arm": cell.arm["name"],
        "seed": cell.seed,
        "method": cell.arm.get("method") or ("classic" if cell.arm.get("classic") else "none"),
        "amount": cell.amount,
        "mode": overrides["mixing_mode"],
        "confidence_weighted": bool(cell.arm.get("confidence_weighted", False)),
        "synthetic_dir": synthetic_dir,
        "cases_csv": str(folder / "eval" / "segmentation_test_cases.csv"),
        "seconds": round(time.perf_counter() - start, 1),
    }
    save_json(record, record_path)
    return record


def score_cohort(
    study_file: str | os.PathLike,
    dataset_dir: str,
    cells: Sequence[str] | None = None,
    out_dir: str | None = None,
    progress: bool = True,
) -> Path:
    """Score every case of the cohort ``dataset_dir`` with the models of the study's finished cells
    (``cells``: names such as ``real/seed0``; default all), as the external evaluation of the synthesis
    models does: each cell's rows go to ``<cell>/eval_<cohort>_<digest>/``, the study's table, intervals and
    page to ``out_dir/report_<cohort>_<digest>/`` (the digest of the resolved path keeps cohorts of one
    name apart). Cells already scored are read back."""
    from monai.bundle import run

    from medsynth.studies.aggregate import collect_cases, study_table, write_report

    spec = StudySpec.read(study_file)
    if out_dir:
        spec.out_dir = out_dir
    from medsynth.utils.hashing import parts_digest

    # The folder name and a digest of the resolved path: two cohorts of one name never share results.
    resolved = str(Path(dataset_dir).resolve()) if dataset_dir else "phantom"
    cohort = f"{Path(dataset_dir).name or 'phantom'}_{parts_digest(resolved, length=8)}"
    chosen = [cell for cell in expand_cells(spec) if cells is None or cell.name in set(cells)]
    unknown = sorted(set(cells or ()) - {cell.name for cell in chosen})
    if unknown:
        raise ValueError(f"study {spec.name}: no cell(s) {unknown}; cells are named like 'real/seed0'")
    bundle, meta = _segmentation_bundle(spec)
    records = []
    for cell in tqdm(chosen, desc=f"scoring {cohort}", disable=not progress):
        record_path = cell_folder(spec, cell) / CELL_RECORD
        if not record_path.is_file():
            raise ValueError(f"study {spec.name}: cell {cell.name} has not finished; run the study first")
        record = json.loads(record_path.read_text())
        eval_dir = cell_folder(spec, cell) / f"eval_{cohort}"
        cases = eval_dir / "segmentation_all_cases.csv"
        if not cases.is_file():
            overrides = {
                **cell_overrides(spec, cell, record.get("synthetic_dir", "")),
                "eval_dataset_dir": dataset_dir,
                "eval_split": "all",
                "eval_dir": str(eval_dir),
            }
            run(config_file=_bundle_files(bundle, "evaluate"), meta_file=meta, **overrides)
        records.append({**record, "cases_csv": str(cases)})
    table = study_table(collect_cases(records), spec.reference_arm)
    config = {key: getattr(spec, key) for key in spec.__dataclass_fields__}
    config["scored_cohort"] = dataset_dir
    title = f"Study {spec.name}: models scored on {dataset_dir}"
    return write_report(table, Path(spec.out_dir) / f"report_{cohort}", title, config, _versions())


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("medsynth", "monai", "torch", "numpy", "pytorch-ignite", "nibabel", "scipy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def run_study(
    study_file: str | os.PathLike,
    out_dir: str | None = None,
    workers: int = 1,
    scheduler: str | None = None,
    progress: bool = True,
) -> Path:
    """Run (or continue) a study; returns its report page (``out_dir/report/index.html``)."""
    from medsynth.studies.aggregate import collect_cases, study_table, write_report

    spec = StudySpec.read(study_file)
    if out_dir:
        spec.out_dir = out_dir
    require_writable_folder(spec.out_dir, "study folder")
    start = time.perf_counter()
    cells = expand_cells(spec)
    methods = sorted({(c.arm["method"], c.seed) for c in cells if c.arm.get("method")})
    synthetic = {}
    for method, seed in tqdm(methods, desc="synthetic cohorts", disable=not progress or not methods):
        synthetic[(method, seed)] = make_synthetic_cohort(spec, method, seed)
    jobs = [(cell, synthetic.get((cell.arm.get("method"), cell.seed), "")) for cell in cells]
    records: list[dict] = []
    with ExitStack() as stack:
        client = start_client(stack, workers, scheduler)
        if client is None:
            for cell, synthetic_dir in tqdm(jobs, desc="study cells", disable=not progress):
                records.append(run_cell(spec, cell, synthetic_dir))
        else:
            futures = [client.submit(run_cell, spec, cell, sd, pure=False) for cell, sd in jobs]
            records = client.gather(futures)
    table = study_table(collect_cases(records), spec.reference_arm)
    config = {key: getattr(spec, key) for key in spec.__dataclass_fields__}
    page = write_report(table, Path(spec.out_dir) / "report", f"Study {spec.name}", config, _versions())
    logger.info(
        "study %s: %d cells in %.0f s (this run); report %s",
        spec.name,
        len(records),
        time.perf_counter() - start,
        page,
    )
    return page
