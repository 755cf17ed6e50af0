"""Dictionary wrappers (suffix ``d``) of the lesion-mask transforms of :mod:`.array`.

Each applies its array transform to the label map of every key, with the brain mask read from
``brain_mask_key`` when given, and stores the ``info`` of what was done under ``"<key>_manipulation"``.
Random wrappers give every key of one call the same draws.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Randomizable

from medsynth.transforms.lesion.array import (
    LesionManipulation,
    MirrorLesion,
    RandLesionManipulation,
    RandMirrorLesion,
    RandResizeTumor,
    RandTransplantLesion,
    ResizeTumor,
    TransplantLesion,
)

__all__ = [
    "LesionManipulationd",
    "MirrorLesiond",
    "RandLesionManipulationd",
    "RandMirrorLesiond",
    "RandResizeTumord",
    "RandTransplantLesiond",
    "ResizeTumord",
    "TransplantLesiond",
]


class _LabelMapDictTransform(MapTransform):
    """Apply an array transform with ``return_info=True`` to each key; store the info beside it."""

    def __init__(
        self,
        keys: KeysCollection,
        brain_mask_key: str | None = None,
        info_key_postfix: str = "manipulation",
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.brain_mask_key = brain_mask_key
        self.info_key_postfix = info_key_postfix

    def _apply(self, d: dict, key: Hashable, **kwargs: Any) -> None:
        brain = None if self.brain_mask_key is None else d[self.brain_mask_key]
        try:
            d[key], info = self.transform(d[key], brain, **kwargs)
        except ValueError as error:
            # Same exception type, with the key and (for loaded images) the file named.
            source = getattr(d[key], "meta", {}).get("filename_or_obj")
            where = f"key {key!r}" + (f", file {source}" if source else "")
            raise type(error)(f"{where}: {error}") from error
        d[f"{key}_{self.info_key_postfix}"] = info

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            self._apply(d, key)
        return d


class MirrorLesiond(_LabelMapDictTransform):
    """Dictionary wrapper of :class:`MirrorLesion` (brain mask optionally from ``brain_mask_key``)."""

    def __init__(
        self,
        keys: KeysCollection,
        brain_mask_key: str | None = None,
        axis: int = 0,
        midline: str = "center_of_mass",
        max_outside_fraction: float = 0.25,
        spatial_dims: int | None = None,
        info_key_postfix: str = "manipulation",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, brain_mask_key, info_key_postfix, allow_missing_keys)
        self.transform = MirrorLesion(axis, midline, max_outside_fraction, spatial_dims, return_info=True)


class ResizeTumord(_LabelMapDictTransform):
    """Dictionary wrapper of :class:`ResizeTumor`."""

    def __init__(
        self,
        keys: KeysCollection,
        percent: float,
        brain_mask_key: str | None = None,
        connectivity: int = 1,
        spatial_dims: int | None = None,
        info_key_postfix: str = "manipulation",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, brain_mask_key, info_key_postfix, allow_missing_keys)
        self.transform = ResizeTumor(percent, connectivity, spatial_dims, return_info=True)


class TransplantLesiond(_LabelMapDictTransform):
    """Dictionary wrapper of :class:`TransplantLesion`; the donor comes from ``donor_key`` or ``donor``."""

    def __init__(
        self,
        keys: KeysCollection,
        donor_key: str | None = None,
        donor: NdarrayOrTensor | None = None,
        brain_mask_key: str | None = None,
        offset: Sequence[int] | None = None,
        max_outside_fraction: float = 0.25,
        spatial_dims: int | None = None,
        info_key_postfix: str = "manipulation",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, brain_mask_key, info_key_postfix, allow_missing_keys)
        if (donor_key is None) == (donor is None):
            raise ValueError("give exactly one of donor_key and donor")
        self.donor_key = donor_key
        self.transform = TransplantLesion(donor, offset, max_outside_fraction, spatial_dims, return_info=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        donor = None if self.donor_key is None else d[self.donor_key]
        for key in self.key_iterator(d):
            self._apply(d, key, donor=donor)
        return d


class _RandLabelMapDictTransform(Randomizable, _LabelMapDictTransform):
    """Random dictionary wrapper: the same draws for every key of one call, from ``self.R``."""

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> Randomizable:
        super().set_random_state(seed, state)
        self.transform.set_random_state(state=self.R)
        return self

    def randomize(self, data: Any = None) -> None:
        self.transform.randomize()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        start = self.R.get_state()
        for key in self.key_iterator(d):
            # Rewind so that every key sees the same draws (e.g. label map and a copy of it).
            self.R.set_state(start)
            self._apply(d, key)
        return d


class RandMirrorLesiond(_RandLabelMapDictTransform):
    """Dictionary wrapper of :class:`RandMirrorLesion`."""

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        brain_mask_key: str | None = None,
        axis: int = 0,
        midline: str = "center_of_mass",
        max_outside_fraction: float = 0.25,
        spatial_dims: int | None = None,
        info_key_postfix: str = "manipulation",
        allow_missing_keys: bool = False,
    ):
        _LabelMapDictTransform.__init__(self, keys, brain_mask_key, info_key_postfix, allow_missing_keys)
        self.transform = RandMirrorLesion(
            prob, axis, midline, max_outside_fraction, spatial_dims, return_info=True
        )
        self.set_random_state()


class RandResizeTumord(_RandLabelMapDictTransform):
    """Dictionary wrapper of :class:`RandResizeTumor`."""

    def __init__(
        self,
        keys: KeysCollection,
        percent_range: Sequence[float] = (-50.0, 100.0),
        prob: float = 1.0,
        brain_mask_key: str | None = None,
        connectivity: int = 1,
        spatial_dims: int | None = None,
        info_key_postfix: str = "manipulation",
        allow_missing_keys: bool = False,
    ):
        _LabelMapDictTransform.__init__(self, keys, brain_mask_key, info_key_postfix, allow_missing_keys)
        self.transform = RandResizeTumor(percent_range, prob, connectivity, spatial_dims, return_info=True)
        self.set_random_state()


class RandTransplantLesiond(_RandLabelMapDictTransform):
    """Dictionary wrapper of :class:`RandTransplantLesion` (donors given as a list of label maps)."""

    def __init__(
        self,
        keys: KeysCollection,
        donors: Sequence[NdarrayOrTensor],
        prob: float = 1.0,
        brain_mask_key: str | None = None,
        random_location: bool = True,
        max_outside_fraction: float = 0.25,
        max_attempts: int = 50,
        spatial_dims: int | None = None,
        info_key_postfix: str = "manipulation",
        allow_missing_keys: bool = False,
    ):
        _LabelMapDictTransform.__init__(self, keys, brain_mask_key, info_key_postfix, allow_missing_keys)
        self.transform = RandTransplantLesion(
            donors, prob, random_location, max_outside_fraction, max_attempts, spatial_dims, return_info=True
        )
        self.set_random_state()


class RandLesionManipulationd(_RandLabelMapDictTransform):
    """Dictionary wrapper of :class:`RandLesionManipulation`; the info is a list per key."""

    def __init__(
        self,
        keys: KeysCollection,
        brain_mask_key: str | None = None,
        mirror_prob: float = 0.5,
        resize_prob: float = 0.5,
        resize_percent_range: Sequence[float] = (-50.0, 100.0),
        transplant_prob: float = 0.0,
        donors: Sequence[NdarrayOrTensor] | None = None,
        random_location: bool = True,
        axis: int = 0,
        midline: str = "center_of_mass",
        max_outside_fraction: float = 0.25,
        connectivity: int = 1,
        skip_impossible: bool = True,
        spatial_dims: int | None = None,
        info_key_postfix: str = "manipulation",
        allow_missing_keys: bool = False,
    ):
        _LabelMapDictTransform.__init__(self, keys, brain_mask_key, info_key_postfix, allow_missing_keys)
        self.transform = RandLesionManipulation(
            mirror_prob,
            resize_prob,
            resize_percent_range,
            transplant_prob,
            donors,
            random_location,
            axis,
            midline,
            max_outside_fraction,
            connectivity,
            skip_impossible,
            spatial_dims,
            return_info=True,
        )
        self.set_random_state()


class LesionManipulationd(_LabelMapDictTransform):
    """Dictionary wrapper of :class:`LesionManipulation`; the donor (if any) comes from ``donor_key``.

    A missing or empty ``donor_key`` entry means no donor (``"transplant"`` then fails with a
    message that says so).
    """

    def __init__(
        self,
        keys: KeysCollection,
        name: str = "none",
        brain_mask_key: str | None = None,
        donor_key: str | None = None,
        grow_percent: float = 100.0,
        shrink_percent: float = -50.0,
        seed: int = 0,
        spatial_dims: int | None = None,
        info_key_postfix: str = "manipulation",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, brain_mask_key, info_key_postfix, allow_missing_keys)
        self.donor_key = donor_key
        self.transform = LesionManipulation(
            name, grow_percent, shrink_percent, seed, spatial_dims=spatial_dims, return_info=True
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        donor = d.get(self.donor_key) if self.donor_key is not None else None
        if isinstance(donor, str) and not donor:
            donor = None
        for key in self.key_iterator(d):
            self._apply(d, key, donor=donor)
        return d
