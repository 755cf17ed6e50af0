"""From a noise-free rendering to what a scanner or a preprocessing pipeline hands over.

* :func:`acquire_ready`: the model-grid volumes of the ``ready`` layout (skull-stripped, co-registered,
  Rician noise on the anatomical sequences, smoother APTw), like the papers' preprocessed data.
* :func:`acquire_raw`: the ``raw`` layout's scanner volumes: whole head with skull and scalp, each
  sequence with its own known rigid head pose, a smooth multiplicative bias field and Rician noise,
  anatomical sequences as int16 at about 1 x 1 x 1.2 mm and APTw on the papers' 15-slice slab.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.ndimage as ndi

from medsynth.data.phantom.contrast import ANATOMICAL_SEQUENCES, APTW_FWHM_MM, NOISE_SIGMA
from medsynth.data.phantom.patient import SLAB_CENTRE_MM, PhantomPatient, Rendering, reference_grid
from medsynth.data.phantom.sampling import (
    Grid,
    random_unit_vector,
    rigid_matrix,
    sample_at,
    smooth_random_field,
)

# Raw anatomical acquisitions: voxel size and the head field of view they cover (mm).
RAW_SPACING_MM: tuple[float, float, float] = (1.0, 1.0, 1.2)
RAW_FIELD_OF_VIEW_MM: tuple[float, float, float] = (196.0, 232.0, 150.0)
RAW_CENTRE_MM: tuple[float, float, float] = (0.0, -18.0, 22.0)
# Largest rigid misalignment of each raw sequence relative to the patient (truth) space.
MAX_ROTATION_DEGREES: dict[str, float] = {"aptw": 8.0, "t1w": 3.0, "gd_t1w": 3.0, "t2w": 3.0, "flair": 3.0}
MAX_TRANSLATION_MM: dict[str, float] = {"aptw": 10.0, "t1w": 4.0, "gd_t1w": 4.0, "t2w": 4.0, "flair": 4.0}
BIAS_STRENGTH: float = 0.2  # standard deviation of the log bias field


def rician(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise of standard deviation ``sigma``."""
    real = image + rng.normal(0.0, sigma, image.shape).astype(np.float32)
    imaginary = rng.normal(0.0, sigma, image.shape).astype(np.float32)
    return np.sqrt(real * real + imaginary * imaginary)


def smooth_in_plane(image: np.ndarray, fwhm_mm: float, spacing) -> np.ndarray:
    """Gaussian blur within each axial slice (APTw is acquired at a lower in-plane resolution)."""
    sigma_mm = fwhm_mm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    sigma = (sigma_mm / spacing[0], sigma_mm / spacing[1], 0.0)
    return ndi.gaussian_filter(image, sigma=sigma, mode="constant")


@dataclass
class ReadyVolumes:
    """The ``ready`` layout of one patient on the model grid."""

    grid: Grid
    images: dict[str, np.ndarray]
    label: np.ndarray
    brain_mask: np.ndarray
    tissue: dict[str, np.ndarray] = field(default_factory=dict)


def tissue_probabilities(rendering: Rendering, brain_mask: np.ndarray) -> dict[str, np.ndarray]:
    """The ground-truth tissue probability maps of a rendering: each normal tissue's share of the voxel's
    brain (so the maps sum to 1 where there is no lesion, as Atropos posteriors inside a brain mask),
    lesion excluded, 0 outside ``brain_mask``."""
    brain = np.maximum(rendering.brain, 1e-6)
    return {
        tissue: np.where(brain_mask > 0, np.clip(fraction / brain, 0.0, 1.0), 0.0).astype(np.float32)
        for tissue, fraction in rendering.tissue.items()
    }


def acquire_ready(patient: PhantomPatient, shape: tuple[int, int, int]) -> ReadyVolumes:
    """Render ``patient`` on the model grid of ``shape`` and add noise; outside the brain is 0."""
    grid = reference_grid(shape)
    rendering = patient.render(grid)
    rng = patient.child_rng("noise")
    mask = rendering.label > 0
    images = {}
    for sequence, clean in rendering.images.items():
        if sequence in ANATOMICAL_SEQUENCES:
            noisy = rician(clean, NOISE_SIGMA[sequence], rng)
        else:
            noisy = _aptw_measurement(clean, grid.spacing, rng)
        images[sequence] = np.where(mask, noisy, 0.0).astype(np.float32)
    return ReadyVolumes(
        grid=grid,
        images=images,
        label=rendering.label,
        brain_mask=mask.astype(np.uint8),
        tissue=tissue_probabilities(rendering, mask),
    )


def _aptw_measurement(clean: np.ndarray, spacing, rng: np.random.Generator) -> np.ndarray:
    noisy = clean + rng.normal(0.0, NOISE_SIGMA["aptw"], clean.shape).astype(np.float32)
    return smooth_in_plane(noisy, APTW_FWHM_MM, spacing).astype(np.float32)


