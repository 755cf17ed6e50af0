"""Manifest CSV: relative paths on disk, absolute in memory; patient-level, seeded splits."""

from __future__ import annotations

import os

import pandas as pd
import pytest
from cohort_helpers import write_tiny_cohort

from medsynth.data.manifest import (
    check_patient_level_split,
    path_columns,
    read_manifest,
    sequences_of,
    split_patients,
    write_manifest,
)


def test_manifest_round_trip_stores_relative_paths_and_reads_absolute(tmp_path):
    manifest_path = write_tiny_cohort(tmp_path / "cohort", num_patients=3)
    manifest = read_manifest(manifest_path)
    columns = path_columns(sequences_of(manifest))
    assert sequences_of(manifest) == ("t1w", "gd_t1w", "t2w", "flair", "aptw")
    for column in columns:
        assert all(os.path.isabs(p) and os.path.isfile(p) for p in manifest[column]), column

    on_disk = pd.read_csv(manifest_path, dtype=str)
    assert on_disk.loc[0, "t1w"] == "P000/P000_t1w.nii.gz"
    assert on_disk.loc[0, "atlas_flair"] == "atlas/atlas_flair.nii.gz"

    # Written elsewhere, the same files are reached through other relative paths.
    moved = write_manifest(manifest, tmp_path / "elsewhere" / "manifest.csv")
    assert pd.read_csv(moved, dtype=str).loc[0, "label"] == "../cohort/P000/P000_label.nii.gz"
    again = read_manifest(moved)
    pd.testing.assert_frame_equal(again, manifest)

    # Moving the whole cohort folder keeps the manifest valid.
    (tmp_path / "cohort").rename(tmp_path / "moved_cohort")
    relocated = read_manifest(tmp_path / "moved_cohort" / "manifest.csv")
    assert relocated.loc[2, "brain_mask"] == str(
        (tmp_path / "moved_cohort" / "P002" / "P002_brainmask.nii.gz").resolve()
    )


def test_split_is_deterministic_patient_level_and_order_independent():
    ids = [f"case{i:02d}" for i in range(20)]
    first = split_patients(ids, (0.7, 0.15, 0.15), seed=3)
    assert first == split_patients(list(reversed(ids)), (0.7, 0.15, 0.15), seed=3)
    counts = pd.Series(first).value_counts()
    assert (counts["train"], counts["val"], counts["test"]) == (14, 3, 3)
    assert set(first) == set(ids)
    other = split_patients(ids, (0.7, 0.15, 0.15), seed=4)
    assert other != first  # the seed matters


def test_manifest_with_a_patient_in_two_splits_is_rejected(tmp_path):
    manifest = read_manifest(write_tiny_cohort(tmp_path / "cohort", num_patients=3))
    leaking = pd.concat(
        [manifest, manifest.iloc[[0]].assign(split="test" if manifest.loc[0, "split"] != "test" else "val")]
    )
    with pytest.raises(ValueError, match="patient-level split violated.*P000"):
        check_patient_level_split(leaking)
    with pytest.raises(ValueError, match="P000"):
        write_manifest(leaking, tmp_path / "leak.csv")
    leaking.to_csv(tmp_path / "leak.csv", index=False)
    with pytest.raises(ValueError, match="P000"):
        read_manifest(tmp_path / "leak.csv")
