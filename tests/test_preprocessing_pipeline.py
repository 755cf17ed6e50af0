"""Per-patient pipeline: discovery, choices, resumable steps, and the real TCGA exam end to end."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import compute_dice

from medsynth.errors import InputDataError
from medsynth.utils.io import save_nifti
from preprocessing.pipeline import (
    STEP_MARKER,
    PipelineConfig,
    choose_hub,
    choose_reference,
    choose_skull_strip_sequence,
    discover_exam,
    run_step,
)
from preprocessing.runner import CohortConfig, run_cohort


def _nifti(path, shape=(8, 8, 4), zooms=(1.0, 1.0, 1.0), value=1.0):
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) * value
    save_nifti(data, np.diag([*zooms, 1.0]), path)
    return path


# -- discovery and choices -----------------------------------------------------------------------
def test_discover_exam_maps_aliases_and_ignores_truth(tmp_path):
    patient = tmp_path / "case_01"
    patient.mkdir()
    for name in ("t1c.nii.gz", "T2.nii.gz", "flair.nii", "t1c_brainmask_reference.nii.gz", "notes.txt"):
        (patient / name).write_bytes(b"x")
    (patient / "t1").mkdir()  # a DICOM folder
    (patient / "truth").mkdir()
    (patient / "truth" / "label.nii.gz").write_bytes(b"x")
    exam = discover_exam(patient)
    assert exam.patient_id == "case_01"
    assert list(exam.sequences) == ["t1w", "gd_t1w", "t2w", "flair"]
    assert exam.sequences["t1w"].is_dir() and exam.label is None
    assert (
        discover_exam(patient, label_globs=("truth/label.nii.gz",)).label
        == patient / "truth" / "label.nii.gz"
    )


def test_discover_exam_errors_name_the_patient(tmp_path):
    patient = tmp_path / "p7"
    patient.mkdir()
    with pytest.raises(InputDataError, match="p7.*no sequence"):
        discover_exam(patient)
    (patient / "t1ce.nii.gz").write_bytes(b"x")
    (patient / "gd_t1w.nii.gz").write_bytes(b"x")
    with pytest.raises(InputDataError, match="given twice"):
        discover_exam(patient)


def test_reference_hub_and_skull_strip_choices(tmp_path):
    assert choose_reference(["t1w", "gd_t1w", "aptw"]) == "aptw"
    assert choose_reference(["t1w", "gd_t1w", "t2w"]) == "gd_t1w"
    assert choose_reference(["t2w", "flair"]) == "t2w"
    assert choose_hub(["gd_t1w", "t2w", "aptw"], "aptw") == "t2w"
    assert choose_hub(["gd_t1w", "flair", "aptw"], "aptw") == "gd_t1w"
    assert choose_hub(["gd_t1w", "t2w"], "gd_t1w") == "gd_t1w"
    images = {
        "t2w": nib.load(_nifti(tmp_path / "a.nii.gz", zooms=(0.5, 0.5, 1.0))),
        "gd_t1w": nib.load(_nifti(tmp_path / "b.nii.gz", zooms=(1.0, 1.0, 1.0))),
        "aptw": nib.load(_nifti(tmp_path / "c.nii.gz", zooms=(0.1, 0.1, 0.1))),
    }
    assert choose_skull_strip_sequence(images) == "t2w"  # finest anatomical voxels; APTw never
    images["t2w"] = nib.load(_nifti(tmp_path / "d.nii.gz", zooms=(1.0, 1.0, 1.0)))
    assert choose_skull_strip_sequence(images) == "gd_t1w"  # tie: Gd-T1w preferred


def test_coregister_dict_transform_aligns_keys_to_the_reference():
    import scipy.ndimage as ndi

    from preprocessing.pipeline import CoRegisterd
    from preprocessing.registration import resample_to_reference, rigid_matrix

    rng = np.random.default_rng(0)
    shape = (40, 44, 30)
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij"))
    inside = np.sum((grid / np.array([15, 17, 12])[:, None, None, None]) ** 2, axis=0) < 1
    data = np.where(inside, 300 + 100 * ndi.gaussian_filter(rng.normal(size=shape), 1.5) * 5, 0).astype(
        np.float32
    )
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1)
    fixed = nib.Nifti1Image(data, affine)
    truth = rigid_matrix((0.0, 0.0, 5.0), (3.0, -2.0, 2.0))
    moving = resample_to_reference(fixed, fixed, truth)
    out = CoRegisterd(keys=["gd_t1w", "t2w"], reference_key="gd_t1w")({"gd_t1w": fixed, "t2w": moving})
    assert out["gd_t1w"] is fixed and out["t2w"].shape == fixed.shape
    np.testing.assert_allclose(out["t2w_to_reference"], np.linalg.inv(truth), atol=0.1)
    before = np.abs(np.asanyarray(moving.dataobj) - data)[inside].mean()
    after = np.abs(np.asanyarray(out["t2w"].dataobj) - data)[inside].mean()
    assert after < 0.5 * before


# -- resumable steps -----------------------------------------------------------------------------
def _copy_step(source, calls):
    def compute(step_dir):
        calls.append(1)
        data = np.asanyarray(nib.load(source).dataobj) * 2
        return {"doubled": save_nifti(data, np.eye(4), step_dir / "doubled.nii.gz")}, {
            "sum": float(data.sum())
        }

    return compute


def test_run_step_skips_reruns_and_tracks_inputs(tmp_path):
    source = _nifti(tmp_path / "in.nii.gz")
    calls: list[int] = []
    step = tmp_path / "work" / "double"
    first = run_step(step, "double", {"image": source}, {"factor": 2}, _copy_step(source, calls))
    assert not first.skipped and first.info["sum"] > 0 and len(calls) == 1
    marker = json.loads((step / STEP_MARKER).read_text())
    assert marker["step"] == "double" and marker["seconds"] >= 0 and "image" in marker["input_hashes"]
    assert run_step(step, "double", {"image": source}, {"factor": 2}, _copy_step(source, calls)).skipped
    (step / "doubled.nii.gz").unlink()  # a deleted output
    assert not run_step(step, "double", {"image": source}, {"factor": 2}, _copy_step(source, calls)).skipped
    assert not run_step(step, "double", {"image": source}, {"factor": 3}, _copy_step(source, calls)).skipped
    _nifti(source, value=5.0)  # changed input content
    assert not run_step(step, "double", {"image": source}, {"factor": 3}, _copy_step(source, calls)).skipped
    assert len(calls) == 4


def test_crash_mid_step_leaves_no_partial_file_and_no_marker(tmp_path):
    source = _nifti(tmp_path / "in.nii.gz", shape=(64, 64, 32))
    step = tmp_path / "work" / "crash"
    run_step(step, "crash", {"image": source}, {}, _copy_step(source, []))
    _nifti(source, shape=(64, 64, 32), value=3.0)  # new input: the step must rerun

    class Killed(BaseException):
        pass

    def crashing(step_dir):
        from medsynth.utils import io

        real_save = nib.save

        def save_then_die(img, filename):
            real_save(img, filename)  # the temporary file is complete on disk ...
            with open(filename, "r+b") as handle:
                handle.truncate(100)  # ... then the process is killed half-way through a rewrite
            raise Killed()

        io.nib.save = save_then_die
        try:
            save_nifti(np.ones((64, 64, 32), np.float32), np.eye(4), step_dir / "doubled.nii.gz")
        finally:
            io.nib.save = real_save
        return {}, {}

    with pytest.raises(Killed):
        run_step(step, "crash", {"image": source}, {}, crashing)
    assert not (step / STEP_MARKER).exists()
    assert sorted(os.listdir(step)) == ["doubled.nii.gz"]  # the old complete output, no temporary file
    assert nib.load(step / "doubled.nii.gz").shape == (64, 64, 32)
    calls: list[int] = []
    assert not run_step(step, "crash", {"image": source}, {}, _copy_step(source, calls)).skipped and calls


# -- the real TCGA exam ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.realdata
def test_tcga_exam_whole_pipeline(tcga_dir, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    os.symlink(tcga_dir, raw / "TCGA-FG-6692")
    config = CohortConfig(pipeline=PipelineConfig(), workers=1, atlas_iterations=1, progress=False)
    result = run_cohort(raw, tmp_path / "out", config)
    assert not result.failures, result.failures
    pid = "TCGA-FG-6692"
    out = tmp_path / "out" / pid
    summary = json.loads((out / "work" / "register" / STEP_MARKER).read_text())["info"]
    assert summary["reference"] == "gd_t1w"  # no APTw: Gd-T1w (t1c) is the reference
    reference = nib.load(tcga_dir / "t1c.nii.gz")
    for sequence in ("t1w", "gd_t1w", "t2w", "flair"):
        img = nib.load(out / f"{pid}_{sequence}.nii.gz")
        assert img.shape == reference.shape
        np.testing.assert_allclose(img.affine, reference.affine, atol=1e-4)
    mask = np.asanyarray(nib.load(out / f"{pid}_brainmask.nii.gz").dataobj) > 0
    expected = np.asanyarray(nib.load(tcga_dir / "t1c_brainmask_reference.nii.gz").dataobj) > 0
    dice = float(
        compute_dice(
            torch.as_tensor(mask[None, None]), torch.as_tensor(expected[None, None]), include_background=True
        )
    )
    assert dice >= 0.95, dice
    # Registration quality: the co-registered T2w agrees with the Gd-T1w inside the brain far better
    # than the header-only alignment does (normalized mutual information is contrast independent).
    from preprocessing.registration import resample_to_reference

    t2_registered = np.asanyarray(nib.load(out / "work" / "resample" / "t2w.nii.gz").dataobj)
    t2_header = np.asanyarray(resample_to_reference(nib.load(tcga_dir / "t2.nii.gz"), reference).dataobj)
    t1c = np.asanyarray(reference.dataobj).astype(np.float32)
    assert _nmi(t1c[expected], t2_registered[expected]) > _nmi(t1c[expected], t2_header[expected])


def _nmi(a: np.ndarray, b: np.ndarray, bins: int = 32) -> float:
    joint, _, _ = np.histogram2d(a, b, bins=bins)
    p = joint / joint.sum()
    px, py = p.sum(1), p.sum(0)

    def entropy(q):
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    return (entropy(px) + entropy(py)) / entropy(p.ravel())
