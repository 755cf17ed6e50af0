"""Lesion-mask manipulations as pure functions on spatial numpy arrays: mirror, resize the tumour, transplant.

The synthesis networks take a label map (0 background, 1 normal brain, 2 edema, 3 cavity, 4 tumour,
see :mod:`medsynth.constants`) and turn it into multi-sequence MRI. New training data come from
manipulated label maps: the lesion mirrored across the midline, the tumour grown by 100 % or shrunk
by 50 %, or the lesion replaced by another patient's lesion (SAMR Fig. 3, CG-SAMR Fig. 7).

Conventions shared by every function (and by the transforms built on them):

* The brain is a boolean mask of the label map's shape. Voxels outside the brain are never
  changed, and a lesion is never placed outside it.
* The lesion is the union of edema, cavity and tumour. A removed lesion becomes normal brain.
* A request that cannot be met for this label map (no tumour to resize, a lesion that would fall
  outside the brain, ...) raises :class:`ManipulationNotPossibleError`, a ``ValueError``.
* Every function returns the new label map and an ``info`` dictionary of what was done (achieved
  resize ratio, offsets, clipped fraction ...) whose keys are those of :data:`INFO_DEFAULTS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from medsynth.constants import CAVITY, EDEMA, LESION_LABELS, NORMAL_BRAIN, TUMOR

__all__ = [
    "INFO_DEFAULTS",
    "INFO_META_KEY",
    "MIDLINE_METHODS",
    "ManipulationNotPossibleError",
    "brain_midline",
    "mirror_lesion",
    "resize_tumor",
    "transplant_lesion",
]

INFO_META_KEY = "lesion_manipulation"
MIDLINE_METHODS = ("center_of_mass", "bounding_box")


class ManipulationNotPossibleError(ValueError):
    """The requested manipulation cannot be carried out on this label map (the message says why)."""


_NAN = float("nan")
# Every info dictionary of an operation has the same keys, applied or not, so that a DataLoader can
# collate them; values of an operation that was not applied are these defaults.
INFO_DEFAULTS: dict[str, dict[str, Any]] = {
    "mirror_lesion": {"axis": -1, "midline": _NAN, "reflection_sum": -1, "clipped_fraction": _NAN},
    "resize_tumor": {
        "requested_percent": _NAN,
        "requested_ratio": _NAN,
        "original_voxels": -1,
        "new_voxels": -1,
        "achieved_ratio": _NAN,
        "steps": 0,
        "lesion_growth_voxels": 0,
    },
    "transplant_lesion": {
        "offset": None,
        "donor_index": -1,
        "donor_lesion_voxels": -1,
        "clipped_fraction": _NAN,
    },
}


def _info(operation: str, ndim: int, applied: bool = True, reason: str = "", **values: Any) -> dict[str, Any]:
    """Info dictionary of ``operation`` with the fixed keys of :data:`INFO_DEFAULTS`."""
    unknown = set(values) - set(INFO_DEFAULTS[operation])
    if unknown:
        raise KeyError(f"unknown info fields {sorted(unknown)} for {operation}")
    info: dict[str, Any] = {"operation": operation, "applied": applied, "reason": reason}
    info.update(INFO_DEFAULTS[operation])
    if info.get("offset", 0) is None:
        info["offset"] = [0] * ndim
    info.update(values)
    return info


def _lesion(label: np.ndarray) -> np.ndarray:
    return np.isin(label, LESION_LABELS)


def _paint_lesion(
    label: np.ndarray,
    brain: np.ndarray,
    coords: np.ndarray,
    values: np.ndarray,
    max_outside_fraction: float,
    what: str,
) -> tuple[np.ndarray, float]:
    """Remove the lesion of ``label`` and paint ``values`` at ``coords`` (ndim x N), clipped to the brain.

    Raises:
        ManipulationNotPossibleError: when more than ``max_outside_fraction`` of the new lesion
            falls outside the brain (or the array), or none of it falls inside.
    """
    outside_fraction, inside_coords, inside_values = _clip_to_brain(brain, coords, values)
    if outside_fraction > max_outside_fraction or inside_values.size == 0:
        raise ManipulationNotPossibleError(
            f"{what}: {outside_fraction:.1%} of the lesion ({values.size} voxels) "
            "would fall outside the brain, "
            f"more than the allowed {max_outside_fraction:.1%}"
        )
    out = label.copy()
    out[_lesion(label) & brain] = NORMAL_BRAIN
    out[tuple(inside_coords)] = inside_values
    return out, outside_fraction


def _clip_to_brain(
    brain: np.ndarray, coords: np.ndarray, values: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """Fraction of ``coords`` outside the brain or the array, and the coordinates/values inside."""
    shape = np.asarray(brain.shape)[:, None]
    in_bounds = np.all((coords >= 0) & (coords < shape), axis=0)
    coords, values_in = coords[:, in_bounds], values[in_bounds]
    inside = brain[tuple(coords)]
    outside_fraction = 1.0 - float(np.count_nonzero(inside)) / float(values.size)
    return outside_fraction, coords[:, inside], values_in[inside]


def brain_midline(brain: np.ndarray, axis: int = 0, method: str = "center_of_mass") -> float:
    """Position of the brain's mid-plane along ``axis`` in voxel coordinates.

    Args:
        brain: boolean spatial brain mask.
        axis: the left-right axis.
        method: ``"center_of_mass"`` (mean coordinate of the brain voxels) or ``"bounding_box"``
            (centre of the brain's extent, insensitive to a lesion's mass effect on one side).
    """
    if method not in MIDLINE_METHODS:
        raise ValueError(f"unknown midline method {method!r}; choose from {MIDLINE_METHODS}")
    other_axes = tuple(a for a in range(brain.ndim) if a != axis)
    profile = brain.sum(axis=other_axes, dtype=np.float64)
    if profile.sum() == 0:
        raise ManipulationNotPossibleError("the brain mask is empty, there is no midline")
    positions = np.arange(profile.size, dtype=np.float64)
    if method == "center_of_mass":
        return float((profile * positions).sum() / profile.sum())
    occupied = np.flatnonzero(profile)
    return float(occupied[0] + occupied[-1]) / 2.0


def mirror_lesion(
    label: np.ndarray,
    brain: np.ndarray,
    axis: int = 0,
    midline: str = "center_of_mass",
    max_outside_fraction: float = 0.25,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Mirror the lesion across the brain's midline along ``axis``.

    Voxel ``x`` goes to ``m - x`` with ``m = round(2 * midline)``, an exact involution, so mirroring
    twice restores the label map when nothing was clipped. The old lesion becomes normal brain; the
    mirrored lesion is clipped to the brain.

    Args:
        label: spatial label map (0..4).
        brain: boolean brain mask of the same shape.
        axis: left-right spatial axis (0 in RAS).
        midline: see :func:`brain_midline`.
        max_outside_fraction: largest tolerated fraction of the lesion falling outside the brain.

    Returns:
        the new label map and an info dictionary.
    """
    if not -label.ndim <= axis < label.ndim:
        raise ValueError(f"axis {axis} out of range for a {label.ndim}D label map")
    axis = axis % label.ndim
    lesion = _lesion(label)
    if not lesion.any():
        raise ManipulationNotPossibleError("mirror: the label map has no lesion (labels 2, 3, 4)")
    centre = brain_midline(brain, axis, midline)
    reflection = int(np.floor(2.0 * centre + 0.5))
    coords = np.array(np.nonzero(lesion))
    values = label[tuple(coords)]
    coords[axis] = reflection - coords[axis]
    out, outside = _paint_lesion(label, brain, coords, values, max_outside_fraction, "mirror")
    info = _info(
        "mirror_lesion",
        label.ndim,
        axis=axis,
        midline=centre,
        reflection_sum=reflection,
        clipped_fraction=outside,
    )
    return out, info


