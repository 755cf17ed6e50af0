"""Multivariate group template (atlas) of the training volumes, and its warp into each patient.

The papers build one average per sequence with ANTs' multivariate template construction. Building
one template per sequence independently (``ants.build_template``) would give each sequence its own
shape; here all sequences share one set of transforms, following the usual iterative scheme:

1. initial template: the voxel-wise mean of the subjects on the template grid (the first subject's
   grid; images are read in world coordinates);
2. register every subject to the current template: the primary sequence drives the registration
   (plus, for SyN, every other sequence as an extra Mattes term of a multivariate metric), and the
   *same* transforms resample every sequence of that subject;
3. new template per sequence = mean of the warped subjects;
4. shape update: move the template by the inverse of the average subject transform (the mean affine
   and, for SyN, ``-gradient_step`` times the mean displacement field) so that the template sits at
   the group's mean position and shape rather than the first subject's;
5. repeat ``iterations`` times.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import ants
import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from medsynth.constants import CLINICAL_SEQUENCES
from medsynth.utils.io import save_nifti
from preprocessing.imageio import from_ants, to_ants
from preprocessing.registration import read_ants_affine, resample_to_reference, write_ants_affine

logger = logging.getLogger(__name__)

__all__ = [
    "ATLAS_TRANSFORMS",
    "build_multivariate_template",
    "choose_primary",
    "register_subject_to_template",
    "warp_atlas_to_patient",
]

ATLAS_TRANSFORMS = ("Rigid", "Affine", "SyN")
_PRIMARY_PREFERENCE = ("gd_t1w", "t1w", "t2w", "flair", "aptw")


def choose_primary(sequences: Sequence[str]) -> str:
    """The sequence that drives atlas registrations: Gd-T1w, else T1w, T2w, FLAIR, APTw."""
    for candidate in _PRIMARY_PREFERENCE:
        if candidate in sequences:
            return candidate
    return next(iter(sequences))


def _registration_args(transform: str, iterations: Sequence[int], syn_iterations: Sequence[int]) -> dict:
    if transform not in ATLAS_TRANSFORMS:
        raise ValueError(f"unknown atlas transform {transform!r}; choose one of {ATLAS_TRANSFORMS}")
    levels = len(iterations)
    args = dict(
        type_of_transform=transform,
        aff_iterations=tuple(iterations),
        aff_shrink_factors=tuple(2**i for i in reversed(range(levels))),
        aff_smoothing_sigmas=tuple(float(i) for i in reversed(range(levels))),
        aff_random_sampling_rate=0.2,
    )
    if transform == "SyN":
        args["reg_iterations"] = tuple(syn_iterations)
    return args


def register_subject_to_template(
    template: Mapping[str, nib.Nifti1Image],
    subject: Mapping[str, nib.Nifti1Image],
    primary: str,
    transform: str = "Affine",
    iterations: Sequence[int] = (40, 20, 10),
    syn_iterations: Sequence[int] = (20, 10, 0),
    seed: int = 0,
    out_prefix: str | os.PathLike | None = None,
) -> tuple[dict[str, nib.Nifti1Image], list[str], np.ndarray, np.ndarray | None]:
    """Register ``subject`` to ``template`` (primary sequence + multivariate extras for SyN).

    Returns:
        ``(warped, transform_files, affine, displacement)``: every sequence of the subject on the
        template grid (all resampled with the same transforms), the ANTs transform files
        (``ants.apply_transforms`` order), the 4x4 RAS template-to-subject affine, and for SyN the
        forward displacement field as an array ``(X, Y, Z, 3)`` (``None`` otherwise).
    """
    from preprocessing.registration import _ants_seed

    fixed = to_ants(template[primary]).clone("float")
    moving = to_ants(subject[primary]).clone("float")
    extras = None
    if transform == "SyN":
        extras = [
            ("mattes", to_ants(template[s]).clone("float"), to_ants(subject[s]).clone("float"), 1.0, 32)
            for s in template
            if s != primary and s in subject
        ]
    prefix = (
        str(out_prefix) if out_prefix is not None else tempfile.mkdtemp(prefix="medsynth_atlas_") + "/reg_"
    )
    identity = write_ants_affine(np.eye(4), prefix + "init.mat")
    with _ants_seed(seed):
        result = ants.registration(
            fixed,
            moving,
            initial_transform=[str(identity)],
            outprefix=prefix,
            multivariate_extras=extras or None,
            **_registration_args(transform, iterations, syn_iterations),
        )
    files = list(result["fwdtransforms"])
    affine_file = next(f for f in files if f.endswith(".mat"))
    affine = read_ants_affine(affine_file)
    displacement = None
    warp_files = [f for f in files if f.endswith("Warp.nii.gz")]
    if warp_files:
        displacement = nib.load(warp_files[0]).get_fdata(dtype=np.float32).reshape(fixed.shape + (3,))
    warped = {}
    for sequence, img in subject.items():
        if sequence not in template:
            continue
        moved = ants.apply_transforms(
            fixed, to_ants(img).clone("float"), transformlist=files, interpolator="linear"
        )
        warped[sequence] = from_ants(moved, like=template[sequence])
    return warped, files, affine, displacement


def _mean(images: Sequence[nib.Nifti1Image], like: nib.Nifti1Image) -> nib.Nifti1Image:
    stack = np.mean([np.asanyarray(i.dataobj, dtype=np.float32) for i in images], axis=0)
    out = nib.Nifti1Image(stack.astype(np.float32), like.affine)
    out.header.set_xyzt_units("mm")
    return out


def _shape_update(
    template: Mapping[str, nib.Nifti1Image],
    mean_affine: np.ndarray,
    mean_displacement: np.ndarray | None,
    gradient_step: float,
    workdir: Path,
) -> dict[str, nib.Nifti1Image]:
    # Resample the template at x' = mean_affine^-1 (x - step * mean_displacement): the subjects'
    # transforms then average to the identity.
    first = next(iter(template.values()))
    files = [str(write_ants_affine(np.linalg.inv(mean_affine), workdir / "inverse_mean_affine.mat"))]
    if mean_displacement is not None:
        reference = to_ants(first)
        field = ants.from_numpy(
            -gradient_step * mean_displacement,
            origin=reference.origin,
            spacing=reference.spacing,
            direction=reference.direction,
            has_components=True,
        )
        field_path = workdir / "mean_warp.nii.gz"
        ants.image_write(field, str(field_path))
        files = [str(field_path)] + files
    updated = {}
    for sequence, img in template.items():
        fixed = to_ants(img).clone("float")
        moved = ants.apply_transforms(fixed, fixed, transformlist=files, interpolator="linear")
        updated[sequence] = from_ants(moved, like=img)
    return updated


def build_multivariate_template(
    subjects: Sequence[Mapping[str, nib.Nifti1Image]],
    primary: str | None = None,
    transform: str = "Affine",
    iterations: int = 2,
    registration_iterations: Sequence[int] = (40, 20, 10),
    syn_iterations: Sequence[int] = (20, 10, 0),
    gradient_step: float = 0.25,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, nib.Nifti1Image]:
    """Group-average template of every sequence, all sequences sharing the same transforms.

    Args:
        subjects: one ``{sequence: image}`` per training patient (skull-stripped, standardized).
        primary: sequence driving the registrations (default :func:`choose_primary`).
        transform: ``Rigid``, ``Affine`` or ``SyN`` (affine + deformable, multivariate metric).
        iterations: template-update iterations.
        registration_iterations: affine iterations per level.
        syn_iterations: SyN iterations per level.
        gradient_step: fraction of the mean displacement removed per shape update (SyN).
        seed: registration seed.
        progress: show a progress bar.

    Returns:
        ``{sequence: template}`` on the grid of the first subject.
    """
    if not subjects:
        raise ValueError("the atlas needs at least one training subject")
    sequences = [s for s in CLINICAL_SEQUENCES if all(s in subject for subject in subjects)]
    sequences += [s for s in subjects[0] if s not in sequences and all(s in subj for subj in subjects)]
    if not sequences:
        raise ValueError("the training subjects share no sequence")
    primary = primary or choose_primary(sequences)
    if primary not in sequences:
        raise ValueError(f"primary sequence {primary!r} is not available in every subject ({sequences})")
    grid = subjects[0][primary]
    template = {
        s: _mean([resample_to_reference(subject[s], grid, None) for subject in subjects], grid)
        for s in sequences
    }
    with tempfile.TemporaryDirectory(prefix="medsynth_template_") as workdir:
        bar = tqdm(total=iterations * len(subjects), desc="atlas", disable=not progress, leave=False)
        for iteration in range(iterations):
            warped_all, affines, displacements = [], [], []
            for index, subject in enumerate(subjects):
                warped, _, affine, displacement = register_subject_to_template(
                    template,
                    {s: subject[s] for s in sequences},
                    primary,
                    transform,
                    registration_iterations,
                    syn_iterations,
                    seed,
                    out_prefix=Path(workdir) / f"it{iteration}_s{index}_",
                )
                warped_all.append(warped)
                affines.append(affine)
                if displacement is not None:
                    displacements.append(displacement)
                bar.update(1)
            template = {s: _mean([w[s] for w in warped_all], grid) for s in sequences}
            mean_affine = np.mean(affines, axis=0)
            mean_displacement = np.mean(displacements, axis=0) if displacements else None
            template = _shape_update(template, mean_affine, mean_displacement, gradient_step, Path(workdir))
            logger.info(
                "atlas iteration %d/%d: mean |affine - I| = %.4f",
                iteration + 1,
                iterations,
                float(np.abs(mean_affine - np.eye(4)).max()),
            )
        bar.close()
    return template


def warp_atlas_to_patient(
    atlas: Mapping[str, nib.Nifti1Image],
    patient_reference: nib.Nifti1Image | Mapping[str, nib.Nifti1Image],
    primary: str | None = None,
    transform: str = "Affine",
    registration_iterations: Sequence[int] = (40, 20, 10),
    syn_iterations: Sequence[int] = (20, 10, 0),
    seed: int = 0,
) -> dict[str, nib.Nifti1Image]:
    """Warp every atlas sequence onto a patient's reference grid (what the models consume).

    Args:
        atlas: ``{sequence: template}``.
        patient_reference: the patient's primary-sequence image on its reference grid, or the patient's
            ``{sequence: image}`` (the primary one, plus the others as SyN extras, are used).
        primary: the registration-driving sequence (default :func:`choose_primary` of the atlas).
        transform: ``Rigid``, ``Affine`` or ``SyN``.

    Returns:
        ``{sequence: atlas image on the patient grid}``, all warped with the same transforms.
    """
    primary = primary or choose_primary(list(atlas))
    patient = (
        dict(patient_reference) if isinstance(patient_reference, Mapping) else {primary: patient_reference}
    )
    if primary not in patient:
        raise ValueError(f"the patient lacks the atlas primary sequence {primary!r}")
    fixed = {s: patient[s] for s in atlas if s in patient}
    moving = dict(atlas)
    # Register atlas (moving) to the patient (fixed): the result lives on the patient grid.
    with tempfile.TemporaryDirectory(prefix="medsynth_atlas_warp_") as workdir:
        _, files, _, _ = register_subject_to_template(
            fixed,
            {primary: moving[primary], **{s: moving[s] for s in fixed if s != primary}},
            primary,
            transform,
            registration_iterations,
            syn_iterations,
            seed,
            out_prefix=Path(workdir) / "reg_",
        )
        grid = to_ants(patient[primary]).clone("float")
        out = {}
        for sequence, img in atlas.items():
            moved = ants.apply_transforms(
                grid, to_ants(img).clone("float"), transformlist=files, interpolator="linear"
            )
            out[sequence] = from_ants(moved, like=patient[primary])
    return out


def save_atlas(
    atlas: Mapping[str, nib.Nifti1Image], folder: str | os.PathLike, prefix: str = "atlas_"
) -> dict[str, Path]:
    """Write ``<folder>/<prefix><sequence>.nii.gz`` atomically."""
    folder = Path(folder)
    return {
        s: save_nifti(
            np.asanyarray(img.dataobj).astype(np.float32), img.affine, folder / f"{prefix}{s}.nii.gz"
        )
        for s, img in atlas.items()
    }
