"""One phantom patient: warped template anatomy + glioma + contrast, rendered on any voxel grid.

A :class:`PhantomPatient` is fully determined by ``(cohort_seed, index)``: every random part draws
from its own child of ``numpy.random.SeedSequence([cohort_seed, index])``, so a patient does not
depend on the cohort size, on the worker that makes it, or on the other random parts.

Rendering is noise-free; :mod:`medsynth.data.phantom.acquisition` adds noise, bias and geometry.
Partial volume: each voxel is split into sub-voxels at most 2.5 mm wide (two per 4.4 mm slice),
the tissue fractions are evaluated at every sub-voxel and averaged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from medsynth.constants import CAVITY, CLINICAL_SEQUENCES, EDEMA, NORMAL_BRAIN, TUMOR
from medsynth.data.phantom.anatomy import (
    DeformationRanges,
    TemplateMaps,
    load_template,
    normal_tissue_fractions,
    random_deformation,
)
from medsynth.data.phantom.contrast import ANATOMICAL_SEQUENCES, PatientContrast, random_contrast
from medsynth.data.phantom.lesion import LESION_TISSUES, Lesion, LesionRanges, random_lesion
from medsynth.data.phantom.sampling import (
    Grid,
    average_blocks,
    sample_at,
    smooth_random_field,
    supersampling_for,
    transform_points,
)

logger = logging.getLogger(__name__)

# Reference grid of the papers' APTw slab: 256 x 256 x 15 voxels of 0.82 x 0.82 x 4.4 mm, axial.
DEFAULT_SHAPE: tuple[int, int, int] = (256, 256, 15)
DEFAULT_SPACING_MM: tuple[float, float, float] = (0.82, 0.82, 4.4)
# Centre of the slab in MNI millimetres: mid-line, mid-brain front-to-back, and 18 mm above the AC so
# that the 66 mm slab spans the lateral ventricles and the supratentorial white matter (z -15..+51).
SLAB_CENTRE_MM: tuple[float, float, float] = (0.0, -17.0, 18.0)

# Sign with which the shared texture field enters each anatomical sequence: more water in a voxel
# darkens T1w and brightens T2w/FLAIR.
_TEXTURE_SIGN: dict[str, float] = {"t1w": -1.0, "gd_t1w": -1.0, "t2w": 1.0, "flair": 1.0}
_NORMAL_TISSUES = ("csf", "gm", "wm")
_HEAD_TISSUES = ("extra_csf", "bone", "marrow", "fat", "skin")
_MIN_CLASS_VOXELS = 4
_MAX_LESION_TRIES = 40


def reference_grid(shape: tuple[int, int, int] = DEFAULT_SHAPE) -> Grid:
    """The model grid: the papers' slab field of view (209.9 x 209.9 x 66 mm) divided into ``shape``
    voxels."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"phantom shape must be three sizes of at least 2 voxels, got {shape}")
    field_of_view = np.asarray(DEFAULT_SHAPE) * np.asarray(DEFAULT_SPACING_MM)
    return Grid.centred(shape, field_of_view / np.asarray(shape), SLAB_CENTRE_MM)


@dataclass
class Rendering:
    """Noise-free images and ground truth of one patient on one grid (all ``grid.shape``)."""

    grid: Grid
    images: dict[str, np.ndarray]
    label: np.ndarray
    brain: np.ndarray  # brain fraction
    white_matter: np.ndarray  # normal white-matter fraction
    fractions: dict[str, np.ndarray] = field(default_factory=dict)  # lesion classes (+ ``head``)
    tissue: dict[str, np.ndarray] = field(
        default_factory=dict
    )  # normal csf, gm, wm fractions, lesion excluded


