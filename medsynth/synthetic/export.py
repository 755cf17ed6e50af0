"""Exports of a cohort for the field's segmentation tools: an nnU-Net v2 raw dataset, a BraTS folder.

* :func:`export_nnunet`: ``Dataset<ID>_<name>/imagesTr/<case>_<XXXX>.nii.gz`` (one file per
  channel, the channel index as a four-digit suffix), ``labelsTr/<case>.nii.gz`` and
  ``dataset.json`` (``channel_names``, ``labels``, ``numTraining``, ``file_ending``), the layout of
  nnU-Net v2's dataset format. nnU-Net wants consecutive labels; the lesion classes become
  0 background (background and normal brain), 1 edema, 2 cavity / necrosis, 3 tumour.
* :func:`export_brats`: ``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz`` with BraTS 2018-2021 ``seg``
  values (0 outside the lesion, 1 necrosis / cavity, 2 edema, 4 enhancing tumour): the inverse of the
  ``brats`` convention the BraTS adapter reads (:data:`medsynth.constants.BRATS_SEG_TO_LABEL`).
  APTw, not a BraTS sequence, is written as ``<case>_apt.nii.gz`` when present.

Both read a cohort manifest (a synthetic cohort's, and optionally the real training cases) and
write every file atomically; an existing export folder is replaced as a whole at the end.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from medsynth.constants import (
    BACKGROUND,
    BRATS_SEG_TO_LABEL,
    CAVITY,
    EDEMA,
    MANIFEST_BRAIN_MASK_COLUMN,
    MANIFEST_LABEL_COLUMN,
    NORMAL_BRAIN,
    SEQUENCE_TITLES,
    TUMOR,
)
from medsynth.data.manifest import sequences_of
from medsynth.utils.io import save_json, save_nifti

__all__ = ["NNUNET_LABELS", "export_brats", "export_nnunet", "to_brats_seg"]

# nnU-Net's consecutive classes, project label -> nnU-Net value.
NNUNET_LABELS: dict[str, int] = {"background": 0, "edema": 1, "cavity": 2, "tumor": 3}
_PROJECT_TO_NNUNET = {BACKGROUND: 0, NORMAL_BRAIN: 0, EDEMA: 1, CAVITY: 2, TUMOR: 3}
_BRATS_SUFFIXES = {"t1w": "t1", "gd_t1w": "t1ce", "t2w": "t2", "flair": "flair", "aptw": "apt"}


def _remap(label: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    lookup = np.zeros(max(mapping) + 1, dtype=np.uint8)
    for source, target in mapping.items():
        lookup[source] = target
    return lookup[np.rint(label).astype(np.int64)]


def to_brats_seg(label: np.ndarray) -> np.ndarray:
    """A project label map (0..4) as a BraTS ``seg`` (0, 1, 2, 4)."""
    inverse = {project: seg for seg, project in BRATS_SEG_TO_LABEL.items()}
    inverse[BACKGROUND] = 0
    return _remap(label, inverse)


def _cases(manifest: pd.DataFrame, real: pd.DataFrame | None) -> pd.DataFrame:
    rows = (
        manifest if real is None else pd.concat([real[real["split"] == "train"], manifest], ignore_index=True)
    )
    duplicated = rows["patient_id"][rows["patient_id"].duplicated()].tolist()
    if duplicated:
        raise ValueError(f"case names occur twice in the export: {sorted(set(duplicated))}")
    return rows.reset_index(drop=True)


def _copy_image(source: str, target: Path, brain: np.ndarray | None = None) -> None:
    image = nib.load(source)
    data = np.asanyarray(image.dataobj).astype(np.float32)
    save_nifti(data if brain is None else np.where(brain, data, 0.0), image.affine, target, np.float32)


def _replace(staging: Path, final: Path) -> Path:
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    return final


def export_nnunet(
    manifest: pd.DataFrame,
    out_dir: str | os.PathLike,
    dataset_id: int = 501,
    name: str = "MedsynthSynthetic",
    real: pd.DataFrame | None = None,
) -> Path:
    """Write ``out_dir/Dataset<ID>_<name>`` (nnU-Net v2 raw format) from ``manifest``'s cases, plus the
    training cases of ``real`` when given; returns the dataset folder."""
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"nnU-Net dataset ids are 1..999, got {dataset_id}")
    rows = _cases(manifest, real)
    sequences = list(sequences_of(rows))
    folder_name = f"Dataset{dataset_id:03d}_{name}"
    staging = Path(out_dir) / f".{folder_name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    for _, row in rows.iterrows():
        case = str(row["patient_id"])
        for channel, sequence in enumerate(sequences):
            _copy_image(row[sequence], staging / "imagesTr" / f"{case}_{channel:04d}.nii.gz")
        label = nib.load(row[MANIFEST_LABEL_COLUMN])
        save_nifti(
            _remap(np.asanyarray(label.dataobj), _PROJECT_TO_NNUNET),
            label.affine,
            staging / "labelsTr" / f"{case}.nii.gz",
            np.uint8,
        )
    save_json(
        {
            "channel_names": {str(i): SEQUENCE_TITLES.get(s, s) for i, s in enumerate(sequences)},
            "labels": dict(NNUNET_LABELS),
            "numTraining": len(rows),
            "file_ending": ".nii.gz",
            "name": name,
            "description": "medsynth synthetic cohort"
            + (" with the real training cases" if real is not None else ""),
        },
        staging / "dataset.json",
    )
    return _replace(staging, Path(out_dir) / folder_name)


def export_brats(
    manifest: pd.DataFrame, out_dir: str | os.PathLike, real: pd.DataFrame | None = None
) -> Path:
    """Write ``out_dir`` in the BraTS folder layout (``<case>/<case>_<suffix>.nii.gz``); returns it."""
    rows = _cases(manifest, real)
    sequences: Sequence[str] = sequences_of(rows)
    final = Path(out_dir)
    staging = final.parent / f".{final.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    for _, row in rows.iterrows():
        case = str(row["patient_id"])
        brain_path = str(row.get(MANIFEST_BRAIN_MASK_COLUMN, "") or "")
        brain = np.asanyarray(nib.load(brain_path).dataobj) >= 0.5 if brain_path else None
        for sequence in sequences:
            # BraTS images are skull-stripped, zero outside the brain (its adapter finds the brain there).
            _copy_image(row[sequence], staging / case / f"{case}_{_BRATS_SUFFIXES[sequence]}.nii.gz", brain)
        label = nib.load(row[MANIFEST_LABEL_COLUMN])
        seg = to_brats_seg(np.asanyarray(label.dataobj))
        save_nifti(seg, label.affine, staging / case / f"{case}_seg.nii.gz", np.uint8)
    staging.mkdir(parents=True, exist_ok=True)
    return _replace(staging, final)
