"""Normal anatomy of the phantom: the MNI152 2009 tissue maps nilearn ships, warped per patient.

The tissue probability maps (grey matter, white matter, brain mask; CSF = brain - GM - WM) come with
nilearn, so nothing is downloaded. Around the brain, shells of extra-axial CSF, skull (inner table,
diploe, outer table), scalp fat and skin are synthesised from the distance to the brain surface, with
a smoothly varying thickness.

Each patient's anatomy is the template seen through a random smooth deformation: a small global
similarity transform (scale, rotation, shift) plus a low-frequency displacement field, small enough to
stay invertible (a diffeomorphic-looking warp).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi

from medsynth.data.phantom.sampling import (
    Grid,
    rotation_matrix,
    sample_at,
    smooth_random_field,
    transform_points,
)

logger = logging.getLogger(__name__)

# Voxels of padding around the template so that warps and skull shells never leave the array.
_TEMPLATE_PADDING = 24

# Tissue names of the normal head, outside-in order for the shells.
BRAIN_TISSUES: tuple[str, ...] = ("csf", "gm", "wm")
HEAD_TISSUES: tuple[str, ...] = ("extra_csf", "bone", "marrow", "fat", "skin")

# Shell boundaries in millimetres from the brain surface (scaled per patient by a smooth thickness field).
SHELL_BOUNDARIES_MM: dict[str, tuple[float, float]] = {
    "extra_csf": (0.0, 2.5),
    "bone": (2.5, 4.5),  # inner table
    "marrow": (4.5, 7.0),  # diploe
    "bone_outer": (7.0, 8.5),  # outer table
    "fat": (8.5, 13.0),
    "skin": (13.0, 15.0),
}


@dataclass
class TemplateMaps:
    """MNI152 maps on the (padded) 1 mm template grid: ``maps`` is ``(3, X, Y, Z)`` = GM, WM, brain."""

    maps: np.ndarray
    affine: np.ndarray

    @functools.cached_property
    def distance_outside(self) -> np.ndarray:
        """Distance (mm) from the brain mask, 0 inside; used for the skull and scalp shells."""
        brain = self.maps[2] > 0.5
        return ndi.distance_transform_edt(~brain).astype(np.float32)


@functools.lru_cache(maxsize=1)
def load_template() -> TemplateMaps:
    """Load the nilearn MNI152 2009 GM/WM maps and brain mask (bundled with nilearn, no download)."""
    from nilearn import datasets  # heavy import: only when a phantom is made

    grey = datasets.load_mni152_gm_template(resolution=1)
    white = datasets.load_mni152_wm_template(resolution=1)
    mask = datasets.load_mni152_brain_mask(resolution=1)
    for image in (white, mask):
        if image.shape != grey.shape or not np.allclose(image.affine, grey.affine):
            raise RuntimeError("nilearn MNI152 maps do not share one grid; cannot build the phantom template")
    brain = np.asarray(mask.get_fdata(), dtype=np.float32)
    gm = np.asarray(grey.get_fdata(), dtype=np.float32) * brain
    wm = np.asarray(white.get_fdata(), dtype=np.float32) * brain
    total = gm + wm
    scale = np.where(total > 1.0, 1.0 / np.maximum(total, 1e-6), 1.0)
    maps = np.stack([gm * scale, wm * scale, brain])
    pad = _TEMPLATE_PADDING
    maps = np.pad(maps, ((0, 0), (pad, pad), (pad, pad), (pad, pad)))
    affine = np.array(grey.affine, dtype=np.float64)
    affine[:3, 3] -= affine[:3, :3] @ np.full(3, pad)
    logger.debug("loaded MNI152 template %s", maps.shape[1:])
    return TemplateMaps(maps=np.ascontiguousarray(maps), affine=affine)


@dataclass
class Deformation:
    """Patient space -> MNI space: ``q = S (p + u(p))``, ``S`` a similarity, ``u`` a smooth displacement.

    ``fields`` is ``(4, X, Y, Z)`` on ``field_grid`` (patient space): three displacement components in
    millimetres and a skull/scalp thickness factor (around 1).
    """

    similarity: np.ndarray
    fields: np.ndarray
    field_grid: Grid

    def __call__(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """MNI positions of patient-space ``points`` ``(..., 3)`` and the shell thickness factor there."""
        sampled = sample_at(self.fields, self.field_grid.affine, points, padding="border")
        moved = points + np.moveaxis(sampled[:3], 0, -1)
        return transform_points(self.similarity, moved), sampled[3]

    def displaced(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``p + u(p)`` and the shell thickness factor: the MNI position before the similarity ``S``
        (fold ``S`` into the template's affine to save a pass over the points)."""
        sampled = sample_at(self.fields, self.field_grid.affine, points, padding="border")
        return points + np.moveaxis(sampled[:3], 0, -1), sampled[3]


