"""Brain-tissue probability maps as a conditioning input (Shin et al. 2018): the CSF, grey-matter and
white-matter maps of the normal brain, with the lesion excluded.

:class:`TissueMapsForLabel` makes a stack of maps agree with a label map: zero outside normal brain
(background and lesion), at most 1 in total, and in normal brain any missing probability given to
white matter. The last rule covers a manipulated lesion mask: where a lesion was removed (mirrored
away, shrunk) the source patient's maps, made with that lesion excluded, have nothing, and gliomas
sit in white matter. Training and inference apply it alike, so the network never sees maps that
disagree with its mask.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import ConcatItemsd, DeleteItemsd, MapTransform, Transform

from medsynth.constants import NORMAL_BRAIN, TISSUE_CLASSES, TISSUE_COLUMNS

__all__ = ["TissueMapsForLabel", "TissueMapsForLabeld", "stacked_tissue_maps"]

_WHITE_MATTER = TISSUE_CLASSES.index("wm")


class TissueMapsForLabel(Transform):
    """``(T, ...)`` tissue probability maps and a ``(1, ...)`` label map on the same grid -> the maps
    restricted to the label's normal brain, summing to 1 there (see the module docstring)."""

    def __call__(self, tissue: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if tissue.shape[0] != len(TISSUE_CLASSES):
            raise ValueError(
                f"expected {len(TISSUE_CLASSES)} tissue maps {TISSUE_CLASSES}, got {tissue.shape[0]}"
            )
        if tuple(tissue.shape[1:]) != tuple(label.shape[1:]):
            raise ValueError(
                f"tissue maps {list(tissue.shape[1:])} and label map {list(label.shape[1:])} differ in shape"
            )
        normal = (torch.round(torch.as_tensor(label, dtype=torch.float32)) == NORMAL_BRAIN).to(tissue.dtype)
        maps = torch.nan_to_num(tissue).clamp(0.0, 1.0) * normal
        total = maps.sum(dim=0, keepdim=True)
        maps = maps / total.clamp(min=1.0)
        deficit = (1.0 - maps.sum(dim=0)).clamp(min=0.0) * normal[0]
        maps[_WHITE_MATTER] = maps[_WHITE_MATTER] + deficit
        return maps


class TissueMapsForLabeld(MapTransform):
    """Dictionary wrapper of :class:`TissueMapsForLabel`: ``keys`` hold tissue-map stacks, ``label_key``
    the label map they must agree with."""

    def __init__(
        self, keys: KeysCollection = "tissue", label_key: str = "label", allow_missing_keys: bool = False
    ):
        super().__init__(keys, allow_missing_keys)
        self.label_key = label_key
        self.converter = TissueMapsForLabel()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key], d[self.label_key])
        return d


def stacked_tissue_maps(label_key: str = "label", tissue_key: str = "tissue") -> list:
    """Loaded ``tissue_<class>`` volumes -> ``tissue_key`` ``(3, ...)`` agreeing with ``label_key``
    (on the grid they were loaded on: fit the plane afterwards, with area interpolation)."""
    keys = list(TISSUE_COLUMNS)
    return [
        ConcatItemsd(keys, name=tissue_key),
        DeleteItemsd(keys),
        TissueMapsForLabeld(tissue_key, label_key),
    ]
