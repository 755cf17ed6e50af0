"""Label conventions declared, not guessed; all-test cohorts; the model's atlas attached to any cohort."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from cohort_helpers import RAS_AFFINE, tiny_label, write_tiny_cohort

from medsynth.cli import main
from medsynth.constants import BRATS_SEG_TO_LABEL, CAVITY, EDEMA, NORMAL_BRAIN, TUMOR
from medsynth.data.atlas import (
    atlas_fingerprint,
    attach_atlas,
    cohort_atlas_files,
    load_model_atlas,
    resolve_model_cohort,
    save_model_atlas,
)
from medsynth.data.cohort import resolve_cohort
from medsynth.data.conventions import foreign_convention_problem, label_convention, to_project_labels
from medsynth.data.manifest import read_manifest, split_patients
from medsynth.errors import CohortValidationError, InputDataError
from medsynth.utils.io import save_nifti


def _as_brats_seg(label: np.ndarray) -> np.ndarray:
    """The project's label map written the BraTS way: lesion only, 1 = necrosis, 4 = enhancing tumour."""
    inverse = {value: key for key, value in BRATS_SEG_TO_LABEL.items()}
    seg = np.zeros_like(label)
    for project, brats in inverse.items():
        seg[label == project] = brats
    return seg


def _csv_with_brats_seg(tmp_path, column_convention: str | None = None):
    source = read_manifest(write_tiny_cohort(tmp_path / "data", 2, sequences=("t1w", "flair")))
    rows = []
    for _, row in source.iterrows():
        seg = _as_brats_seg(np.asarray(nib.load(row["label"]).dataobj))
        path = save_nifti(seg, RAS_AFFINE, tmp_path / "data" / f"{row['patient_id']}_seg.nii.gz", np.uint8)
        rows.append(
            {"patient_id": row["patient_id"], "t1": row["t1w"], "flair": row["flair"], "label": str(path)}
        )
    table = pd.DataFrame(rows)
    if column_convention:
        table["label_convention"] = column_convention
    csv = tmp_path / "patients.csv"
    table.to_csv(csv, index=False)
    return csv, source


def test_a_brats_valued_label_read_as_the_project_convention_is_refused(tmp_path):
    csv, _ = _csv_with_brats_seg(tmp_path)
    with pytest.raises(CohortValidationError) as raised:
        resolve_cohort(csv, tmp_path / "cache", progress=False)
    message = str(raised.value)
    assert "does not look like this project's label convention" in message
    assert "label_convention 'brats'" in message and "P000" in message and "_seg.nii.gz" in message
    seg = _as_brats_seg(tiny_label())
    assert foreign_convention_problem(seg) is not None
    assert foreign_convention_problem(tiny_label()) is None


@pytest.mark.parametrize("declared_by", ["setting", "column"])
def test_a_declared_brats_convention_is_converted_in_the_brain(tmp_path, declared_by):
    csv, source = _csv_with_brats_seg(tmp_path, "brats" if declared_by == "column" else None)
    kwargs = {"label_convention": "brats"} if declared_by == "setting" else {}
    manifest = resolve_cohort(csv, tmp_path / "cache", progress=False, **kwargs)
    for _, row in manifest.iterrows():
        original = source.loc[source["patient_id"] == row["patient_id"], "label"].item()
        converted = np.asarray(nib.load(row["label"]).dataobj)
        # The brain comes from the non-zero sequences, so the converted map is the original one.
        np.testing.assert_array_equal(converted, np.asarray(nib.load(original).dataobj))
    assert "label_convention" not in manifest.columns


def test_conventions_and_mapping_files(tmp_path):
    seg = np.array([0, 0, 1, 2, 4, 0])
    brain = np.array([False, True, True, True, True, True])
    np.testing.assert_array_equal(
        to_project_labels(seg, label_convention("brats"), brain), [0, NORMAL_BRAIN, CAVITY, EDEMA, TUMOR, 1]
    )
    np.testing.assert_array_equal(
        to_project_labels(np.array([0, 3, 1]), label_convention("brats2023"), np.ones(3, bool)),
        [1, TUMOR, CAVITY],
    )
    mapping = tmp_path / "mine.json"
    mapping.write_text(json.dumps({"values": {"0": 0, "10": 1, "20": 2, "40": 4}}))
    np.testing.assert_array_equal(
        to_project_labels(np.array([0, 10, 40]), label_convention(mapping)), [0, 1, 4]
    )
    with pytest.raises(ValueError, match="not defined by the 'brats' convention"):
        to_project_labels(np.array([3]), label_convention("brats"), np.ones(1, bool))
    with pytest.raises(ValueError, match="needs a brain mask"):
        to_project_labels(seg, label_convention("brats"))
    with pytest.raises(ValueError, match="unknown label convention"):
        label_convention("brats2017")
    mapping.write_text(json.dumps({"values": {"1": 9}}))
    with pytest.raises(ValueError, match="outside the project's labels"):
        label_convention(mapping)


