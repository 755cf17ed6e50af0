"""Skull stripping with deepbet: real glioma exam vs a reference mask, phantom ground truth,
post-processing."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_from_to

from medsynth.errors import InputDataError
from medsynth.metrics import binary_dice
from preprocessing.imageio import load_image, same_grid
from preprocessing.skull_strip import ExtractBraind, extract_brain, postprocess_mask


def truth_on_grid(truth_path, image: nib.Nifti1Image) -> np.ndarray:
    """A ground-truth map brought onto ``image``'s grid (nearest neighbour: exact for flips/permutations)."""
    return np.asanyarray(resample_from_to(nib.load(truth_path), image, order=0).dataobj)


@pytest.fixture(scope="session")
def phantom_raw_patient(tmp_path_factory):
    """One small raw-layout phantom patient (2 x 2 x 2.4 mm anatomy), shared by the preprocessing tests."""
    phantom = pytest.importorskip("medsynth.data.phantom")
    out_dir = tmp_path_factory.getbasetemp() / "preprocessing_phantom_raw"
    # Resumable generator: a second caller (another test file) reuses the finished patient.
    phantom.generate_phantom_cohort(
        out_dir, 1, seed=3, layout="raw", shape=(64, 64, 15), raw_scale=2.0, progress=False
    )
    return out_dir / "phantom_000"


def test_tcga_gd_t1w_matches_reference_mask(tcga_dir):
    image = load_image(tcga_dir / "t1c.nii.gz")
    out = ExtractBraind(keys=["t1c"], mask_key="brain_mask", apply_mask=True)({"t1c": image})
    mask = out["brain_mask"]
    assert mask.get_data_dtype() == np.uint8 and same_grid(mask, image)
    values = np.asanyarray(mask.dataobj)
    assert set(np.unique(values)) == {0, 1}
    reference = np.asanyarray(nib.load(tcga_dir / "t1c_brainmask_reference.nii.gz").dataobj)
    assert binary_dice(values, reference) >= 0.95
    stripped = np.asanyarray(out["t1c"].dataobj)
    np.testing.assert_array_equal(stripped[values == 0], 0)
    np.testing.assert_array_equal(stripped[values == 1], np.asanyarray(image.dataobj)[values == 1])


@pytest.mark.slow
def test_phantom_brain_masks_match_ground_truth(phantom_raw_patient):
    # T1w comes from the DICOM series (other voxel order than the truth NIfTI), FLAIR from NIfTI.
    for sequence, source in (
        ("t1w", phantom_raw_patient / "t1w"),
        ("flair", phantom_raw_patient / "flair.nii.gz"),
    ):
        image = load_image(source)
        mask = extract_brain(image)
        truth = truth_on_grid(phantom_raw_patient / "truth" / f"brain_mask_{sequence}.nii.gz", image)
        assert binary_dice(np.asanyarray(mask.dataobj), truth) >= 0.95, sequence


def test_postprocessing_keeps_largest_component_and_fills_holes():
    mask = np.zeros((30, 30, 12), dtype=bool)
    mask[5:25, 5:25, 2:10] = True
    mask[12:16, 12:16, 5:7] = False  # enclosed cavity (e.g. a dark tumour core)
    mask[27:29, 27:29, 5:7] = True  # detached island (e.g. eye or skull remnant)
    out = postprocess_mask(mask)
    assert out.dtype == np.uint8
    assert out[13, 13, 5] == 1 and out[28, 28, 5] == 0
    assert out.sum() == 20 * 20 * 8
    np.testing.assert_array_equal(postprocess_mask(mask, keep_largest=False, fill_holes=False), mask)


def test_bad_inputs_are_refused():
    constant = nib.Nifti1Image(np.full((20, 20, 10), 7.0, np.float32), np.eye(4))
    with pytest.raises(InputDataError, match="constant"):
        extract_brain(constant)
    with pytest.raises(ValueError, match="unknown skull-stripping method"):
        extract_brain(constant, method="bet2")
    nan_image = nib.Nifti1Image(np.where(np.eye(20)[..., None] > 0, np.nan, 1.0).repeat(4, -1), np.eye(4))
    with pytest.raises(InputDataError, match="NaN"):
        extract_brain(nan_image)
