"""Axial-slice helpers: fitting the in-plane grid, per-slice statistics, neighbouring-slice stacks.

Volumes are channel-first ``(C, H, W, D)`` in RAS orientation, so the last axis is axial.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    InvertibleTransform,
    MapTransform,
    Resize,
    ResizeWithPadOrCrop,
    SpatialPad,
    Transform,
)
from monai.utils import TraceKeys, ensure_tuple_rep

from medsynth.constants import LESION_LABELS

SLICE_SELECTIONS: tuple[str, ...] = ("all", "brain", "lesion")


class FitInPlane(InvertibleTransform):
    """Bring the axial plane of a ``(C, H, W, D)`` volume to ``image_size x image_size``; depth is kept.

    The decision depends on the grid only (so a patient's volumes and its atlas, which share the
    grid, are fitted identically): planes no larger than ``image_size * (1 + crop_tolerance)`` are
    centre-padded (zeros) / centre-cropped; larger planes are padded to a square and resized down,
    which never cuts the field of view. Every step is a MONAI invertible transform, so
    :meth:`inverse` of a ``MetaTensor`` output restores the original grid (inference uses this to
    write volumes on the input grid).

    Args:
        image_size: output height and width.
        mode: interpolation when resizing: ``"area"`` for images, ``"nearest"`` for label maps.
        crop_tolerance: how much larger than ``image_size`` a plane may be and still be cropped
            rather than resized (fraction of ``image_size``; 0 never crops).
    """

    def __init__(self, image_size: int = 256, mode: str = "area", crop_tolerance: float = 0.0):
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.mode = mode
        self.crop_tolerance = float(crop_tolerance)
        # One instance per input plane: MONAI inverts with the instance that applied the transform.
        self._fitters: dict[tuple[int, int], Transform] = {}

    def transform_for(self, spatial_shape: Sequence[int]) -> Transform:
        """The (invertible) MONAI transform used for a volume of this spatial shape."""
        plane = (int(spatial_shape[0]), int(spatial_shape[1]))
        if plane not in self._fitters:
            size = self.image_size
            if max(plane) <= size * (1.0 + self.crop_tolerance):
                fitter: Transform = ResizeWithPadOrCrop((size, size, -1))
            else:
                side = max(plane)
                kwargs = {} if self.mode in ("nearest", "nearest-exact", "area") else {"align_corners": False}
                fitter = Compose(
                    [SpatialPad((side, side, -1)), Resize((size, size, -1), mode=self.mode, **kwargs)]
                )
            self._fitters[plane] = fitter
        return self._fitters[plane]

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        if img.ndim != 4:
            raise ValueError(f"expected a channel-first volume (C, H, W, D), got shape {tuple(img.shape)}")
        return self.transform_for(img.shape[1:])(img)

    def inverse(self, img: MetaTensor) -> MetaTensor:
        """Undo the fitting of ``img`` (a ``MetaTensor`` output of this instance) onto its original plane."""
        operations = getattr(img, "applied_operations", None)
        if not operations:
            raise ValueError(
                "cannot invert: the image carries no applied operations (use a MetaTensor input)"
            )
        last = operations[-1].get(TraceKeys.ID)
        for fitter in self._fitters.values():
            members = fitter.transforms if isinstance(fitter, Compose) else (fitter,)
            if any(id(member) == last for member in members):
                return fitter.inverse(img)
        raise ValueError("cannot invert: the image was not fitted by this FitInPlane instance")


class FitInPlaned(MapTransform, InvertibleTransform):
    """Dictionary wrapper of :class:`FitInPlane` with one interpolation mode per key; invertible, so
    MONAI's ``Invertd`` brings a prediction made on the fitted grid back to the input grid."""

    def __init__(
        self,
        keys: KeysCollection,
        image_size: int = 256,
        mode: str | Sequence[str] = "area",
        crop_tolerance: float = 0.0,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        modes = ensure_tuple_rep(mode, len(self.keys))
        self.fitters = {
            key: FitInPlane(image_size, m, crop_tolerance) for key, m in zip(self.keys, modes, strict=True)
        }

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.fitters[key](d[key])
        return d

    def inverse(self, data: Mapping[Hashable, MetaTensor]) -> dict[Hashable, MetaTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.fitters[key].inverse(d[key])
        return d


def axial_slice_stats(
    label: NdarrayOrTensor, brain_mask: NdarrayOrTensor, brain_threshold: float = 0.5
) -> dict[str, np.ndarray]:
    """Per axial slice of ``(1, H, W, D)`` or ``(H, W, D)`` volumes: brain fraction and lesion presence.

    ``brain_fraction`` is the share of the slice's ``H x W`` pixels where the brain mask is at least
    ``brain_threshold``, measured on the volume's own grid (so it does not depend on the training
    image size). ``lesion_fraction``: the same share for edema, cavity and tumour; ``has_lesion``: the
    slice holds any of them.
    """
    label_np = _squeeze_channel(label)
    brain_np = _squeeze_channel(brain_mask) >= brain_threshold
    if label_np.shape != brain_np.shape:
        raise ValueError(f"label {label_np.shape} and brain mask {brain_np.shape} differ in shape")
    plane = label_np.shape[0] * label_np.shape[1]
    lesion = np.isin(np.rint(label_np).astype(np.int64), LESION_LABELS)
    return {
        "brain_fraction": brain_np.sum(axis=(0, 1)) / float(plane),
        "lesion_fraction": lesion.sum(axis=(0, 1)) / float(plane),
        "has_lesion": lesion.any(axis=(0, 1)),
    }


def select_slices(
    brain_fraction: np.ndarray,
    has_lesion: np.ndarray,
    selection: str = "brain",
    min_brain_fraction: float = 0.05,
) -> np.ndarray:
    """Indices of the axial slices kept by ``selection``: ``"all"``, ``"brain"`` or ``"lesion"``."""
    if selection == "all":
        keep = np.ones(len(brain_fraction), dtype=bool)
    elif selection == "brain":
        keep = np.asarray(brain_fraction) >= min_brain_fraction
    elif selection == "lesion":
        keep = np.asarray(has_lesion, dtype=bool)
    else:
        raise ValueError(f"slice_selection must be one of {SLICE_SELECTIONS}, got {selection!r}")
    return np.flatnonzero(keep)


def neighbour_slices(volume: NdarrayOrTensor, index: int, radius: int = 1, axis: int = -1) -> NdarrayOrTensor:
    """Slices ``index - radius .. index + radius`` along ``axis`` of a channel-first volume, per channel.

    For a ``(C, H, W, D)`` volume (``axis=-1``) or a ``(C, D, H, W)`` one (``axis=1``) the result is
    ``(C * (2r+1), H, W)``: channel ``c * (2r+1) + k`` holds channel ``c`` at slice ``index + k - radius``;
    slices beyond the volume's ends repeat the edge slice.
    """
    axis = axis % volume.ndim
    if axis == 0:
        raise ValueError("axis 0 is the channel axis")
    depth = volume.shape[axis]
    if not 0 <= index < depth:
        raise IndexError(f"slice {index} outside a volume of depth {depth}")
    positions = np.clip(np.arange(index - radius, index + radius + 1), 0, depth - 1)
    plane = [size for dim, size in enumerate(volume.shape) if dim not in (0, axis)]
    if isinstance(volume, torch.Tensor):
        stack = torch.index_select(volume, axis, torch.as_tensor(positions, device=volume.device))
        stack = torch.movedim(stack, axis, 1)
    else:
        stack = np.moveaxis(np.take(volume, positions, axis=axis), axis, 1)
    return stack.reshape(volume.shape[0] * len(positions), *plane)


def _squeeze_channel(volume: NdarrayOrTensor) -> np.ndarray:
    array = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise ValueError(f"expected one channel, got shape {array.shape}")
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {array.shape}")
    return array
