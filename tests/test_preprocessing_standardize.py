"""Nyúl & Udupa standardization: cross-check with TorchIO, extrapolation, landmark file safety."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medsynth.errors import InputDataError
from preprocessing.standardize import (
    DEFAULT_PERCENTILES,
    LandmarkFileError,
    NyulLandmarks,
    NyulStandardized,
    NyulStandardizer,
)

AFFINE = np.diag([1.2, 1.2, 3.0, 1.0])


def _brain(seed: int, shape=(24, 22, 10)) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """A skull-less head: brain ellipsoid with tissue classes, a scanner-specific gain and offset."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    radius = np.sqrt((grid**2).sum(-1))
    mask = radius < 0.9
    tissue = np.where(radius < 0.5, 110.0, 70.0) + rng.gamma(2.0, 8.0, size=shape)
    gain, offset = rng.uniform(2, 15), rng.uniform(-50, 200)
    data = np.where(mask, gain * tissue + offset, rng.normal(0, 3, size=shape)).astype(np.float32)
    return nib.Nifti1Image(data, AFFINE), nib.Nifti1Image(mask.astype(np.uint8), AFFINE)


@pytest.fixture(scope="module")
def training():
    return [_brain(seed) for seed in range(4)]


def test_landmarks_and_mapping_match_torchio(tmp_path, training):
    tio = pytest.importorskip("torchio")
    image_paths, mask_paths = [], []
    for i, (image, mask) in enumerate(training):
        image_paths.append(tmp_path / f"img{i}.nii.gz")
        mask_paths.append(tmp_path / f"mask{i}.nii.gz")
        nib.save(image, image_paths[-1])
        nib.save(mask, mask_paths[-1])
    theirs = tio.HistogramStandardization.train(image_paths, cutoff=(0.01, 0.99), mask_path=mask_paths)
    ours = NyulStandardizer(sequence="t2w").fit([im for im, _ in training], [m for _, m in training])
    # TorchIO also learns the 25th/75th percentiles but maps with the deciles + cut-offs only
    # (its `range_to_use`), i.e. exactly our default landmark set.
    their_percentiles = [1, 10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 99]
    used = [their_percentiles.index(p) for p in DEFAULT_PERCENTILES]
    np.testing.assert_allclose(ours.landmarks, theirs[used], rtol=1e-5, atol=1e-4)
    assert ours.landmarks[0] == pytest.approx(0.0) and ours.landmarks[-1] == pytest.approx(100.0)

    test_image, test_mask = _brain(seed=10)
    nib.save(test_image, tmp_path / "test.nii.gz")
    nib.save(test_mask, tmp_path / "test_mask.nii.gz")
    subject = tio.Subject(
        image=tio.ScalarImage(tmp_path / "test.nii.gz"), brain=tio.LabelMap(tmp_path / "test_mask.nii.gz")
    )
    mapped_theirs = tio.HistogramStandardization({"image": theirs}, masking_method="brain")(subject)
    mapped_theirs = mapped_theirs["image"].data[0].numpy()
    mapped_ours = np.asanyarray(ours.transform(test_image, test_mask).dataobj)
    inside = np.asanyarray(test_mask.dataobj) > 0
    np.testing.assert_allclose(mapped_ours[inside], mapped_theirs[inside], rtol=1e-4, atol=1e-3)
    assert np.all(mapped_ours[~inside] == 0)
    assert np.ptp(mapped_ours[inside]) > 50  # a real mapping, not a collapse


def test_standardization_removes_scanner_gain_and_offset(training):
    model = NyulStandardizer(sequence="flair").fit([im for im, _ in training], [m for _, m in training])
    image, mask = training[0]
    raw = np.asanyarray(image.dataobj).astype(np.float64)
    rescaled = nib.Nifti1Image((7.0 * raw + 300.0).astype(np.float32), AFFINE)
    a = np.asanyarray(model.transform(image, mask).dataobj)
    b = np.asanyarray(model.transform(rescaled, mask).dataobj)
    inside = np.asanyarray(mask.dataobj) > 0
    np.testing.assert_allclose(a[inside], b[inside], atol=1e-3)
    landmarks = np.percentile(a[inside], DEFAULT_PERCENTILES)
    # Equal up to the interpolation between order statistics straddling a landmark.
    np.testing.assert_allclose(landmarks, model.landmarks, atol=5e-3)


def test_linear_extrapolation_beyond_end_landmarks():
    model = NyulStandardizer(percentiles=(10, 50, 90), standard_range=(0, 100), sequence="t1w")
    model.landmarks = np.array([0.0, 40.0, 100.0])
    source = np.array([10.0, 20.0, 30.0])
    values = np.array([0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 50.0])
    mapped = model.map_values(values, source)
    # First segment slope 4, last segment slope 6, extended outside [10, 30].
    np.testing.assert_allclose(mapped, [-40, -20, 0, 20, 40, 70, 100, 220])


