"""N4 bias-field correction: a known synthetic field, phantom ground truth, geometry and input checks."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medsynth.errors import InputDataError
from preprocessing.bias import N4BiasCorrectiond, n4_correct
from preprocessing.imageio import load_image, same_grid
from tests.test_preprocessing_skullstrip import phantom_raw_patient, truth_on_grid  # noqa: F401 (fixture)


def coefficient_of_variation(values: np.ndarray) -> float:
    return float(values.std() / values.mean())


def _synthetic_head(shape=(64, 64, 24), spacing=(2.5, 2.5, 5.0), seed=0):
    """Ellipsoid brain (WM core, GM shell, CSF slab), 3 % noise, and a smooth multiplicative field."""
    rng = np.random.default_rng(seed)
    centre = np.array(shape) * np.array(spacing) / 2
    xyz = (
        np.stack(
            np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij"), -1
        )
        - centre
    )
    radius = np.sqrt(((xyz / np.array([70.0, 75.0, 55.0])) ** 2).sum(-1))
    brain = radius < 1
    csf = (np.abs(xyz[..., 0]) < 6) & (np.abs(xyz[..., 1]) < 20) & (np.abs(xyz[..., 2]) < 15)
    white_matter = (radius < 0.6) & ~csf
    clean = np.where(white_matter, 100.0, np.where(csf, 30.0, 70.0))
    clean = clean * (1 + 0.03 * rng.normal(size=shape)) * brain
    field = np.exp(0.25 * xyz[..., 0] / 70 - 0.2 * (xyz[..., 1] / 75) ** 2 + 0.15 * xyz[..., 2] / 55)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -centre
    return clean, field, brain, white_matter, affine


def test_recovers_a_known_smooth_field():
    clean, field, brain, white_matter, affine = _synthetic_head()
    image = nib.Nifti1Image((clean * field).astype(np.float32), affine)
    mask = nib.Nifti1Image(brain.astype(np.uint8), affine)
    corrected, bias = n4_correct(image, mask, iterations=(50, 50, 50))
    assert same_grid(corrected, image) and same_grid(bias, image)
    cv_clean = coefficient_of_variation(clean[white_matter])
    cv_biased = coefficient_of_variation((clean * field)[white_matter])
    cv_corrected = coefficient_of_variation(np.asanyarray(corrected.dataobj)[white_matter])
    assert cv_corrected <= 0.7 * cv_biased
    assert cv_corrected - cv_clean < 0.2 * (cv_biased - cv_clean)
    # The estimated field equals the true one up to N4's free global scale (unit geometric mean here).
    estimated = np.asanyarray(bias.dataobj)[brain]
    true = field[brain] / np.exp(np.log(field[brain]).mean())
    assert np.exp(np.log(estimated).mean()) == pytest.approx(1.0, abs=1e-4)
    assert np.abs(estimated / true - 1).max() < 0.1
    np.testing.assert_allclose(
        np.asanyarray(corrected.dataobj) * np.asanyarray(bias.dataobj), clean * field, rtol=1e-4, atol=1e-3
    )


@pytest.mark.slow
def test_phantom_white_matter_becomes_homogeneous(phantom_raw_patient):  # noqa: F811
    folder = phantom_raw_patient
    for sequence in ("t1w", "gd_t1w", "t2w", "flair"):
        image = load_image(folder / sequence if sequence == "t1w" else folder / f"{sequence}.nii.gz")
        truth = folder / "truth"
        brain = truth_on_grid(truth / f"brain_mask_{sequence}.nii.gz", image)
        white_matter = truth_on_grid(truth / f"wm_{sequence}.nii.gz", image) > 0
        corrected, _ = n4_correct(image, nib.Nifti1Image(brain, image.affine))
        cv_raw = coefficient_of_variation(np.asanyarray(image.dataobj).astype(float)[white_matter])
        cv_clean = coefficient_of_variation(
            truth_on_grid(truth / f"{sequence}_nobias.nii.gz", image)[white_matter]
        )
        cv_corrected = coefficient_of_variation(np.asanyarray(corrected.dataobj)[white_matter])
        assert cv_corrected <= 0.7 * cv_raw, (sequence, cv_raw, cv_corrected)
        # "Approaches the bias-free image": closes more than half of the gap.
        assert cv_corrected - cv_clean < 0.5 * (cv_raw - cv_clean), (sequence, cv_raw, cv_corrected, cv_clean)


def test_dict_transform_and_input_checks():
    clean, field, brain, _, affine = _synthetic_head(shape=(32, 32, 12), spacing=(5.0, 5.0, 10.0))
    image = nib.Nifti1Image((clean * field).astype(np.float32), affine)
    mask = nib.Nifti1Image(brain.astype(np.uint8), affine)
    out = N4BiasCorrectiond(
        keys=["t2w"], mask_key="brain_mask", bias_key_postfix="_bias", iterations=(20, 20)
    )({"t2w": image, "brain_mask": mask})
    assert set(out) == {"t2w", "brain_mask", "t2w_bias"}
    np.testing.assert_allclose(
        np.asanyarray(out["t2w"].dataobj) * np.asanyarray(out["t2w_bias"].dataobj),
        clean * field,
        rtol=1e-4,
        atol=1e-3,
    )
    shifted = affine.copy()
    shifted[0, 3] += 3.0
    with pytest.raises(InputDataError, match="mask grid"):
        n4_correct(image, nib.Nifti1Image(brain.astype(np.uint8), shifted))
    with pytest.raises(InputDataError, match="cannot fit"):
        n4_correct(image, nib.Nifti1Image(np.zeros(brain.shape, np.uint8), affine))
    bad = np.asanyarray(image.dataobj).copy()
    bad[3, 3, 3] = np.inf
    with pytest.raises(InputDataError, match="NaN/inf"):
        n4_correct(nib.Nifti1Image(bad, affine), mask)


def test_preprocessing_transforms_join_a_monai_chain(tmp_path):
    """After LoadImaged the volumes are MetaTensors: N4 and Nyul standardization take and return them,
    with the same voxels as on NIfTI images."""
    from monai.data import MetaTensor
    from monai.transforms import Compose, LoadImaged

    from preprocessing.standardize import NyulLandmarks, NyulStandardized, NyulStandardizer

    clean, field, brain, _, affine = _synthetic_head(shape=(32, 32, 12), spacing=(5.0, 5.0, 10.0))
    image = nib.Nifti1Image((clean * field).astype(np.float32), affine)
    mask = nib.Nifti1Image(brain.astype(np.uint8), affine)
    nib.save(image, tmp_path / "t2w.nii.gz")
    nib.save(mask, tmp_path / "brain_mask.nii.gz")
    model = NyulStandardizer(sequence="t2w").fit([image], [mask])
    landmarks = NyulLandmarks([model])
    chain = Compose(
        [
            LoadImaged(["t2w", "brain_mask"], image_only=True, ensure_channel_first=True),
            N4BiasCorrectiond(["t2w"], mask_key="brain_mask", iterations=(20, 20)),
            NyulStandardized(["t2w"], landmarks=landmarks, mask_key="brain_mask"),
        ]
    )
    out = chain({"t2w": str(tmp_path / "t2w.nii.gz"), "brain_mask": str(tmp_path / "brain_mask.nii.gz")})
    assert isinstance(out["t2w"], MetaTensor) and out["t2w"].shape == (1, *brain.shape)
    np.testing.assert_allclose(out["t2w"].affine.numpy(), affine, atol=1e-5)
    corrected, _ = n4_correct(image, mask, iterations=(20, 20))
    expected = np.asanyarray(model(corrected, mask).dataobj)
    np.testing.assert_allclose(out["t2w"][0].numpy(), expected, rtol=1e-5, atol=1e-4)
