"""Array transforms of the lesion-mask manipulations (see :mod:`.functional` for what they do).

They accept numpy arrays or torch tensors (2D or 3D, with or without a leading channel dimension)
and return the same type; the brain is ``label > 0`` unless an explicit brain mask is given.
Malformed input (wrong shape, NaNs, unknown label values) raises a plain ``ValueError``. What was
done is returned as an ``info`` dictionary with ``return_info=True``, and recorded under
``meta["lesion_manipulation"]`` of a ``MetaTensor`` output.

Random variants follow MONAI's naming (``Rand*``) and TorchIO's design: ``RandX`` draws its
parameters from ``self.R`` (seeded through :meth:`set_random_state`) and delegates to the
deterministic ``X``. :class:`LesionManipulation` is the named, seeded manipulation of the bundle
configs (``"none"``, ``"mirror"``, ``"grow"``, ``"shrink"``, ``"transplant"``, ``"random"``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from monai.config import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import Randomizable, RandomizableTransform, Transform
from monai.utils import TransformBackends, convert_data_type, convert_to_dst_type

from medsynth.constants import MANIPULATIONS
from medsynth.transforms.lesion.functional import (
    INFO_META_KEY,
    MIDLINE_METHODS,
    ManipulationNotPossibleError,
    _clip_to_brain,
    _info,
    _lesion,
    mirror_lesion,
    resize_tumor,
    transplant_lesion,
)
from medsynth.utils.labels import checked_label_map

logger = logging.getLogger(__name__)

__all__ = [
    "MANIPULATIONS",
    "LesionManipulation",
    "MirrorLesion",
    "RandLesionManipulation",
    "RandMirrorLesion",
    "RandResizeTumor",
    "RandTransplantLesion",
    "ResizeTumor",
    "TransplantLesion",
]


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
        spatial = checked_label_map(spatial)
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
        donor_spatial = checked_label_map(
            _to_spatial(donor, spatial.ndim, "donor label map")[0], "donor label map"
        )
        offset = self.offset if offset is None else offset
        out, info = transplant_lesion(spatial, brain, donor_spatial, offset, self.max_outside_fraction)
        return self._finish(out, has_channel, label, info)


def _not_applied(
    operation: str, label: NdarrayOrTensor, spatial_dims: int | None, reason: str = ""
) -> dict[str, Any]:
    ndim = spatial_dims or _to_spatial(label, None, "label map")[0].ndim
    return _info(operation, ndim, applied=False, reason=reason)


class _RandLabelMapTransform(RandomizableTransform):
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


class RandMirrorLesion(_RandLabelMapTransform):
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


class RandResizeTumor(_RandLabelMapTransform):
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


class RandTransplantLesion(_RandLabelMapTransform):
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
            raise ValueError("RandTransplantLesion needs at least one donor label map")
        self.donors = [
            checked_label_map(_to_spatial(d, spatial_dims, f"donor label map {i}")[0], f"donor label map {i}")
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


class RandLesionManipulation(Randomizable, Transform):
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
        self.steps: list[_RandLabelMapTransform] = []
        if transplant_prob > 0:
            self.steps.append(
                RandTransplantLesion(
                    donors,
                    transplant_prob,
                    random_location,
                    max_outside_fraction,
                    spatial_dims=spatial_dims,
                    return_info=True,
                )
            )
        self.steps.append(
            RandMirrorLesion(mirror_prob, axis, midline, max_outside_fraction, spatial_dims, return_info=True)
        )
        self.steps.append(
            RandResizeTumor(resize_percent_range, resize_prob, connectivity, spatial_dims, return_info=True)
        )
        self.skip_impossible = skip_impossible
        self.return_info = return_info
        self.set_random_state()

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandLesionManipulation:
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


class LesionManipulation(Transform):
    """One of :data:`MANIPULATIONS` by name, as the bundle configs and the CLI choose it.

    ``"none"`` returns the label map unchanged; ``"mirror"`` is :class:`MirrorLesion`; ``"grow"`` and
    ``"shrink"`` are :class:`ResizeTumor` by ``grow_percent`` / ``shrink_percent`` (papers: +100,
    -50); ``"transplant"`` is :class:`TransplantLesion` of the donor given per call; ``"random"`` is
    :class:`RandLesionManipulation` (mirror, resize within ``resize_percent_range``, and a
    transplant with probability 0.5 when a donor is given), re-seeded with ``seed`` at every call so
    that each case's draws depend on the seed alone, not on the cases before it.

    Args:
        name: one of :data:`MANIPULATIONS`.
        grow_percent, shrink_percent: tumour change of ``"grow"`` / ``"shrink"`` in percent.
        seed: seed of ``"random"``.
        mirror_prob, resize_prob, resize_percent_range: the draws of ``"random"``.
        spatial_dims: 2 or 3; ``None`` infers it from the array.
        return_info: return ``(label, info)``; ``info`` is a dict (a list of dicts for ``"random"``).
    """

    backend = _LabelMapTransform.backend

    def __init__(
        self,
        name: str = "none",
        grow_percent: float = 100.0,
        shrink_percent: float = -50.0,
        seed: int = 0,
        mirror_prob: float = 0.5,
        resize_prob: float = 0.5,
        resize_percent_range: Sequence[float] = (-50.0, 100.0),
        spatial_dims: int | None = None,
        return_info: bool = False,
    ):
        if name not in MANIPULATIONS:
            raise ValueError(f"unknown manipulation {name!r}; choose one of {MANIPULATIONS}")
        self.name = name
        self.grow_percent = float(grow_percent)
        self.shrink_percent = float(shrink_percent)
        self.seed = int(seed)
        self.mirror_prob = mirror_prob
        self.resize_prob = resize_prob
        self.resize_percent_range = tuple(resize_percent_range)
        self.spatial_dims = spatial_dims
        self.return_info = return_info

    @property
    def needs_donor(self) -> bool:
        """Whether the manipulation uses a donor label map (``"transplant"`` needs one, ``"random"`` may)."""
        return self.name in ("transplant", "random")

    def _transform(self, donor: NdarrayOrTensor | None) -> Any:
        if self.name == "mirror":
            return MirrorLesion(spatial_dims=self.spatial_dims, return_info=True)
        if self.name in ("grow", "shrink"):
            percent = self.grow_percent if self.name == "grow" else self.shrink_percent
            return ResizeTumor(percent, spatial_dims=self.spatial_dims, return_info=True)
        if self.name == "transplant":
            if donor is None:
                raise ValueError(
                    "manipulation 'transplant' needs a donor label map (donor_file, or another patient)"
                )
            return TransplantLesion(donor=donor, spatial_dims=self.spatial_dims, return_info=True)
        random = RandLesionManipulation(
            mirror_prob=self.mirror_prob,
            resize_prob=self.resize_prob,
            resize_percent_range=self.resize_percent_range,
            transplant_prob=0.5 if donor is not None else 0.0,
            donors=None if donor is None else [donor],
            spatial_dims=self.spatial_dims,
            return_info=True,
        )
        random.set_random_state(self.seed)
        return random

    def __call__(
        self,
        label: NdarrayOrTensor,
        brain_mask: NdarrayOrTensor | None = None,
        donor: NdarrayOrTensor | None = None,
    ) -> Any:
        if self.name == "none":
            result, info = label, {"operation": "none"}
        else:
            result, info = self._transform(donor)(label, brain_mask)
        return (result, info) if self.return_info else result
