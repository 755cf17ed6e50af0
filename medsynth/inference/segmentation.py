"""Lesion-segmentation inference as MONAI pieces (the lesion-segmentation bundle's ``inference.json``).

An item is a dict of file paths: ``case``, one entry per sequence and optionally ``brain_mask``.
:func:`segmentation_preprocessing` loads them (RAS), fits the plane to the network's size and scales
the images to [-1, 1] in their brain window exactly as for training (the brain is the mask, or the
voxels where any sequence is non-zero); MONAI's ``SliceInferer`` runs the 2D U-Net over the stacked
axial slices; :func:`segmentation_postprocessing` takes the argmax, brings the label map back to the
input grid (``Invertd``) and writes ``output_dir/<case>/lesion_seg.nii.gz``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.transforms import AsDiscreted, Compose, ConcatItemsd, Invertd, MapTransform, Transposed

from medsynth.constants import BRAIN_MASK_THRESHOLD, MANIFEST_BRAIN_MASK_COLUMN
from medsynth.transforms.intensity import ScaleToUnitd, windows_for
from medsynth.transforms.slices import FitInPlaned
from medsynth.transforms.volume import load_ras
from medsynth.utils.io import save_nifti

__all__ = [
    "SaveSegmentationd",
    "segmentation_cases",
    "segmentation_postprocessing",
    "segmentation_preprocessing",
]

SEGMENTATION_FILE = "lesion_seg.nii.gz"


def segmentation_cases(
    manifest: pd.DataFrame, sequences: Sequence[str], splits: Sequence[str] | None = None
) -> list:
    """The inference items of the patients of ``splits`` (all when ``None``) of a cohort manifest."""
    rows = manifest if splits is None else manifest[manifest["split"].isin(list(splits))]
    if rows.empty:
        raise ValueError(f"no patient in split(s) {splits}")
    items = []
    for _, row in rows.sort_values("patient_id").iterrows():
        item = {"case": str(row["patient_id"]), **{s: row[s] for s in sequences}}
        if str(row.get(MANIFEST_BRAIN_MASK_COLUMN, "") or ""):
            item[MANIFEST_BRAIN_MASK_COLUMN] = row[MANIFEST_BRAIN_MASK_COLUMN]
        items.append(item)
    return items


class NonZeroBrainMaskd(MapTransform):
    """``key``: the loaded brain mask thresholded, or, when the item has none, the voxels where any
    of ``image_keys`` is non-zero (skull-stripped images)."""

    def __init__(self, key: str, image_keys: Sequence[str], threshold: float = BRAIN_MASK_THRESHOLD) -> None:
        super().__init__(key, allow_missing_keys=True)
        self.key, self.image_keys, self.threshold = key, list(image_keys), threshold

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.key in d:
            d[self.key] = (d[self.key] >= self.threshold).to(torch.uint8)
        else:
            nonzero = torch.stack([torch.as_tensor(d[k])[0] != 0 for k in self.image_keys]).any(dim=0)
            mask = d[self.image_keys[0]].clone()  # the first image's grid and metadata
            mask[:] = nonzero[None]
            d[self.key] = mask.to(torch.uint8)
        return d


def segmentation_preprocessing(sequences: Sequence[str], image_size: int = 128) -> Compose:
    """Paths -> ``"image"`` ``(N, D, S, S)`` in [-1, 1], axial-first as the training volumes."""
    sequences = list(sequences)
    return Compose(
        [
            *load_ras([*sequences, MANIFEST_BRAIN_MASK_COLUMN], allow_missing_keys=True),
            NonZeroBrainMaskd(MANIFEST_BRAIN_MASK_COLUMN, sequences),
            FitInPlaned(
                [*sequences, MANIFEST_BRAIN_MASK_COLUMN],
                image_size,
                mode=["area"] * len(sequences) + ["nearest"],
            ),
            ConcatItemsd(sequences, name="image"),
            ScaleToUnitd(
                "image", windows_for(sequences), window_keys="window", mask_key=MANIFEST_BRAIN_MASK_COLUMN
            ),
            Transposed("image", indices=(0, 3, 1, 2)),
        ]
    )


class SaveSegmentationd(MapTransform):
    """Write ``output_dir/<case>/lesion_seg.nii.gz`` (uint8 project labels, the input's grid)."""

    def __init__(self, output_dir: str, key: str = "pred") -> None:
        super().__init__(key)
        self.output_dir, self.key = Path(output_dir), key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        pred = d[self.key]
        affine = np.asarray(pred.meta.get("original_affine", pred.affine), dtype=np.float64)
        target = self.output_dir / d["case"] / SEGMENTATION_FILE
        d["segmentation_file"] = str(
            save_nifti(np.rint(pred[0].detach().cpu().numpy()), affine, target, np.uint8)
        )
        return d


def segmentation_postprocessing(preprocessing: Compose, sequences: Sequence[str], output_dir: str) -> Compose:
    """Logits ``(C, D, S, S)`` -> label map on the input grid, written by :class:`SaveSegmentationd`."""
    return Compose(
        [
            AsDiscreted("pred", argmax=True),
            Transposed("pred", indices=(0, 2, 3, 1)),  # axial-first back to (1, S, S, D)
            Invertd("pred", transform=preprocessing, orig_keys=list(sequences)[0], nearest_interp=True),
            SaveSegmentationd(output_dir),
        ]
    )
