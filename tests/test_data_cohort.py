"""Cohort resolution (source detection, validation on resolve), the ``medsynth cohort`` CLI, and
the end-to-end path from a generated phantom cohort to a DataLoader batch."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from cohort_helpers import write_tiny_cohort
from monai.data import DataLoader

from medsynth.cli import main
from medsynth.data.cohort import detect_source, phantom_cohort_dir, resolve_cohort
from medsynth.data.dataset import make_slice_dataset
from medsynth.data.manifest import read_manifest
from medsynth.errors import CohortValidationError
from medsynth.utils.io import save_nifti


def test_detect_source_and_the_error_listing_what_was_looked_for(tmp_path):
    ready = write_tiny_cohort(tmp_path / "ready", 2).parent
    (tmp_path / "brats" / "case1").mkdir(parents=True)
    (tmp_path / "brats" / "case1" / "case1_seg.nii.gz").write_bytes(b"")
    (tmp_path / "list.csv").write_text("patient_id,t1,label\n")
    (tmp_path / "empty").mkdir()
    assert detect_source(None) == detect_source("") == "phantom"
    assert detect_source(ready) == "ready"
    assert detect_source(tmp_path / "brats") == "brats"
    assert detect_source(tmp_path / "list.csv") == "csv"
    with pytest.raises(ValueError) as caught:
        detect_source(tmp_path / "empty")
    message = str(caught.value)
    assert str(tmp_path / "empty") in message and "is not a recognised dataset" in message
    for looked_for in ("manifest.csv", "<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz", ".csv file", "phantom"):
        assert looked_for in message
    with pytest.raises(ValueError, match="does not exist"):
        detect_source(tmp_path / "missing")


def test_resolving_validates_every_patient_and_records_success(tmp_path):
    folder = write_tiny_cohort(tmp_path / "cohort", 4).parent
    manifest = resolve_cohort(folder, tmp_path / "cache", progress=False)
    assert len(manifest) == 4 and manifest.loc[0, "t1w"].startswith(str(folder))
    assert len(list((tmp_path / "cache" / "validated").iterdir())) == 1
    save_nifti(
        torch.zeros(3, 3, 3).numpy(),
        [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
        manifest.loc[2, "flair"],
    )
    with pytest.raises(CohortValidationError, match="P002.*flair.*shape"):
        resolve_cohort(folder, tmp_path / "cache", progress=False)


def test_user_csv_is_resolved_into_the_cache(tmp_path):
    source = read_manifest(write_tiny_cohort(tmp_path / "data", 3, sequences=("t1w", "flair")))
    csv = tmp_path / "patients.csv"
    source[["patient_id", "t1w", "flair", "label"]].rename(columns={"t1w": "t1"}).to_csv(csv, index=False)
    manifest = resolve_cohort(csv, tmp_path / "cache", seed=2, progress=False)
    assert list(manifest.columns) == [
        "patient_id",
        "split",
        "t1w",
        "flair",
        "label",
        "brain_mask",
        "atlas_t1w",
        "atlas_flair",
    ]
    derived = list((tmp_path / "cache").glob("csv_*"))
    assert len(derived) == 1 and manifest.loc[0, "atlas_flair"].startswith(str(derived[0]))


def test_cli_writes_the_manifest_and_prints_the_summary(tmp_path, capsys):
    folder = write_tiny_cohort(tmp_path / "cohort", 7).parent
    out = tmp_path / "resolved.csv"
    assert main(["cohort", str(folder), "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sequences: t1w, gd_t1w, t2w, flair, aptw" in printed
    table = {line.split()[0]: line.split()[1:] for line in printed.splitlines()[2:]}
    # 7 patients -> 5/1/1; 6 slices each, 5 with brain (slice 0 is empty).
    assert (
        table["train"] == ["5", "30", "25"]
        and table["val"] == ["1", "6", "5"]
        and table["total"] == ["7", "42", "35"]
    )
    pd.testing.assert_frame_equal(read_manifest(out), read_manifest(folder / "manifest.csv"))
    assert main(["cohort", str(tmp_path / "nowhere"), "--cache-dir", str(tmp_path / "cache")]) == 2


@pytest.mark.slow
def test_phantom_cohort_to_a_dataloader_batch(tmp_path):
    shape = (32, 32, 5)
    manifest = resolve_cohort(None, tmp_path, seed=0, phantom_patients=3, phantom_shape=shape, progress=False)
    folder = phantom_cohort_dir(tmp_path, 0, 3, shape)
    assert folder.name == "phantom_0_3_32x32x5"
    assert sorted(manifest["split"]) == ["test", "train", "val"]
    stamp = (folder / "manifest.csv").stat().st_mtime_ns
    pd.testing.assert_frame_equal(
        resolve_cohort(None, tmp_path, seed=0, phantom_patients=3, phantom_shape=shape), manifest
    )
    assert (folder / "manifest.csv").stat().st_mtime_ns == stamp  # reused, not regenerated

    dataset = make_slice_dataset(manifest, "train", image_size=32, slice_selection="all", progress=False)
    assert len(dataset) == shape[2]
    batch = next(iter(DataLoader(dataset, batch_size=4, shuffle=False, num_workers=0)))
    assert batch["image"].shape == (4, 5, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["atlas"].shape == (4, 15, 32, 32)
    assert batch["mask"].shape == (4, 5, 32, 32)
    assert batch["label"].shape == (4, 1, 32, 32) and batch["label"].dtype == torch.int64
    assert batch["brain_mask"].shape == (4, 1, 32, 32)
    assert batch["window"].shape == (4, 5, 2)
    assert list(batch["slice_index"]) == [0, 1, 2, 3]
    assert len(batch["patient_id"]) == 4 and set(batch["patient_id"]) == set(
        manifest.loc[manifest["split"] == "train", "patient_id"]
    )
    torch.testing.assert_close(batch["mask"].sum(1), torch.ones(4, 32, 32))
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert max(int(dataset[i]["label"].max()) for i in range(len(dataset))) >= 2  # the phantom has a lesion

    # Other split fractions re-split the same patients, and the atlas follows the new train split.
    resplit = resolve_cohort(
        None, tmp_path, seed=0, split_fractions=(0.5, 0.5, 0.0), phantom_patients=3, phantom_shape=shape
    )
    assert "test" not in set(resplit["split"]) and list(tmp_path.glob("phantom_*")) == [folder]
    train = resplit.loc[resplit["split"] == "train", "t1w"]
    expected_atlas = np.mean([nib.load(p).get_fdata() for p in train], axis=0)
    np.testing.assert_allclose(
        nib.load(resplit.loc[0, "atlas_t1w"]).get_fdata(), expected_atlas, rtol=1e-5, atol=1e-5
    )


def test_concurrent_resolutions_generate_the_cohort_once(tmp_path, monkeypatch):
    # Two DDP ranks starting on an empty cache: one generates, the other waits and reuses.
    import threading
    import time

    import medsynth.data.phantom as phantom

    generate = phantom.generate_phantom_cohort
    calls, active, most_active = [], [0], [0]

    def slow_generate(*args, **kwargs):
        calls.append(args[0])
        active[0] += 1
        most_active[0] = max(most_active[0], active[0])
        time.sleep(0.5)  # a window in which an unguarded second caller would start generating too
        try:
            return generate(*args, **kwargs)
        finally:
            active[0] -= 1

    monkeypatch.setattr(phantom, "generate_phantom_cohort", slow_generate)
    results, errors = [], []

    def resolve():
        try:
            results.append(
                resolve_cohort(None, tmp_path, phantom_patients=3, phantom_shape=(24, 24, 4), progress=False)
            )
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=resolve) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(calls) == 1 and most_active[0] == 1
    pd.testing.assert_frame_equal(results[0], results[1])
