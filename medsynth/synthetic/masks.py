"""Is a manipulated lesion mask plausible? The mask gate of synthetic cohorts.

A manipulated label map (mirror, resize, transplant: :mod:`medsynth.transforms.lesion`) is only
worth synthesising when it could be a patient's. :class:`LesionMaskPlausibility` checks, in this
order, and reports the first failure as a named reason (:data:`MASK_REJECTION_REASONS`):

* ``outside_brain``: lesion voxels outside the brain mask;
* ``not_nested``: the lesion classes are not nested as the papers define them: the core (tumour
  and cavity) is surrounded by the lesion, so a core component (of at least
  ``min_component_voxels``; smaller ones are the sliver rule's) whose boundary touches normal brain
  or background over more than ``max_core_exposure`` of its surface is refused. Real masks are not
  always so tidy (BraTS cores touch the brain over up to ~60 % of their surface), so with a source
  the limit is the source's own exposure plus ``core_exposure_margin`` where that is higher;
* ``sliver``: more connected components of the lesion or of the core smaller than
  ``min_component_voxels`` than the source mask had (fragments left by clipping or shrinking;
  without a source, any such component);
* ``volume_out_of_range``: a class volume (edema, cavity, tumour, whole lesion, in mm³) outside the
  training cohort's range widened by ``volume_margin`` (:class:`LesionVolumeRange`);
* ``crosses_midline``: the lesion crosses the brain's midline although its source did not.

:class:`LesionMaskPlausibilityd` is the dictionary form; ``medsynth mask-check`` is the CLI.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from monai.config import NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from scipy import ndimage

from medsynth.constants import BACKGROUND, CAVITY, EDEMA, LESION_LABELS, NORMAL_BRAIN, TUMOR
from medsynth.transforms.lesion import ManipulationNotPossibleError, brain_midline

__all__ = [
    "MASK_REJECTION_REASONS",
    "LesionMaskPlausibility",
    "LesionMaskPlausibilityd",
    "LesionVolumeRange",
    "MaskVerdict",
    "class_volumes",
    "crosses_midline",
]

MASK_REJECTION_REASONS: tuple[str, ...] = (
    "outside_brain",
    "not_nested",
    "sliver",
    "volume_out_of_range",
    "crosses_midline",
)
# The regions whose volumes are compared with the training cohort's.
VOLUME_REGIONS: dict[str, tuple[int, ...]] = {
    "edema": (EDEMA,),
    "cavity": (CAVITY,),
    "tumor": (TUMOR,),
    "lesion": LESION_LABELS,
}


def _spatial(array: NdarrayOrTensor) -> np.ndarray:
    """A spatial numpy array from a channel-first (1, ...) or spatial array or tensor."""
    data = np.asarray(array.detach().cpu() if hasattr(array, "detach") else array)
    return data[0] if data.ndim in (3, 4) and data.shape[0] == 1 else data


def class_volumes(label: np.ndarray, voxel_volume: float = 1.0) -> dict[str, float]:
    """Volume of each region of :data:`VOLUME_REGIONS` in ``label`` (voxels times ``voxel_volume``)."""
    return {
        name: float(np.count_nonzero(np.isin(label, values))) * voxel_volume
        for name, values in VOLUME_REGIONS.items()
    }


def crosses_midline(label: np.ndarray, brain: np.ndarray, axis: int = 0, min_fraction: float = 0.02) -> bool:
    """Whether the lesion has at least ``min_fraction`` of its voxels on each side of the brain's midline."""
    lesion = np.isin(label, LESION_LABELS)
    total = np.count_nonzero(lesion)
    if total == 0 or not brain.any():
        return False
    midline = brain_midline(brain, axis)
    positions = np.nonzero(lesion)[axis]
    left = np.count_nonzero(positions < midline) / total
    return bool(min(left, 1.0 - left) >= min_fraction)


