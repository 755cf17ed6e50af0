"""Brain-tissue probability maps with ANTs Atropos: CSF, grey matter and white matter inside the brain
mask, with the lesion excluded (Shin et al. 2018 condition their generator on them).

Atropos fits a three-class finite mixture with a Markov random field prior, initialised by k-means
on the intensities of a T1-weighted image (``t1w``, else ``gd_t1w``): k-means orders the classes by
intensity, which on T1w is CSF < GM < WM. On a T2-weighted or FLAIR image the order is reversed.
The lesion (labels 2-4) is left out of the mask, so it neither draws a class towards itself nor
gets tissue probabilities; its voxels are 0 in all three maps.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import nibabel as nib
import numpy as np

from medsynth.constants import LESION_LABELS, TISSUE_CLASSES
from preprocessing.imageio import new_image_like

logger = logging.getLogger(__name__)

__all__ = ["TISSUE_SOURCE_PREFERENCE", "choose_tissue_sequence", "segment_tissues", "tissue_shares"]

# Sequences Atropos segments, best first, and whether their intensity order is CSF < GM < WM.
TISSUE_SOURCE_PREFERENCE: tuple[tuple[str, bool], ...] = (
    ("t1w", True),
    ("gd_t1w", True),
    ("t2w", False),
    ("flair", False),
)


def choose_tissue_sequence(sequences) -> tuple[str, bool]:
    """The sequence the tissue maps are made from and whether its intensities rise CSF -> GM -> WM.

    Raises:
        ValueError: no anatomical sequence (APTw alone has no tissue contrast).
    """
    for sequence, rising in TISSUE_SOURCE_PREFERENCE:
        if sequence in sequences:
            return sequence, rising
    raise ValueError(f"tissue maps need T1w, Gd-T1w, T2w or FLAIR; the exam has {sorted(sequences)}")


def segment_tissues(
    image: nib.Nifti1Image,
    brain_mask: nib.Nifti1Image,
    label: nib.Nifti1Image | None = None,
    rising: bool = True,
    mrf_smoothing: float = 0.1,
    iterations: int = 5,
    seed: int = 0,
) -> dict[str, nib.Nifti1Image]:
    """CSF, GM and WM posterior probability maps of ``image`` inside ``brain_mask`` minus the lesion.

    Args:
        image: an anatomical image (bias-corrected) on the grid of the mask.
        brain_mask: the brain (> 0).
        label: the patient's label map on the same grid; its lesion labels are excluded.
        rising: the intensities rise CSF -> GM -> WM (T1w); ``False`` for T2w / FLAIR.
        mrf_smoothing: Atropos' MRF smoothing factor (radius 1 voxel).
        iterations: EM iterations.
        seed: ITK's random seed (Atropos samples when it initialises).

    Returns:
        ``{"csf", "gm", "wm"}`` float32 probability maps on the image's grid, 0 outside the mask.

    Raises:
        ValueError: the grids differ, or too few brain voxels are left to fit three classes.
    """
    import ants

    data = np.asarray(image.get_fdata(), dtype=np.float32)
    inside = np.asanyarray(brain_mask.dataobj) > 0
    if inside.shape != data.shape:
        raise ValueError(f"brain mask {inside.shape} and image {data.shape} differ in shape")
    if label is not None:
        lesion = np.isin(np.rint(np.asanyarray(label.dataobj)).astype(np.int64), LESION_LABELS)
        if lesion.shape != data.shape:
            raise ValueError(f"label map {lesion.shape} and image {data.shape} differ in shape")
        inside &= ~lesion
    if int(inside.sum()) < 100:
        raise ValueError(
            f"only {int(inside.sum())} brain voxels outside the lesion: too few for tissue classes"
        )
    os.environ["ANTS_RANDOM_SEED"] = str(int(seed))
    spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
    ants_image = ants.from_numpy(data, spacing=spacing)
    ants_mask = ants.from_numpy(inside.astype(np.float32), spacing=spacing)
    result = ants.atropos(
        a=ants_image,
        x=ants_mask,
        i=f"Kmeans[{len(TISSUE_CLASSES)}]",
        m=f"[{mrf_smoothing},1x1x1]",
        c=f"[{int(iterations)},0]",
        priorweight=0.0,
    )
    posteriors = [np.asarray(p.numpy(), dtype=np.float32) for p in result["probabilityimages"]]
    if not rising:
        posteriors = posteriors[::-1]
    maps = {}
    for tissue, posterior in zip(TISSUE_CLASSES, posteriors, strict=True):
        probability = np.where(inside, np.clip(posterior, 0.0, 1.0), 0.0).astype(np.float32)
        maps[tissue] = new_image_like(probability, image)
    logger.debug("tissue shares inside the mask: %s", tissue_shares(maps, inside))
    return maps


def tissue_shares(maps: Mapping[str, nib.Nifti1Image], mask: np.ndarray) -> dict[str, float]:
    """Mean probability of each class inside ``mask``: the QC record of a patient's maps."""
    return {t: round(float(np.asarray(m.get_fdata())[mask].mean()), 4) for t, m in maps.items()}
