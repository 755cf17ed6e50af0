"""Cohort runner: every patient folder of a raw cohort to the layout and manifest the data layer reads.

Patients are independent until the Nyúl fit and the atlas, which use the train split only; the
splits are drawn (:func:`medsynth.data.manifest.split_patients`) before either. Per-patient work is
handed to a Dask distributed cluster (an existing scheduler, or a ``LocalCluster`` of single-thread
worker processes; ``workers=1`` runs in-process for debugging). A failing patient is recorded and
the others go on; the run is resumable because every step is (see :mod:`preprocessing.pipeline`).

Output layout (``OUT``)::

    manifest.csv  nyul_landmarks.json  timings.csv  timings.json  failures.json
    atlas/atlas_<seq>.nii.gz
    <pid>/<pid>_<seq>.nii.gz  <pid>_brainmask.nii.gz  [<pid>_label.nii.gz]  <pid>_atlas_<seq>.nii.gz
    <pid>/<pid>_tissue_{csf,gm,wm}.nii.gz    (with tissue_maps: ANTs Atropos, lesion excluded)
    <pid>/work/<step>/...     (intermediate files and step markers)
    qc/index.html  qc/<pid>_montage.png  qc/<pid>_histograms.png
    bids_derivatives/...      (the final files as a BIDS derivatives dataset: preprocessing.bids)

The input is a folder of patient folders (named sequences, or raw DICOM exams whose series get their
roles from the headers: :mod:`preprocessing.roles`) or a BIDS raw dataset (:mod:`preprocessing.bids`).
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from medsynth.constants import (
    CLINICAL_SEQUENCES,
    MANIFEST_BRAIN_MASK_COLUMN,
    MANIFEST_LABEL_COLUMN,
    TISSUE_COLUMNS,
    atlas_column,
    tissue_column,
)
from medsynth.data.manifest import DEFAULT_SPLIT_FRACTIONS, split_patients, write_manifest
from medsynth.utils.io import require_writable_folder, save_json
from medsynth.utils.parallel import start_client
from preprocessing.pipeline import (
    ANATOMICAL_SEQUENCES,
    Exam,
    PipelineConfig,
    discover_exam,
    final_paths,
    preprocess_patient,
    run_step,
    standardize_patient,
    work_dir,
)

logger = logging.getLogger(__name__)

__all__ = ["CohortConfig", "CohortResult", "list_patient_folders", "list_sources", "run_cohort"]


@dataclass
class CohortConfig:
    """Cohort-level settings (plain types).

    Attributes:
        pipeline: per-patient settings.
        split_fractions: train/val/test fractions.
        workers: Dask worker processes (1: run in this process).
        scheduler: address of an existing Dask scheduler (overrides ``workers``).
        atlas_transform: ``Rigid``, ``Affine`` or ``SyN``.
        atlas_iterations: template-update iterations.
        nyul_percentiles: Nyúl landmark percentiles.
        nyul_range: Nyúl standard scale.
        qc: write the QC figures and page.
        progress: show progress bars.
        drop_incomplete_sequences: a sequence some patients lack is left out of the whole cohort (said
            once) instead of those patients being refused.
        tissue_maps: also make the CSF, grey- and white-matter probability maps (ANTs Atropos inside
            the brain mask, lesion excluded; :mod:`preprocessing.tissue`), the input of Shin et al.
        bids_aptw_entity: with a BIDS input, the entity (``key-value``) that marks the APTw files.
        bids_session: with a BIDS input, the session of subjects that have several.
        bids_derivatives: also write ``OUT/bids_derivatives`` (:mod:`preprocessing.bids`).
    """

    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS
    workers: int = 1
    scheduler: str | None = None
    atlas_transform: str = "Affine"
    atlas_iterations: int = 2
    nyul_percentiles: tuple[float, ...] = (1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99)
    nyul_range: tuple[float, float] = (0.0, 100.0)
    qc: bool = True
    progress: bool = True
    tissue_maps: bool = False
    drop_incomplete_sequences: bool = False
    bids_aptw_entity: str = "acq-APT"
    bids_session: str | None = None
    bids_derivatives: bool = True


@dataclass
class CohortResult:
    """What :func:`run_cohort` produced."""

    manifest: Path | None
    failures: dict[str, str]
    timings: Path
    qc_page: Path | None
    patients: list[str]


def list_patient_folders(input_dir: str | os.PathLike) -> list[Path]:
    """Sub-folders of ``input_dir`` (one per patient), sorted; hidden folders skipped."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input folder does not exist: {input_dir}")
    folders = sorted(p for p in input_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise FileNotFoundError(f"no patient folders in {input_dir}")
    return folders


# -- tasks run on the workers (top-level functions: picklable) -------------------------------------
def _guarded(task: Callable[..., Any], patient_id: str, *args) -> dict[str, Any]:
    """Run one patient's task; an exception becomes a failure record instead of stopping the cohort."""
    try:
        return {"patient_id": patient_id, "ok": True, "result": task(*args)}
    except Exception as err:  # noqa: BLE001 - isolation is the point
        logger.error("patient %s failed: %s", patient_id, err)
        return {
            "patient_id": patient_id,
            "ok": False,
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(),
        }


def _stage_preprocess(source: str | Exam, out_dir: str, config: PipelineConfig) -> dict[str, Any]:
    exam = source if isinstance(source, Exam) else discover_exam(source, config.label_globs)
    return preprocess_patient(exam, out_dir, config)


def list_sources(input_dir: Path, config: CohortConfig) -> tuple[dict[str, str | Exam], dict[str, str]]:
    """Patient id -> its source (a patient folder, or a BIDS subject's exam), and the unreadable ones."""
    from preprocessing.bids import bids_exams, is_bids_dataset

    if is_bids_dataset(input_dir):
        exams, problems = bids_exams(
            input_dir, config.bids_aptw_entity, config.bids_session, config.pipeline.label_globs
        )
        logger.info("BIDS dataset: %d subject(s) read, %d refused", len(exams), len(problems))
        return {e.patient_id: e for e in exams}, problems
    return {f.name: str(f) for f in list_patient_folders(input_dir)}, {}


def _stage_finalize(
    summary: dict,
    out_dir: str,
    landmarks: str,
    atlas_files: dict[str, str],
    atlas_transform: str,
    seed: int,
    qc: bool,
    tissue_maps: bool = False,
) -> dict[str, Any]:
    import nibabel as nib

    from medsynth.utils.io import save_nifti
    from preprocessing.atlas import choose_primary, warp_atlas_to_patient

    pid = summary["patient_id"]
    standardized = standardize_patient(summary, out_dir, landmarks)
    final = standardized["outputs"]
    steps = [summary["steps"], [standardized["step"]]]
    paths = final_paths(out_dir, pid, summary["sequences"])
    atlas_seqs = [s for s in atlas_files if s in summary["sequences"]]
    primary = choose_primary(atlas_seqs) if atlas_seqs else None
    if tissue_maps:
        rec = _tissue_step(pid, out_dir, summary["sequences"], final, seed)
        steps.append([asdict(rec)])
        for key, rel in rec.outputs.items():
            final[key] = str((work_dir(out_dir, pid) / "tissue" / rel).resolve())

    def _warp(step_dir: Path):
        atlas = {s: nib.load(atlas_files[s]) for s in atlas_files}
        patient = {s: nib.load(final[s]) for s in atlas_seqs}
        warped = warp_atlas_to_patient(atlas, patient, primary=primary, transform=atlas_transform, seed=seed)
        mask = np.asanyarray(nib.load(final["brain_mask"]).dataobj) > 0
        outputs = {}
        for sequence, img in warped.items():
            outputs[f"atlas_{sequence}"] = save_nifti(
                np.asanyarray(img.dataobj).astype(np.float32), img.affine, paths[f"atlas_{sequence}"]
            )
        return outputs, {"primary": primary, "mask_voxels": int(mask.sum())}

    if primary is not None:
        rec = run_step(
            work_dir(out_dir, pid) / "atlas_warp",
            "atlas_warp",
            {**{f"atlas_{s}": atlas_files[s] for s in atlas_files}, **{s: final[s] for s in atlas_seqs}},
            {"transform": atlas_transform, "seed": seed, "primary": primary},
            _warp,
        )
        steps.append([asdict(rec)])
        for key, rel in rec.outputs.items():
            final[key] = str((work_dir(out_dir, pid) / "atlas_warp" / rel).resolve())
    figures = {}
    if qc:
        from preprocessing.qc import intensity_histograms, patient_montage

        qc_dir = Path(out_dir) / "qc"

        def _qc(step_dir: Path):
            outputs = {
                "montage": patient_montage(
                    work_dir(out_dir, pid), summary, final, qc_dir / f"{pid}_montage.png"
                ),
                "histograms": intensity_histograms(summary, final, qc_dir / f"{pid}_histograms.png"),
            }
            return outputs, {}

        rec = run_step(work_dir(out_dir, pid) / "qc", "qc", {k: v for k, v in final.items()}, {}, _qc)
        steps.append([asdict(rec)])
        figures = {k: str((work_dir(out_dir, pid) / "qc" / rel).resolve()) for k, rel in rec.outputs.items()}
    return {"patient_id": pid, "final": final, "steps": [s for group in steps for s in group], **figures}


def _tissue_step(pid: str, out_dir: str, sequences: Sequence[str], final: Mapping[str, str], seed: int):
    """The patient's tissue maps from its final (standardized) T1w-like image, brain mask and label."""
    import nibabel as nib

    from medsynth.utils.io import save_nifti
    from preprocessing.tissue import choose_tissue_sequence, segment_tissues, tissue_shares

    source, rising = choose_tissue_sequence(sequences)
    paths = final_paths(out_dir, pid, sequences)

    def _segment(step_dir: Path):
        mask = nib.load(final["brain_mask"])
        label = nib.load(final["label"]) if final.get("label") else None
        maps = segment_tissues(nib.load(final[source]), mask, label, rising=rising, seed=seed)
        outputs = {
            tissue_column(t): save_nifti(
                np.asanyarray(m.dataobj), m.affine, paths[tissue_column(t)], np.float32
            )
            for t, m in maps.items()
        }
        return outputs, {"source": source, "shares": tissue_shares(maps, np.asanyarray(mask.dataobj) > 0)}

    inputs = {source: final[source], "brain_mask": final["brain_mask"]}
    if final.get("label"):
        inputs["label"] = final["label"]
    return run_step(
        work_dir(out_dir, pid) / "tissue", "tissue", inputs, {"source": source, "seed": seed}, _segment
    )


# -- driver ---------------------------------------------------------------------------------------
def _map(client, task: Callable, items: Sequence[tuple], desc: str, progress: bool) -> list[dict[str, Any]]:
    """Run ``_guarded(task, *item)`` for every item, on Dask when a client is given; keeps order."""
    if client is None:
        return [_guarded(task, *item) for item in tqdm(items, desc=desc, disable=not progress)]
    from distributed import as_completed

    futures = [client.submit(_guarded, task, *item, pure=False, key=f"{desc}-{item[0]}") for item in items]
    for _ in tqdm(as_completed(futures), total=len(futures), desc=desc, disable=not progress):
        pass
    return [f.result() for f in futures]


def _start_client(stack: ExitStack, config: CohortConfig):
    return start_client(stack, config.workers, config.scheduler)


def _fit_landmarks(out_dir: Path, train: Sequence[Mapping[str, Any]], config: CohortConfig) -> Path:
    from preprocessing.standardize import NyulLandmarks, NyulStandardizer

    sequences = [s for s in ANATOMICAL_SEQUENCES if any(s in t["sequences"] for t in train)]
    path = out_dir / "nyul_landmarks.json"
    params = {
        "percentiles": list(config.nyul_percentiles),
        "range": list(config.nyul_range),
        "sequences": sequences,
    }

    def _fit(step_dir: Path):
        import nibabel as nib

        models = []
        for sequence in sequences:
            members = [t for t in train if sequence in t["sequences"]]
            model = NyulStandardizer(config.nyul_percentiles, config.nyul_range, sequence)
            model.fit(
                [nib.load(t["n4"][sequence]) for t in members], [nib.load(t["brain_mask"]) for t in members]
            )
            models.append(model)
        NyulLandmarks(models).save(path)
        return {"landmarks": path}, {"train_patients": [t["patient_id"] for t in train]}

    inputs = {}
    for t in train:
        inputs[f"{t['patient_id']}_mask"] = t["brain_mask"]
        inputs.update({f"{t['patient_id']}_{s}": t["n4"][s] for s in sequences if s in t["sequences"]})
    run_step(out_dir / "work" / "nyul", "nyul_fit", inputs, params, _fit)
    return path


def _build_atlas(
    out_dir: Path, train_final: Sequence[Mapping[str, Any]], config: CohortConfig
) -> dict[str, str]:
    import nibabel as nib

    from preprocessing.atlas import build_multivariate_template, save_atlas

    sequences = [s for s in CLINICAL_SEQUENCES if train_final and all(s in t["final"] for t in train_final)]
    params = {
        "transform": config.atlas_transform,
        "iterations": config.atlas_iterations,
        "seed": config.pipeline.seed,
        "sequences": sequences,
    }

    def _build(step_dir: Path):
        subjects = [{s: nib.load(t["final"][s]) for s in sequences} for t in train_final]
        atlas = build_multivariate_template(
            subjects,
            transform=config.atlas_transform,
            iterations=config.atlas_iterations,
            seed=config.pipeline.seed,
            progress=config.progress,
        )
        return save_atlas(atlas, out_dir / "atlas"), {
            "train_patients": [t["patient_id"] for t in train_final]
        }

    inputs = {f"{t['patient_id']}_{s}": t["final"][s] for t in train_final for s in sequences}
    rec = run_step(out_dir / "work" / "atlas", "atlas", inputs, params, _build)
    return {s: str((out_dir / "work" / "atlas" / rel).resolve()) for s, rel in rec.outputs.items()}


def cohort_sequences(
    sequences_by_patient: Mapping[str, Sequence[str]], drop_incomplete: bool = False
) -> tuple[list[str], dict[str, list[str]], dict[str, list[str]]]:
    """The cohort's sequences from what each patient has: ``(kept, lacking, dropped)``.

    A sequence more than half the patients have is the cohort's (``kept``, in the project's order); a
    patient lacking one of them is refused (``lacking``: patient -> the kept sequences it lacks),
    rather than silently taking the sequence out of everyone's atlas; a sequence at most half have
    is left out of the cohort (``dropped``: sequence -> the patients that have it); at a tie the
    patients are kept and the sequence is dropped. With ``drop_incomplete`` every patient is kept and
    the cohort has only the sequences all of them have.
    """
    count = len(sequences_by_patient)
    held = {s: [p for p, seqs in sequences_by_patient.items() if s in seqs] for s in CLINICAL_SEQUENCES}
    needed = count if drop_incomplete else count // 2 + 1
    kept = [s for s in CLINICAL_SEQUENCES if held[s] and len(held[s]) >= needed]
    dropped = {s: holders for s, holders in held.items() if holders and s not in kept}
    lacking = {p: [s for s in kept if s not in seqs] for p, seqs in sequences_by_patient.items()}
    return kept, {p: missing for p, missing in lacking.items() if missing}, dropped


def _apply_cohort_sequences(
    summaries: dict[str, dict[str, Any]], failures: dict[str, str], drop_incomplete: bool = False
) -> None:
    """Refuse the patients lacking one of the cohort's sequences and leave the rare ones out (said once);
    with ``drop_incomplete``, leave out every sequence some patient lacks instead."""
    kept, lacking, dropped = cohort_sequences(
        {p: s["sequences"] for p, s in summaries.items()}, drop_incomplete
    )
    for sequence, holders in dropped.items():
        logger.warning(
            "%s is left out of the cohort: only %d of %d patient(s) have it (%s)",
            sequence,
            len(holders),
            len(summaries),
            ", ".join(holders[:10]),
        )
    for pid, missing in lacking.items():
        failures[pid] = (
            f"lacks {', '.join(missing)}, which the other patients have: add the series, leave the "
            "patient out of --input, or rerun with --drop-incomplete-sequences to leave the sequence "
            "out of the cohort"
        )
        summaries.pop(pid)
    for summary in summaries.values():
        summary["sequences"] = [s for s in summary["sequences"] if s in kept]


def _require_separate_folders(input_dir: Path, out_dir: Path) -> None:
    """The output must be neither the input nor inside it (nor hold it): a rerun would take the
    outputs (``atlas/``, ``qc/``, ``work/``) for patients."""
    source, target = input_dir.resolve(), out_dir.resolve()
    if target.is_file():
        raise NotADirectoryError(f"--output {out_dir} is a file, not a folder")
    if source == target or source in target.parents or target in source.parents:
        raise ValueError(
            f"--output {out_dir} and --input {input_dir} overlap (the same folder, or one inside the "
            "other): choose an output folder outside the raw exams"
        )


def run_cohort(
    input_dir: str | os.PathLike, output_dir: str | os.PathLike, config: CohortConfig | None = None
) -> CohortResult:
    """Preprocess a raw cohort (see the module docstring for the output layout).

    Returns:
        A :class:`CohortResult`; ``failures`` maps patient id to the error message.
    """
    config = config or CohortConfig()
    out_dir = Path(output_dir)
    _require_separate_folders(Path(input_dir), out_dir)
    require_writable_folder(out_dir, "--output")
    sources, unreadable = list_sources(Path(input_dir), config)
    ids = sorted([*sources, *unreadable])
    splits = split_patients(ids, config.split_fractions, config.pipeline.seed)
    failures: dict[str, str] = dict(unreadable)
    timings: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        client = _start_client(stack, config)
        stage1 = _map(
            client,
            _stage_preprocess,
            [(pid, sources[pid], str(out_dir), config.pipeline) for pid in sorted(sources)],
            "preprocess",
            config.progress,
        )
        summaries = {}
        for record in stage1:
            if record["ok"]:
                summaries[record["patient_id"]] = record["result"]
            else:
                failures[record["patient_id"]] = record["error"]
                logger.debug(record["traceback"])
        _apply_cohort_sequences(summaries, failures, config.drop_incomplete_sequences)
        train = [summaries[p] for p in ids if p in summaries and splits[p] == "train"]
        finals: dict[str, dict[str, Any]] = {}
        if not train:
            logger.error(
                "no training patient was preprocessed: cannot fit the Nyul landmarks nor build the atlas"
            )
        else:
            landmarks = _fit_landmarks(out_dir, train, config)
            # Standardize the train split first: the atlas needs its final images.
            train_ids = [t["patient_id"] for t in train]
            standardized = _map(
                client,
                _stage_finalize,
                [
                    (
                        p,
                        summaries[p],
                        str(out_dir),
                        str(landmarks),
                        {},
                        config.atlas_transform,
                        config.pipeline.seed,
                        False,
                        config.tissue_maps,
                    )
                    for p in train_ids
                ],
                "standardize",
                config.progress,
            )
            train_final = [r["result"] for r in standardized if r["ok"]]
            failures.update({r["patient_id"]: r["error"] for r in standardized if not r["ok"]})
            atlas_files = _build_atlas(out_dir, train_final, config) if train_final else {}
            todo = [p for p in ids if p in summaries and p not in failures]
            finalized = _map(
                client,
                _stage_finalize,
                [
                    (
                        p,
                        summaries[p],
                        str(out_dir),
                        str(landmarks),
                        atlas_files,
                        config.atlas_transform,
                        config.pipeline.seed,
                        config.qc,
                        config.tissue_maps,
                    )
                    for p in todo
                ],
                "finalize",
                config.progress,
            )
            for record in finalized:
                if record["ok"]:
                    finals[record["patient_id"]] = record["result"]
                else:
                    failures[record["patient_id"]] = record["error"]
    for pid in ids:
        if pid in summaries:
            steps = finals[pid]["steps"] if pid in finals else summaries[pid]["steps"]
            timings += [
                {
                    "patient_id": pid,
                    "step": s["step"],
                    "seconds": round(float(s["seconds"]), 3),
                    "skipped": bool(s["skipped"]),
                }
                for s in steps
            ]
    manifest_path = _write_manifest(out_dir, ids, splits, finals) if finals else None
    if finals and config.bids_derivatives:
        from medsynth import __version__
        from preprocessing.bids import write_bids_derivatives

        references = {p: summaries[p]["reference"] for p in finals}
        write_bids_derivatives(
            out_dir, {p: f["final"] for p, f in finals.items()}, splits, references, __version__
        )
    timings_path = out_dir / "timings.csv"
    pd.DataFrame(timings, columns=["patient_id", "step", "seconds", "skipped"]).to_csv(
        timings_path, index=False
    )
    save_json(timings, out_dir / "timings.json")
    save_json({"failures": failures, "splits": splits}, out_dir / "failures.json")
    qc_page = None
    if config.qc:
        from preprocessing.qc import cohort_page

        rows = [
            {
                "patient_id": p,
                "split": splits[p],
                "montage": finals[p].get("montage"),
                "histograms": finals[p].get("histograms"),
            }
            for p in ids
            if p in finals
        ]
        qc_page = cohort_page(out_dir, rows, failures, timings)
    if failures:
        logger.error("%d patient(s) failed: %s", len(failures), ", ".join(sorted(failures)))
    return CohortResult(manifest_path, failures, timings_path, qc_page, [p for p in ids if p in finals])


def _write_manifest(
    out_dir: Path, ids: Sequence[str], splits: Mapping[str, str], finals: Mapping[str, Mapping[str, Any]]
) -> Path:
    sequences = [s for s in CLINICAL_SEQUENCES if any(s in f["final"] for f in finals.values())]
    records = []
    for pid in ids:
        if pid not in finals:
            continue
        final = finals[pid]["final"]
        row = {"patient_id": pid, "split": splits[pid]}
        row.update({s: final.get(s, "") for s in sequences})
        row[MANIFEST_LABEL_COLUMN] = final.get("label", "")
        row[MANIFEST_BRAIN_MASK_COLUMN] = final.get("brain_mask", "")
        row.update({atlas_column(s): final.get(f"atlas_{s}", "") for s in sequences})
        row.update({c: final[c] for c in TISSUE_COLUMNS if final.get(c)})
        records.append(row)
    return write_manifest(pd.DataFrame(records), out_dir / "manifest.csv")