@dataclass
class RawSequence:
    """One raw acquisition with its ground truth (all arrays on ``grid``)."""

    grid: Grid
    image: np.ndarray  # int16 for anatomical sequences, float32 percent for APTw
    pose: np.ndarray  # 4x4, patient (truth) space -> this acquisition's scanner world
    rotation_degrees: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    rotation_centre_mm: tuple[float, float, float]
    image_without_bias: np.ndarray | None = None
    bias: np.ndarray | None = None
    brain_mask: np.ndarray | None = None
    white_matter_mask: np.ndarray | None = None
    label: np.ndarray | None = None
    extras: dict = field(default_factory=dict)


def raw_grid(scale: float = 1.0, spacing_mm=RAW_SPACING_MM) -> Grid:
    """The axial whole-head grid of the raw anatomical sequences; ``scale`` enlarges the voxels."""
    spacing = np.asarray(spacing_mm, dtype=np.float64) * scale
    shape = tuple(round(f / s) for f, s in zip(RAW_FIELD_OF_VIEW_MM, spacing, strict=True))
    return Grid.centred(shape, spacing, RAW_CENTRE_MM)


def random_pose(rng: np.random.Generator, max_rotation_degrees: float, max_translation_mm: float):
    """A rigid head pose about the slab centre: Euler angles within ``max_rotation_degrees`` (the largest one
    at least a quarter of it, so the misalignment is never negligible) and a shift up to
    ``max_translation_mm``."""
    angles = rng.uniform(-1.0, 1.0, 3) * max_rotation_degrees
    largest = int(np.argmax(np.abs(angles)))
    if abs(angles[largest]) < 0.25 * max_rotation_degrees:
        angles[largest] = np.sign(angles[largest] or 1.0) * 0.25 * max_rotation_degrees
    translation = random_unit_vector(rng) * rng.uniform(0.25, 1.0) * max_translation_mm
    centre = tuple(float(c) for c in SLAB_CENTRE_MM)
    matrix = rigid_matrix(tuple(angles), tuple(translation), centre)
    return matrix, tuple(float(a) for a in angles), tuple(float(t) for t in translation), centre


def bias_field(rng: np.random.Generator, grid: Grid, strength: float = BIAS_STRENGTH) -> np.ndarray:
    """A smooth multiplicative field (mean about 1) over ``grid``: a random linear ramp times a random
    low-frequency pattern, both fixed to the scanner (receive coil), not to the head."""
    coarse = Grid.centred((9, 10, 9), (30.0, 30.0, 30.0), RAW_CENTRE_MM)
    pattern = smooth_random_field(rng, coarse.shape, 1.5)
    log_field = strength * sample_at(pattern, coarse.affine, grid.points(), padding="border")[0]
    direction = random_unit_vector(rng)
    ramp = (grid.points() - np.asarray(RAW_CENTRE_MM, dtype=np.float32)) @ direction.astype(np.float32)
    log_field += strength * ramp / 100.0
    return np.exp(log_field).astype(np.float32)


def acquire_raw(
    patient: PhantomPatient,
    shape: tuple[int, int, int],
    raw_scale: float = 1.0,
) -> dict[str, RawSequence]:
    """All five raw acquisitions of ``patient``: the APTw slab on the model grid of ``shape`` and the
    anatomical sequences on the whole-head grid (voxels ``raw_scale`` times the default size)."""
    rng = patient.child_rng("raw")
    acquisitions: dict[str, RawSequence] = {}
    slab = reference_grid(shape)
    pose, angles, translation, centre = random_pose(
        rng, MAX_ROTATION_DEGREES["aptw"], MAX_TRANSLATION_MM["aptw"]
    )
    rendering = patient.render(slab, pose=pose, include_head=True, sequences=("aptw",))
    head = rendering.fractions["head"] >= 0.5
    aptw = _aptw_measurement(rendering.images["aptw"], slab.spacing, rng)
    acquisitions["aptw"] = RawSequence(
        grid=slab,
        image=np.where(head, aptw, 0.0).astype(np.float32),
        pose=pose,
        rotation_degrees=angles,
        translation_mm=translation,
        rotation_centre_mm=centre,
        brain_mask=(rendering.label > 0).astype(np.uint8),
        label=rendering.label,
        white_matter_mask=(rendering.white_matter >= 0.9).astype(np.uint8),
        extras={"tissue": tissue_probabilities(rendering, rendering.label > 0)},
    )
    grid = raw_grid(raw_scale)
    for sequence in ANATOMICAL_SEQUENCES:
        pose, angles, translation, centre = random_pose(
            rng, MAX_ROTATION_DEGREES[sequence], MAX_TRANSLATION_MM[sequence]
        )
        rendering = patient.render(
            grid, pose=pose, include_head=True, sequences=(sequence,), supersample=(1, 1, 1)
        )
        magnitude = rician(rendering.images[sequence], NOISE_SIGMA[sequence], rng)
        bias = bias_field(rng, grid)
        acquisitions[sequence] = RawSequence(
            grid=grid,
            image=_to_int16(magnitude * bias),
            pose=pose,
            rotation_degrees=angles,
            translation_mm=translation,
            rotation_centre_mm=centre,
            image_without_bias=_to_int16(magnitude),
            bias=bias,
            brain_mask=(rendering.label > 0).astype(np.uint8),
            label=rendering.label,
            white_matter_mask=(rendering.white_matter >= 0.9).astype(np.uint8),
        )
    return acquisitions


def _to_int16(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16)