@dataclass
class LesionVolumeRange:
    """The training cohort's range of each region's volume (mm³), widened by a relative ``margin``.

    Args:
        low, high: smallest and largest volume per region of :data:`VOLUME_REGIONS`.
        margin: a volume ``v`` is in range when ``low / (1 + margin) <= v <= high * (1 + margin)``.
        patients: how many label maps the range comes from.
    """

    low: dict[str, float]
    high: dict[str, float]
    margin: float = 0.25
    patients: int = 0

    @classmethod
    def from_label_files(cls, paths: Iterable[str | os.PathLike], margin: float = 0.25) -> LesionVolumeRange:
        """The range of the label maps in ``paths`` (NIfTI, the project's labels)."""
        import nibabel as nib

        volumes = []
        for path in paths:
            image = nib.load(str(path))
            voxel = float(np.prod(image.header.get_zooms()[:3]))
            volumes.append(class_volumes(np.rint(np.asanyarray(image.dataobj)).astype(np.int16), voxel))
        if not volumes:
            raise ValueError("no label maps to take the lesion volume range from")
        return cls(
            low={k: min(v[k] for v in volumes) for k in VOLUME_REGIONS},
            high={k: max(v[k] for v in volumes) for k in VOLUME_REGIONS},
            margin=margin,
            patients=len(volumes),
        )

    def problem(self, volumes: Mapping[str, float]) -> str | None:
        """Why ``volumes`` are out of range (``None`` when they are in)."""
        for name in VOLUME_REGIONS:
            low, high = self.low[name] / (1.0 + self.margin), self.high[name] * (1.0 + self.margin)
            if not low <= volumes[name] <= high:
                return (
                    f"{name} volume {volumes[name]:.0f} mm³ outside the training range "
                    f"[{low:.0f}, {high:.0f}] mm³ (margin {self.margin:.0%})"
                )
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "margin": self.margin, "patients": self.patients}


@dataclass
class MaskVerdict:
    """The validator's answer: ``reason`` is ``None`` for an accepted mask, else one of
    :data:`MASK_REJECTION_REASONS`, with ``detail`` in words; ``measures`` holds what was measured."""

    reason: str | None
    detail: str = ""
    measures: dict[str, Any] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return self.reason is None

    def to_dict(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "reason": self.reason, "detail": self.detail, **self.measures}


