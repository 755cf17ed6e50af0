"""Volume-level transform chains shared by the training dataset and inference, so that a label map
and an atlas are read, oriented, fitted and scaled by the same transforms in both.

Each function returns a list of MONAI dictionary transforms, to be placed in a ``Compose``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.transforms import AsDiscreted, ConcatItemsd, CopyItemsd, DeleteItemsd, LoadImaged, Orientationd

from medsynth.constants import NUM_LABELS, atlas_column
from medsynth.transforms.intensity import ScaleToUnitd, WindowSpec, windows_for
from medsynth.transforms.slices import FitInPlaned

__all__ = ["load_ras", "one_hot_mask", "scaled_atlas"]


def load_ras(keys: Sequence[str], allow_missing_keys: bool = False) -> list:
    """Read NIfTI volumes as float32 channel-first MetaTensors, reoriented to RAS (the training
    orientation)."""
    return [
        LoadImaged(
            keys,
            reader="NibabelReader",
            image_only=True,
            ensure_channel_first=True,
            dtype=np.float32,
            allow_missing_keys=allow_missing_keys,
        ),
        # Explicit nibabel-style axis labels: "RAS" means +x right, +y anterior, +z superior.
        Orientationd(
            keys,
            axcodes="RAS",
            labels=(("L", "R"), ("P", "A"), ("I", "S")),
            allow_missing_keys=allow_missing_keys,
        ),
    ]


def one_hot_mask(
    label_key: str, mask_key: str = "mask", image_size: int | None = None, crop_tolerance: float = 0.0
) -> list:
    """``mask_key``: the uint8 one-hot ``(5, ...)`` form of the label map under ``label_key``, with the
    plane fitted to ``image_size`` first (nearest neighbour) when given; ``label_key`` is left as it is."""
    fit = (
        []
        if image_size is None
        else [FitInPlaned(mask_key, image_size, mode="nearest", crop_tolerance=crop_tolerance)]
    )
    return [
        CopyItemsd(label_key, names=mask_key),
        *fit,
        AsDiscreted(mask_key, to_onehot=NUM_LABELS, dtype=torch.uint8),
    ]


def scaled_atlas(
    sequences: Sequence[str],
    image_size: int,
    windows: Mapping[str, WindowSpec] | None = None,
    crop_tolerance: float = 0.0,
    atlas_key: str = "atlas",
    keep_volumes: bool = False,
) -> list:
    """Loaded ``atlas_<sequence>`` volumes -> ``atlas_key`` ``(N, S, S, D)`` in [-1, 1] and its
    ``(N, 2)`` windows under ``"<atlas_key>_window"``; the plane is fitted before scaling, and the
    percentile bounds use the atlas's non-zero voxels. ``keep_volumes`` keeps the fitted
    ``atlas_<sequence>`` entries (inference inverts the fitting of a prediction through them)."""
    keys = [atlas_column(s) for s in sequences]
    return [
        FitInPlaned(keys, image_size, mode="area", crop_tolerance=crop_tolerance),
        ConcatItemsd(keys, name=atlas_key),
        *([] if keep_volumes else [DeleteItemsd(keys)]),
        ScaleToUnitd(atlas_key, windows_for(sequences, windows), window_keys=f"{atlas_key}_window"),
    ]
