"""N4 bias-field correction (Tustison et al. 2010) with ANTs, fitted inside the brain mask.

ANTsPy's ``n4_bias_field_correction`` is called once with ``return_bias_field=True``; the corrected
image is ``image / bias`` (exactly what N4 outputs, without running it twice). The B-spline field
is fitted on the shrunk image (``shrink_factor``) from the voxels of ``mask`` with positive
intensity (N4 works in log space) and evaluated over the whole grid, so voxels outside the mask are
corrected by the smooth extrapolation of the field.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import ants
import nibabel as nib
import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from medsynth.errors import InputDataError
from preprocessing.imageio import like_input, new_image_like, same_grid, to_ants, to_nifti

logger = logging.getLogger(__name__)

__all__ = ["N4BiasCorrection", "N4BiasCorrectiond", "n4_correct"]


def n4_correct(
    img: nib.Nifti1Image,
    mask: nib.Nifti1Image | None = None,
    shrink_factor: int = 4,
    iterations: Sequence[int] = (50, 50, 50, 50),
    convergence_tol: float = 1e-7,
    spline_distance_mm: float = 200.0,
) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """Estimate and remove a smooth multiplicative bias field.

    Args:
        img: 3D image (intensities positive inside ``mask``).
        mask: region used to fit the field (the brain mask); ``None``: ANTs' automatic head mask.
        shrink_factor: isotropic voxel shrink factor for fitting (speed).
        iterations: iterations per fitting level (one entry per multi-resolution level).
        convergence_tol: convergence threshold of each level.
        spline_distance_mm: B-spline control point spacing.

    Returns:
        ``(corrected, bias)``: float32 images on ``img``'s grid, ``corrected = img / bias``; the
        bias field has unit geometric mean over the fitted voxels.

    Raises:
        InputDataError: mask on another grid, empty mask, non-finite values.
    """
    data = np.asanyarray(img.dataobj).astype(np.float32)
    if data.ndim != 3:
        raise InputDataError(f"expected a 3D image, got shape {data.shape}", path=img.get_filename())
    if not np.all(np.isfinite(data)):
        raise InputDataError("image contains NaN/inf voxels", path=img.get_filename())
    image = new_image_like(data, img)
    ants_img = to_ants(image)
    if mask is None:
        region = ants_img.get_mask().numpy() > 0
    else:
        if not same_grid(mask, img):
            raise InputDataError(
                f"mask grid {mask.shape} does not match the image grid {img.shape}", path=mask.get_filename()
            )
        region = np.asanyarray(mask.dataobj) > 0
    # N4 fits in log space: only positive voxels can inform the field.
    fit_mask = to_ants(new_image_like((region & (data > 0)).astype(np.float32), img))
    n_fit = int(fit_mask.numpy().sum())
    if n_fit < 100:
        raise InputDataError(
            f"only {n_fit} positive voxels inside the mask: cannot fit a bias field", path=img.get_filename()
        )
    start = time.perf_counter()
    bias_ants = ants.n4_bias_field_correction(
        ants_img,
        mask=fit_mask,
        shrink_factor=int(shrink_factor),
        convergence={"iters": [int(i) for i in iterations], "tol": float(convergence_tol)},
        spline_param=float(spline_distance_mm),
        return_bias_field=True,
    )
    bias = bias_ants.numpy().astype(np.float64)
    if not np.all(np.isfinite(bias)) or np.any(bias <= 0):
        raise InputDataError(
            "N4 produced an invalid bias field (check the mask and intensities)", path=img.get_filename()
        )
    # N4 leaves the field's scale arbitrary; unit geometric mean over the fit region keeps the
    # corrected intensities on the input's scale.
    inside = fit_mask.numpy() > 0
    bias = (bias / np.exp(np.mean(np.log(bias[inside])))).astype(np.float32)
    corrected = data / bias
    logger.info(
        "N4: bias field range %.3f-%.3f inside the fit mask, %.1f s",
        float(bias[inside].min()),
        float(bias[inside].max()),
        time.perf_counter() - start,
    )
    return new_image_like(corrected.astype(np.float32), img), new_image_like(bias, img)


class N4BiasCorrection(Transform):
    """Array transform ``(img, mask) -> corrected img`` (see :func:`n4_correct`) on NIfTI images or
    MONAI MetaTensors (the output has the input's type)."""

    def __init__(
        self,
        shrink_factor: int = 4,
        iterations: Sequence[int] = (50, 50, 50, 50),
        convergence_tol: float = 1e-7,
        spline_distance_mm: float = 200.0,
    ):
        self.kwargs = {
            "shrink_factor": shrink_factor,
            "iterations": tuple(iterations),
            "convergence_tol": convergence_tol,
            "spline_distance_mm": spline_distance_mm,
        }

    def __call__(self, img: nib.Nifti1Image | MetaTensor, mask: nib.Nifti1Image | MetaTensor | None = None):
        return like_input(n4_correct(to_nifti(img), to_nifti(mask), **self.kwargs)[0], img)


class N4BiasCorrectiond(MapTransform):
    """Dictionary wrapper: corrects every key, fitting inside ``mask_key`` when present.

    Args:
        keys: images to correct.
        mask_key: key of the brain mask (optional in the dictionary).
        bias_key_postfix: when set, the bias field of ``key`` is stored under ``key + postfix``.
        kwargs: see :class:`N4BiasCorrection`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str | None = "brain_mask",
        bias_key_postfix: str | None = None,
        allow_missing_keys: bool = False,
        **kwargs,
    ):
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.bias_key_postfix = bias_key_postfix
        self.kwargs = N4BiasCorrection(**kwargs).kwargs

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = to_nifti(d.get(self.mask_key)) if self.mask_key is not None else None
        for key in self.key_iterator(d):
            corrected, bias = n4_correct(to_nifti(d[key]), mask, **self.kwargs)
            if self.bias_key_postfix:
                d[f"{key}{self.bias_key_postfix}"] = like_input(bias, d[key])
            d[key] = like_input(corrected, d[key])
        return d