class LesionMaskPlausibility(Transform):
    """Check a (manipulated) label map; returns a :class:`MaskVerdict` (see the module docstring).

    Args:
        volume_range: the training cohort's class volumes; ``None`` skips the volume check.
        min_component_voxels: smallest connected component of the lesion and of the core.
        max_core_exposure: largest fraction of a core component's boundary voxels that may touch
            normal brain or background.
        core_exposure_margin: with a source, the exposure may also reach the source's plus this.
        midline_axis: the left-right axis (0 in RAS).
        midline_min_fraction: share of the lesion needed on each side to count as crossing.
        connectivity: voxel connectivity of the components (1: faces).
    """

    def __init__(
        self,
        volume_range: LesionVolumeRange | None = None,
        min_component_voxels: int = 20,
        max_core_exposure: float = 0.5,
        core_exposure_margin: float = 0.1,
        midline_axis: int = 0,
        midline_min_fraction: float = 0.02,
        connectivity: int = 1,
    ) -> None:
        self.volume_range = volume_range
        self.min_component_voxels = int(min_component_voxels)
        self.max_core_exposure = float(max_core_exposure)
        self.core_exposure_margin = float(core_exposure_margin)
        self.midline_axis = int(midline_axis)
        self.midline_min_fraction = float(midline_min_fraction)
        self.connectivity = int(connectivity)

    def _structure(self, ndim: int) -> np.ndarray:
        return ndimage.generate_binary_structure(ndim, self.connectivity)

    def core_exposure(self, label: np.ndarray) -> float:
        """Largest fraction, over the core's components of at least ``min_component_voxels``, of
        boundary voxels next to non-lesion."""
        core = np.isin(label, (CAVITY, TUMOR))
        if not core.any():
            return 0.0
        structure = self._structure(label.ndim)
        outside_lesion = np.isin(label, (BACKGROUND, NORMAL_BRAIN))
        touches_outside = ndimage.binary_dilation(outside_lesion, structure) & core
        boundary = core & ~ndimage.binary_erosion(core, structure, border_value=0)
        components, count = ndimage.label(core, structure)
        exposure = 0.0
        for index, region in enumerate(ndimage.find_objects(components), start=1):
            member = components[region] == index
            edge = np.count_nonzero(boundary[region] & member)
            if edge and np.count_nonzero(member) >= self.min_component_voxels:
                exposure = max(exposure, np.count_nonzero(touches_outside[region] & member) / edge)
        return float(exposure)

    def small_components(self, label: np.ndarray) -> tuple[int, int]:
        """``(count, smallest size)`` of the lesion's and the core's connected components below
        ``min_component_voxels`` (smallest size 0 when there is none)."""
        structure = self._structure(label.ndim)
        sizes: list[int] = []
        for region in (np.isin(label, LESION_LABELS), np.isin(label, (CAVITY, TUMOR))):
            components, count = ndimage.label(region, structure)
            if count:
                sizes += [
                    int(v) for v in np.bincount(components.ravel())[1:] if v < self.min_component_voxels
                ]
        return len(sizes), (min(sizes) if sizes else 0)

    def __call__(
        self,
        label: NdarrayOrTensor,
        brain_mask: NdarrayOrTensor | None = None,
        source_label: NdarrayOrTensor | None = None,
        voxel_volume: float = 1.0,
    ) -> MaskVerdict:
        """Check ``label`` (spatial or channel-first), inside ``brain_mask`` (default ``label > 0``);
        ``source_label`` is the unmanipulated map (for the midline rule; without it the rule is
        skipped); ``voxel_volume`` in mm³ scales the volumes."""
        label = np.rint(_spatial(label)).astype(np.int16)
        brain = (label > 0) if brain_mask is None else _spatial(brain_mask) > 0
        lesion = np.isin(label, LESION_LABELS)
        measures: dict[str, Any] = {"lesion_voxels": int(np.count_nonzero(lesion))}
        outside = int(np.count_nonzero(lesion & ~brain))
        measures["outside_brain_voxels"] = outside
        if outside:
            return MaskVerdict("outside_brain", f"{outside} lesion voxel(s) outside the brain", measures)
        if not lesion.any():
            return MaskVerdict("volume_out_of_range", "the label map has no lesion", measures)
        source = None if source_label is None else np.rint(_spatial(source_label)).astype(np.int16)
        measures["core_exposure"] = self.core_exposure(label)
        allowed_exposure = self.max_core_exposure
        if source is not None:
            measures["source_core_exposure"] = self.core_exposure(source)
            allowed_exposure = max(
                allowed_exposure, measures["source_core_exposure"] + self.core_exposure_margin
            )
        if measures["core_exposure"] > allowed_exposure:
            return MaskVerdict(
                "not_nested",
                f"{measures['core_exposure']:.0%} of a tumour/cavity component's boundary touches normal "
                f"brain or background (at most {allowed_exposure:.0%})",
                measures,
            )
        small, smallest = self.small_components(label)
        allowed = 0 if source is None else self.small_components(source)[0]
        measures["small_components"], measures["source_small_components"] = small, allowed
        if small > allowed:
            return MaskVerdict(
                "sliver",
                f"{small} lesion component(s) under {self.min_component_voxels} voxels, the smallest of "
                f"{smallest} (the source had {allowed})",
                measures,
            )
        measures["volumes_mm3"] = class_volumes(label, voxel_volume)
        if self.volume_range is not None:
            problem = self.volume_range.problem(measures["volumes_mm3"])
            if problem is not None:
                return MaskVerdict("volume_out_of_range", problem, measures)
        if source is not None:
            try:
                crossed = crosses_midline(label, brain, self.midline_axis, self.midline_min_fraction)
                source_crossed = crosses_midline(source, brain, self.midline_axis, self.midline_min_fraction)
            except ManipulationNotPossibleError as error:  # empty brain
                return MaskVerdict("outside_brain", str(error), measures)
            measures["crosses_midline"], measures["source_crosses_midline"] = crossed, source_crossed
            if crossed and not source_crossed:
                return MaskVerdict(
                    "crosses_midline", "the lesion crosses the midline and its source does not", measures
                )
        return MaskVerdict(None, "", measures)


class LesionMaskPlausibilityd(MapTransform):
    """Dictionary form of :class:`LesionMaskPlausibility`: the verdict of ``keys`` goes to
    ``<key>_plausibility`` (a dict, :meth:`MaskVerdict.to_dict`).

    Args:
        keys: the label maps to check.
        brain_mask_key: the brain mask entry (absent: ``label > 0``).
        source_key: the unmanipulated label map entry (absent: no midline rule).
        validator: the checker (default settings when ``None``).
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: str | Sequence[str],
        brain_mask_key: str = "brain_mask",
        source_key: str = "source_label",
        validator: LesionMaskPlausibility | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.brain_mask_key = brain_mask_key
        self.source_key = source_key
        self.validator = validator or LesionMaskPlausibility()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            affine = getattr(d[key], "affine", None)  # a MetaTensor's: the voxel volume in mm³
            voxel = 1.0 if affine is None else float(abs(np.linalg.det(np.asarray(affine)[:3, :3])))
            verdict = self.validator(d[key], d.get(self.brain_mask_key), d.get(self.source_key), voxel)
            d[f"{key}_plausibility"] = verdict.to_dict()
        return d
