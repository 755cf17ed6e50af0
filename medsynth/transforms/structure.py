"""Qu et al.'s structural feature maps, brain-area masks and their filter (papers 003/004, Algorithms 1-3).

* **Algorithm 1**, :func:`structural_feature_map`: the Sobel responses of a slice in its two in-plane
  directions; the per-pixel minimum and maximum of the two; each taken as a difference from its own
  image mean (``mean - min`` and ``max - mean``, so strong edges of either sign are large and
  positive); each thresholded at ``beta``; the union. A binary map of the slice's structure.
  :func:`soft_structural_map` is the same with a steep sigmoid instead of the threshold, so that a
  loss can compare the structure of a generated image with a map (the hard threshold has no gradient).
* **Algorithm 2**, :func:`brain_area_mask`: where the slice is non-zero, enlarged by ``p`` pixels
  (the mask is resized to ``(H + p, W + p)`` about its centre and cropped back). The papers write it
  as the complement (1 outside the brain); here 1 is the brain, as everywhere in the project, and
  the losses use ``1 - mask``.
* **Algorithm 3**, :func:`closed_contour_mask` and :class:`StructuralMapFilter`: the generated map,
  Gaussian-blurred and binarised, with every closed contour filled (``binary_fill_holes``: what the
  papers' OpenCV ``findContours``/``drawContours(filled)`` draws); a map is kept when the mean
  absolute difference between that filled mask and the brain mask the MASK generator predicts is
  below a threshold (0.05 in paper 003), i.e. when the brain outline is closed. (Both papers' pseudo
  code loops while the MAE is *below* the threshold, which contradicts their text; the text is
  followed.)
* **Lesion-label fusion rule** (Sec. 2.5): :func:`remove_lesion_structure` clears a real image's map
  where its own lesion is, so that lesion structure comes from the chosen label only;
  :func:`label_inside_brain` accepts a label only when no lesion pixel lies outside the brain mask;
  :func:`fuse_structure_and_label` combines map and one-hot label by a pixel-wise weighted sum per
  label channel.

Tensors are channel-first 2D slices, ``(C, H, W)`` for the transforms and ``(B, C, H, W)`` for the
functions (which the trainers call on batches); values of the image are expected in ``[0, 1]`` with
0 outside the head (``beta`` is in those units).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_tensor
from scipy import ndimage

__all__ = [
    "BrainAreaMask",
    "BrainAreaMaskd",
    "StructuralFeatureMap",
    "StructuralFeatureMapd",
    "StructuralMapFilter",
    "brain_area_mask",
    "closed_contour_mask",
    "fuse_structure_and_label",
    "label_inside_brain",
    "remove_lesion_structure",
    "soft_structural_map",
    "structural_feature_map",
]

# 3x3 Sobel kernels: derivative along rows (vertical edges respond) and along columns.
_SOBEL = torch.tensor([[[-1.0, -2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 1.0]],
                       [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]])  # fmt: skip


def _batch(x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch of 2D slices, got shape {tuple(x.shape)}")
    return x


def _edge_differences(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean(min) - min`` and ``max - mean(max)`` of the two Sobel responses, per image and channel."""
    x = _batch(x).float()
    b, c, h, w = x.shape
    kernels = _SOBEL.to(x.device).unsqueeze(1)  # (2, 1, 3, 3)
    padded = F.pad(x.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    responses = F.conv2d(padded, kernels).reshape(b, c, 2, h, w)
    low, high = responses.min(dim=2).values, responses.max(dim=2).values
    low = low.mean(dim=(-2, -1), keepdim=True) - low
    high = high - high.mean(dim=(-2, -1), keepdim=True)
    return low, high


def structural_feature_map(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Algorithm 1 on a batch ``(B, C, H, W)``: the binary structural map of every channel (float 0/1)."""
    low, high = _edge_differences(x)
    return ((low > beta) | (high > beta)).float()


def soft_structural_map(x: torch.Tensor, beta: float, sharpness: float = 50.0) -> torch.Tensor:
    """Algorithm 1 with ``sigmoid(sharpness * (response - beta))`` for the thresholds and a soft union
    (``1 - (1 - a)(1 - b)``): differentiable, equal to the hard map as ``sharpness`` grows."""
    low, high = _edge_differences(x)
    a, b = torch.sigmoid(sharpness * (low - beta)), torch.sigmoid(sharpness * (high - beta))
    return 1.0 - (1.0 - a) * (1.0 - b)


def brain_area_mask(x: torch.Tensor, p: int) -> torch.Tensor:
    """Algorithm 2 on a batch ``(B, C, H, W)``: 1 where any channel is non-zero, enlarged by ``p``
    pixels (resized to ``(H + p, W + p)`` about the centre, nearest neighbour, centre-cropped back).

    Returns:
        ``(B, 1, H, W)`` float 0/1, 1 = brain area (the papers' ``mask`` is ``1 -`` this).
    """
    x = _batch(x)
    if p < 0:
        raise ValueError(f"p must be >= 0, got {p}")
    inside = (x != 0).any(dim=1, keepdim=True).float()
    if p == 0:
        return inside
    h, w = inside.shape[-2:]
    grown = F.interpolate(inside, size=(h + p, w + p), mode="nearest")
    top, left = p // 2, p // 2
    return grown[..., top : top + h, left : left + w].contiguous()


def closed_contour_mask(structure: NdarrayOrTensor, sigma: float = 1.0, level: float = 0.25) -> np.ndarray:
    """Algorithm 3's "traditional" mask of one map ``(H, W)``: blurred, binarised, closed contours filled.

    Args:
        structure: a structural map (values 0..1).
        sigma: Gaussian blur, pixels (closes one-pixel gaps of the edge map).
        level: binarisation level of the blurred map.

    Returns:
        ``(H, W)`` float 0/1: 1 inside every closed contour (and on it).
    """
    array = np.asarray(convert_to_tensor(structure, track_meta=False).detach().cpu(), dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"expected one (H, W) map, got shape {array.shape}")
    edges = ndimage.gaussian_filter(array, sigma) > level if sigma > 0 else array > level
    return ndimage.binary_fill_holes(edges).astype(np.float32)


class StructuralMapFilter:
    """Algorithm 3: keep a generated structural map when its filled contours match its predicted mask.

    Args:
        mae_threshold: the largest mean absolute difference accepted (paper 003: 0.05).
        sigma: Gaussian blur before filling (pixels).
        level: binarisation level of the blurred map.
    """

    def __init__(self, mae_threshold: float = 0.05, sigma: float = 1.0, level: float = 0.25) -> None:
        self.mae_threshold = float(mae_threshold)
        self.sigma, self.level = float(sigma), float(level)

    def mae(self, structure: NdarrayOrTensor, brain_mask: NdarrayOrTensor) -> float:
        """Mean absolute difference between the filled contours of ``structure`` and ``brain_mask`` (H, W)."""
        filled = closed_contour_mask(structure, self.sigma, self.level)
        mask = np.asarray(convert_to_tensor(brain_mask, track_meta=False).detach().cpu(), dtype=np.float32)
        if mask.shape != filled.shape:
            raise ValueError(f"map {filled.shape} and mask {mask.shape} differ in shape")
        return float(np.abs(filled - mask).mean())

    def __call__(self, structure: NdarrayOrTensor, brain_mask: NdarrayOrTensor) -> bool:
        return self.mae(structure, brain_mask) < self.mae_threshold


def remove_lesion_structure(
    structure: torch.Tensor, label: torch.Tensor, lesion_labels: Sequence[int]
) -> torch.Tensor:
    """The map with its own lesion cleared (Sec. 2.5): ``structure * (1 - [label is a lesion label])``."""
    lesion = torch.isin(label.long(), torch.as_tensor(list(lesion_labels), device=label.device))
    return structure * (~lesion).to(structure.dtype)


def label_inside_brain(
    label: torch.Tensor, brain_mask: torch.Tensor, lesion_labels: Sequence[int]
) -> torch.Tensor:
    """Sec. 2.5's acceptance rule, per batch item: no lesion pixel outside the brain mask (bool ``(B,)``)."""
    lesion = torch.isin(label.long(), torch.as_tensor(list(lesion_labels), device=label.device))
    outside = lesion & (brain_mask < 0.5)
    return ~outside.flatten(1).any(dim=1)


def fuse_structure_and_label(
    structure: torch.Tensor, onehot: torch.Tensor, label_weight: float = 0.5
) -> torch.Tensor:
    """Sec. 2.5's fusion: each one-hot label channel combined with the map by a pixel-wise weighted sum,
    ``(1 - w) * structure + w * onehot_c`` (``structure`` ``(B, 1, H, W)``, ``onehot`` ``(B, L, H, W)``).

    The papers give neither the weights nor the form beyond "pixel-wise weighted sum"; one weight
    for every channel keeps each fused channel in [0, 1] and both sources readable in it.
    """
    if structure.shape[1] != 1 or structure.shape[-2:] != onehot.shape[-2:]:
        raise ValueError(f"structure {tuple(structure.shape)} and label {tuple(onehot.shape)} do not fuse")
    return (1.0 - label_weight) * structure + label_weight * onehot.to(structure.dtype)


class StructuralFeatureMap(Transform):
    """Algorithm 1 on a channel-first slice ``(C, H, W)``: one binary map per channel.

    Args:
        beta: the threshold of the edge differences (image units; images in [0, 1]).
    """

    backend = [torch.Tensor.__name__]

    def __init__(self, beta: float = 0.1) -> None:
        self.beta = float(beta)

    def __call__(self, img: NdarrayOrTensor) -> torch.Tensor:
        x = convert_to_tensor(img, track_meta=False)
        return structural_feature_map(x.unsqueeze(0), self.beta)[0]


class BrainAreaMask(Transform):
    """Algorithm 2 on a channel-first slice ``(C, H, W)``: ``(1, H, W)``, 1 on the enlarged brain area.

    Args:
        p: enlargement, pixels (the mask is resized to ``(H + p, W + p)`` and cropped back).
    """

    backend = [torch.Tensor.__name__]

    def __init__(self, p: int = 4) -> None:
        self.p = int(p)

    def __call__(self, img: NdarrayOrTensor) -> torch.Tensor:
        x = convert_to_tensor(img, track_meta=False)
        return brain_area_mask(x.unsqueeze(0), self.p)[0]


class _DerivedKeyd(MapTransform):
    """Writes ``transform(d[key])`` to ``d[output_key]`` (the source is kept)."""

    def __init__(self, transform: Transform, keys: KeysCollection, output_keys: KeysCollection) -> None:
        super().__init__(keys)
        self.transform = transform
        self.output_keys = list(output_keys) if not isinstance(output_keys, str) else [output_keys]
        if len(self.output_keys) != len(self.keys):
            raise ValueError(f"{len(self.keys)} key(s) but {len(self.output_keys)} output key(s)")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, output_key in zip(self.keys, self.output_keys, strict=True):
            d[output_key] = self.transform(d[key])
        return d


class StructuralFeatureMapd(_DerivedKeyd):
    """Dictionary wrapper of :class:`StructuralFeatureMap`: ``d[output_key] = map(d[key])``."""

    def __init__(
        self, keys: KeysCollection, output_keys: KeysCollection = "structure", beta: float = 0.1
    ) -> None:
        super().__init__(StructuralFeatureMap(beta), keys, output_keys)


class BrainAreaMaskd(_DerivedKeyd):
    """Dictionary wrapper of :class:`BrainAreaMask`: ``d[output_key] = mask(d[key])``."""

    def __init__(self, keys: KeysCollection, output_keys: KeysCollection = "brain_area", p: int = 4) -> None:
        super().__init__(BrainAreaMask(p), keys, output_keys)