def resize_tumor(
    label: np.ndarray, brain: np.ndarray, percent: float, connectivity: int = 1
) -> tuple[np.ndarray, dict[str, Any]]:
    """Grow or shrink the tumour (label 4) by ``percent`` of its area (2D) or volume (3D).

    Growth dilates the tumour step by step (structuring element of ``connectivity``); it converts
    edema first and leaves the cavity untouched. Only when no edema borders the tumour any more does
    it extend into normal brain, which enlarges the lesion envelope, always inside ``brain``.
    Shrinking erodes the tumour step by step and turns the removed tumour into edema, so the lesion
    envelope is unchanged. The last step adds (removes) only as many boundary voxels as needed,
    nearest to (farthest inside) the original tumour first, so the achieved voxel count is the
    requested one rounded to a voxel.

    Args:
        label: spatial label map (0..4).
        brain: boolean brain mask of the same shape.
        percent: change in percent, e.g. ``100`` doubles, ``-50`` halves the tumour.
        connectivity: connectivity of the structuring element (1: faces only).

    Returns:
        the new label map and an info dictionary with ``achieved_ratio``.

    Raises:
        ManipulationNotPossibleError: no tumour, a shrink by 100 % or more (or to less than one
            voxel), or a growth that does not fit in the brain.
    """
    tumor = label == TUMOR
    original = int(np.count_nonzero(tumor))
    if original == 0:
        raise ManipulationNotPossibleError("resize tumour: the label map has no tumour (label 4)")
    if percent <= -100:
        raise ManipulationNotPossibleError(
            f"resize tumour: shrinking by {-percent:g} % (>= 100 %) removes the whole tumour"
        )
    target = round(original * (1.0 + percent / 100.0))
    if target < 1:
        raise ManipulationNotPossibleError(
            f"resize tumour: {percent:g} % of a {original}-voxel tumour leaves less than one voxel"
        )
    structure = ndimage.generate_binary_structure(label.ndim, connectivity)
    if target >= original:
        new_tumor, steps = _grow(label, brain, tumor, target, structure)
    else:
        new_tumor, steps = _shrink(tumor, target, structure)
    out = label.copy()
    out[tumor & ~new_tumor] = EDEMA
    out[new_tumor] = TUMOR
    achieved = int(np.count_nonzero(new_tumor))
    info = _info(
        "resize_tumor",
        label.ndim,
        requested_percent=float(percent),
        requested_ratio=1.0 + percent / 100.0,
        original_voxels=original,
        new_voxels=achieved,
        achieved_ratio=achieved / original,
        steps=steps,
        lesion_growth_voxels=int(np.count_nonzero(_lesion(out) & ~_lesion(label))),
    )
    return out, info


