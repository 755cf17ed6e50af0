"""Invertible intensity scaling of MR sequences to [-1, 1], one window per channel.

A window ``(lower, upper)`` maps ``lower -> -1`` and ``upper -> +1`` (values outside are clipped).
Each bound of a window *specification* is either a number (a fixed intensity) or a string
``"p<q>"``: the q-th percentile of the brain voxels of that volume. The defaults follow the
papers' preprocessing: anatomical sequences use ``[0, p99.5 of the brain]`` per volume, APTw a
fixed ``[-5 %, +5 %]`` window (so 0 % maps to 0). The concrete window of every volume is stored
beside the image (``"window"``: a ``(C, 2)`` tensor) so that synthesized images can be written
back in the volume's own intensity units with :func:`unit_to_intensity`.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends

from medsynth.constants import CLINICAL_SEQUENCES

logger = logging.getLogger(__name__)

Bound = float | str
WindowSpec = Sequence[Bound]

ANATOMICAL_WINDOW: tuple[Bound, Bound] = (0.0, "p99.5")
APTW_WINDOW: tuple[Bound, Bound] = (-5.0, 5.0)
DEFAULT_WINDOWS: dict[str, tuple[Bound, Bound]] = {
    sequence: (APTW_WINDOW if sequence == "aptw" else ANATOMICAL_WINDOW) for sequence in CLINICAL_SEQUENCES
}


def windows_for(
    sequences: Sequence[str], overrides: Mapping[str, WindowSpec] | None = None
) -> list[tuple[Bound, Bound]]:
    """Window specifications of ``sequences`` (in that order): the defaults, updated by ``overrides``."""
    table = {**DEFAULT_WINDOWS, **{k: tuple(v) for k, v in (overrides or {}).items()}}
    missing = [s for s in sequences if s not in table]
    if missing:
        raise ValueError(f"no intensity window for sequence(s) {missing}; give one in the window overrides")
    return [_checked_spec(table[s]) for s in sequences]


def _checked_spec(spec: WindowSpec) -> tuple[Bound, Bound]:
    if len(spec) != 2:
        raise ValueError(f"an intensity window needs two bounds (lower, upper), got {spec!r}")
    for bound in spec:
        if isinstance(bound, str):
            _percentile_of(bound)
        elif not np.isfinite(float(bound)):
            raise ValueError(f"intensity window bound must be finite, got {bound!r}")
    return (spec[0], spec[1])


def _percentile_of(bound: str) -> float:
    text = bound.strip().lower()
    try:
        q = float(text[1:]) if text.startswith("p") else float("nan")
    except ValueError:
        q = float("nan")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile bound must look like 'p99.5' (0..100), got {bound!r}")
    return q


def compute_window(
    channel: NdarrayOrTensor, spec: WindowSpec, mask: NdarrayOrTensor | None = None
) -> tuple[float, float]:
    """The concrete ``(lower, upper)`` window of one channel.

    Percentile bounds are taken over the voxels of ``mask`` (the brain); without a mask, or with an
    empty one, over the channel's non-zero voxels. A degenerate window (``upper <= lower``, e.g. an
    all-zero volume) is widened to ``upper = lower + 1`` so that scaling stays finite.
    """
    region = None if mask is None else _region_index(mask, channel.shape)
    return _window_of(_as_numpy(channel).reshape(-1), _checked_spec(spec), region)


def _as_numpy(data: NdarrayOrTensor) -> np.ndarray:
    if isinstance(data, torch.Tensor):
        return (
            data.detach().cpu().numpy()
            if not isinstance(data, MetaTensor)
            else data.as_tensor().detach().cpu().numpy()
        )
    return np.asarray(data)


def _region_index(mask: NdarrayOrTensor, shape: Sequence[int]) -> np.ndarray | None:
    """Flat indices of the mask's voxels (``None`` when the mask is empty)."""
    flat = _as_numpy(mask).reshape(-1)
    if flat.size != int(np.prod(shape)):
        raise ValueError(
            f"mask of {flat.size} voxels does not match an image channel of shape {tuple(shape)}"
        )
    index = np.flatnonzero(flat > 0)
    return index if index.size else None


