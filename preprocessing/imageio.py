"""Image input/output and exact geometry conversion between nibabel, ANTsPy and SimpleITK.

The in-memory exchange type of every preprocessing step is :class:`nibabel.Nifti1Image`. ANTs and
SimpleITK are used as computation back ends, so conversions must preserve geometry exactly:

* nibabel stores a 4x4 affine mapping voxel indices ``(i, j, k)`` to world **RAS+** millimetres;
* ITK (and therefore ANTs and SimpleITK) stores ``origin``, ``spacing`` and a direction matrix whose
  columns are the unit axis vectors, all in world **LPS+** millimetres.

With ``F = diag(-1, -1, 1)`` and the affine ``[[M, t], [0, 1]]``: ``spacing_c = |M[:, c]|``,
``direction = F @ M / spacing`` and ``origin = F @ t``. The same voxel index order ``(i, j, k)`` is
used by nibabel and ANTs arrays; SimpleITK arrays are ``(k, j, i)``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ants
import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medsynth.errors import InputDataError

logger = logging.getLogger(__name__)

__all__ = [
    "RAS_TO_LPS",
    "affine_to_itk",
    "from_ants",
    "from_sitk",
    "itk_to_affine",
    "load_image",
    "new_image_like",
    "same_grid",
    "to_ants",
    "to_sitk",
]

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

# Pixel types ANTsPy stores natively; anything else is converted to float32 (ANTs would otherwise
# silently cast int16 to uint32 and wrap negative values).
_ANTS_NATIVE = (np.uint8, np.uint32, np.float32, np.float64)
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def affine_to_itk(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], np.ndarray]:
    """Split a nibabel RAS affine into ITK ``(origin, spacing, direction)`` in LPS.

    Args:
        affine: 4x4 voxel-to-RAS matrix.

    Returns:
        ``origin`` (3,), ``spacing`` (3,), ``direction`` (3, 3) with unit columns.
    """
    affine = np.asarray(affine, dtype=np.float64)
    linear = affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"degenerate affine (zero-length axis):\n{affine}")
    direction = RAS_TO_LPS @ linear / spacing
    origin = RAS_TO_LPS @ affine[:3, 3]
    return tuple(float(v) for v in origin), tuple(float(v) for v in spacing), direction


def itk_to_affine(origin, spacing, direction) -> np.ndarray:
    """Compose ITK LPS ``origin``, ``spacing`` and ``direction`` into a nibabel RAS affine."""
    direction = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = RAS_TO_LPS @ direction * np.asarray(spacing, dtype=np.float64)
    affine[:3, 3] = RAS_TO_LPS @ np.asarray(origin, dtype=np.float64)
    return affine


def _spatial_data(img: nib.Nifti1Image) -> np.ndarray:
    data = np.asanyarray(img.dataobj)
    # Trailing singleton dimensions (e.g. 3D stored as 4D with one volume) carry no information.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputDataError(f"expected a 3D image, got shape {data.shape}", path=img.get_filename())
    return data


def load_image(path: str | os.PathLike, **dicom_kwargs) -> nib.Nifti1Image:
    """Load a 3D image from a NIfTI file or a DICOM series folder.

    Args:
        path: ``.nii``/``.nii.gz`` file, or a folder with one DICOM series (plain or ``.dcm.gz``).
        dicom_kwargs: forwarded to :func:`preprocessing.dicom.read_dicom_series` for folders
            (``series_number``, ``series_description``).

    Returns:
        The image as a :class:`nibabel.Nifti1Image` (data loaded lazily for NIfTI).

    Raises:
        InputDataError: missing file, unreadable file, non-3D image, or non-finite voxels.
    """
    path = Path(path)
    if path.is_dir():
        from preprocessing.dicom import read_dicom_series

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
    data = _spatial_data(image)
    if data.ndim != len(image.shape):
        image = nib.Nifti1Image(data, image.affine, image.header)
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


def same_grid_geometry(shape_a, affine_a, shape_b, affine_b, atol: float = 1e-3) -> bool:
    """Whether two (shape, affine) pairs describe the same voxel grid within ``atol`` mm."""
    if tuple(shape_a[:3]) != tuple(shape_b[:3]):
        return False
    return bool(np.allclose(np.asarray(affine_a, float), np.asarray(affine_b, float), atol=atol, rtol=0))


def same_grid(a: nib.Nifti1Image, b: nib.Nifti1Image, atol: float = 1e-3) -> bool:
    """Whether images ``a`` and ``b`` share the same 3D shape and affine (within ``atol`` mm)."""
    return same_grid_geometry(a.shape, a.affine, b.shape, b.affine, atol=atol)


def new_image_like(data: np.ndarray, like: nib.Nifti1Image) -> nib.Nifti1Image:
    """A new image with ``data`` on the grid of ``like`` (same affine, header reused, no scaling)."""
    data = np.asarray(data)
    if data.shape[:3] != like.shape[:3]:
        raise ValueError(f"data shape {data.shape} does not match the template grid {like.shape[:3]}")
    return _finish(data, like.affine, like)