@dataclass
class PhantomPatient:
    """The random make-up of one patient; :meth:`render` images it on any grid and head pose."""

    patient_id: str
    seed_sequence: np.random.SeedSequence
    template: TemplateMaps
    deformation: object
    contrast: PatientContrast
    texture: np.ndarray
    texture_grid: Grid
    stage_seeds: dict[str, np.random.SeedSequence] = field(default_factory=dict)
    lesion: Lesion | None = None

    @classmethod
    def create(
        cls,
        cohort_seed: int,
        index: int,
        shape: tuple[int, int, int] = DEFAULT_SHAPE,
        deformation_ranges: DeformationRanges | None = None,
        lesion_ranges: LesionRanges | None = None,
    ) -> PhantomPatient:
        """Draw patient ``index`` of the cohort with seed ``cohort_seed``; the lesion is placed so that
        all three lesion classes show on the model grid of ``shape``."""
        root = np.random.SeedSequence([int(cohort_seed), int(index)])
        anatomy_ss, contrast_ss, texture_ss, lesion_ss, noise_ss, raw_ss = root.spawn(6)
        texture_grid = Grid.centred((68, 82, 76), (3.0, 3.0, 3.0), (0.0, -18.0, 8.0))
        texture_rng = np.random.default_rng(texture_ss)
        # Channels: normal-tissue texture, lesion heterogeneity, APTw fluctuation.
        texture = np.concatenate(
            [
                smooth_random_field(texture_rng, texture_grid.shape, 1.3),
                smooth_random_field(texture_rng, texture_grid.shape, 0.9),
                smooth_random_field(texture_rng, texture_grid.shape, 2.0),
            ]
        )
        patient = cls(
            patient_id=f"phantom_{index:03d}",
            seed_sequence=root,
            template=load_template(),
            deformation=random_deformation(np.random.default_rng(anatomy_ss), deformation_ranges),
            contrast=random_contrast(np.random.default_rng(contrast_ss)),
            texture=texture,
            texture_grid=texture_grid,
            stage_seeds={"noise": noise_ss, "raw": raw_ss},
        )
        patient._place_lesion(
            np.random.default_rng(lesion_ss), reference_grid(shape), lesion_ranges or LesionRanges()
        )
        return patient

    def child_rng(self, stage: str) -> np.random.Generator:
        """A fresh generator for an acquisition stage (``"noise"`` or ``"raw"``), independent of the rest."""
        if stage not in self.stage_seeds:
            raise ValueError(f"unknown stage {stage!r}; known: {sorted(self.stage_seeds)}")
        return np.random.default_rng(self.stage_seeds[stage])

    # ------------------------------------------------------------------------------------------ lesion
    def _place_lesion(self, rng: np.random.Generator, grid: Grid, ranges: LesionRanges) -> None:
        # Placement is checked on the model grid, every other voxel in-plane when it is fine (speed):
        # each class must cover a few voxels there, hence a few times more on the full grid.
        if min(grid.shape[:2]) >= 128:
            coarse = np.asarray(grid.affine).copy()
            coarse[:3, :2] *= 2
            grid = Grid((grid.shape[0] // 2, grid.shape[1] // 2, grid.shape[2]), coarse)
        points = grid.points()
        normal = normal_tissue_fractions(self.template, self.deformation, points)
        depth = np.arange(grid.shape[2])
        central = (depth >= 0.3 * (grid.shape[2] - 1)) & (depth <= 0.7 * (grid.shape[2] - 1))
        candidates = np.argwhere((normal["wm"] > 0.6) & central[None, None, :])
        if len(candidates) == 0:
            candidates = np.argwhere(normal["brain"] > 0.9)
        if len(candidates) == 0:
            raise RuntimeError(
                f"{self.patient_id}: no brain on the model grid {grid.shape}; cannot place a lesion"
            )

        def white_matter_at(where: np.ndarray) -> np.ndarray:
            return normal_tissue_fractions(self.template, self.deformation, where)["wm"]

        brain = normal["brain"] >= 0.5
        for attempt in range(_MAX_LESION_TRIES):
            centre = points[tuple(candidates[rng.integers(len(candidates))])].astype(np.float64)
            lesion = random_lesion(rng, centre, white_matter_at, ranges)
            fractions = lesion.fractions(points)
            stacked = np.stack(
                [np.maximum(1.0 - sum(fractions.values()), 0.0)] + [fractions[t] for t in LESION_TISSUES]
            )
            winner = np.argmax(stacked, axis=0)
            counts = [int(((winner == k) & brain).sum()) for k in (1, 2, 3)]
            if min(counts) >= _MIN_CLASS_VOXELS:
                self.lesion = lesion
                logger.debug(
                    "%s: %s lesion after %d tries, voxels %s",
                    self.patient_id,
                    lesion.kind,
                    attempt + 1,
                    counts,
                )
                return
        raise RuntimeError(
            f"{self.patient_id}: could not place a lesion with all three classes on grid {grid.shape}"
        )

    # --------------------------------------------------------------------------------------- rendering
    @staticmethod
    def _centres(grid: Grid, pose: np.ndarray | None) -> np.ndarray:
        """Patient-space positions of the voxel centres of ``grid`` seen with head ``pose``."""
        points = grid.points()
        return points if pose is None else transform_points(np.linalg.inv(pose), points)

    def render(
        self,
        grid: Grid,
        pose: np.ndarray | None = None,
        include_head: bool = False,
        sequences: tuple[str, ...] = CLINICAL_SEQUENCES,
        supersample: tuple[int, int, int] | None = None,
    ) -> Rendering:
        """Noise-free images of ``sequences`` and the ground truth on ``grid``.

        Args:
            grid: the acquisition grid (scanner world coordinates).
            pose: 4x4 head pose, patient space -> scanner world; ``None`` is the identity.
            include_head: render skull and scalp around the brain (raw layout); otherwise only the brain
                has signal.
            sequences: which images to make.
            supersample: sub-voxels per axis for partial volume; default sub-voxels at most 2.5 mm wide.
        """
        if self.lesion is None:
            raise RuntimeError("the patient has no lesion yet")
        supersample = supersampling_for(grid.spacing) if supersample is None else tuple(supersample)
        points = grid.points(supersample)
        if pose is not None:
            points = transform_points(np.linalg.inv(pose), points)
        normal = normal_tissue_fractions(self.template, self.deformation, points, include_head=include_head)
        lesion = self.lesion.fractions(points)
        brain = normal["brain"]
        lesion_total = sum(lesion.values())
        fractions: dict[str, np.ndarray] = {t: normal[t] * (1.0 - lesion_total) for t in _NORMAL_TISSUES}
        fractions.update({t: lesion[t] * brain for t in LESION_TISSUES})
        if include_head:
            fractions.update({t: normal[t] for t in _HEAD_TISSUES})
        # Partial volume: average the fractions over the sub-voxels. The texture varies over millimetres,
        # smoothly, so it is read once per voxel centre.
        fractions = {t: average_blocks(f, supersample) for t, f in fractions.items()}
        brain_avg = average_blocks(brain, supersample)
        del normal, lesion, lesion_total, brain, points
        texture = sample_at(
            self.texture, self.texture_grid.affine, self._centres(grid, pose), padding="border"
        )

        images = {}
        for sequence in sequences:
            image = np.zeros(grid.shape, dtype=np.float32)
            for tissue, fraction in fractions.items():
                mean = self.contrast.value(sequence, tissue)
                sd = self.contrast.texture_sd[sequence]["csf" if tissue == "extra_csf" else tissue]
                if sequence in ANATOMICAL_SEQUENCES:
                    channel = 1 if tissue in LESION_TISSUES else 0
                    fluctuation = _TEXTURE_SIGN[sequence] * sd * texture[channel]
                else:
                    fluctuation = sd * texture[2]
                image += fraction * (mean + fluctuation)
            images[sequence] = image
        lesion_avg = {t: fractions[t] for t in LESION_TISSUES}
        normal_avg = np.maximum(brain_avg - sum(lesion_avg.values()), 0.0)
        winner = np.argmax(np.stack([normal_avg] + [lesion_avg[t] for t in LESION_TISSUES]), axis=0)
        classes = np.array([NORMAL_BRAIN, EDEMA, CAVITY, TUMOR], dtype=np.uint8)
        label = np.where(brain_avg >= 0.5, classes[winner], 0).astype(np.uint8)
        white_matter = fractions["wm"]
        lesion_avg = dict(lesion_avg)
        if include_head:
            lesion_avg["head"] = brain_avg + sum(fractions[t] for t in _HEAD_TISSUES)
        return Rendering(
            grid=grid,
            images=images,
            label=label,
            brain=brain_avg,
            white_matter=white_matter,
            fractions=lesion_avg,
            tissue={t: fractions[t] for t in _NORMAL_TISSUES},
        )
