"""Lesion-mask manipulations of the SAMR / CG-SAMR papers: mirror, resize the tumour, transplant.

The synthesis networks take a label map (0 background, 1 normal brain, 2 edema, 3 cavity, 4 tumour,
see :mod:`medsynth.constants`) and turn it into multi-sequence MRI. New training data come from
manipulated label maps: the lesion mirrored across the midline, the tumour grown by 100 % or shrunk
by 50 %, or the lesion replaced by another patient's lesion (SAMR Fig. 3, CG-SAMR Fig. 7).

Layout follows MONAI: pure functions on spatial numpy arrays (:func:`mirror_lesion`,
:func:`resize_tumor`, :func:`transplant_lesion`), array transforms that accept numpy arrays or torch
tensors (2D or 3D, with or without a leading channel dimension), dictionary wrappers (suffix ``d``),
and random variants in the TorchIO style: ``RandomX`` draws its parameters from ``self.R`` (seeded
through :meth:`set_random_state`) and delegates to the deterministic ``X``.

Conventions shared by every transform here:

* The brain is ``label > 0`` unless an explicit brain mask is given. Voxels outside the brain are
  never changed, and a lesion is never placed outside it.
* The lesion is the union of edema, cavity and tumour. A removed lesion becomes normal brain.
* A request that cannot be met for this label map (no tumour to resize, a lesion that would fall
  outside the brain, ...) raises :class:`ManipulationNotPossibleError`, a ``ValueError``; malformed
  input (wrong shape, NaNs, unknown label values) raises a plain ``ValueError``.
* What was done (achieved resize ratio, offsets, clipped fraction ...) is returned as an ``info``
  dictionary: with ``return_info=True`` by the array transforms, under ``meta["lesion_manipulation"]``
  of a ``MetaTensor`` output, and under ``"<key>_manipulation"`` by the dictionary wrappers.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, RandomizableTransform, Transform
from monai.utils import TransformBackends, convert_data_type, convert_to_dst_type
from scipy import ndimage

from medsynth.constants import CAVITY, EDEMA, LESION_LABELS, NORMAL_BRAIN, NUM_LABELS, TUMOR

logger = logging.getLogger(__name__)

__all__ = [
    "INFO_DEFAULTS",
    "INFO_META_KEY",
    "ManipulationNotPossibleError",
    "MirrorLesion",
    "MirrorLesiond",
    "RandomLesionManipulation",
    "RandomLesionManipulationd",
    "RandomMirrorLesion",
    "RandomMirrorLesiond",
    "RandomResizeTumor",
    "RandomResizeTumord",
    "RandomTransplantLesion",
    "RandomTransplantLesiond",
    "ResizeTumor",
    "ResizeTumord",
    "TransplantLesion",
    "TransplantLesiond",
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


# ----------------------------------------------------------------------------------------------
# Input handling shared by every transform
# ----------------------------------------------------------------------------------------------


def _to_spatial(array: NdarrayOrTensor, spatial_dims: int | None, name: str) -> tuple[np.ndarray, bool]:
    """Return the spatial numpy array of a single-channel map and whether it had a channel dim.

    Without ``spatial_dims``: 2 dims are a 2D slice, 4 dims a channel-first volume, and 3 dims a
    channel-first slice when the first dim is 1, else a volume.
    """
    arr = convert_data_type(array, np.ndarray)[0]
    if spatial_dims is None:
        if arr.ndim == 2:
            has_channel = False
        elif arr.ndim == 4:
            has_channel = True
        elif arr.ndim == 3:
            has_channel = arr.shape[0] == 1
        else:
            raise ValueError(
                f"{name} must be 2D or 3D (optionally with a leading channel), got shape {arr.shape}"
            )
    elif spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    elif arr.ndim == spatial_dims:
        has_channel = False
    elif arr.ndim == spatial_dims + 1:
        if arr.shape[0] != 1:
            raise ValueError(
                f"{name} of shape {arr.shape} is neither {spatial_dims}D "
                f"nor a single-channel {spatial_dims}D map"
            )
        has_channel = True
    else:
        raise ValueError(f"{name} of shape {arr.shape} does not have {spatial_dims} spatial dims")
    if has_channel:
        if arr.shape[0] != 1:
            raise ValueError(f"{name} must have a single channel, got shape {arr.shape}")
        arr = arr[0]
    return arr, has_channel


def _validated_label(arr: np.ndarray, name: str = "label map") -> np.ndarray:
    """Check that ``arr`` holds only the labels 0..4 and return it as int16."""
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.issubdtype(arr.dtype, np.integer) and arr.dtype != bool:
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains {int(np.count_nonzero(~np.isfinite(arr)))} NaN/inf values")
        if np.any(arr != np.round(arr)):
            raise ValueError(f"{name} contains non-integer values; expected labels 0..{NUM_LABELS - 1}")
    if arr.min() < 0 or arr.max() >= NUM_LABELS:
        bad = sorted(v for v in np.unique(arr).tolist() if not 0 <= v < NUM_LABELS)
        raise ValueError(f"{name} contains unknown labels {bad[:10]}; expected 0..{NUM_LABELS - 1}")
    return arr.astype(np.int16)


def _lesion(label: np.ndarray) -> np.ndarray:
    return np.isin(label, LESION_LABELS)


def _brain_region(label: np.ndarray, brain_mask: NdarrayOrTensor | None) -> np.ndarray:
    """The brain as a boolean spatial array: the explicit mask, or ``label > 0``."""
    if brain_mask is None:
        return label > 0
    brain, _ = _to_spatial(brain_mask, label.ndim, "brain mask")
    if brain.shape != label.shape:
        raise ValueError(f"brain mask shape {brain.shape} differs from the label map shape {label.shape}")
    brain = brain != 0
    outside = int(np.count_nonzero(_lesion(label) & ~brain))
    if outside:
        raise ValueError(f"{outside} lesion voxels of the label map lie outside the brain mask")
    return brain


def _restore(
    spatial: np.ndarray, has_channel: bool, like: NdarrayOrTensor, info: dict | list
) -> NdarrayOrTensor:
    """Give ``spatial`` the layout, type, dtype and device of ``like``; record ``info`` in MetaTensor meta."""
    out = spatial[None] if has_channel else spatial
    return _append_meta_info(convert_to_dst_type(out, like, dtype=like.dtype)[0], info)


def _append_meta_info(result: NdarrayOrTensor, info: dict | list) -> NdarrayOrTensor:
    """Append ``info`` to ``meta["lesion_manipulation"]`` of a MetaTensor (other types unchanged)."""
    if isinstance(result, MetaTensor):
        previous = list(result.meta.get(INFO_META_KEY, []))
        new = info if isinstance(info, list) else [info]
        # A fresh dict so that the input's meta is not modified in place.
        result.meta = {**result.meta, INFO_META_KEY: previous + new}
    return result


def _unchanged(label: NdarrayOrTensor, info: dict) -> NdarrayOrTensor:
    """``label`` as it is, with ``info`` recorded in a copy when it is a MetaTensor.

    Recording skipped operations too keeps the meta of every item alike, so batches collate.
    """
    return _append_meta_info(label.clone(), info) if isinstance(label, MetaTensor) else label


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


# ----------------------------------------------------------------------------------------------
# Pure functions on spatial numpy arrays
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Array transforms
# ----------------------------------------------------------------------------------------------


class _LabelMapTransform(Transform):
    """Shared plumbing: unwrap the label map, find the brain, rewrap the result with its info."""

    # Both accepted; the work itself is done in numpy (scipy.ndimage) on the CPU.
    backend: ClassVar[list[TransformBackends]] = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, spatial_dims: int | None = None, return_info: bool = False):
        self.spatial_dims = spatial_dims
        self.return_info = return_info

    def _prepare(
        self, label: NdarrayOrTensor, brain_mask: NdarrayOrTensor | None
    ) -> tuple[np.ndarray, np.ndarray, bool]:
        spatial, has_channel = _to_spatial(label, self.spatial_dims, "label map")
        spatial = _validated_label(spatial)
        return spatial, _brain_region(spatial, brain_mask), has_channel

    def _finish(
        self, spatial: np.ndarray, has_channel: bool, like: NdarrayOrTensor, info: dict | list
    ) -> Any:
        result = _restore(spatial, has_channel, like, info)
        return (result, info) if self.return_info else result


class MirrorLesion(_LabelMapTransform):
    """Mirror the lesion across the brain's left-right midline (see :func:`mirror_lesion`).

    Args:
        axis: the left-right spatial axis (0, the first spatial axis in RAS).
        midline: ``"center_of_mass"`` or ``"bounding_box"`` of the brain along ``axis``.
        max_outside_fraction: largest tolerated fraction of the mirrored lesion outside the brain;
            more raises :class:`ManipulationNotPossibleError`.
        spatial_dims: 2 or 3; ``None`` infers it from the array (see module docs).
        return_info: return ``(label, info)`` instead of the label map.
    """

    def __init__(
        self,
        axis: int = 0,
        midline: str = "center_of_mass",
        max_outside_fraction: float = 0.25,
        spatial_dims: int | None = None,
        return_info: bool = False,
    ):
        super().__init__(spatial_dims, return_info)
        if midline not in MIDLINE_METHODS:
            raise ValueError(f"unknown midline method {midline!r}; choose from {MIDLINE_METHODS}")
        self.axis = axis
        self.midline = midline
        self.max_outside_fraction = max_outside_fraction

    def __call__(self, label: NdarrayOrTensor, brain_mask: NdarrayOrTensor | None = None) -> Any:
        spatial, brain, has_channel = self._prepare(label, brain_mask)
        out, info = mirror_lesion(spatial, brain, self.axis, self.midline, self.max_outside_fraction)
        return self._finish(out, has_channel, label, info)


class ResizeTumor(_LabelMapTransform):
    """Grow or shrink the tumour by a percentage of its area/volume (see :func:`resize_tumor`).

    Args:
        percent: change in percent (papers: ``100`` and ``-50``).
        connectivity: connectivity of the dilation/erosion structuring element.
        spatial_dims: 2 or 3; ``None`` infers it from the array.
        return_info: return ``(label, info)``; ``info["achieved_ratio"]`` is new / old tumour size.
    """

    def __init__(
        self,
        percent: float,
        connectivity: int = 1,
        spatial_dims: int | None = None,
        return_info: bool = False,
    ):
        super().__init__(spatial_dims, return_info)
        self.percent = float(percent)
        self.connectivity = connectivity

    def __call__(self, label: NdarrayOrTensor, brain_mask: NdarrayOrTensor | None = None) -> Any:
        spatial, brain, has_channel = self._prepare(label, brain_mask)
        out, info = resize_tumor(spatial, brain, self.percent, self.connectivity)
        return self._finish(out, has_channel, label, info)


class TransplantLesion(_LabelMapTransform):
    """Replace the lesion with a donor's lesion (see :func:`transplant_lesion`).

    Args:
        donor: donor label map; may instead be given per call.
        offset: shift of the donor lesion in voxels; may be given per call.
        max_outside_fraction: largest tolerated fraction of the donor lesion outside the brain.
        spatial_dims: 2 or 3; ``None`` infers it from the array.
        return_info: return ``(label, info)``.
    """

    def __init__(
        self,
        donor: NdarrayOrTensor | None = None,
        offset: Sequence[int] | None = None,
        max_outside_fraction: float = 0.25,
        spatial_dims: int | None = None,
        return_info: bool = False,
    ):
        super().__init__(spatial_dims, return_info)
        self.donor = donor
        self.offset = offset
        self.max_outside_fraction = max_outside_fraction

    def __call__(
        self,
        label: NdarrayOrTensor,
        brain_mask: NdarrayOrTensor | None = None,
        donor: NdarrayOrTensor | None = None,
        offset: Sequence[int] | None = None,
    ) -> Any:
        donor = self.donor if donor is None else donor
        if donor is None:
            raise ValueError("transplant: no donor label map given")
        spatial, brain, has_channel = self._prepare(label, brain_mask)
        donor_spatial = _validated_label(
            _to_spatial(donor, spatial.ndim, "donor label map")[0], "donor label map"
        )
        offset = self.offset if offset is None else offset
        out, info = transplant_lesion(spatial, brain, donor_spatial, offset, self.max_outside_fraction)
        return self._finish(out, has_channel, label, info)


# ----------------------------------------------------------------------------------------------
# Random array transforms (TorchIO style: sample parameters, delegate to the deterministic one)
# ----------------------------------------------------------------------------------------------


def _not_applied(
    operation: str, label: NdarrayOrTensor, spatial_dims: int | None, reason: str = ""
) -> dict[str, Any]:
    ndim = spatial_dims or _to_spatial(label, None, "label map")[0].ndim
    return _info(operation, ndim, applied=False, reason=reason)


class _RandomLabelMapTransform(RandomizableTransform):
    backend = _LabelMapTransform.backend
    operation = ""  # key of INFO_DEFAULTS

    def __init__(self, prob: float, spatial_dims: int | None, return_info: bool):
        RandomizableTransform.__init__(self, prob)
        self.spatial_dims = spatial_dims
        self.return_info = return_info

    def _skip(self, label: NdarrayOrTensor) -> Any:
        info = _not_applied(self.operation, label, self.spatial_dims)
        label = _unchanged(label, info)
        return (label, info) if self.return_info else label


class RandomMirrorLesion(_RandomLabelMapTransform):
    """Mirror the lesion with probability ``prob``; arguments as in :class:`MirrorLesion`."""

    operation = "mirror_lesion"

    def __init__(
        self,
        prob: float = 0.5,
        axis: int = 0,
        midline: str = "center_of_mass",
        max_outside_fraction: float = 0.25,
        spatial_dims: int | None = None,
        return_info: bool = False,
    ):
        super().__init__(prob, spatial_dims, return_info)
        self.mirror = MirrorLesion(axis, midline, max_outside_fraction, spatial_dims, return_info)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)

    def __call__(
        self, label: NdarrayOrTensor, brain_mask: NdarrayOrTensor | None = None, randomize: bool = True
    ) -> Any:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return self._skip(label)
        return self.mirror(label, brain_mask)


class RandomResizeTumor(_RandomLabelMapTransform):
    """Resize the tumour by a percentage drawn uniformly from ``percent_range`` with probability ``prob``.

    Args:
        percent_range: ``(low, high)`` in percent, e.g. ``(-50, 100)``; low must exceed -100.
        prob: probability of resizing at all.
        connectivity, spatial_dims, return_info: as in :class:`ResizeTumor`.
    """

    operation = "resize_tumor"

    def __init__(
        self,
        percent_range: Sequence[float] = (-50.0, 100.0),
        prob: float = 1.0,
        connectivity: int = 1,
        spatial_dims: int | None = None,
        return_info: bool = False,
    ):
        super().__init__(prob, spatial_dims, return_info)
        low, high = (float(v) for v in percent_range)
        if low > high or low <= -100:
            raise ValueError(
                f"percent_range must be (low, high) with -100 < low <= high, got {percent_range}"
            )
        self.percent_range = (low, high)
        self.connectivity = connectivity
        self._percent = 0.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self._percent = float(self.R.uniform(*self.percent_range))

    def __call__(
        self, label: NdarrayOrTensor, brain_mask: NdarrayOrTensor | None = None, randomize: bool = True
    ) -> Any:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return self._skip(label)
        return ResizeTumor(self._percent, self.connectivity, self.spatial_dims, self.return_info)(
            label, brain_mask
        )


class RandomTransplantLesion(_RandomLabelMapTransform):
    """Transplant the lesion of a donor drawn from ``donors``, optionally at a random brain location.

    With ``random_location`` the donor lesion's centre is moved onto a random voxel of the
    recipient's brain; locations where more than ``max_outside_fraction`` of the lesion would fall
    outside the brain are redrawn up to ``max_attempts`` times before giving up.

    Args:
        donors: donor label maps (each with or without a channel dim).
        prob: probability of transplanting at all.
        random_location: move the lesion to a random in-brain location, else keep the donor position.
        max_outside_fraction: largest tolerated fraction of the lesion outside the brain.
        max_attempts: location draws before raising :class:`ManipulationNotPossibleError`.
        spatial_dims, return_info: as in :class:`TransplantLesion`.
    """

    operation = "transplant_lesion"

    def __init__(
        self,
        donors: Sequence[NdarrayOrTensor],
        prob: float = 1.0,
        random_location: bool = True,
        max_outside_fraction: float = 0.25,
        max_attempts: int = 50,
        spatial_dims: int | None = None,
        return_info: bool = False,
    ):
        super().__init__(prob, spatial_dims, return_info)
        if len(donors) == 0:
            raise ValueError("RandomTransplantLesion needs at least one donor label map")
        self.donors = [
            _validated_label(_to_spatial(d, spatial_dims, f"donor label map {i}")[0], f"donor label map {i}")
            for i, d in enumerate(donors)
        ]
        for i, donor in enumerate(self.donors):
            if not _lesion(donor).any():
                raise ValueError(f"donor label map {i} has no lesion (labels 2, 3, 4)")
        self.random_location = random_location
        self.max_outside_fraction = max_outside_fraction
        self.max_attempts = max_attempts
        self._donor_index = 0
        self._offset: list[int] | None = None

    def randomize(self, data: Any = None) -> None:
        """Draw whether to apply and which donor; ``data`` is unused (the location needs the brain)."""
        super().randomize(None)
        self._donor_index = int(self.R.randint(len(self.donors)))
        self._offset = None  # drawn at call time, when the recipient's brain is known

    def _draw_offset(self, brain: np.ndarray, donor: np.ndarray) -> list[int]:
        coords = np.array(np.nonzero(_lesion(donor)))
        values = donor[tuple(coords)]
        centre = np.round(coords.mean(axis=1)).astype(np.int64)
        brain_voxels = np.flatnonzero(brain)
        if brain_voxels.size == 0:
            raise ManipulationNotPossibleError("transplant: the recipient brain is empty")
        for _ in range(self.max_attempts):
            target = np.array(np.unravel_index(brain_voxels[self.R.randint(brain_voxels.size)], brain.shape))
            offset = target - centre
            outside, _, _ = _clip_to_brain(brain, coords + offset[:, None], values)
            if outside <= self.max_outside_fraction:
                return offset.tolist()
        raise ManipulationNotPossibleError(
            f"transplant: no location found in {self.max_attempts} attempts where at most "
            f"{self.max_outside_fraction:.1%} of the donor lesion falls outside the brain"
        )

    def __call__(
        self, label: NdarrayOrTensor, brain_mask: NdarrayOrTensor | None = None, randomize: bool = True
    ) -> Any:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return self._skip(label)
        donor = self.donors[self._donor_index]
        transplant = TransplantLesion(
            donor, None, self.max_outside_fraction, self.spatial_dims, return_info=True
        )
        offset = None
        if self.random_location:
            if self._offset is None:
                spatial, brain, _ = transplant._prepare(label, brain_mask)
                if donor.ndim != spatial.ndim:
                    raise ValueError(f"donor label map is {donor.ndim}D but the recipient is {spatial.ndim}D")
                self._offset = self._draw_offset(brain, donor)
            offset = self._offset
        result, info = transplant(label, brain_mask, offset=offset)
        info["donor_index"] = self._donor_index  # the same dict is in a MetaTensor's meta
        return (result, info) if self.return_info else result


class RandomLesionManipulation(Randomizable, Transform):
    """Random combination of transplant, mirror and tumour resize, applied in that order.

    Each manipulation is drawn independently with its probability; all draws come from one seeded
    generator (:meth:`set_random_state`), so a seed gives the same sequence of label maps.

    Args:
        mirror_prob: probability of mirroring the lesion.
        resize_prob: probability of resizing the tumour.
        resize_percent_range: ``(low, high)`` percent for the resize, e.g. ``(-50, 100)``.
        transplant_prob: probability of transplanting a donor lesion (needs ``donors``).
        donors: donor label maps for the transplant.
        random_location: place transplanted lesions at a random in-brain location.
        axis, midline, max_outside_fraction, connectivity: passed to the manipulations.
        skip_impossible: when a drawn manipulation cannot be done for this label map (e.g. resize
            without a tumour), skip it and record why, instead of raising.
        spatial_dims: 2 or 3; ``None`` infers it from the array.
        return_info: return ``(label, infos)``, one info dictionary per manipulation considered.
    """

    def __init__(
        self,
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
        return_info: bool = False,
    ):
        if transplant_prob > 0 and not donors:
            raise ValueError("transplant_prob > 0 needs a non-empty list of donors")
        self.steps: list[_RandomLabelMapTransform] = []
        if transplant_prob > 0:
            self.steps.append(
                RandomTransplantLesion(
                    donors,
                    transplant_prob,
                    random_location,
                    max_outside_fraction,
                    spatial_dims=spatial_dims,
                    return_info=True,
                )
            )
        self.steps.append(
            RandomMirrorLesion(
                mirror_prob, axis, midline, max_outside_fraction, spatial_dims, return_info=True
            )
        )
        self.steps.append(
            RandomResizeTumor(resize_percent_range, resize_prob, connectivity, spatial_dims, return_info=True)
        )
        self.skip_impossible = skip_impossible
        self.return_info = return_info
        self.set_random_state()

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandomLesionManipulation:
        super().set_random_state(seed, state)
        # One shared generator: the sequence of draws depends only on the seed.
        for step in self.steps:
            step.set_random_state(state=self.R)
        return self

    def randomize(self, data: Any = None) -> None:
        for step in self.steps:
            step.randomize()

    def __call__(
        self, label: NdarrayOrTensor, brain_mask: NdarrayOrTensor | None = None, randomize: bool = True
    ) -> Any:
        if randomize:
            self.randomize()
        infos: list[dict[str, Any]] = []
        for step in self.steps:
            try:
                label, info = step(label, brain_mask, randomize=False)
            except ManipulationNotPossibleError as error:
                if not self.skip_impossible:
                    raise
                logger.debug("skipped a lesion manipulation: %s", error)
                info = _not_applied(step.operation, label, step.spatial_dims, str(error))
                label = _unchanged(label, info)
            infos.append(info)
        return (label, infos) if self.return_info else label


# ----------------------------------------------------------------------------------------------
# Dictionary wrappers
# ----------------------------------------------------------------------------------------------


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


class _RandomLabelMapDictTransform(Randomizable, _LabelMapDictTransform):
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


class RandomMirrorLesiond(_RandomLabelMapDictTransform):
    """Dictionary wrapper of :class:`RandomMirrorLesion`."""

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
        self.transform = RandomMirrorLesion(
            prob, axis, midline, max_outside_fraction, spatial_dims, return_info=True
        )
        self.set_random_state()


class RandomResizeTumord(_RandomLabelMapDictTransform):
    """Dictionary wrapper of :class:`RandomResizeTumor`."""

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
        self.transform = RandomResizeTumor(percent_range, prob, connectivity, spatial_dims, return_info=True)
        self.set_random_state()


class RandomTransplantLesiond(_RandomLabelMapDictTransform):
    """Dictionary wrapper of :class:`RandomTransplantLesion` (donors given as a list of label maps)."""

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
        self.transform = RandomTransplantLesion(
            donors, prob, random_location, max_outside_fraction, max_attempts, spatial_dims, return_info=True
        )
        self.set_random_state()


class RandomLesionManipulationd(_RandomLabelMapDictTransform):
    """Dictionary wrapper of :class:`RandomLesionManipulation`; the info is a list per key."""

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
        self.transform = RandomLesionManipulation(
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