def _window_of(flat: np.ndarray, spec: tuple[Bound, Bound], region: np.ndarray | None) -> tuple[float, float]:
    values = None
    bounds = []
    for bound in spec:
        if isinstance(bound, str):
            if values is None:
                values = flat[region] if region is not None else flat[flat != 0]
            bounds.append(float(np.percentile(values, _percentile_of(bound))) if values.size else 0.0)
        else:
            bounds.append(float(bound))
    lower, upper = bounds
    if not upper > lower:
        logger.warning(
            "degenerate intensity window (%g, %g); using (%g, %g)", lower, upper, lower, lower + 1.0
        )
        upper = lower + 1.0
    return lower, upper


def scale_to_unit(image: NdarrayOrTensor, window: NdarrayOrTensor | Sequence[float], clip_range: bool = True):
    """Map intensities to [-1, 1].

    ``window`` is one ``(lower, upper)`` pair, or one pair per leading index of ``image``: ``(C, 2)``
    for a channel-first image, ``(B, C, 2)`` for a batch.
    """
    lower, upper = _window_bounds(image, window)
    scale = 2.0 / (upper - lower)
    # One multiply-add pass (volumes are large): x * scale + (-1 - lower * scale).
    return _affine(image, scale, -1.0 - lower * scale, clip_range)


def unit_to_intensity(unit: NdarrayOrTensor, window: NdarrayOrTensor | Sequence[float]):
    """Inverse of :func:`scale_to_unit` (exact inside the window; clipped values stay at its bounds)."""
    lower, upper = _window_bounds(unit, window)
    scale = 0.5 * (upper - lower)
    return _affine(unit, scale, lower + scale, False)


def _affine(image: NdarrayOrTensor, scale, offset, clip_range: bool) -> NdarrayOrTensor:
    if isinstance(image, torch.Tensor):
        out = (image if image.is_floating_point() else image.float()) * scale
        out += offset
        return out.clamp_(-1.0, 1.0) if clip_range else out
    image = np.asarray(image)
    out = image.astype(np.float32) * scale if not np.issubdtype(image.dtype, np.floating) else image * scale
    out += offset
    return np.clip(out, -1.0, 1.0, out=out) if clip_range else out


def _window_bounds(image: NdarrayOrTensor, window) -> tuple:
    """Bounds broadcastable to ``image``: a ``(2,)`` window, or ``(..., 2)`` windows for its leading dims."""
    if isinstance(window, torch.Tensor):
        window = window.detach().cpu().numpy()
    bounds = np.asarray(window, dtype=np.float64)
    if bounds.shape == (2,):
        return float(bounds[0]), float(bounds[1])
    lead = bounds.shape[:-1]
    if bounds.shape[-1] != 2 or tuple(image.shape[: len(lead)]) != lead:
        raise ValueError(
            f"window must have shape (2,) or leading image dims + (2,), e.g. ({image.shape[0]}, 2); "
            f"got {bounds.shape} for an image of shape {tuple(image.shape)}"
        )
    view = lead + (1,) * (image.ndim - len(lead))
    lower, upper = bounds[..., 0].reshape(view), bounds[..., 1].reshape(view)
    if isinstance(image, torch.Tensor):
        dtype = image.dtype if image.is_floating_point() else torch.float32
        return (
            torch.as_tensor(lower, dtype=dtype, device=image.device),
            torch.as_tensor(upper, dtype=dtype, device=image.device),
        )
    dtype = image.dtype if np.issubdtype(np.asarray(image).dtype, np.floating) else np.float32
    return lower.astype(dtype), upper.astype(dtype)


