"""The cohort manifest: one row per patient, one path column per file, and the patient's split.

On disk it is a CSV whose paths are relative to the CSV's folder, so a cohort folder can be
moved or shared as a whole; in memory (:func:`read_manifest`) every path is absolute.

Columns: ``patient_id``, ``split``, one column per sequence (``t1w``, ``gd_t1w``, ...), ``label``,
``brain_mask`` and one ``atlas_<sequence>`` column per sequence; optionally the brain-tissue
probability maps ``tissue_csf``, ``tissue_gm``, ``tissue_wm`` (all three or none: Shin et al.'s input)
and, in a synthetic cohort, ``confidence_<sequence>``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medsynth.constants import (
    CLINICAL_SEQUENCES,
    MANIFEST_BRAIN_MASK_COLUMN,
    MANIFEST_LABEL_COLUMN,
    SPLITS,
    TISSUE_COLUMNS,
    atlas_column,
)
from medsynth.utils.io import atomic_path

DEFAULT_SPLIT_FRACTIONS: tuple[float, float, float] = (0.7, 0.15, 0.15)


def sequences_of(manifest: pd.DataFrame) -> tuple[str, ...]:
    """The sequences a manifest holds, in the canonical channel order."""
    known = [s for s in CLINICAL_SEQUENCES if s in manifest.columns]
    if not known:
        raise ValueError(f"manifest has no sequence column; expected some of {CLINICAL_SEQUENCES}")
    return tuple(known)


def path_columns(sequences: Sequence[str]) -> list[str]:
    """All path columns of a manifest with these sequences."""
    return [
        *sequences,
        MANIFEST_LABEL_COLUMN,
        MANIFEST_BRAIN_MASK_COLUMN,
        *(atlas_column(s) for s in sequences),
    ]


def stored_path_columns(sequences: Sequence[str]) -> list[str]:
    """The columns whose paths a manifest file stores relative to itself: :func:`path_columns`, the
    optional tissue maps (``tissue_<class>``) and a synthetic cohort's optional confidence maps
    (``confidence_<sequence>``)."""
    return [*path_columns(sequences), *TISSUE_COLUMNS, *(f"confidence_{s}" for s in sequences)]


def has_tissue_maps(manifest: pd.DataFrame) -> bool:
    """Whether every patient of ``manifest`` has its three tissue maps (``tissue_<class>`` columns)."""
    return all(c in manifest.columns for c in TISSUE_COLUMNS) and bool(
        (manifest[list(TISSUE_COLUMNS)].astype(str).map(str.strip) != "").all().all()
    )


def split_patients(
    patient_ids: Iterable[str],
    fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = 0,
) -> dict[str, str]:
    """Assign every patient to ``train``/``val``/``test`` from a seed (patient level, deterministic).

    The patients are sorted before shuffling so the result does not depend on listing order.
    Every split with a positive fraction gets at least one patient when there are enough patients,
    and ``train`` is empty only when its fraction is 0 (a cohort kept whole for testing a trained
    model: ``(0, 0, 1)``).
    """
    ids = sorted(set(patient_ids))
    if not ids:
        raise ValueError("cannot split an empty cohort")
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(
            f"split fractions must be {len(SPLITS)} non-negative numbers, got {tuple(fractions)}"
        )
    if abs(float(sum(fractions)) - 1.0) > 1e-6:
        terms = " + ".join(f"{f:g}" for f in fractions)
        raise ValueError(
            f"split fractions (train, val, test) must sum to 1, got {terms} = {float(sum(fractions)):g}"
        )
    weights = np.asarray(fractions, dtype=float) / float(sum(fractions))
    order = np.random.default_rng(seed).permutation(len(ids))
    counts = np.floor(weights * len(ids)).astype(int)
    # Give the remainder, then guarantee non-empty requested splits, taking from the largest split.
    for index in np.argsort(-(weights * len(ids) - counts))[: len(ids) - counts.sum()]:
        counts[index] += 1
    for index in np.flatnonzero(weights > 0):
        if counts[index] == 0 and counts.max() > 1:
            counts[int(np.argmax(counts))] -= 1
            counts[index] += 1
    if counts[0] == 0 and weights[0] > 0:
        raise ValueError("the train split would be empty; give it a positive fraction")
    assignment: dict[str, str] = {}
    start = 0
    for split, count in zip(SPLITS, counts, strict=True):
        for position in order[start : start + count]:
            assignment[ids[position]] = split
        start += count
    return assignment


def check_patient_level_split(manifest: pd.DataFrame) -> None:
    """Fail loudly when a patient has rows in two splits, or a split value is unknown."""
    unknown = sorted(set(manifest["split"].dropna()) - set(SPLITS))
    if unknown:
        raise ValueError(f"manifest has unknown split values {unknown}; allowed: {list(SPLITS)}")
    splits_per_patient = manifest.groupby("patient_id")["split"].nunique()
    leaking = splits_per_patient[splits_per_patient > 1]
    if len(leaking):
        detail = {
            pid: sorted(manifest.loc[manifest["patient_id"] == pid, "split"].unique())
            for pid in leaking.index
        }
        raise ValueError(f"patient-level split violated: patients in more than one split: {detail}")


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read a manifest CSV; relative paths become absolute (relative to the CSV's folder)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    manifest = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ("patient_id", "split") if c not in manifest.columns]
    if missing:
        raise ValueError(f"manifest {path}: missing column(s) {missing}")
    root = path.resolve().parent
    for column in stored_path_columns(sequences_of(manifest)):
        if column in manifest.columns:
            manifest[column] = [str((root / value).resolve()) if value else "" for value in manifest[column]]
    check_patient_level_split(manifest)
    return manifest


def write_manifest(manifest: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a manifest CSV atomically, storing paths relative to the CSV's folder where possible."""
    path = Path(path)
    check_patient_level_split(manifest)
    root = path.resolve().parent
    out = manifest.copy()
    for column in stored_path_columns(sequences_of(out)):
        if column in out.columns:
            out[column] = [_relative_to(value, root) for value in out[column]]
    with atomic_path(path) as tmp:
        out.to_csv(tmp, index=False)
    return path


def _relative_to(value: str, root: Path) -> str:
    if not value:
        return ""
    try:
        return os.path.relpath(Path(value).resolve(), root)
    except ValueError:  # another drive on Windows
        return str(Path(value).resolve())