@dataclass(frozen=True)
class DeformationRanges:
    """How far a patient's head may differ from the template."""

    max_rotation_degrees: float = 6.0
    max_log_scale: float = 0.06
    max_shift_mm: float = 4.0
    displacement_mm: float = 3.0
    control_spacing_mm: float = 12.0
    smoothness_mm: float = 24.0


def random_deformation(rng: np.random.Generator, ranges: DeformationRanges | None = None) -> Deformation:
    """Draw one patient's deformation from ``rng`` (default :class:`DeformationRanges`)."""
    ranges = DeformationRanges() if ranges is None else ranges
    rotation = rotation_matrix(tuple(rng.uniform(-1, 1, 3) * ranges.max_rotation_degrees))
    scales = np.exp(
        rng.uniform(-1, 1) * ranges.max_log_scale + rng.uniform(-0.3, 0.3, 3) * ranges.max_log_scale
    )
    similarity = np.eye(4)
    similarity[:3, :3] = rotation @ np.diag(scales)
    similarity[:3, 3] = rng.uniform(-1, 1, 3) * ranges.max_shift_mm
    # The displacement lives on a coarse box over the whole head (MNI extent plus margin).
    spacing = ranges.control_spacing_mm
    shape = tuple(int(np.ceil(extent / spacing)) + 1 for extent in (220.0, 260.0, 240.0))
    grid = Grid.centred(shape, (spacing,) * 3, (0.0, -18.0, 10.0))
    field = smooth_random_field(rng, shape, ranges.smoothness_mm / spacing, channels=3)
    shell_thickness = 1.0 + 0.15 * smooth_random_field(rng, shape, ranges.smoothness_mm / spacing)
    fields = np.concatenate([field * np.float32(ranges.displacement_mm), shell_thickness]).astype(np.float32)
    return Deformation(similarity=similarity, fields=fields, field_grid=grid)


def _soft_interval(distance: np.ndarray, low: float, high: float, edge_mm: float = 1.0) -> np.ndarray:
    """Fraction of a voxel between ``low`` and ``high`` mm, with a linear ``edge_mm`` ramp at each end."""
    rise = np.clip((distance - low) / edge_mm + 0.5, 0.0, 1.0) if np.isfinite(low) else 1.0
    fall = np.clip((distance - high) / edge_mm + 0.5, 0.0, 1.0)
    return rise - fall


def normal_tissue_fractions(
    template: TemplateMaps,
    deformation: Deformation,
    points: np.ndarray,
    include_head: bool = False,
) -> dict[str, np.ndarray]:
    """Tissue fractions of the patient's normal head at patient-space ``points`` ``(..., 3)``.

    Returns ``csf``, ``gm``, ``wm`` (summing to the brain fraction ``brain``) and, with ``include_head``,
    the shells ``extra_csf``, ``bone``, ``marrow``, ``fat``, ``skin`` that fill the rest of the head.
    """
    displaced, thickness = deformation.displaced(points)
    # World of the template seen in the displaced frame: q = S p'  <=>  p' = inv(S) q.
    template_affine = np.linalg.inv(deformation.similarity) @ template.affine
    gm, wm, brain = sample_at(template.maps, template_affine, displaced)
    brain = np.clip(brain, 0.0, 1.0)
    gm = np.minimum(gm, brain)
    wm = np.minimum(wm, brain - gm)
    fractions = {"csf": np.clip(brain - gm - wm, 0.0, 1.0), "gm": gm, "wm": wm, "brain": brain}
    if include_head:
        distance = sample_at(template.distance_outside, template_affine, displaced, padding="border")[0]
        distance = distance / np.clip(thickness, 0.6, 1.6)
        outside = 1.0 - brain
        fractions["extra_csf"] = outside * _soft_interval(
            distance, -np.inf, SHELL_BOUNDARIES_MM["extra_csf"][1]
        )
        fractions["bone"] = outside * (
            _soft_interval(distance, *SHELL_BOUNDARIES_MM["bone"])
            + _soft_interval(distance, *SHELL_BOUNDARIES_MM["bone_outer"])
        )
        for name in ("marrow", "fat", "skin"):
            fractions[name] = outside * _soft_interval(distance, *SHELL_BOUNDARIES_MM[name])
    return fractions
