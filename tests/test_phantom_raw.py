"""The phantom cohort's ``raw`` layout: scanner-like exams with ground truth for preprocessing."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
import scipy.ndimage as ndi
import SimpleITK as sitk

from medsynth.data.phantom import generate_phantom_cohort, reference_grid
from medsynth.data.phantom.acquisition import MAX_ROTATION_DEGREES, MAX_TRANSLATION_MM

SHAPE = (64, 64, 8)
ANATOMICAL = ("t1w", "gd_t1w", "t2w", "flair")


@pytest.fixture(scope="module")
def raw_patient(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom_raw")
    assert generate_phantom_cohort(out, 1, seed=11, layout="raw", shape=SHAPE, progress=False) == out
    return out / "phantom_000"


def _load(path):
    image = nib.load(path)
    return np.asarray(image.get_fdata(dtype=np.float32)), image.affine


def _dice(a, b):
    a, b = a > 0, b > 0
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def test_raw_files_present(raw_patient):
    for name in ("gd_t1w.nii.gz", "t2w.nii.gz", "flair.nii.gz", "aptw.nii.gz", "t1w"):
        assert (raw_patient / name).exists(), name
    truth = raw_patient / "truth"
    expected = ["transforms.json", "brain_mask.nii.gz", "label.nii.gz"]
    for sequence in ANATOMICAL:
        expected += [
            f"brain_mask_{sequence}.nii.gz",
            f"bias_{sequence}.nii.gz",
            f"{sequence}_nobias.nii.gz",
            f"wm_{sequence}.nii.gz",
        ]
    for name in expected:
        assert (truth / name).is_file(), name
    for sequence in ("gd_t1w", "t2w", "flair"):
        assert nib.load(raw_patient / f"{sequence}.nii.gz").get_data_dtype() == np.int16


def test_aptw_slab_geometry_and_truth_grid(raw_patient):
    image = nib.load(raw_patient / "aptw.nii.gz")
    assert image.shape == SHAPE and image.get_data_dtype() == np.float32
    np.testing.assert_allclose(image.affine, reference_grid(SHAPE).affine, atol=1e-5)
    label = nib.load(raw_patient / "truth" / "label.nii.gz")
    mask = nib.load(raw_patient / "truth" / "brain_mask.nii.gz")
    np.testing.assert_allclose(label.affine, image.affine)
    np.testing.assert_array_equal(np.asarray(mask.dataobj), (np.asarray(label.dataobj) > 0).astype(np.uint8))
    values = set(np.unique(np.asarray(label.dataobj)))
    assert {1, 2, 3, 4} <= values <= {0, 1, 2, 3, 4}
    aptw = np.asarray(image.dataobj)
    labels = np.asarray(label.dataobj)
    assert aptw[labels == 4].mean() > aptw[labels == 1].mean() + 1.5


def test_t1w_dicom_series_geometry_and_identifiers(raw_patient):
    folder = raw_patient / "t1w"
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(folder))
    assert len(files) == len(list(folder.glob("*.dcm")))
    reader.SetFileNames(files)
    dicom_image = reader.Execute()
    # The intended geometry is the truth grid of t1w (RAS); SimpleITK reports LPS.
    truth = nib.load(raw_patient / "truth" / "t1w_nobias.nii.gz")
    affine = truth.affine
    assert dicom_image.GetSize() == truth.shape
    np.testing.assert_allclose(dicom_image.GetSpacing(), np.sqrt((affine[:3, :3] ** 2).sum(0)), atol=1e-4)
    direction = np.asarray(dicom_image.GetDirection()).reshape(3, 3)
    lps_affine = np.eye(4)
    lps_affine[:3, :3] = direction * np.asarray(dicom_image.GetSpacing())
    lps_affine[:3, 3] = dicom_image.GetOrigin()
    ras_from_sitk = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps_affine
    # SimpleITK arrays are [z, y, x] of its own index order; compare world positions of the voxels.
    dicom_volume = sitk.GetArrayFromImage(dicom_image).transpose(2, 1, 0).astype(np.float32)
    to_truth_index = np.linalg.inv(affine) @ ras_from_sitk
    # The two voxel grids must coincide exactly (a signed permutation with integer offsets) ...
    to_dicom_index = np.linalg.inv(to_truth_index)
    np.testing.assert_allclose(to_dicom_index, np.round(to_dicom_index), atol=1e-3)
    # ... so gather the DICOM voxel of each truth voxel.
    truth_index = np.indices(truth.shape).reshape(3, -1)
    dicom_index = np.rint(to_dicom_index[:3, :3] @ truth_index + to_dicom_index[:3, 3:]).astype(int)
    resampled = dicom_volume[tuple(dicom_index)].reshape(truth.shape)
    bias = _load(raw_patient / "truth" / "bias_t1w.nii.gz")[0]
    expected = np.asarray(truth.dataobj).astype(np.float32) * bias
    # The series holds round(bias * magnitude); the truth holds round(magnitude): equal to rounding.
    assert np.abs(resampled - expected).max() <= 0.5 + 0.5 * bias.max() + 1e-3
    assert resampled.max() > 300
    header = pydicom.dcmread(files[0])
    assert str(header.PatientName) == "Phantom^phantom_000"
    assert header.PatientID == "phantom_000"
    assert float(header.RescaleSlope) != 1.0  # the reader really applied the rescale
    for keyword in (
        "PatientBirthDate",
        "PatientAddress",
        "StudyDate",
        "AcquisitionDate",
        "InstitutionName",
        "ReferringPhysicianName",
    ):
        assert keyword not in header
    identifying_text = {
        str(element.value) for element in header if element.VR in ("PN", "LO", "SH", "DA", "DT")
    }
    assert all(
        "phantom" in text.lower() or text in ("1", "BRAIN", "US") for text in identifying_text if text
    ), identifying_text


def test_transforms_are_recorded_and_consistent(raw_patient):
    record = json.loads((raw_patient / "truth" / "transforms.json").read_text())
    assert "convention" in record and "to_reference" in record["convention"]
    reference_pose = np.asarray(record["sequences"]["aptw"]["patient_to_scanner"])
    for sequence, entry in record["sequences"].items():
        pose = np.asarray(entry["patient_to_scanner"])
        np.testing.assert_allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-9)
        np.testing.assert_allclose(
            np.asarray(entry["to_reference"]), reference_pose @ np.linalg.inv(pose), atol=1e-9
        )
        assert max(abs(a) for a in entry["rotation_degrees"]) <= MAX_ROTATION_DEGREES[sequence]
        assert np.linalg.norm(entry["translation_mm"]) <= MAX_TRANSLATION_MM[sequence] + 1e-9
        assert max(abs(a) for a in entry["rotation_degrees"]) >= 0.25 * MAX_ROTATION_DEGREES[sequence] - 1e-9


@pytest.mark.parametrize("sequence", ["t2w", "gd_t1w"])
def test_known_transform_aligns_brain_masks_with_reference(raw_patient, sequence):
    record = json.loads((raw_patient / "truth" / "transforms.json").read_text())
    to_reference = np.asarray(record["sequences"][sequence]["to_reference"])
    moving, moving_affine = _load(raw_patient / "truth" / f"brain_mask_{sequence}.nii.gz")
    reference, reference_affine = _load(raw_patient / "truth" / "brain_mask.nii.gz")

    def resample(world_map):
        matrix = np.linalg.inv(moving_affine) @ world_map @ reference_affine
        return ndi.affine_transform(
            moving, matrix[:3, :3], matrix[:3, 3], output_shape=reference.shape, order=1
        )

    aligned = _dice(resample(np.linalg.inv(to_reference)) > 0.5, reference)
    unaligned = _dice(resample(np.eye(4)) > 0.5, reference)
    wrong_direction = _dice(resample(to_reference) > 0.5, reference)
    assert aligned > 0.9
    assert aligned > unaligned and aligned > wrong_direction


def test_skull_scalp_and_bias(raw_patient):
    image, _ = _load(raw_patient / "gd_t1w.nii.gz")
    nobias, _ = _load(raw_patient / "truth" / "gd_t1w_nobias.nii.gz")
    bias, _ = _load(raw_patient / "truth" / "bias_gd_t1w.nii.gz")
    brain, _ = _load(raw_patient / "truth" / "brain_mask_gd_t1w.nii.gz")
    white, _ = _load(raw_patient / "truth" / "wm_gd_t1w.nii.gz")
    brain = brain > 0
    head = ndi.binary_fill_holes(nobias > 150)
    outside = head & ~brain
    # A substantial head outside the brain, with bright scalp fat (brighter than white matter on T1w).
    assert outside.sum() > 0.3 * brain.sum()
    assert np.percentile(nobias[outside], 99) > np.mean(nobias[white > 0])
    # The skull: a dark ring right outside the brain.
    ring = ndi.binary_dilation(brain, iterations=2) & ~brain
    assert np.median(nobias[ring]) < 0.6 * np.median(nobias[white > 0])
    # The bias field is smooth, not flat, and really multiplies the image.
    assert 0.5 < bias[head].min() and bias[head].max() < 2.5 and bias[head].std() > 0.05
    assert np.abs(image - np.rint(nobias * bias))[head].max() <= 1.0 + 0.5 * bias.max()
    assert np.all(white[white > 0] <= brain[white > 0])