def test_save_load_roundtrip_and_refusals(tmp_path, training):
    model = NyulStandardizer(percentiles=(2, 25, 50, 75, 98), standard_range=(0, 1), sequence="T2").fit(
        [im for im, _ in training], [m for _, m in training]
    )
    path = model.save(tmp_path / "t2w.json")
    loaded = NyulStandardizer.load(path, expected_sequence="t2w")
    np.testing.assert_array_equal(loaded.landmarks, model.landmarks)
    assert loaded.percentiles.tolist() == [2, 25, 50, 75, 98] and loaded.standard_range == (0.0, 1.0)
    with pytest.raises(LandmarkFileError, match="made for sequence 't2w', not 'flair'"):
        NyulStandardizer.load(path, expected_sequence="flair")
    record = json.loads(path.read_text())
    record["landmarks"][2] += 0.01
    (tmp_path / "tampered.json").write_text(json.dumps(record))
    with pytest.raises(LandmarkFileError, match="fingerprint mismatch"):
        NyulStandardizer.load(tmp_path / "tampered.json")
    record = json.loads(path.read_text())
    record["sequence"] = "flair"  # relabelled by hand: also a fingerprint mismatch
    (tmp_path / "relabelled.json").write_text(json.dumps(record))
    with pytest.raises(LandmarkFileError, match="fingerprint mismatch"):
        NyulStandardizer.load(tmp_path / "relabelled.json", expected_sequence="flair")


def test_multi_sequence_container_and_dict_transform(tmp_path, training):
    images, masks = [im for im, _ in training], [m for _, m in training]
    landmarks = NyulLandmarks(
        [
            NyulStandardizer(sequence="t1w").fit(images[:2], masks[:2]),
            NyulStandardizer(sequence="flair").fit(images[2:], masks[2:]),
        ]
    )
    path = landmarks.save(tmp_path / "landmarks.json")
    loaded = NyulLandmarks.load(path, expected_sequences=["flair", "t1"])
    assert loaded.sequences == ("flair", "t1w")
    with pytest.raises(LandmarkFileError, match="missing: \\['t2w'\\]"):
        loaded.check(["t1w", "t2w", "flair"])
    with pytest.raises(LandmarkFileError, match="unexpected: \\['flair'\\]"):
        loaded.check(["t1w"])
    loaded.check(["t1w"], allow_extra=True)
    record = json.loads(path.read_text())
    del record["sequences"]["flair"]
    (tmp_path / "cut.json").write_text(json.dumps(record))
    with pytest.raises(LandmarkFileError, match="fingerprint mismatch"):
        NyulLandmarks.load(tmp_path / "cut.json")

    transform = NyulStandardized(keys=["t1w", "flair"], landmarks=path, mask_key="brain_mask")
    out = transform({"t1w": images[0], "flair": images[3], "brain_mask": masks[0]})
    expected = landmarks["t1w"].transform(images[0], masks[0])
    np.testing.assert_array_equal(np.asanyarray(out["t1w"].dataobj), np.asanyarray(expected.dataobj))
    assert out["brain_mask"] is masks[0]
    with pytest.raises(LandmarkFileError, match="no landmarks for 't2w'"):
        NyulStandardized(keys=["t2w"], landmarks=loaded)


def test_bad_inputs_are_refused(training):
    image, mask = training[0]
    empty = nib.Nifti1Image(np.zeros(mask.shape, np.uint8), AFFINE)
    with pytest.raises(InputDataError, match="empty brain mask"):
        NyulStandardizer(sequence="t1w").fit([image], [empty])
    shifted_affine = AFFINE.copy()
    shifted_affine[0, 3] = 5.0
    shifted = nib.Nifti1Image(np.asanyarray(mask.dataobj), shifted_affine)
    with pytest.raises(InputDataError, match="mask grid"):
        NyulStandardizer(sequence="t1w").fit([image], [shifted])
    bad = np.asanyarray(image.dataobj).copy()
    bad[12, 11, 5] = np.nan
    with pytest.raises(InputDataError, match="NaN"):
        NyulStandardizer(sequence="t1w").fit([nib.Nifti1Image(bad, AFFINE)], [mask])
    with pytest.raises(RuntimeError, match="not fitted"):
        NyulStandardizer(sequence="t1w").transform(image, mask)
    with pytest.raises(ValueError, match="increase strictly"):
        NyulStandardizer(percentiles=(1, 50, 50, 99))
    with pytest.raises(ValueError, match="unknown sequence"):
        NyulStandardizer(sequence="dwi")