def test_an_all_test_cohort(tmp_path):
    assert set(split_patients([f"p{i}" for i in range(5)], (0, 0, 1)).values()) == {"test"}
    assert set(split_patients(["a", "b"], (0, 0.5, 0.5)).values()) == {"val", "test"}
    with pytest.raises(ValueError, match="must sum to 1"):
        split_patients(["a", "b"], (0, 1, 1))
    csv, _ = _csv_with_brats_seg(tmp_path, "brats")
    assert (
        main(["cohort", str(csv), "--cache-dir", str(tmp_path / "cache"), "--split-fractions", "0", "0", "1"])
        == 0
    )
    manifest = resolve_cohort(csv, tmp_path / "cache", split_fractions=(0, 0, 1), progress=False)
    assert set(manifest["split"]) == {"test"} and "atlas_t1w" not in manifest.columns  # no train: no atlas


def test_the_model_atlas_is_saved_once_and_attached_to_other_cohorts(tmp_path):
    train = read_manifest(write_tiny_cohort(tmp_path / "a", 4, sequences=("t1w", "flair")))
    record = save_model_atlas(train, tmp_path / "models")
    assert record["kind"] == "shared" and record["shape"] == list(tiny_label().shape)
    assert record["fingerprint"] == atlas_fingerprint(cohort_atlas_files(train))
    assert save_model_atlas(train, tmp_path / "models")["fingerprint"] == record["fingerprint"]  # idempotent
    other = read_manifest(write_tiny_cohort(tmp_path / "b", 3, sequences=("t1w", "flair"), seed=7))
    with pytest.raises(ValueError, match="another atlas"):
        save_model_atlas(other, tmp_path / "models")

    model = load_model_atlas(tmp_path / "models")
    attached = attach_atlas(other, model["files"])
    assert set(attached["atlas_t1w"]) == {model["files"]["t1w"]}
    # Another grid: refused with both grids named, or resampled on request.
    shifted = tmp_path / "c"
    cohort = read_manifest(write_tiny_cohort(shifted, 2, sequences=("t1w", "flair"), shape=(26, 20, 6)))
    with pytest.raises(
        InputDataError, match=r"not on the grid of the model's atlas.*\[26, 20, 6\] vs \[24, 20, 6\]"
    ):
        attach_atlas(cohort, model["files"], label="the model's atlas")
    resampled = attach_atlas(cohort, model["files"], tmp_path / "cache", resample_atlas=True)
    image = nib.load(resampled.loc[0, "atlas_t1w"])
    assert image.shape == (26, 20, 6) and np.allclose(image.affine, nib.load(cohort.loc[0, "label"]).affine)
    # A changed atlas file no longer matches its fingerprint.
    save_nifti(np.zeros((24, 20, 6)), RAS_AFFINE, model["files"]["t1w"])
    with pytest.raises(InputDataError, match="changed since training"):
        load_model_atlas(tmp_path / "models")


def test_resolve_model_cohort_builds_no_atlas_for_an_external_brats_cohort(tmp_path):
    train = read_manifest(write_tiny_cohort(tmp_path / "a", 4, sequences=("t1w", "gd_t1w", "t2w", "flair")))
    save_model_atlas(train, tmp_path / "models")
    brats = tmp_path / "brats"
    for index in range(3):
        case = f"case{index}"
        label = tiny_label()
        for suffix in ("t1", "t1ce", "t2", "flair"):
            volume = np.where(label > 0, 100.0 + index, 0.0).astype(np.float32)
            save_nifti(volume, RAS_AFFINE, brats / case / f"{case}_{suffix}.nii.gz")
        save_nifti(_as_brats_seg(label), RAS_AFFINE, brats / case / f"{case}_seg.nii.gz", np.uint8)
    manifest = resolve_model_cohort(brats, tmp_path / "cache", tmp_path / "models", progress=False)
    assert len(manifest) == 3
    assert not list((tmp_path / "cache").glob("brats_*/atlas"))  # nothing averaged for the external cohort
    assert set(manifest["atlas_t1w"]) == {str(tmp_path / "models" / "atlas" / "atlas_t1w.nii.gz")}
    with pytest.raises(FileNotFoundError, match="no model atlas"):
        resolve_model_cohort(brats, tmp_path / "cache", tmp_path / "nothing", progress=False)
