"""Voxel-grid geometry shared by every reader and writer: RAS (nibabel) versus LPS (ITK, DICOM).

A leaf module (numpy only), so that the DICOM reader, the image I/O of the preprocessing, the
phantom's DICOM writer and the cohort checks use one definition without importing each other.

nibabel stores a 4x4 affine mapping voxel indices ``(i, j, k)`` to world **RAS+** millimetres; ITK
(and therefore ANTs, SimpleITK and DICOM) stores ``origin``, ``spacing`` and a direction matrix whose
columns are the unit axis vectors, in world **LPS+** millimetres. With ``F = diag(-1, -1, 1)`` and
the affine ``[[M, t], [0, 1]]``: ``spacing_c = |M[:, c]|``, ``direction = F @ M / spacing`` and
``origin = F @ t``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["AFFINE_ATOL_MM", "RAS_TO_LPS", "affine_to_itk", "itk_to_affine", "same_grid_geometry"]

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
# Two grids whose affines differ by no more than this (mm) are the same grid.
AFFINE_ATOL_MM = 1e-3


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


def same_grid_geometry(shape_a, affine_a, shape_b, affine_b, atol: float = AFFINE_ATOL_MM) -> bool:
    """Whether two (shape, affine) pairs describe the same 3D voxel grid within ``atol`` mm."""
    if tuple(shape_a[:3]) != tuple(shape_b[:3]):
        return False
    return bool(np.allclose(np.asarray(affine_a, float), np.asarray(affine_b, float), atol=atol, rtol=0))