class ScaleToUnit(Transform):
    """Scale each channel of a channel-first image to [-1, 1] with its own window.

    Args:
        windows: one window specification per channel (see the module docstring), e.g.
            ``[[0.0, "p99.5"], [-5.0, 5.0]]``.
        clip: clip the result to [-1, 1].
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, windows: Sequence[WindowSpec], clip: bool = True):
        self.windows = [_checked_spec(w) for w in windows]
        self.clip = clip

    def compute_windows(self, img: NdarrayOrTensor, mask: NdarrayOrTensor | None = None) -> torch.Tensor:
        """The concrete ``(C, 2)`` windows of ``img``; ``mask`` (the brain) serves every channel."""
        if img.shape[0] != len(self.windows):
            raise ValueError(f"image has {img.shape[0]} channels but {len(self.windows)} windows were given")
        region = None if mask is None else _region_index(mask, img.shape[1:])
        data = _as_numpy(img).reshape(img.shape[0], -1)
        return torch.tensor(
            [_window_of(data[c], w, region) for c, w in enumerate(self.windows)], dtype=torch.float32
        )

    def __call__(
        self,
        img: NdarrayOrTensor,
        mask: NdarrayOrTensor | None = None,
        windows: NdarrayOrTensor | None = None,
    ) -> NdarrayOrTensor:
        """Scale ``img``; ``windows`` (``(C, 2)``) skips computing them from ``img`` and ``mask``."""
        windows = self.compute_windows(img, mask) if windows is None else windows
        return scale_to_unit(img, windows, clip_range=self.clip)


class UnitToIntensity(Transform):
    """Map a [-1, 1] channel-first image back to intensities with its ``(C, 2)`` windows."""

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __call__(self, img: NdarrayOrTensor, windows: NdarrayOrTensor | Sequence[float]) -> NdarrayOrTensor:
        return unit_to_intensity(img, windows)


class ScaleToUnitd(MapTransform):
    """Dictionary wrapper of :class:`ScaleToUnit`; stores each key's ``(C, 2)`` windows under its window key.

    Args:
        keys: images to scale (channel-first, one channel per sequence).
        windows: one window specification per channel, shared by all ``keys``.
        window_keys: where to store the windows of each key (default ``"<key>_window"``).
        mask_key: the brain mask used for percentile bounds; ``None`` uses each channel's non-zero voxels.
        clip: clip the result to [-1, 1].
    """

    backend = ScaleToUnit.backend

    def __init__(
        self,
        keys: KeysCollection,
        windows: Sequence[WindowSpec],
        window_keys: str | Sequence[str] | None = None,
        mask_key: str | None = None,
        clip: bool = True,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.scaler = ScaleToUnit(windows, clip=clip)
        if window_keys is None:
            window_keys = [f"{key}_window" for key in self.keys]
        elif isinstance(window_keys, str):
            window_keys = [window_keys]
        if len(window_keys) != len(self.keys):
            raise ValueError(f"need one window key per key, got {list(window_keys)} for {list(self.keys)}")
        self.window_keys = list(window_keys)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        mask = d[self.mask_key] if self.mask_key is not None else None
        for key, window_key in self.key_iterator(d, self.window_keys):
            windows = self.scaler.compute_windows(d[key], mask)
            d[key] = self.scaler(d[key], windows=windows)
            d[window_key] = windows
        return d


class UnitToIntensityd(MapTransform):
    """Dictionary wrapper of :class:`UnitToIntensity`, reading each key's windows from its window key."""

    backend = UnitToIntensity.backend

    def __init__(
        self,
        keys: KeysCollection,
        window_keys: str | Sequence[str] | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if window_keys is None:
            window_keys = [f"{key}_window" for key in self.keys]
        elif isinstance(window_keys, str):
            window_keys = [window_keys]
        self.window_keys = list(window_keys)
        self.inverter = UnitToIntensity()

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key, window_key in self.key_iterator(d, self.window_keys):
            d[key] = self.inverter(d[key], d[window_key])
        return d
