"""The model's atlas: the group atlas a synthesis model was trained with travels with its weights.

The generators read three atlas slices per sequence, so a model is only meaningful with the atlas
it was trained with. Training copies that atlas into ``<output_dir>/models/atlas/`` with a record
(``models/atlas.json``: sequences, grid, a fingerprint of the files' contents, where it came from);
evaluation, inference, augmentation and serving use it by default on any cohort on the same
template grid (:func:`resolve_model_cohort`, :func:`attach_atlas`).

Choosing the atlas (``atlas``): ``"model"`` (default outside training), ``"cohort"`` (the
cohort's own atlas columns, e.g. an atlas built for it) or the path of a folder of atlas files.
Anything but the model's atlas is logged as a warning. A cohort whose patients are not on the
atlas' grid is refused, unless ``resample_atlas`` is set: the atlas is then resampled (trilinear,
through world coordinates, so the template spaces must agree) onto each patient grid, and the log
says so.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.processing import resample_from_to

from medsynth.constants import CLINICAL_SEQUENCES, atlas_column, canonical_sequence
from medsynth.data.manifest import sequences_of
from medsynth.errors import InputDataError
from medsynth.utils.bundles import as_flag
from medsynth.utils.geometry import same_grid_geometry
from medsynth.utils.hashing import file_digest, json_digest, parts_digest
from medsynth.utils.io import atomic_path, save_json, save_nifti

logger = logging.getLogger(__name__)

__all__ = [
    "ATLAS_CHOICES",
    "MODEL_ATLAS_DIRNAME",
    "MODEL_ATLAS_RECORD",
    "atlas_fingerprint",
    "atlas_in_use",
    "attach_atlas",
    "cohort_atlas_files",
    "find_atlas_files",
    "load_model_atlas",
    "model_atlas_sequences",
    "resolve_model_cohort",
    "save_model_atlas",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
MODEL_ATLAS_DIRNAME = "atlas"
MODEL_ATLAS_RECORD = "atlas.json"
ATLAS_CHOICES = ("model", "cohort")  # or a folder of atlas files


def atlas_fingerprint(files: Mapping[str, str | os.PathLike]) -> str:
    """A key of an atlas' contents (the bytes of every sequence's file), independent of where it lies."""
    return json_digest({sequence: file_digest(path) for sequence, path in sorted(files.items())}, length=20)


def find_atlas_files(atlas_dir: str | os.PathLike, sequences: Sequence[str] | None = None) -> dict[str, str]:
    """Atlas NIfTI files of a folder by sequence: ``atlas_<seq>.nii.gz`` or ``<seq>.nii.gz`` (aliases such
    as ``t1ce`` or ``T2`` are recognised). Raises :class:`InputDataError` when a sequence is missing."""
    folder = Path(atlas_dir)
    if not folder.is_dir():
        raise InputDataError("atlas folder does not exist", path=folder)
    found: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        stem = next((path.name[: -len(s)] for s in NIFTI_SUFFIXES if path.name.lower().endswith(s)), None)
        if stem is None:
            continue
        stem = stem[len("atlas_") :] if stem.lower().startswith("atlas_") else stem
        try:
            found.setdefault(canonical_sequence(stem), str(path))
        except ValueError:
            continue
    wanted = list(sequences) if sequences is not None else [s for s in CLINICAL_SEQUENCES if s in found]
    missing = [s for s in wanted if s not in found]
    if missing or not wanted:
        raise InputDataError(
            f"no atlas file for sequence(s) {missing or list(CLINICAL_SEQUENCES)}", path=folder
        )
    return {s: found[s] for s in wanted}


def cohort_atlas_files(manifest: pd.DataFrame, splits: Sequence[str] = ("train",)) -> dict[str, str] | None:
    """The atlas files shared by every patient of ``splits``, or ``None`` when the patients have atlases
    of their own (a preprocessing output warps the group atlas onto every patient)."""
    sequences = sequences_of(manifest)
    rows = manifest[manifest["split"].isin(list(splits))]
    columns = [atlas_column(s) for s in sequences]
    missing = [c for c in columns if c not in rows.columns or (rows[c].astype(str) == "").any()]
    if rows.empty or missing:
        raise ValueError(f"the {list(splits)} patients have no atlas (column(s) {missing or columns})")
    distinct = rows[columns].drop_duplicates()
    if len(distinct) > 1:
        return None
    return {s: str(distinct.iloc[0][atlas_column(s)]) for s in sequences}


def atlas_in_use(manifest: pd.DataFrame) -> dict[str, Any]:
    """What a cohort's patients are synthesized with: ``{"fingerprint", "files"}`` of the atlas they share,
    or ``{"kind": "per_patient"}``; recorded beside evaluation results."""
    files = cohort_atlas_files(manifest, splits=sorted(set(manifest["split"])))
    if files is None:
        return {"kind": "per_patient"}
    return {"kind": "shared", "fingerprint": atlas_fingerprint(files), "files": files}


def save_model_atlas(manifest: pd.DataFrame, models_dir: str | os.PathLike) -> dict[str, Any]:
    """Copy the training split's atlas beside the weights and record it; returns the record.

    Idempotent: a model folder that already holds this atlas (same fingerprint) is left alone, so a
    resumed run does not rewrite it; another atlas is refused (one output folder, one model).
    """
    models_dir = Path(models_dir)
    record_path = models_dir / MODEL_ATLAS_RECORD
    sources = cohort_atlas_files(manifest)
    sequences = list(sequences_of(manifest))
    if sources is None:
        record = {"kind": "per_patient", "sequences": sequences}
        logger.info("training patients have per-patient atlases: inference uses each cohort's own")
        save_json(record, record_path)
        return record
    fingerprint = atlas_fingerprint(sources)
    if record_path.is_file():
        previous = load_model_atlas(models_dir)
        if previous.get("fingerprint") == fingerprint:
            return previous
        raise ValueError(
            f"{models_dir} holds a model trained with another atlas (fingerprint "
            f"{previous.get('fingerprint')}, "
            f"this cohort's is {fingerprint}); use a new output_dir"
        )
    first = nib.load(sources[sequences[0]])
    files = {}
    for sequence in sequences:
        target = models_dir / MODEL_ATLAS_DIRNAME / f"atlas_{sequence}.nii.gz"
        with atomic_path(target) as tmp:
            shutil.copyfile(sources[sequence], tmp)
        files[sequence] = f"{MODEL_ATLAS_DIRNAME}/{target.name}"
    record = {
        "kind": "shared",
        "sequences": sequences,
        "files": files,
        "shape": [int(v) for v in first.shape[:3]],
        "affine": np.asarray(first.affine, dtype=float).round(6).tolist(),
        "fingerprint": fingerprint,
        "source": {s: str(Path(p).resolve()) for s, p in sources.items()},
    }
    save_json(record, record_path)
    logger.info(
        "saved the model's atlas (fingerprint %s) in %s", fingerprint, models_dir / MODEL_ATLAS_DIRNAME
    )
    return record


def model_atlas_sequences(models_dir: str | os.PathLike) -> list[str] | None:
    """The sequences a trained model synthesises, from its atlas record (``None``: no record)."""
    import json

    record = Path(models_dir) / MODEL_ATLAS_RECORD
    return list(json.loads(record.read_text()).get("sequences", [])) if record.is_file() else None


def load_model_atlas(models_dir: str | os.PathLike) -> dict[str, Any]:
    """The record of a model's atlas, with ``files`` as absolute paths; checks the files' fingerprint."""
    import json

    models_dir = Path(models_dir)
    record_path = models_dir / MODEL_ATLAS_RECORD
    if not record_path.is_file():
        raise FileNotFoundError(
            f"no model atlas in {models_dir} ({MODEL_ATLAS_RECORD} missing): train the model first, or "
            f"choose "
            "another atlas explicitly (atlas='cohort' or the folder of atlas files)"
        )
    record = json.loads(record_path.read_text())
    if record.get("kind") == "shared":
        record["files"] = {s: str(models_dir / rel) for s, rel in record["files"].items()}
        actual = atlas_fingerprint(record["files"])
        if actual != record["fingerprint"]:
            raise InputDataError(
                f"the model's atlas files changed since training (fingerprint {actual}, recorded "
                f"{record['fingerprint']})",
                path=models_dir / MODEL_ATLAS_DIRNAME,
            )
    return record


def _resampled(atlas: Mapping[str, str], shape, affine, cache_dir: Path) -> dict[str, str]:
    """The atlas resampled onto the grid ``(shape, affine)`` (trilinear, world coordinates), cached."""
    key = parts_digest(
        atlas_fingerprint(atlas), tuple(shape), np.asarray(affine).round(4).tolist(), length=16
    )
    out = {}
    for sequence, path in atlas.items():
        target = cache_dir / f"atlas_on_{key}" / f"atlas_{sequence}.nii.gz"
        if not target.is_file():
            moved = resample_from_to(
                nib.load(path), (tuple(shape), np.asarray(affine)), order=1, mode="constant", cval=0.0
            )
            save_nifti(np.asanyarray(moved.dataobj).astype(np.float32), affine, target)
        out[sequence] = str(target)
    return out


def attach_atlas(
    manifest: pd.DataFrame,
    atlas: Mapping[str, str],
    cache_dir: str | os.PathLike | None = None,
    resample_atlas: bool = False,
    label: str = "the model's atlas",
) -> pd.DataFrame:
    """``manifest`` with every patient's ``atlas_<sequence>`` set to ``atlas`` (sequence -> file).

    Raises:
        InputDataError: a patient is not on the atlas' grid (named, with both grids) and
            ``resample_atlas`` is not set; or the atlas lacks a sequence of the cohort.
    """
    resample_atlas = as_flag(resample_atlas, "resample_atlas")
    sequences = sequences_of(manifest)
    missing = [s for s in sequences if s not in atlas]
    if missing:
        raise InputDataError(
            f"{label} has no {missing} (it has {sorted(atlas)}); the cohort has {list(sequences)}"
        )
    reference = nib.load(atlas[sequences[0]])
    out = manifest.copy()
    resampled_grids: dict[tuple, int] = {}
    for index, row in out.iterrows():
        image = nib.load(row["label"])
        files = {s: atlas[s] for s in sequences}
        if not same_grid_geometry(image.shape, image.affine, reference.shape, reference.affine):
            if not resample_atlas:
                raise InputDataError(
                    f"not on the grid of {label} (shape {list(image.shape[:3])} vs "
                    f"{list(reference.shape[:3])}, "
                    "or the affines differ); bring the cohort onto the model's template grid, or pass "
                    "resample_atlas=true to resample the atlas onto each patient's grid",
                    path=row["label"],
                    patient_id=str(row["patient_id"]),
                )
            if cache_dir is None:
                raise ValueError("resampling the atlas needs a cache_dir")
            files = _resampled(files, image.shape[:3], image.affine, Path(cache_dir))
            grid = (tuple(image.shape[:3]), tuple(np.round(image.affine, 3).ravel()))
            resampled_grids[grid] = resampled_grids.get(grid, 0) + 1
        for sequence in sequences:
            out.at[index, atlas_column(sequence)] = files[sequence]
    if resampled_grids:
        logger.warning(
            "resampled %s (grid %s) onto %d other grid(s) for %d patient(s), trilinear through world "
            "coordinates",
            label,
            list(reference.shape[:3]),
            len(resampled_grids),
            sum(resampled_grids.values()),
        )
    return out


def resolve_model_cohort(
    dataset_dir: str | os.PathLike | None,
    cache_dir: str | os.PathLike,
    model_dir: str | os.PathLike,
    atlas: str = "model",
    resample_atlas: bool = False,
    **cohort_kwargs: Any,
) -> pd.DataFrame:
    """The cohort of ``dataset_dir`` with the atlas a trained model needs (see the module docstring).

    With ``atlas="model"`` (default) no atlas is built for the cohort: its adapter derives the label
    maps and brain masks only, and the model's own atlas (``model_dir``) is attached. ``"cohort"``
    keeps the cohort's atlas; a folder path uses the atlas files found there. Other keyword
    arguments go to :func:`medsynth.data.cohort.resolve_cohort`.
    """
    from medsynth.data.cohort import resolve_cohort

    record = load_model_atlas(model_dir) if atlas == "model" else None
    if atlas == "cohort" or (record is not None and record.get("kind") != "shared"):
        if atlas == "cohort":
            logger.warning(
                "using the cohort's own atlas, not the one the model was trained with (atlas='cohort')"
            )
        else:
            logger.info(
                "the model was trained with per-patient atlases: using the cohort's own atlas columns"
            )
        return resolve_cohort(dataset_dir, cache_dir, **cohort_kwargs)
    manifest = resolve_cohort(dataset_dir, cache_dir, build_atlas=False, **cohort_kwargs)
    if record is not None:
        files, label = record["files"], f"the model's atlas ({record['fingerprint']})"
        logger.info("using %s from %s", label, model_dir)
    else:
        files = find_atlas_files(atlas, sequences_of(manifest))
        label = f"the atlas of {atlas}"
        logger.warning("using %s, not the one the model was trained with (atlas=%s)", label, atlas)
    return attach_atlas(manifest, files, Path(cache_dir) / "atlas_resampled", resample_atlas, label)
