"""The prepared GPU run works before a GPU is lent: its CPU dry run, its refusal without a GPU, and
the preparation of the real cohort it carries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_dry_run_measures_every_section_and_writes_few_files(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "2"}
    command = [sys.executable, "benchmarks/gpu_run.py", "--dry-run", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    variants = {(row["network"], row["variant"]) for row in summary["training"]}
    assert {
        ("cgsamr", "naive"),
        ("cgsamr", "optimized"),
        ("samr", "naive"),
        ("samr", "optimized"),
    } <= variants
    assert all(row["samples_per_s"] > 0 for row in summary["training"])
    assert summary["largest_batch"] >= 2
    assert [row["variant"] for row in summary["inference"]][:1] == ["naive"]
    assert summary["quality"]["epochs"] >= 1 and -1 <= summary["quality"]["mean_ssim"] <= 1
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8 and all(len(p.parts) <= 3 for p in files)
    assert {"summary.json", "table1_test.md", "metrics.json"} <= {str(p) for p in files}
    assert "targets: fastest CG-SAMR training" in result.stdout  # the closing table


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the real run would start")
def test_without_a_gpu_the_real_run_refuses_to_start(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_run.py", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 3 and "no GPU here" in result.stderr + result.stdout
    assert not list(tmp_path.iterdir())


def test_carried_cohort_is_cropped_and_quantized_on_the_same_world_grid(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_prepare_data import main

    rng = np.random.default_rng(0)
    affine = np.array([[-1.0, 0, 0, 10.0], [0, -1.0, 0, 20.0], [0, 0, 1.0, -5.0], [0, 0, 0, 1]])
    for case, centre in (("c1", 8), ("c2", 11)):
        folder = tmp_path / "in" / case
        folder.mkdir(parents=True)
        brain = np.zeros((20, 20, 10), bool)
        brain[centre - 4 : centre + 4, 6:14, 2:8] = True
        for suffix in ("t1", "t1ce", "t2", "flair"):
            volume = np.where(brain, rng.integers(100, 1000, brain.shape), 0).astype(np.int16)
            nib.save(nib.Nifti1Image(volume, affine), folder / f"{case}_{suffix}.nii.gz")
        seg = np.where(brain, 2, 0).astype(np.uint8)
        nib.save(nib.Nifti1Image(seg, affine), tmp_path / "in" / case / f"{case}_seg.nii.gz")
    assert main(["--source", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 0
    for case in ("c1", "c2"):
        original = nib.load(tmp_path / "in" / case / f"{case}_t1.nii.gz")
        cropped = nib.load(tmp_path / "out" / case / f"{case}_t1.nii.gz")
        assert cropped.shape == (15, 12, 10)  # the union box (4..14, 6..13, 2..7) plus a margin of 2
        # The same voxel of the brain has the same world position, and nearly the same intensity.
        world = affine @ np.array([9, 10, 5, 1])
        index = np.linalg.solve(cropped.affine, world)[:3].round().astype(int)
        value, reference = cropped.get_fdata()[tuple(index)], original.get_fdata()[9, 10, 5]
        assert abs(value - reference) <= 1000 / 255 + 1e-6
        seg_in = np.asanyarray(nib.load(tmp_path / "in" / case / f"{case}_seg.nii.gz").dataobj)
        seg_out = np.asanyarray(nib.load(tmp_path / "out" / case / f"{case}_seg.nii.gz").dataobj)
        assert seg_out.sum() == seg_in.sum()  # the whole lesion is kept
