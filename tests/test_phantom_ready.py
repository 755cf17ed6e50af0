"""The phantom cohort's ``ready`` layout: determinism, labels, contrast, atlas, manifest, resume."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medsynth.constants import CLINICAL_SEQUENCES, atlas_column
from medsynth.data.manifest import read_manifest, split_patients
from medsynth.data.phantom import CONTRAST_TABLE, generate_phantom_cohort, ready_paths, reference_grid
from medsynth.data.phantom.acquisition import acquire_ready
from medsynth.data.phantom.cohort import COMPLETE_MARKER
from medsynth.data.phantom.patient import PhantomPatient

SHAPE = (64, 64, 8)
SEED = 7


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom_ready")
    manifest_path = generate_phantom_cohort(out, 3, seed=SEED, shape=SHAPE, progress=False)
    return out, manifest_path


def _load(path):
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine


def _patient_arrays(out, pid):
    return {column: _load(path)[0] for column, path in ready_paths(out, pid).items() if column != "montage"}


def test_manifest_reads_back_with_patient_level_splits(cohort):
    out, manifest_path = cohort
    manifest = read_manifest(manifest_path)
    expected_columns = ["patient_id", "split", *CLINICAL_SEQUENCES, "label", "brain_mask"]
    expected_columns += ["tissue_csf", "tissue_gm", "tissue_wm"]  # ground truth for Shin et al.
    expected_columns += [atlas_column(s) for s in CLINICAL_SEQUENCES]
    assert list(manifest.columns) == expected_columns
    assert list(manifest["patient_id"]) == ["phantom_000", "phantom_001", "phantom_002"]
    assert dict(zip(manifest["patient_id"], manifest["split"], strict=True)) == split_patients(
        manifest["patient_id"], (0.7, 0.15, 0.15), SEED
    )
    for column in expected_columns[2:]:
        assert all(p and (out / p).resolve().is_file() for p in manifest[column]), column
    # On disk the paths are relative to the CSV, so the cohort folder can move.
    assert "phantom_000/phantom_000_t1w.nii.gz" in manifest_path.read_text()


def test_files_share_grid_and_types(cohort):
    out, _ = cohort
    grid = reference_grid(SHAPE)
    for pid in ("phantom_000", "phantom_001", "phantom_002"):
        for column, path in ready_paths(out, pid).items():
            if column == "montage":
                assert path.stat().st_size > 10_000
                continue
            image = nib.load(path)
            assert image.shape == SHAPE
            np.testing.assert_allclose(image.affine, grid.affine, atol=1e-5)
            expected = np.uint8 if column in ("label", "brain_mask") else np.float32
            assert image.get_data_dtype() == expected, (pid, column)
    # RAS, axial, the papers' slab field of view (209.92 x 209.92 x 66 mm).
    spacing = np.sqrt((grid.affine[:3, :3] ** 2).sum(axis=0))
    np.testing.assert_allclose(spacing * SHAPE, (209.92, 209.92, 66.0), rtol=1e-6)
    assert np.all(np.diag(grid.affine)[:3] > 0)


def test_labels_classes_and_brain(cohort):
    out, _ = cohort
    for pid in ("phantom_000", "phantom_001", "phantom_002"):
        arrays = _patient_arrays(out, pid)
        label, mask = arrays["label"], arrays["brain_mask"]
        assert set(np.unique(label)) <= {0, 1, 2, 3, 4}
        np.testing.assert_array_equal(mask, (label > 0).astype(np.uint8))
        for value in (2, 3, 4):
            assert (label == value).sum() > 0, f"{pid} lacks label {value}"
        # The lesion lies inside the brain and is a minority of it.
        assert 0 < (label >= 2).sum() < 0.5 * (label > 0).sum()
        # Skull-stripped: every sequence is zero outside the brain, and has signal inside it.
        for sequence in CLINICAL_SEQUENCES:
            image = arrays[sequence]
            assert np.all(np.isfinite(image))
            assert np.all(image[label == 0] == 0)
            if sequence != "aptw":
                assert np.median(image[label == 1]) > 100


def test_contrast_model_ordering_in_images(cohort):
    out, _ = cohort
    for pid in ("phantom_000", "phantom_001", "phantom_002"):
        arrays = _patient_arrays(out, pid)
        label = arrays["label"]
        normal, edema, tumor = (label == 1), (label == 2), (label == 4)

        def mean(sequence, region, arrays=arrays):
            return float(arrays[sequence][region].mean())

        assert mean("flair", edema) > 1.3 * mean("flair", normal)
        assert mean("t2w", edema) > 1.2 * mean("t2w", normal)
        assert mean("t1w", edema) < mean("t1w", normal)
        assert mean("gd_t1w", tumor) > 1.4 * mean("gd_t1w", normal)
        assert abs(mean("aptw", normal)) < 0.7
        assert mean("aptw", tumor) > 2.0
        assert mean("aptw", normal) < mean("aptw", edema) < mean("aptw", tumor)


def test_contrast_table_is_radiologically_ordered():
    def low(sequence, tissue):
        return CONTRAST_TABLE[sequence][tissue].mean_low

    def high(sequence, tissue):
        return CONTRAST_TABLE[sequence][tissue].mean_high

    # Every patient draw keeps these orders because the ranges do not overlap.
    assert low("t1w", "wm") > high("t1w", "gm") > high("t1w", "csf")
    assert low("t2w", "csf") > high("t2w", "gm") and low("t2w", "gm") > high("t2w", "wm")
    assert high("flair", "csf") < low("flair", "wm") and high("flair", "wm") < low("flair", "gm")
    assert low("flair", "edema") > high("flair", "gm") and low("t2w", "edema") > high("t2w", "gm")
    assert high("t1w", "edema") < low("t1w", "gm")
    assert low("gd_t1w", "tumor") > high("gd_t1w", "wm")
    assert high("gd_t1w", "cavity") < low("gd_t1w", "gm")
    assert low("t2w", "cavity") > high("t2w", "edema") and high("flair", "cavity") < low("flair", "edema")
    assert high("aptw", "wm") <= 0.5 and high("aptw", "gm") <= 0.5 and low("aptw", "wm") >= -0.5
    assert 2.5 <= low("aptw", "tumor") and high("aptw", "tumor") <= 4.5
    assert high("aptw", "gm") < low("aptw", "edema") and high("aptw", "edema") < low("aptw", "tumor")


def test_atlas_is_mean_of_train_split(cohort):
    _, manifest_path = cohort
    manifest = read_manifest(manifest_path)
    train = manifest[manifest["split"] == "train"]
    assert len(train) >= 1
    for sequence in CLINICAL_SEQUENCES:
        atlas_file = manifest[atlas_column(sequence)].iloc[0]
        atlas, affine = _load(atlas_file)
        assert atlas.dtype == np.float32
        np.testing.assert_allclose(affine, reference_grid(SHAPE).affine, atol=1e-5)
        expected = np.mean([_load(path)[0].astype(np.float64) for path in train[sequence]], axis=0)
        np.testing.assert_allclose(atlas, expected, rtol=1e-5, atol=1e-4)


def test_patients_are_deterministic_and_independent_of_cohort_size(cohort, tmp_path):
    out, _ = cohort
    generate_phantom_cohort(tmp_path, 2, seed=SEED, shape=SHAPE, progress=False)
    for column, array in _patient_arrays(out, "phantom_001").items():
        np.testing.assert_array_equal(_patient_arrays(tmp_path, "phantom_001")[column], array, err_msg=column)


def test_seed_changes_patient():
    first = acquire_ready(PhantomPatient.create(SEED, 0, SHAPE), SHAPE)
    again = acquire_ready(PhantomPatient.create(SEED, 0, SHAPE), SHAPE)
    other = acquire_ready(PhantomPatient.create(SEED + 1, 0, SHAPE), SHAPE)
    np.testing.assert_array_equal(first.images["flair"], again.images["flair"])
    np.testing.assert_array_equal(first.label, again.label)
    assert (first.label != other.label).mean() > 0.01
    assert not np.allclose(first.images["t1w"], other.images["t1w"])


def test_rerun_skips_complete_and_redoes_incomplete_patients(tmp_path):
    generate_phantom_cohort(tmp_path, 2, seed=3, shape=SHAPE, progress=False)
    paths0, paths1 = ready_paths(tmp_path, "phantom_000"), ready_paths(tmp_path, "phantom_001")
    stamps0 = {c: p.stat().st_mtime_ns for c, p in paths0.items()}
    original1 = _patient_arrays(tmp_path, "phantom_001")
    # Simulate a job killed while writing phantom_001: no marker, one file missing.
    (tmp_path / "phantom_001" / COMPLETE_MARKER).unlink()
    paths1["t2w"].unlink()
    generate_phantom_cohort(tmp_path, 2, seed=3, shape=SHAPE, progress=False)
    assert {c: p.stat().st_mtime_ns for c, p in paths0.items()} == stamps0
    redone = _patient_arrays(tmp_path, "phantom_001")
    for column, array in original1.items():
        np.testing.assert_array_equal(redone[column], array, err_msg=column)
    marker = json.loads((tmp_path / "phantom_001" / COMPLETE_MARKER).read_text())
    assert "phantom_001_t2w.nii.gz" in marker["files"]


def test_other_settings_in_same_folder_are_refused(tmp_path):
    generate_phantom_cohort(tmp_path, 1, seed=3, shape=SHAPE, progress=False)
    with pytest.raises(ValueError, match="phantom.json"):
        generate_phantom_cohort(tmp_path, 1, seed=4, shape=SHAPE, progress=False)


def test_single_patient_is_train_and_is_the_atlas(tmp_path):
    manifest = read_manifest(generate_phantom_cohort(tmp_path, 1, seed=3, shape=SHAPE, progress=False))
    assert list(manifest["split"]) == ["train"]
    atlas, _ = _load(manifest["atlas_flair"].iloc[0])
    np.testing.assert_allclose(atlas, _load(manifest["flair"].iloc[0])[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_patients": 0}, "num_patients"),
        ({"layout": "bids"}, "layout"),
        ({"shape": (64, 64)}, "shape"),
        ({"workers": 0}, "workers"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    arguments = {"num_patients": 1, "shape": SHAPE, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_phantom_cohort(tmp_path, **arguments)


def test_documented_contrast_table_matches_code():
    from pathlib import Path

    from medsynth.data.phantom import contrast_table_markdown

    doc = (Path(__file__).resolve().parents[1] / "docs" / "phantom.md").read_text()
    documented = doc.split("<!-- contrast-table:start -->")[1].split("<!-- contrast-table:end -->")[0]
    assert documented.strip() == contrast_table_markdown().strip()


@pytest.mark.slow
def test_worker_count_does_not_change_patients(cohort, tmp_path):
    out, _ = cohort
    generate_phantom_cohort(tmp_path, 3, seed=SEED, shape=SHAPE, workers=2, progress=False)
    for pid in ("phantom_000", "phantom_001", "phantom_002"):
        parallel = _patient_arrays(tmp_path, pid)
        for column, array in _patient_arrays(out, pid).items():
            np.testing.assert_array_equal(parallel[column], array, err_msg=f"{pid} {column}")
    assert (tmp_path / "manifest.csv").read_text() == (out / "manifest.csv").read_text()


def test_template_loads_without_network(monkeypatch):
    import socket

    from medsynth.data.phantom.anatomy import load_template

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    load_template.cache_clear()
    template = load_template()
    gm, wm, brain = template.maps
    assert brain.sum() > 1.5e6  # about 1.9 litres of 1 mm voxels
    assert np.all(gm + wm <= brain + 1e-5)
    assert wm[brain > 0].mean() > 0.2 and gm[brain > 0].mean() > 0.2
