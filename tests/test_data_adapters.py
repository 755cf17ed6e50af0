"""Adapters: user CSV (aliases, derived brain masks / splits / atlas) and BraTS (synthetic and real)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from cohort_helpers import (
    RAS_AFFINE,
    write_tiny_brats_case,
    write_tiny_cohort,
)

from medsynth.constants import BRATS_SEQUENCES
from medsynth.data.adapters import brats_cohort, find_brats_cases, user_csv_cohort
from medsynth.data.cohort import resolve_cohort
from medsynth.data.dataset import make_slice_dataset
from medsynth.data.manifest import read_manifest, split_patients
from medsynth.errors import CohortValidationError
from medsynth.utils.io import save_nifti


def _volume(path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def _expected_atlas(paths, brains) -> np.ndarray:
    """Mean over patients of each volume divided by its brain p99.5 (the documented atlas recipe)."""
    total = 0.0
    for path, brain in zip(paths, brains, strict=True):
        volume = _volume(path).astype(np.float64)
        total = total + volume / np.percentile(volume[_volume(brain) > 0], 99.5)
    return total / len(paths)


def _user_csv(tmp_path, num_patients=5, with_brain_mask=False):
    """A user CSV with sequence aliases, relative paths and neither split, brain mask nor atlas."""
    cohort = read_manifest(write_tiny_cohort(tmp_path / "data", num_patients, sequences=BRATS_SEQUENCES))
    table = pd.DataFrame(
        {
            "patient_id": cohort["patient_id"],
            "T1": [f"data/{p}/{p}_t1w.nii.gz" for p in cohort["patient_id"]],
            "t1ce": [f"data/{p}/{p}_gd_t1w.nii.gz" for p in cohort["patient_id"]],
            "t2": [f"data/{p}/{p}_t2w.nii.gz" for p in cohort["patient_id"]],
            "FLAIR": [f"data/{p}/{p}_flair.nii.gz" for p in cohort["patient_id"]],
            "label": [f"data/{p}/{p}_label.nii.gz" for p in cohort["patient_id"]],
            "age": ["50"] * len(cohort),
        }
    )
    if with_brain_mask:
        table["brain_mask"] = [f"data/{p}/{p}_brainmask.nii.gz" for p in cohort["patient_id"]]
    path = tmp_path / "cohort.csv"
    table.to_csv(path, index=False)
    return path, cohort


def test_user_csv_derives_masks_splits_and_train_only_atlas(tmp_path):
    csv, source = _user_csv(tmp_path)
    manifest = user_csv_cohort(csv, tmp_path / "derived", seed=1, progress=False)
    assert list(manifest.columns[:6]) == ["patient_id", "split", "t1w", "gd_t1w", "t2w", "flair"]
    assert "age" not in manifest.columns
    assert manifest["t2w"].tolist() == source["t2w"].tolist()  # aliases and relative paths resolved
    assert dict(zip(manifest["patient_id"], manifest["split"], strict=True)) == split_patients(
        source["patient_id"], seed=1
    )
    for _, row in manifest.iterrows():
        assert row["brain_mask"].startswith(str(tmp_path / "derived"))
        np.testing.assert_array_equal(_volume(row["brain_mask"]), _volume(row["label"]) > 0)
    train = manifest[manifest["split"] == "train"]
    assert 0 < len(train) < len(manifest)
    atlas = _volume(manifest.loc[0, "atlas_flair"])
    np.testing.assert_allclose(
        atlas, _expected_atlas(train["flair"], train["brain_mask"]), rtol=1e-5, atol=1e-6
    )
    # Averaging all patients instead would differ: the val/test patients' noise is not in it.
    assert not np.allclose(
        atlas, _expected_atlas(manifest["flair"], manifest["brain_mask"]), rtol=1e-5, atol=1e-6
    )
    assert (
        read_manifest(tmp_path / "derived" / "manifest.csv")["atlas_t1w"].tolist()
        == manifest["atlas_t1w"].tolist()
    )


def test_user_csv_atlas_needs_a_common_grid(tmp_path):
    csv, source = _user_csv(tmp_path, with_brain_mask=True)
    shifted = source.loc[source["patient_id"] == "P000"].iloc[0]
    for column in ("t1w", "gd_t1w", "t2w", "flair", "label", "brain_mask"):
        image = nib.load(shifted[column])
        save_nifti(np.asanyarray(image.dataobj), image.affine @ np.diag([1.2, 1, 1, 1]), shifted[column])
    table = pd.read_csv(csv).assign(split=["train"] * 5)
    table.to_csv(csv, index=False)
    with pytest.raises(ValueError, match="not on one common grid.*P000"):
        user_csv_cohort(csv, tmp_path / "derived", progress=False)

    partial = table.assign(atlas_t1=table["T1"])
    partial.to_csv(csv, index=False)
    with pytest.raises(ValueError, match="atlas columns must be given for every sequence"):
        user_csv_cohort(csv, tmp_path / "derived", progress=False)


def test_brats_layout_labels_atlas_and_resume(tmp_path):
    rng = np.random.default_rng(0)
    truth = {
        case: write_tiny_brats_case(tmp_path / "brats", case, rng)
        for case in ("BraTS_a", "BraTS_b", "BraTS_c", "BraTS_d")
    }
    assert sorted(find_brats_cases(tmp_path / "brats")) == sorted(truth)
    manifest = brats_cohort(tmp_path / "brats", tmp_path / "out", seed=0, progress=False)
    assert sorted(manifest["split"]) == ["test", "train", "train", "val"]
    for _, row in manifest.iterrows():
        label, files = truth[row["patient_id"]]
        np.testing.assert_array_equal(_volume(row["label"]), label)
        assert _volume(row["label"]).dtype == np.uint8
        assert row["gd_t1w"] == str(files["gd_t1w"])
    train = manifest[manifest["split"] == "train"]
    np.testing.assert_allclose(
        _volume(manifest.loc[0, "atlas_t2w"]),
        _expected_atlas(train["t2w"], train["brain_mask"]),
        rtol=1e-5,
        atol=1e-6,
    )
    # Resuming reuses every derived file.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.nii.gz")}
    again = brats_cohort(tmp_path / "brats", tmp_path / "out", seed=0, progress=False)
    pd.testing.assert_frame_equal(again, manifest)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.nii.gz")} == stamps
    # An edited source file is noticed: its case is derived again.
    label_a, files_a = truth["BraTS_a"]
    seg = _volume(files_a["seg"]).copy()
    seg[seg == 4] = 2
    save_nifti(seg, RAS_AFFINE, files_a["seg"])
    later = files_a["seg"].stat().st_mtime + 10  # robust to coarse file-system clocks
    os.utime(files_a["seg"], (later, later))
    updated = brats_cohort(tmp_path / "brats", tmp_path / "out", seed=0, progress=False)
    relabelled = _volume(updated.set_index("patient_id").loc["BraTS_a", "label"])
    np.testing.assert_array_equal(relabelled, np.where(label_a == 4, 2, label_a))


def test_brats_layout_problems_name_the_case(tmp_path):
    rng = np.random.default_rng(1)
    write_tiny_brats_case(tmp_path / "brats", "good", rng)
    _, files = write_tiny_brats_case(tmp_path / "brats", "odd_seg", rng, tumour_seg_value=3)
    _, missing = write_tiny_brats_case(tmp_path / "brats", "no_t2", rng)
    missing["t2w"].unlink()
    with pytest.raises(CohortValidationError, match="no_t2.*missing the t2w file"):
        brats_cohort(tmp_path / "brats", tmp_path / "out", progress=False)
    (tmp_path / "brats" / "no_t2" / "no_t2_seg.nii.gz").unlink()  # no longer a case
    with pytest.raises(CohortValidationError) as caught:
        brats_cohort(tmp_path / "brats", tmp_path / "out", progress=False)
    (error,) = caught.value.errors
    assert error.patient_id == "odd_seg" and error.path == str(files["seg"])
    assert "label value(s) [3] are not defined by the 'brats' convention" in error.problem


# ------------------------------------------------------------------------------------------
# Real BraTS 2018 cases (skipped without ../shared/data)

BRATS_SUBSET = ("Brats18_2013_3_1", "Brats18_TCIA01_201_1", "Brats18_TCIA10_628_1", "Brats18_TCIA13_623_1")


@pytest.fixture(scope="module")
def real_brats(brats_dir, tmp_path_factory):
    """Four real cases (linked, not copied) resolved once: derived labels, 2-case train atlas, validation."""
    root = tmp_path_factory.mktemp("brats")
    subset = root / "brats_subset"
    subset.mkdir()
    for case in BRATS_SUBSET:
        (subset / case).symlink_to(brats_dir / case, target_is_directory=True)
    manifest = resolve_cohort(subset, root / "cache", seed=0, progress=False)
    return manifest, brats_dir


@pytest.mark.slow  # its first use resolves the four cases (about 20 s on 2 cores)
@pytest.mark.realdata
def test_real_brats_label_map_follows_the_project_mapping(real_brats):
    manifest, brats_dir = real_brats
    assert sorted(manifest["patient_id"]) == sorted(BRATS_SUBSET)
    assert manifest["split"].value_counts().to_dict() == {"train": 2, "val": 1, "test": 1}
    row = manifest.set_index("patient_id").loc["Brats18_2013_3_1"]
    case = brats_dir / "Brats18_2013_3_1" / "Brats18_2013_3_1"
    seg = _volume(f"{case}_seg.nii.gz")
    sequences = [_volume(f"{case}_{s}.nii.gz") for s in ("t1", "t1ce", "t2", "flair")]
    label = _volume(row["label"])
    all_zero = np.all([s == 0 for s in sequences], axis=0)
    assert label.dtype == np.uint8
    assert set(np.unique(label).tolist()) == {0, 1, 2, 3, 4}
    np.testing.assert_array_equal(label == 0, all_zero)
    np.testing.assert_array_equal(label == 3, seg == 1)
    # Outside the brain wins over seg: this case has one seg-2 voxel where every sequence is 0.
    np.testing.assert_array_equal(label == 2, (seg == 2) & ~all_zero)
    assert int(((seg == 2) & all_zero).sum()) == 1
    np.testing.assert_array_equal(label == 4, seg == 4)
    np.testing.assert_array_equal(label == 1, (seg == 0) & ~all_zero)
    np.testing.assert_array_equal(_volume(row["brain_mask"]) > 0, ~all_zero)
    # The atlas comes from the two train cases only.
    record = json.loads((Path(manifest.loc[0, "atlas_t1w"]).parent / "atlas.json").read_text())
    assert record["patients"] == sorted(manifest.loc[manifest["split"] == "train", "patient_id"])


@pytest.mark.slow
@pytest.mark.realdata
def test_real_brats_instances(real_brats):
    manifest, _ = real_brats
    dataset = make_slice_dataset(manifest, "test", image_size=256, slice_selection="lesion", progress=False)
    assert len(dataset) > 10
    middle = len(dataset) // 2
    item, after = dataset[middle], dataset[middle + 1]
    assert after["slice_index"] == item["slice_index"] + 1  # consecutive lesion slices
    assert item["image"].shape == (4, 256, 256) and item["atlas"].shape == (12, 256, 256)
    assert item["mask"].shape == (5, 256, 256) and item["label"].shape == (1, 256, 256)
    torch.testing.assert_close(item["mask"].sum(0), torch.ones(256, 256))
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["label"].ge(2).any()
    # 240 x 240 BraTS planes are padded by 8 pixels on each side: background there.
    assert item["label"][0, :8].eq(0).all() and item["label"][0, -8:].eq(0).all()
    assert item["image"][:, :8].eq(-1).all()
    # Atlas layout: channel 3i+2 of slice z is channel 3i+1 of slice z+1, for every sequence i.
    for i in range(4):
        assert torch.equal(item["atlas"][3 * i + 2], after["atlas"][3 * i + 1])
        assert torch.equal(item["atlas"][3 * i + 1], after["atlas"][3 * i + 0])
        assert not torch.equal(item["atlas"][3 * i + 0], item["atlas"][3 * i + 2])


def test_user_csv_tissue_maps_are_optional_columns_checked_like_the_images(tmp_path):
    """Shin et al.'s input: tissue_<class> columns are resolved, kept in the manifest, and refused when
    partial or not probabilities (naming the patient, the file and the problem)."""
    csv, source = _user_csv(tmp_path, with_brain_mask=True)
    table = pd.read_csv(csv)
    rng = np.random.default_rng(0)
    for pid in source["patient_id"]:
        label = nib.load(source.loc[source["patient_id"] == pid, "label"].iloc[0])
        shares = rng.dirichlet(np.ones(3), size=label.shape).astype(np.float32)
        for k, tissue in enumerate(("csf", "gm", "wm")):
            save_nifti(shares[..., k], label.affine, tmp_path / "data" / pid / f"{pid}_{tissue}.nii.gz")
    for tissue in ("csf", "gm", "wm"):
        table[f"Tissue_{tissue.upper()}"] = [f"data/{p}/{p}_{tissue}.nii.gz" for p in table["patient_id"]]
    table.to_csv(csv, index=False)
    manifest = resolve_cohort(str(csv), tmp_path / "cache", progress=False)
    assert manifest["tissue_wm"].tolist() == [
        str(tmp_path / "data" / p / f"{p}_wm.nii.gz") for p in manifest["patient_id"]
    ]
    dataset = make_slice_dataset(manifest, "train", image_size=16, progress=False, with_tissue=True)
    assert dataset[0]["tissue"].shape == (3, 16, 16)

    broken = tmp_path / "data" / "P001" / "P001_gm.nii.gz"
    image = nib.load(broken)
    save_nifti(np.asanyarray(image.dataobj) * 100, image.affine, broken)
    with pytest.raises(
        CohortValidationError, match=r"P001.*P001_gm.nii.gz.*tissue_gm is not a probability map"
    ):
        resolve_cohort(str(csv), tmp_path / "cache", progress=False)
    table.drop(columns=["Tissue_GM"]).to_csv(csv, index=False)
    with pytest.raises(ValueError, match="tissue maps must be given for every class"):
        user_csv_cohort(csv, tmp_path / "derived", progress=False)
