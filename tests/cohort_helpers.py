"""Tiny hand-made cohorts for the data-layer tests (imported by the other ``test_data_*`` files).

The volumes are small (a few thousand voxels) and their content is known exactly: a brain
ellipsoid (label 1) with an edema / cavity / tumour blob in the middle slices, background 0
outside, anatomical sequences positive inside the brain, APTw in percent.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medsynth.constants import BRATS_SEQUENCES, CLINICAL_SEQUENCES, atlas_column
from medsynth.data.manifest import split_patients, write_manifest
from medsynth.utils.io import save_nifti

TINY_SHAPE = (24, 20, 6)
RAS_AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])
# BraTS-like orientation (L, P, S): the dataset must flip x and y to reach RAS.
BRATS_SUFFIX = {"t1w": "t1", "gd_t1w": "t1ce", "t2w": "t2", "flair": "flair"}
LPS_AFFINE = np.array([[-1.0, 0, 0, 23.0], [0, -1.0, 0, 19.0], [0, 0, 2.0, 0], [0, 0, 0, 1.0]])


def tiny_label(shape: Sequence[int] = TINY_SHAPE, lesion: bool = True) -> np.ndarray:
    """Brain ellipsoid (1) covering every slice but the first, lesion rings (2, 3, 4) in the middle slices."""
    x, y, z = np.meshgrid(*(np.arange(s, dtype=float) for s in shape), indexing="ij")
    cx, cy = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    radius = ((x - cx) / (0.4 * shape[0])) ** 2 + ((y - cy) / (0.4 * shape[1])) ** 2
    label = np.zeros(shape, dtype=np.uint8)
    label[(radius <= 1.0) & (z >= 1)] = 1
    if lesion:
        middle = (z >= shape[2] // 2 - 1) & (z <= shape[2] // 2)
        lesion_radius = ((x - cx - 2) ** 2 + (y - cy) ** 2) ** 0.5
        label[middle & (lesion_radius <= 4)] = 2
        label[middle & (lesion_radius <= 2.5)] = 4
        label[middle & (lesion_radius <= 1.2)] = 3
    return label


def tiny_sequence(label: np.ndarray, sequence: str, rng: np.random.Generator) -> np.ndarray:
    """Float32 intensities: positive arbitrary units inside the brain (0 outside), APTw in percent."""
    if sequence == "aptw":
        values = np.array([0.0, 0.5, 1.5, -2.0, 3.5])[label] + rng.normal(0, 0.3, label.shape)
        return np.where(label > 0, values, 0.0).astype(np.float32)
    base = {"t1w": 800.0, "gd_t1w": 600.0, "t2w": 1200.0, "flair": 500.0}[sequence]
    contrast = np.array([0.0, 1.0, 1.3, 0.6, 1.8])[label]
    return (base * contrast * (1 + rng.normal(0, 0.05, label.shape)) * (label > 0)).astype(np.float32)


def write_tiny_cohort(
    root: Path,
    num_patients: int = 4,
    shape: Sequence[int] = TINY_SHAPE,
    sequences: Sequence[str] = CLINICAL_SEQUENCES,
    affine: np.ndarray = RAS_AFFINE,
    seed: int = 0,
) -> Path:
    """A ready cohort (``root/manifest.csv`` with relative paths) of ``num_patients`` tiny patients."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    ids = [f"P{index:03d}" for index in range(num_patients)]
    splits = split_patients(ids, seed=seed)
    atlas = {s: np.zeros(shape, dtype=np.float64) for s in sequences}
    rows = []
    for pid in ids:
        label = tiny_label(shape)
        row = {"patient_id": pid, "split": splits[pid]}
        for sequence in sequences:
            volume = tiny_sequence(label, sequence, rng)
            atlas[sequence] += volume / num_patients
            row[sequence] = str(save_nifti(volume, affine, root / pid / f"{pid}_{sequence}.nii.gz"))
        row["label"] = str(save_nifti(label, affine, root / pid / f"{pid}_label.nii.gz", dtype=np.uint8))
        row["brain_mask"] = str(
            save_nifti((label > 0).astype(np.uint8), affine, root / pid / f"{pid}_brainmask.nii.gz")
        )
        rows.append(row)
    for sequence in sequences:
        path = save_nifti(
            atlas[sequence].astype(np.float32), affine, root / "atlas" / f"atlas_{sequence}.nii.gz"
        )
        for row in rows:
            row[atlas_column(sequence)] = str(path)
    return write_manifest(pd.DataFrame(rows), root / "manifest.csv")


def write_tiny_brats_case(root: Path, case: str, rng: np.random.Generator, tumour_seg_value: float = 4):
    """A tiny BraTS case (int16 like the real ones, the seg float when ``tumour_seg_value`` is not a
    whole number); ``tumour_seg_value`` 3 makes an unknown seg value. Returns the project label map
    and the files."""
    label = tiny_label(TINY_SHAPE)
    seg_of_label = np.array([0, 0, 2, 1, tumour_seg_value])  # inverse of the project mapping (0, 1 -> seg 0)
    whole = float(tumour_seg_value).is_integer()
    seg = seg_of_label[label].astype(np.int16 if whole else np.float32)
    files = {}
    for sequence in BRATS_SEQUENCES:
        volume = np.rint(tiny_sequence(label, sequence, rng)).astype(np.int16)
        files[sequence] = save_nifti(
            volume, RAS_AFFINE, Path(root) / case / f"{case}_{BRATS_SUFFIX[sequence]}.nii.gz"
        )
    files["seg"] = save_nifti(seg, RAS_AFFINE, Path(root) / case / f"{case}_seg.nii.gz")
    return label, files
