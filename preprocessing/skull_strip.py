"""Brain extraction (skull stripping) of raw MRI, robust to tumours, offline, on CPU.

Method: **deepbet** (Fisch et al. 2024; a two-stage U-Net trained on >7000 T1w scans including
pathology; TorchScript weights ship in the wheel under ``site-packages/data/models``). It is run
in-process on the image array; this module only adds the geometry handling deepbet lacks:

* deepbet crops a bounding box and rescales it to 256^3 with nearest-neighbour interpolation,
  whatever the voxel size, so thick-slice clinical data (0.9 x 0.9 x 5.5 mm) reach the network
  stretched along z. We therefore resample the image to an isotropic ``resample_mm`` grid (default
  1 mm, linear, in the closest canonical RAS orientation), run the network there, and resample its
  brain **probability** back to the input grid (linear) before thresholding, which gives smooth
  boundaries on thick slices instead of staircase nearest-neighbour masks;
* post-processing: largest connected component, then hole filling (MONAI transforms), so a
  tumour cavity darker than brain stays inside the mask.

Measured on the raw TCGA-FG-6692 Gd-T1w (256 x 224 x 26, 0.9 x 0.9 x 5.5 mm, glioma) against the
HD-BET-class reference mask: Dice 0.971 when deepbet is fed the native anisotropic grid, 0.974
through the 1 mm resampling used here, 0.972 at 1.5 mm; ~5-15 s per image on one CPU thread (the
network always sees a 256^3 crop, so the cost hardly depends on the input size). On the digital
phantom's raw exams (truth masks), Dice 0.975-0.985 on T1w, Gd-T1w and FLAIR but only 0.92-0.94 on
T2w (dark white matter, bright CSF: deepbet is a T1w model): strip the T1w/Gd-T1w and carry the
mask to the other sequences (the per-patient pipeline does this). No ANTs fallback was needed.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import FillHoles, KeepLargestConnectedComponent, MapTransform, Transform
from nibabel.processing import resample_from_to, resample_to_output

from medsynth.errors import InputDataError
from preprocessing.imageio import like_input, new_image_like, same_grid, to_nifti

logger = logging.getLogger(__name__)

__all__ = [
    "SKULL_STRIP_METHODS",
    "ExtractBrain",
    "ExtractBraind",
    "brain_probability",
    "extract_brain",
    "postprocess_mask",
]

SKULL_STRIP_METHODS = ("deepbet",)


@functools.lru_cache(maxsize=2)
def _deepbet_model(device: str):
    # Loading the two TorchScript networks takes ~1 s; keep one instance per device.
    from deepbet.bet import BrainExtraction

    model = BrainExtraction(no_gpu=device == "cpu")
    return model


def brain_probability(
    img: nib.Nifti1Image, resample_mm: float | None = 1.0, device: str = "cpu"
) -> nib.Nifti1Image:
    """deepbet brain probability (float32 in [0, 1]) on ``img``'s grid.

    Args:
        img: 3D head MRI (T1w-like contrast works best).
        resample_mm: isotropic voxel size the network sees; ``None`` feeds the native grid.
        device: ``"cpu"`` or ``"cuda"``.
    """
    data = np.asanyarray(img.dataobj)
    if data.ndim != 3:
        raise InputDataError(f"expected a 3D image, got shape {data.shape}", path=img.get_filename())
    if not np.all(np.isfinite(data)):
        raise InputDataError("image contains NaN/inf voxels", path=img.get_filename())
    if float(np.ptp(data)) == 0.0:
        raise InputDataError("image is constant: nothing to skull-strip", path=img.get_filename())
    float_img = nib.Nifti1Image(data.astype(np.float32), img.affine)
    if resample_mm is None:
        work = float_img
    else:
        work = resample_to_output(float_img, voxel_sizes=(float(resample_mm),) * 3, order=1)
    work = nib.as_closest_canonical(work)
    model = _deepbet_model(device)
    with torch.no_grad():
        probability = model.run_model(work.get_fdata(dtype=np.float32).copy())
    probability_img = nib.Nifti1Image(np.clip(probability, 0, 1).astype(np.float32), work.affine)
    back = resample_from_to(probability_img, (img.shape[:3], img.affine), order=1, cval=0.0)
    return new_image_like(np.clip(back.get_fdata(dtype=np.float32), 0, 1), img)


def postprocess_mask(mask: np.ndarray, keep_largest: bool = True, fill_holes: bool = True) -> np.ndarray:
    """Largest 26-connected component, then 3D hole filling; returns uint8."""
    tensor = torch.as_tensor(np.asarray(mask, dtype=bool)[None].astype(np.uint8))
    if keep_largest and tensor.any():
        tensor = KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False, connectivity=3)(tensor)
    if fill_holes:
        tensor = FillHoles(applied_labels=[1])(tensor)
    return np.asarray(tensor[0]).astype(np.uint8)


def extract_brain(
    img: nib.Nifti1Image,
    method: str = "deepbet",
    threshold: float = 0.5,
    resample_mm: float | None = 1.0,
    keep_largest: bool = True,
    fill_holes: bool = True,
    device: str = "cpu",
) -> nib.Nifti1Image:
    """Brain mask of a raw head MRI.

    Args:
        img: 3D head image (any orientation, anisotropic voxels allowed).
        method: ``"deepbet"`` (see the module docstring).
        threshold: probability threshold.
        resample_mm: isotropic working resolution of the network (``None``: native grid).
        keep_largest: keep only the largest connected component.
        fill_holes: fill enclosed holes.
        device: torch device for the network.

    Returns:
        uint8 mask (0/1) on ``img``'s grid.

    Raises:
        InputDataError: non-3D, non-finite or constant image, or an empty mask.
    """
    if method not in SKULL_STRIP_METHODS:
        raise ValueError(f"unknown skull-stripping method {method!r}; available: {SKULL_STRIP_METHODS}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    start = time.perf_counter()
    probability = brain_probability(img, resample_mm=resample_mm, device=device)
    mask = postprocess_mask(np.asanyarray(probability.dataobj) > threshold, keep_largest, fill_holes)
    if not mask.any():
        raise InputDataError("skull stripping found no brain (is this a head MRI?)", path=img.get_filename())
    volume_ml = mask.sum() * float(np.prod(img.header.get_zooms()[:3])) / 1000.0
    logger.info("brain mask: %.0f ml in %.1f s (%s)", volume_ml, time.perf_counter() - start, method)
    return new_image_like(mask, img)


class ExtractBrain(Transform):
    """Array transform: image -> uint8 brain mask (see :func:`extract_brain`), on NIfTI images or MONAI
    MetaTensors (the mask has the input's type)."""

    def __init__(
        self,
        method: str = "deepbet",
        threshold: float = 0.5,
        resample_mm: float | None = 1.0,
        keep_largest: bool = True,
        fill_holes: bool = True,
        device: str = "cpu",
    ):
        self.kwargs = {
            "method": method,
            "threshold": threshold,
            "resample_mm": resample_mm,
            "keep_largest": keep_largest,
            "fill_holes": fill_holes,
            "device": device,
        }

    def __call__(self, img: nib.Nifti1Image | MetaTensor) -> nib.Nifti1Image | MetaTensor:
        return like_input(extract_brain(to_nifti(img), **self.kwargs), img)


class ExtractBraind(MapTransform):
    """Dictionary wrapper: computes the mask of ``keys[0]`` into ``mask_key``.

    Args:
        keys: the image to skull-strip (first key); further keys are masked too when ``apply_mask``.
        mask_key: dictionary key receiving the mask image.
        apply_mask: also zero the voxels outside the mask in every key (images must share the grid).
        kwargs: see :class:`ExtractBrain`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str = "brain_mask",
        apply_mask: bool = False,
        allow_missing_keys: bool = False,
        **kwargs,
    ):
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.apply_mask = apply_mask
        self.extractor = ExtractBrain(**kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys: Sequence[Hashable] = list(self.key_iterator(d))
        if not keys:
            return d
        mask_img = extract_brain(to_nifti(d[keys[0]]), **self.extractor.kwargs)
        d[self.mask_key] = like_input(mask_img, d[keys[0]])
        if self.apply_mask:
            mask = np.asanyarray(mask_img.dataobj).astype(bool)
            for key in keys:
                image = to_nifti(d[key])
                if not same_grid(image, mask_img):
                    raise InputDataError(
                        f"{key!r} is not on the grid of the brain mask", path=image.get_filename()
                    )
                d[key] = like_input(
                    new_image_like(np.where(mask, np.asanyarray(image.dataobj), 0), image), d[key]
                )
        return d
