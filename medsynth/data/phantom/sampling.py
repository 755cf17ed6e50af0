"""Geometry helpers of the phantom: voxel grids, point sampling, smooth random fields, rigid poses.

All positions are world coordinates in millimetres (RAS). A volume is a ``(C, X, Y, Z)`` float32
array with a 4x4 voxel-to-world affine; :func:`sample_at` interpolates it at arbitrary points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``shape`` (X, Y, Z) and a voxel-to-world ``affine`` (4x4, millimetres)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        return np.sqrt((np.asarray(self.affine)[:3, :3] ** 2).sum(axis=0))

    @classmethod
    def centred(cls, shape, spacing, centre, rotation: np.ndarray | None = None) -> Grid:
        """An axis-aligned (or ``rotation``-turned) grid whose centre lies at ``centre`` (mm)."""
        shape = tuple(int(s) for s in shape)
        linear = np.diag(np.asarray(spacing, dtype=np.float64))
        if rotation is not None:
            linear = np.asarray(rotation, dtype=np.float64) @ linear
        middle = (np.asarray(shape, dtype=np.float64) - 1) / 2
        affine = np.eye(4)
        affine[:3, :3] = linear
        affine[:3, 3] = np.asarray(centre, dtype=np.float64) - linear @ middle
        return cls(shape, affine)

    def points(self, supersample: tuple[int, int, int] = (1, 1, 1)) -> np.ndarray:
        """World coordinates of every voxel centre, ``(X, Y, Z, 3)`` float32.

        With ``supersample`` ``(a, b, c)`` each voxel is split into ``a*b*c`` sub-voxels and the result
        has shape ``(X*a, Y*b, Z*c, 3)``; :func:`average_blocks` brings sampled values back to the grid.
        """
        axes = []
        for size, factor in zip(self.shape, supersample, strict=True):
            offsets = (np.arange(factor) + 0.5) / factor - 0.5
            axes.append((np.arange(size)[:, None] + offsets[None, :]).reshape(-1))
        i, j, k = np.meshgrid(*axes, indexing="ij")
        affine = np.asarray(self.affine, dtype=np.float64)
        out = np.empty(i.shape + (3,), dtype=np.float32)
        for row in range(3):
            out[..., row] = affine[row, 0] * i + affine[row, 1] * j + affine[row, 2] * k + affine[row, 3]
        return out


def average_blocks(values: np.ndarray, supersample: tuple[int, int, int]) -> np.ndarray:
    """Mean over ``supersample`` blocks of the last three axes (the partial-volume average)."""
    if tuple(supersample) == (1, 1, 1):
        return values
    a, b, c = supersample
    *lead, x, y, z = values.shape
    blocks = values.reshape(*lead, x // a, a, y // b, b, z // c, c)
    return blocks.mean(axis=(-5, -3, -1))


def supersampling_for(spacing, target_mm: float = 2.5) -> tuple[int, int, int]:
    """Sub-voxels per axis so that each sub-voxel is at most about ``target_mm`` wide."""
    return tuple(max(1, int(np.ceil(s / target_mm - 1e-6))) for s in spacing)


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 matrix to points ``(..., 3)``; returns float32 of the same shape."""
    matrix = np.asarray(matrix, dtype=np.float64)
    tensor = torch.from_numpy(np.asarray(points, dtype=np.float32))
    linear = torch.from_numpy(matrix[:3, :3].T.astype(np.float32))
    offset = torch.from_numpy(matrix[:3, 3].astype(np.float32))
    return torch.addmm(offset, tensor.reshape(-1, 3), linear).reshape(tensor.shape).numpy()


def sample_at(
    volume: np.ndarray,
    affine: np.ndarray,
    points: np.ndarray,
    padding: str = "zeros",
) -> np.ndarray:
    """Trilinear interpolation of ``volume`` ``(C, X, Y, Z)`` at world ``points`` ``(..., 3)``.

    Returns ``(C, ...)`` float32. ``padding`` is ``"zeros"`` or ``"border"`` (outside the volume).
    """
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim == 3:
        volume = volume[None]
    lead_shape = points.shape[:-1]
    # One matrix from world millimetres to grid_sample's [-1, 1] coordinates, whose last axis reads
    # (W, H, D) = (Z, Y, X) of a (C, X, Y, Z) tensor (align_corners=True: -1 and 1 are voxel centres).
    size = np.asarray(volume.shape[1:], dtype=np.float64)
    to_unit = np.eye(4)
    to_unit[:3, :3] = np.diag(2.0 / np.maximum(size - 1, 1))
    to_unit[:3, 3] = -1.0
    reverse_axes = np.eye(4)[[2, 1, 0, 3]]
    normalised = transform_points(reverse_axes @ to_unit @ np.linalg.inv(affine), points.reshape(-1, 3))
    grid = torch.from_numpy(normalised).reshape(1, 1, 1, -1, 3)
    sampled = F.grid_sample(
        torch.from_numpy(volume)[None], grid, mode="bilinear", padding_mode=padding, align_corners=True
    )
    return sampled.reshape(volume.shape[0], *lead_shape).numpy()


def smooth_random_field(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    sigma_voxels: float | tuple[float, ...],
    channels: int = 1,
) -> np.ndarray:
    """Gaussian-smoothed white noise, each channel scaled to zero mean and unit standard deviation."""
    fields = rng.standard_normal((channels, *shape)).astype(np.float32)
    sigma = (0.0, *np.broadcast_to(np.asarray(sigma_voxels, dtype=float), (len(shape),)))
    fields = ndi.gaussian_filter(fields, sigma=sigma, mode="wrap")
    fields -= fields.mean(axis=tuple(range(1, fields.ndim)), keepdims=True)
    fields /= fields.std(axis=tuple(range(1, fields.ndim)), keepdims=True) + 1e-8
    return fields


def rotation_matrix(degrees: tuple[float, float, float]) -> np.ndarray:
    """3x3 rotation about x, then y, then z (right-handed, degrees)."""
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def rigid_matrix(
    rotation_degrees: tuple[float, float, float],
    translation_mm: tuple[float, float, float],
    centre_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """4x4 rigid transform ``x -> R (x - centre) + centre + t`` (rotation about ``centre``)."""
    rotation = rotation_matrix(rotation_degrees)
    centre = np.asarray(centre_mm, dtype=np.float64)
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = centre - rotation @ centre + np.asarray(translation_mm, dtype=np.float64)
    return matrix


def random_unit_vector(rng: np.random.Generator) -> np.ndarray:
    vector = rng.standard_normal(3)
    return vector / (np.linalg.norm(vector) + 1e-12)
