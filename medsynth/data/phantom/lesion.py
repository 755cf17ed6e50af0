"""The phantom's glioma: tumour core, cavity (necrosis or surgical cavity) and surrounding edema.

A lesion is three level-set fields on a patient-space grid around its centre (negative inside,
in millimetres), so it can be sampled on any acquisition grid with smooth borders:

* tumour: a lobulated blob, an ellipsoid whose radius is perturbed by a smooth random field;
* cavity: either liquefactive necrosis inside the tumour (the tumour becomes an enhancing rim) or a
  surgical cavity beside it with a patchy rim of residual tumour;
* edema: everything within a reach of the core, the reach longer in white matter (vasogenic edema
  follows the fibre tracts) and modulated by a smooth random field.

Class precedence is cavity > tumour > edema. Labels are only ever given inside the brain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi

from medsynth.data.phantom.sampling import (
    Grid,
    random_unit_vector,
    rotation_matrix,
    sample_at,
    smooth_random_field,
)

LESION_TISSUES: tuple[str, ...] = ("edema", "cavity", "tumor")


@dataclass(frozen=True)
class LesionRanges:
    """Ranges the random lesion parameters are drawn from (millimetres unless stated)."""

    tumor_radius_mm: tuple[float, float] = (8.0, 20.0)
    axis_ratio: tuple[float, float] = (0.75, 1.3)
    lobulation: tuple[float, float] = (0.12, 0.35)
    necrosis_probability: float = 0.55
    necrosis_radius_ratio: tuple[float, float] = (0.35, 0.65)
    surgical_radius_ratio: tuple[float, float] = (0.55, 0.95)
    surgical_rim_mm: tuple[float, float] = (2.0, 4.5)
    edema_reach_mm: tuple[float, float] = (6.0, 22.0)
    grid_spacing_mm: float = 2.0
    edge_mm: float = 1.0


@dataclass
class Lesion:
    """Level sets ``(3, X, Y, Z)`` (cavity, tumour, edema; mm, negative inside) on ``grid``."""

    level_sets: np.ndarray
    grid: Grid
    kind: str
    centre_mm: np.ndarray
    tumor_radius_mm: float
    edge_mm: float = 1.0

    def fractions(self, points: np.ndarray) -> dict[str, np.ndarray]:
        """Soft, mutually exclusive fractions of edema, cavity and tumour at ``points`` ``(..., 3)``."""
        # Outside the lesion grid every level set reads as far outside (padding with a large value).
        sets = sample_at(self.level_sets - 50.0, self.grid.affine, points) + 50.0
        inside = [np.clip(0.5 - s / self.edge_mm, 0.0, 1.0) for s in sets]
        cavity = inside[0]
        tumor = inside[1] * (1.0 - cavity)
        edema = inside[2] * (1.0 - cavity - tumor)
        return {"edema": edema, "cavity": cavity, "tumor": tumor}


def _lobulated_blob(
    rng: np.random.Generator,
    points: np.ndarray,
    centre: np.ndarray,
    radius: float,
    ranges: LesionRanges,
    shape: tuple[int, int, int],
) -> np.ndarray:
    """Signed pseudo-distance (mm) of a randomly stretched, rotated and lobulated ellipsoid."""
    axes = rng.uniform(*ranges.axis_ratio, 3)
    axes /= np.cbrt(np.prod(axes))  # keep the volume of a sphere of ``radius``
    rotation = rotation_matrix(tuple(rng.uniform(-180, 180, 3)))
    local = (points - centre) @ rotation / axes
    # Lobes about a third of the radius wide.
    sigma = max(1.0, 0.35 * radius / ranges.grid_spacing_mm)
    lobes = smooth_random_field(rng, shape, sigma)[0]
    return (np.linalg.norm(local, axis=-1) / radius - 1.0 + rng.uniform(*ranges.lobulation) * lobes) * radius


def random_lesion(
    rng: np.random.Generator,
    centre_mm: np.ndarray,
    white_matter_at,
    ranges: LesionRanges | None = None,
) -> Lesion:
    """Draw a lesion centred near ``centre_mm`` (patient space).

    Args:
        rng: the patient's generator.
        centre_mm: tumour centre, world millimetres.
        white_matter_at: callable mapping points ``(..., 3)`` to the white-matter fraction there
            (the edema spreads further in white matter).
        ranges: parameter ranges (default :class:`LesionRanges`).
    """
    ranges = LesionRanges() if ranges is None else ranges
    radius = rng.uniform(*ranges.tumor_radius_mm)
    reach = rng.uniform(*ranges.edema_reach_mm)
    half_extent = 2.1 * radius + 1.5 * reach + 4.0
    size = int(np.ceil(2 * half_extent / ranges.grid_spacing_mm)) + 1
    grid = Grid.centred((size,) * 3, (ranges.grid_spacing_mm,) * 3, centre_mm)
    points = grid.points()
    shape = grid.shape

    tumor = _lobulated_blob(rng, points, centre_mm, radius, ranges, shape)
    if rng.uniform() < ranges.necrosis_probability:
        kind = "necrosis"
        cavity_centre = centre_mm + random_unit_vector(rng) * rng.uniform(0.0, 0.2) * radius
        cavity_radius = rng.uniform(*ranges.necrosis_radius_ratio) * radius
        cavity = _lobulated_blob(rng, points, cavity_centre, cavity_radius, ranges, shape)
    else:
        kind = "surgical"
        cavity_centre = centre_mm + random_unit_vector(rng) * rng.uniform(0.7, 1.1) * radius
        cavity_radius = rng.uniform(*ranges.surgical_radius_ratio) * radius
        cavity = _lobulated_blob(rng, points, cavity_centre, cavity_radius, ranges, shape)
        # Residual tumour lines part of the cavity wall: a patchy shell just outside it.
        rim_width = rng.uniform(*ranges.surgical_rim_mm)
        patches = smooth_random_field(rng, shape, max(1.0, 0.5 * cavity_radius / ranges.grid_spacing_mm))[0]
        rim = np.abs(cavity - rim_width / 2) - rim_width / 2 - 3.0 * np.minimum(patches, 0.0) * rim_width
        tumor = np.minimum(tumor, rim)
    core = np.minimum(tumor, cavity) < 0
    distance = ndi.distance_transform_edt(~core, sampling=ranges.grid_spacing_mm).astype(np.float32)
    distance -= ndi.distance_transform_edt(core, sampling=ranges.grid_spacing_mm).astype(np.float32)
    white = np.clip(white_matter_at(points), 0.0, 1.0)
    # Smooth the white-matter map at the scale of the edema front so that the front stays smooth.
    white = ndi.gaussian_filter(white, sigma=2.0 / ranges.grid_spacing_mm)
    wobble = smooth_random_field(rng, shape, max(1.0, 6.0 / ranges.grid_spacing_mm))[0]
    local_reach = reach * (0.25 + 0.95 * white) * (1.0 + 0.25 * wobble)
    edema = distance - np.maximum(local_reach, 0.0)
    level_sets = np.stack([cavity, tumor, edema]).astype(np.float32)
    return Lesion(
        level_sets=np.clip(level_sets, -50.0, 50.0),
        grid=grid,
        kind=kind,
        centre_mm=np.asarray(centre_mm, dtype=np.float64),
        tumor_radius_mm=float(radius),
        edge_mm=ranges.edge_mm,
    )