def _bounding_box(mask: np.ndarray, pad: int) -> tuple[slice, ...]:
    """Slices of the bounding box of a non-empty ``mask``, grown by ``pad`` voxels within the array."""
    box = []
    for axis, size in enumerate(mask.shape):
        occupied = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(occupied[0]) - pad, 0), min(int(occupied[-1]) + pad + 1, size)))
    return tuple(box)


def _grow(
    label: np.ndarray, brain: np.ndarray, tumor: np.ndarray, target: int, structure: np.ndarray
) -> tuple[np.ndarray, int]:
    edema = label == EDEMA
    allowed = brain & (label != CAVITY)
    current = tumor.copy()
    count, steps = int(np.count_nonzero(current)), 0
    while count < target:
        # The next front lies within one voxel of the tumour: work in that box, not the volume.
        box = _bounding_box(current, 1)
        sub = current[box]
        front = ndimage.binary_dilation(sub, structure) & ~sub & allowed[box]
        front_in_lesion = front & edema[box]
        if front_in_lesion.any():
            front = front_in_lesion
        elif not front.any():
            raise ManipulationNotPossibleError(
                f"resize tumour: the tumour can grow to {count} voxels at most inside the brain "
                f"(without entering the cavity), {target} were requested"
            )
        candidates = np.flatnonzero(front)
        needed = target - count
        if candidates.size > needed:
            # Last, partial step: voxels closest to the original tumour first. The box holds the
            # whole original tumour, so the distances are exact.
            distance = ndimage.distance_transform_edt(~tumor[box]).ravel()
            candidates = candidates[np.argsort(distance[candidates], kind="stable")[:needed]]
        sub[np.unravel_index(candidates, sub.shape)] = True
        count += candidates.size
        steps += 1
    return current, steps


def _shrink(tumor: np.ndarray, target: int, structure: np.ndarray) -> tuple[np.ndarray, int]:
    box = _bounding_box(tumor, 1)  # the tumour only shrinks: its padded box is enough
    original = tumor[box]
    current = original.copy()
    count, steps = int(np.count_nonzero(current)), 0
    while count > target:
        rim = current & ~ndimage.binary_erosion(current, structure)
        candidates = np.flatnonzero(rim)
        excess = count - target
        if candidates.size > excess:
            # Last, partial step: voxels shallowest inside the original tumour first.
            depth = ndimage.distance_transform_edt(original).ravel()
            candidates = candidates[np.argsort(depth[candidates], kind="stable")[:excess]]
        current[np.unravel_index(candidates, current.shape)] = False
        count -= candidates.size
        steps += 1
    result = np.zeros_like(tumor)
    result[box] = current
    return result, steps


def transplant_lesion(
    label: np.ndarray,
    brain: np.ndarray,
    donor: np.ndarray,
    offset: Sequence[int] | None = None,
    max_outside_fraction: float = 0.25,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Replace the lesion of ``label`` with the lesion (edema, cavity, tumour) of ``donor``.

    The donor lesion keeps its voxel position (donor and recipient share the atlas grid) shifted by
    ``offset`` voxels, and is clipped to the recipient's brain.

    Args:
        label: recipient spatial label map (0..4).
        brain: recipient boolean brain mask.
        donor: donor spatial label map (0..4) with the same number of dims (its shape may differ).
        offset: shift of the donor lesion in voxels, one integer per spatial dim.
        max_outside_fraction: largest tolerated fraction of the donor lesion outside the brain.

    Returns:
        the new label map and an info dictionary.
    """
    if donor.ndim != label.ndim:
        raise ValueError(f"donor label map is {donor.ndim}D but the recipient is {label.ndim}D")
    offset_array = (
        np.zeros(label.ndim, dtype=np.int64) if offset is None else np.asarray(offset, dtype=np.int64)
    )
    if offset_array.shape != (label.ndim,):
        raise ValueError(f"offset must have {label.ndim} integers, got {offset}")
    donor_lesion = _lesion(donor)
    if not donor_lesion.any():
        raise ManipulationNotPossibleError("transplant: the donor label map has no lesion (labels 2, 3, 4)")
    coords = np.array(np.nonzero(donor_lesion)) + offset_array[:, None]
    values = donor[donor_lesion]
    out, outside = _paint_lesion(label, brain, coords, values, max_outside_fraction, "transplant")
    info = _info(
        "transplant_lesion",
        label.ndim,
        offset=offset_array.tolist(),
        donor_lesion_voxels=int(values.size),
        clipped_fraction=outside,
    )
    return out, info
