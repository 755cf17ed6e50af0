"""Image input/output and exact geometry conversion between nibabel, ANTsPy, SimpleITK and MONAI.

The in-memory exchange type of every preprocessing step is :class:`nibabel.Nifti1Image`; the
preprocessing transforms also take MONAI ``MetaTensor`` volumes (:func:`to_nifti`, :func:`like_input`),
so they join MONAI transform chains after ``LoadImaged``. ANTs and
SimpleITK are used as computation back ends, so conversions must preserve geometry exactly:

nibabel affines are RAS, ITK geometry is LPS; the conversion is :mod:`medsynth.utils.geometry`. The
same voxel index order ``(i, j, k)`` is used by nibabel and ANTs arrays; SimpleITK arrays are ``(k, j, i)``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ants
import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

from medsynth.errors import InputDataError
from medsynth.utils.geometry import AFFINE_ATOL_MM, affine_to_itk, itk_to_affine, same_grid_geometry
from preprocessing.dicom import read_dicom_series

logger = logging.getLogger(__name__)

__all__ = [
    "from_ants",
    "from_sitk",
    "load_image",
    "new_image_like",
    "like_input",
    "same_grid",
    "to_ants",
    "to_nifti",
    "to_sitk",
]

# Pixel types ANTsPy stores natively; anything else is converted to float32 (ANTs would otherwise
# silently cast int16 to uint32 and wrap negative values).
_ANTS_NATIVE = (np.uint8, np.uint32, np.float32, np.float64)
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _spatial_data(img: nib.Nifti1Image, volume: int | None = None) -> np.ndarray:
    data = np.asanyarray(img.dataobj)
    # Trailing singleton dimensions (e.g. 3D stored as 4D with one volume) carry no information.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        count = data.shape[3]
        if volume is None:
            raise InputDataError(
                f"is a multi-volume series ({count} volumes, shape {data.shape}); the anatomical "
                f"pipeline takes one 3D volume: choose one with --volume INDEX (0..{count - 1})",
                path=img.get_filename(),
            )
        if not -count <= volume < count:
            raise InputDataError(
                f"has {count} volumes; --volume {volume} is not one of 0..{count - 1}",
                path=img.get_filename(),
            )
        logger.info("%s: volume %d of %d taken", Path(img.get_filename() or "image").name, volume, count)
        data = data[..., volume]
    if data.ndim != 3:
        raise InputDataError(f"expected a 3D image, got shape {data.shape}", path=img.get_filename())
    return data


def load_image(
    path: str | os.PathLike, volume: int | None = None, converter: str = "pydicom", **dicom_kwargs
) -> nib.Nifti1Image:
    """Load a 3D image from a NIfTI file or a DICOM series folder.

    Args:
        path: ``.nii``/``.nii.gz`` file, or a folder with one DICOM series (plain or ``.dcm.gz``).
        volume: index of the volume to take from a 4D image (``None``: 4D is refused, naming the file).
        converter: of a DICOM folder: ``"pydicom"`` (the project's reader, strict slice checks,
            selection by ``dicom_kwargs``) or ``"dcm2niix"`` (one series of any kind,
            :func:`preprocessing.dcm2niix.load_dicom_folder`; the pipeline's choice).
        dicom_kwargs: forwarded to :func:`preprocessing.dicom.read_dicom_series` for folders
            (``series_number``, ``series_description``).

    Returns:
        The image as a :class:`nibabel.Nifti1Image` (data loaded lazily for NIfTI).

    Raises:
        InputDataError: missing file, unreadable file, non-3D image, or non-finite voxels.
    """
    path = Path(path)
    if path.is_dir() and converter == "dcm2niix":
        from preprocessing.dcm2niix import load_dicom_folder

        if dicom_kwargs:
            raise ValueError(
                f"selection {sorted(dicom_kwargs)} is the pydicom reader's; dcm2niix takes one series"
            )
        return load_dicom_folder(path, volume)
    if path.is_dir():
        if converter != "pydicom":
            raise ValueError(f"converter must be 'pydicom' or 'dcm2niix', got {converter!r}")
        image, _ = read_dicom_series(path, **dicom_kwargs)
        return image
    if not path.exists():
        raise InputDataError("file does not exist", path=path)
    if not path.name.lower().endswith(_NIFTI_SUFFIXES):
        raise InputDataError("not a NIfTI file (.nii/.nii.gz) nor a DICOM folder", path=path)
    try:
        image = nib.load(str(path))
    except Exception as err:  # nibabel raises several types for corrupt files
        raise InputDataError(f"cannot read NIfTI: {err}", path=path) from err
    if not isinstance(image, nib.Nifti1Image):
        image = nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine, image.header)
    data = _spatial_data(image, volume)
    if data.ndim != len(image.shape):
        image = nib.Nifti1Image(data, image.affine, image.header)
        image.set_filename(str(path))
    if np.issubdtype(image.get_data_dtype(), np.floating):
        n_bad = int(np.count_nonzero(~np.isfinite(np.asanyarray(image.dataobj))))
        if n_bad:
            raise InputDataError(f"contains {n_bad} NaN/inf voxels", path=path)
    return image


def to_ants(img: nib.Nifti1Image) -> ants.ANTsImage:
    """Convert a nibabel image to ANTsPy with identical geometry.

    Pixel types ANTs stores natively (uint8, uint32, float32, float64) are kept; others become
    float32 (ANTs would cast int16 to uint32).
    """
    data = _spatial_data(img)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    elif data.dtype.type not in _ANTS_NATIVE:
        data = data.astype(np.float32)
    origin, spacing, direction = affine_to_itk(img.affine)
    return ants.from_numpy(np.ascontiguousarray(data), origin=origin, spacing=spacing, direction=direction)


def _header_like(like: nib.Nifti1Image | None, data: np.ndarray) -> nib.Nifti1Header | None:
    if like is None:
        return None
    header = like.header.copy()
    header.set_data_dtype(data.dtype)
    # Scaling of the template would be re-applied to already-scaled values.
    header.set_slope_inter(None, None)
    return header


def _finish(data: np.ndarray, affine: np.ndarray, like: nib.Nifti1Image | None) -> nib.Nifti1Image:
    if like is not None and same_grid_geometry(data.shape, affine, like.shape[:3], like.affine):
        # Keep the template's exact affine: avoids float round-off through LPS conversion.
        affine = like.affine
    image = nib.Nifti1Image(data, affine, _header_like(like, data))
    image.header.set_xyzt_units("mm")
    return image


def from_ants(ants_img: ants.ANTsImage, like: nib.Nifti1Image | None = None) -> nib.Nifti1Image:
    """Convert an ANTsPy image to nibabel.

    Args:
        ants_img: the 3D ANTs image.
        like: optional template; its header fields are reused and, when the grids agree within
            1e-3 mm, its exact affine.
    """
    if ants_img.dimension != 3 or ants_img.has_components:
        raise ValueError(f"expected a scalar 3D ANTs image, got dimension {ants_img.dimension}")
    affine = itk_to_affine(ants_img.origin, ants_img.spacing, ants_img.direction)
    return _finish(ants_img.numpy(), affine, like)


def to_sitk(img: nib.Nifti1Image) -> sitk.Image:
    """Convert a nibabel image to SimpleITK with identical geometry (array axes reversed)."""
    data = _spatial_data(img)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    origin, spacing, direction = affine_to_itk(img.affine)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(tuple(direction.ravel()))
    return image


def from_sitk(sitk_img: sitk.Image, like: nib.Nifti1Image | None = None) -> nib.Nifti1Image:
    """Convert a SimpleITK image to nibabel (``like`` as in :func:`from_ants`)."""
    if sitk_img.GetDimension() != 3 or sitk_img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("expected a scalar 3D SimpleITK image")
    data = sitk.GetArrayFromImage(sitk_img).transpose(2, 1, 0)
    affine = itk_to_affine(sitk_img.GetOrigin(), sitk_img.GetSpacing(), sitk_img.GetDirection())
    return _finish(np.ascontiguousarray(data), affine, like)


def same_grid(a: nib.Nifti1Image, b: nib.Nifti1Image, atol: float = AFFINE_ATOL_MM) -> bool:
    """Whether images ``a`` and ``b`` share the same 3D shape and affine (within ``atol`` mm)."""
    return same_grid_geometry(a.shape, a.affine, b.shape, b.affine, atol=atol)


def new_image_like(data: np.ndarray, like: nib.Nifti1Image) -> nib.Nifti1Image:
    """A new image with ``data`` on the grid of ``like`` (same affine, header reused, no scaling)."""
    data = np.asarray(data)
    if data.shape[:3] != like.shape[:3]:
        raise ValueError(f"data shape {data.shape} does not match the template grid {like.shape[:3]}")
    return _finish(data, like.affine, like)


def to_nifti(image: nib.Nifti1Image | MetaTensor | None) -> nib.Nifti1Image | None:
    """The preprocessing's working type from either of the types a transform chain carries.

    A NIfTI image is returned as it is; a MONAI ``MetaTensor`` as ``LoadImage(ensure_channel_first=True)``
    makes it (one channel, RAS ``affine`` in its metadata) becomes a 3D NIfTI image on the same grid,
    named after its source file so that error messages can cite it. ``None`` stays ``None``.
    """
    if image is None or isinstance(image, nib.Nifti1Image):
        return image
    if not isinstance(image, MetaTensor):
        raise TypeError(f"expected a nibabel image or a MONAI MetaTensor, got {type(image).__name__}")
    data = image.detach().cpu().numpy()
    if data.ndim == 4:
        if data.shape[0] != 1:
            raise ValueError(f"expected a single-channel volume (1, H, W, D), got shape {tuple(data.shape)}")
        data = data[0]
    converted = nib.Nifti1Image(np.ascontiguousarray(data), np.asarray(image.affine, dtype=np.float64))
    source = image.meta.get("filename_or_obj")
    if isinstance(source, (str, os.PathLike)) and str(source):
        converted.set_filename(str(source))
    return converted


def like_input(
    result: nib.Nifti1Image, original: nib.Nifti1Image | MetaTensor
) -> nib.Nifti1Image | MetaTensor:
    """``result`` in the type of ``original``: a NIfTI image, or a channel-first ``MetaTensor`` that
    keeps ``original``'s metadata with ``result``'s affine (the grid may have changed)."""
    if not isinstance(original, MetaTensor):
        return result
    converted = MetaTensor(torch.as_tensor(np.asanyarray(result.dataobj))[None], meta=dict(original.meta))
    converted.affine = torch.as_tensor(result.affine, dtype=torch.float64)
    return converted
