"""Multivariate template construction on small synthetic volumes."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

from preprocessing.atlas import (
    build_multivariate_template,
    register_subject_to_template,
    warp_atlas_to_patient,
)
from preprocessing.registration import resample_to_reference, rigid_matrix

SPACING = 2.0


def _phantom(shape=(36, 40, 18), seed=0) -> nib.Nifti1Image:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij"))
    radii = np.array([0.38, 0.42, 0.4])[:, None, None, None] * np.array(shape)[:, None, None, None]
    head = (np.sum((grid / radii) ** 2, axis=0) < 1).astype(np.float32)
    texture = ndi.gaussian_filter(rng.normal(size=shape), 1.5)
    data = head * (100 + 400 * texture / texture.std())
    data = np.clip(ndi.gaussian_filter(data, 0.7), 0, None).astype(np.float32)
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    affine[:3, 3] = -SPACING * (np.array(shape) - 1) / 2
    return nib.Nifti1Image(data, affine)


def _shifted(img: nib.Nifti1Image, shift_mm) -> nib.Nifti1Image:
    # Reading img at x - shift: the anatomy moves by +shift in world space.
    return resample_to_reference(img, img, rigid_matrix(translation_mm=-np.asarray(shift_mm, float)))


def _corr(a: nib.Nifti1Image, b: nib.Nifti1Image) -> float:
    x, y = np.asanyarray(a.dataobj).ravel(), np.asanyarray(b.dataobj).ravel()
    return float(np.corrcoef(x, y)[0, 1])


def test_template_of_shifted_copies_recovers_the_image():
    original = _phantom()
    shifts = [(4.0, -3.0, 0.0), (-4.0, 3.0, 2.0), (2.0, 4.0, -2.0), (-2.0, -4.0, 0.0)]  # mean zero
    subjects = [{"gd_t1w": _shifted(original, s)} for s in shifts]
    naive_mean = np.mean([np.asanyarray(s["gd_t1w"].dataobj) for s in subjects], axis=0)
    template = build_multivariate_template(subjects, transform="Rigid", iterations=2, progress=False)[
        "gd_t1w"
    ]
    naive_corr = _corr(nib.Nifti1Image(naive_mean, original.affine), original)
    template_corr = _corr(template, original)
    # The template is on the first subject's grid, which is the original grid here.
    assert template_corr > 0.95, template_corr
    assert template_corr > naive_corr + 0.1, (template_corr, naive_corr)


def test_all_sequences_share_the_same_transform():
    original = _phantom(seed=1)
    inverted = nib.Nifti1Image(
        np.where(np.asanyarray(original.dataobj) > 0, 600 - np.asanyarray(original.dataobj), 0).astype(
            np.float32
        ),
        original.affine,
    )
    subject = {
        "gd_t1w": _shifted(original, (3.0, -2.0, 2.0)),
        "t2w": _shifted(inverted, (3.0, -2.0, 2.0)),
        "flair": _shifted(original, (3.0, -2.0, 2.0)),
    }
    template = {"gd_t1w": original, "t2w": inverted, "flair": original}
    warped, _files, affine, _ = register_subject_to_template(template, subject, "gd_t1w", transform="Rigid")
    # flair is a copy of gd_t1w: identical after warping only if it got exactly the same transform.
    np.testing.assert_array_equal(
        np.asanyarray(warped["flair"].dataobj), np.asanyarray(warped["gd_t1w"].dataobj)
    )
    # The anatomy moved by +shift, so a template point maps to the subject point + shift (within 0.3 mm).
    np.testing.assert_allclose(affine[:3, 3], [3.0, -2.0, 2.0], atol=0.3)
    before = _corr(subject["t2w"], inverted)
    assert _corr(warped["t2w"], inverted) > max(0.9, before + 0.1), (before, _corr(warped["t2w"], inverted))

    # Atlas to patient: the atlas lands where the patient's anatomy is.
    on_patient = warp_atlas_to_patient(template, subject["gd_t1w"], primary="gd_t1w", transform="Rigid")
    assert set(on_patient) == {"gd_t1w", "t2w", "flair"}
    assert _corr(on_patient["gd_t1w"], subject["gd_t1w"]) > max(0.9, _corr(original, subject["gd_t1w"]) + 0.1)
    assert _corr(on_patient["t2w"], subject["t2w"]) > max(0.9, _corr(inverted, subject["t2w"]) + 0.1)


def test_template_rejects_missing_primary():
    with pytest.raises(ValueError, match="primary"):
        build_multivariate_template([{"t2w": _phantom()}], primary="gd_t1w", progress=False)
