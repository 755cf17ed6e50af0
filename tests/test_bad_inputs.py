"""The reliability suite (issue 14): one test per kind of bad input and entry point. Each asserts
the exit code, that the message names the file, the patient and the problem, and that nothing
partial is left. The matrix is in docs/reliability.md."""

from __future__ import annotations

import numpy as np
import pytest
from cohort_helpers import write_tiny_brats_case, write_tiny_cohort

from medsynth.cli import main
from medsynth.data.manifest import read_manifest
from medsynth.utils.io import save_nifti


def _run(capfd, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capfd.readouterr()
    return code, captured.out + captured.err


def _one_clean_error(output: str, *needles: str) -> None:
    assert "Traceback" not in output
    for needle in needles:
        assert needle in output, (needle, output[-1500:])


def test_cohort_refuses_a_brats_seg_with_non_integer_values_and_writes_no_label(tmp_path, capfd):
    rng = np.random.default_rng(0)
    write_tiny_brats_case(tmp_path / "brats", "good", rng)
    _, files = write_tiny_brats_case(tmp_path / "brats", "fractional", rng, tumour_seg_value=3.6)
    cache = tmp_path / "cache"
    code, output = _run(capfd, "cohort", str(tmp_path / "brats"), "--cache-dir", str(cache))
    assert code == 2
    _one_clean_error(output, "fractional", "fractional_seg.nii.gz", "non-integer values", "never rounded")
    assert not list(cache.rglob("fractional*label*"))  # nothing half-derived for that case


@pytest.mark.parametrize("value, words", [(0.0, "is all zero"), (250.0, "is constant (250 everywhere)")])
def test_cohort_refuses_a_constant_sequence_naming_patient_and_file(tmp_path, capfd, value, words):
    manifest_path = write_tiny_cohort(tmp_path / "ready", num_patients=4)
    row = read_manifest(manifest_path).iloc[1]
    image_path = row["t2w"]
    save_nifti(np.full((24, 20, 6), value, np.float32), np.diag([1.0, 1.0, 2.0, 1.0]), image_path)
    code, output = _run(capfd, "cohort", str(tmp_path / "ready"), "--cache-dir", str(tmp_path / "cache"))
    assert code == 2
    _one_clean_error(output, row["patient_id"], "t2w", words)


def test_phantom_and_cohort_refuse_split_fractions_that_do_not_sum_to_one(tmp_path, capfd):
    out = tmp_path / "phantom"
    code, output = _run(
        capfd, "phantom", "--out", str(out), "--patients", "3", "--splits", "0.5", "0.5", "0.5"
    )
    assert code == 2
    _one_clean_error(output, "must sum to 1", "1.5")
    assert not out.exists() or not any(out.iterdir())  # nothing written
    cohort = ["cohort", "--cache-dir", str(tmp_path / "c"), "--phantom-patients", "3"]
    code, output = _run(
        capfd, *cohort, "--phantom-shape", "24", "24", "4", "--split-fractions", "0.6", "0.3", "0.3"
    )
    assert code == 2
    _one_clean_error(output, "must sum to 1")


def test_a_constant_sequence_is_refused_by_the_validation_every_source_shares(tmp_path):
    from medsynth.data.validation import validate_patient

    manifest = read_manifest(write_tiny_cohort(tmp_path / "ready", num_patients=2))
    row = manifest.iloc[0].to_dict()
    save_nifti(np.zeros((24, 20, 6), np.float32), np.diag([1.0, 1.0, 2.0, 1.0]), row["flair"])
    problems = validate_patient(row, ["t1w", "gd_t1w", "t2w", "flair", "aptw"])
    assert [p.path for p in problems] == [row["flair"]] and "all zero" in str(problems[0])
    assert problems[0].patient_id == row["patient_id"]
    assert not validate_patient(manifest.iloc[1].to_dict(), ["t1w", "gd_t1w", "t2w", "flair", "aptw"])


def test_phantom_out_on_an_existing_file_is_one_clean_line_and_debug_keeps_the_traceback(tmp_path, capfd):
    target = tmp_path / "a_file"
    target.write_text("not a folder")
    code, output = _run(capfd, "phantom", "--out", str(target), "--patients", "2", "--shape", "24", "24", "4")
    assert code == 2 and target.read_text() == "not a folder"
    _one_clean_error(output, str(target))
    with pytest.raises(OSError):
        main(["--debug", "phantom", "--out", str(target), "--patients", "2", "--shape", "24", "24", "4"])


@pytest.mark.parametrize("where", ["same", "inside", "file"])
def test_preprocessing_refuses_an_output_that_overlaps_the_input_or_is_a_file(tmp_path, capfd, where):
    from preprocessing.cli import main as preprocessing_main

    raw = tmp_path / "raw"
    (raw / "P001").mkdir(parents=True)
    output = {"same": raw, "inside": raw / "derived", "file": tmp_path / "out.txt"}[where]
    if where == "file":
        output.write_text("x")
    code = preprocessing_main(["run", "--input", str(raw), "--output", str(output)])
    captured = capfd.readouterr()
    text = captured.out + captured.err
    assert code == 2 and "Traceback" not in text
    assert ("is a file" if where == "file" else "overlap") in text
    assert sorted(p.name for p in raw.iterdir()) == ["P001"]  # nothing written into the raw folder
