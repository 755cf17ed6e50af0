"""Every kind of bad input gives an error naming the patient, the file and the problem."""

from __future__ import annotations

import os
import re

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from cohort_helpers import write_tiny_cohort

from medsynth.data.manifest import read_manifest
from medsynth.data.validation import validate_cohort, validate_patient
from medsynth.errors import CohortValidationError, InputDataError
from medsynth.utils.io import save_nifti


@pytest.fixture()
def cohort(tmp_path):
    return read_manifest(write_tiny_cohort(tmp_path / "cohort", num_patients=4))


def _rewrite(path, change):
    image = nib.load(path)
    data, affine = change(np.asanyarray(image.dataobj).copy(), image.affine.copy())
    save_nifti(data, affine, path)


def _only_error(manifest, pid) -> InputDataError:
    row = manifest.set_index("patient_id").loc[pid].to_dict() | {"patient_id": pid}
    errors = validate_patient(row, ("t1w", "gd_t1w", "t2w", "flair", "aptw"))
    assert len(errors) == 1, [str(e) for e in errors]
    assert errors[0].patient_id == pid
    return errors[0]


def test_a_clean_cohort_passes_and_is_recorded(cohort, tmp_path):
    validate_cohort(cohort, record_dir=tmp_path / "records", progress=False)
    assert len(list((tmp_path / "records").glob("validated_*.json"))) == 1


def _nan(data, affine):
    data = data.astype(np.float32)
    data[3, 4, 2] = np.nan
    data[5, 5, 3] = np.inf
    return data, affine


@pytest.mark.parametrize(
    ("column", "change", "problem"),
    [
        ("flair", _nan, r"contains 2 NaN/inf voxel\(s\) \(flair\)"),
        (
            "t2w",
            lambda d, a: (d[:, :, :-1], a),
            r"shape \(24, 20, 5\) \(t2w\) differs from \(24, 20, 6\) \(t1w\)",
        ),
        ("gd_t1w", lambda d, a: (d, a + np.diag([0, 0, 0.01, 0])), r"affine \(gd_t1w\) differs .* 0\.01 mm"),
        (
            "label",
            lambda d, a: (np.where(d == 4, 7, d).astype(np.uint8), a),
            r"unknown label value\(s\) \[7\]",
        ),
        ("brain_mask", lambda d, a: (np.zeros_like(d), a), "brain mask is empty"),
        ("label", lambda d, a: (np.zeros_like(d), a), "label map has no brain"),
        (
            "atlas_t1w",
            lambda d, a: (d, a @ np.diag([2.0, 1, 1, 1])),
            r"atlas grid mismatch: affine \(atlas_t1w\)",
        ),
    ],
)
def test_each_problem_names_patient_file_and_problem(cohort, column, change, problem):
    path = cohort.loc[1, column]
    pid = cohort.loc[1, "patient_id"]
    _rewrite(path, change)
    error = _only_error(cohort, pid)
    assert error.path == path
    message = str(error)
    assert f"patient {pid}" in message and path in message
    assert re.search(problem, error.problem), message


def test_missing_and_unreadable_files(cohort):
    missing = cohort.loc[0, "t1w"]
    os.remove(missing)
    error = _only_error(cohort, "P000")
    assert error.path == missing and "does not exist (t1w)" in str(error)

    corrupt = cohort.loc[2, "label"]
    with open(corrupt, "wb") as handle:
        handle.write(b"not a nifti file")
    error = _only_error(cohort, "P002")
    assert error.path == corrupt and "unreadable image (label)" in str(error)


def test_cohort_error_lists_every_bad_patient(cohort):
    _rewrite(cohort.loc[0, "t1w"], _nan)
    _rewrite(cohort.loc[3, "label"], lambda d, a: (np.where(d == 2, 9, d).astype(np.uint8), a))
    with pytest.raises(CohortValidationError) as caught:
        validate_cohort(cohort, progress=False)
    errors = caught.value.errors
    assert sorted(e.patient_id for e in errors) == ["P000", "P003"]
    text = str(caught.value)
    assert "2 problem(s) in 2 patient(s)" in text
    assert cohort.loc[0, "t1w"] in text and cohort.loc[3, "label"] in text


def test_a_broken_shared_atlas_is_reported_once(cohort):
    _rewrite(cohort.loc[0, "atlas_aptw"], _nan)
    with pytest.raises(CohortValidationError) as caught:
        validate_cohort(cohort, progress=False)
    (error,) = caught.value.errors
    assert error.patient_id is None and error.path == cohort.loc[0, "atlas_aptw"]
    assert "NaN/inf" in error.problem


def test_duplicated_patient_rows_are_rejected(cohort):
    with pytest.raises(CohortValidationError, match="P001.*listed more than once"):
        validate_cohort(pd.concat([cohort, cohort.iloc[[1]]]), progress=False)
