"""The reliability suite (issue 14): one test per kind of bad input and entry point. Each asserts
the exit code, that the message names the file, the patient and the problem, and that nothing
partial is left. The matrix is in docs/reliability.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bundle_helpers import TINY_DATA, TINY_NETWORKS, TINY_TRAINING
from cohort_helpers import write_tiny_brats_case, write_tiny_cohort

from medsynth.cli import main
from medsynth.data.manifest import read_manifest
from medsynth.utils.io import save_nifti

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file")


def _run(*argv: str, module: str = "medsynth.cli") -> tuple[int, str]:
    """The command line as a user runs it: its own process (so its logging is its own), from the
    repository root; returns the exit code and everything it printed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", module, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    return result.returncode, result.stdout + result.stderr


def _one_clean_error(output: str, *needles: str) -> None:
    assert "Traceback" not in output
    for needle in needles:
        assert needle in output, (needle, output[-1500:])


def test_cohort_refuses_a_brats_seg_with_non_integer_values_and_writes_no_label(tmp_path):
    rng = np.random.default_rng(0)
    write_tiny_brats_case(tmp_path / "brats", "good", rng)
    _, files = write_tiny_brats_case(tmp_path / "brats", "fractional", rng, tumour_seg_value=3.6)
    cache = tmp_path / "cache"
    code, output = _run("cohort", str(tmp_path / "brats"), "--cache-dir", str(cache))
    assert code == 2
    _one_clean_error(output, "fractional", "fractional_seg.nii.gz", "non-integer values", "never rounded")
    assert not list(cache.rglob("fractional*label*"))  # nothing half-derived for that case


@pytest.mark.parametrize("value, words", [(0.0, "is all zero"), (250.0, "is constant (250 everywhere)")])
def test_cohort_refuses_a_constant_sequence_naming_patient_and_file(tmp_path, value, words):
    manifest_path = write_tiny_cohort(tmp_path / "ready", num_patients=4)
    row = read_manifest(manifest_path).iloc[1]
    image_path = row["t2w"]
    save_nifti(np.full((24, 20, 6), value, np.float32), np.diag([1.0, 1.0, 2.0, 1.0]), image_path)
    code, output = _run("cohort", str(tmp_path / "ready"), "--cache-dir", str(tmp_path / "cache"))
    assert code == 2
    _one_clean_error(output, row["patient_id"], "t2w", words)


def test_phantom_and_cohort_refuse_split_fractions_that_do_not_sum_to_one(tmp_path):
    out = tmp_path / "phantom"
    code, output = _run("phantom", "--out", str(out), "--patients", "3", "--splits", "0.5", "0.5", "0.5")
    assert code == 2
    _one_clean_error(output, "must sum to 1", "1.5")
    assert not out.exists() or not any(out.iterdir())  # nothing written
    cohort = ["cohort", "--cache-dir", str(tmp_path / "c"), "--phantom-patients", "3"]
    code, output = _run(*cohort, "--phantom-shape", "24", "24", "4", "--split-fractions", "0.6", "0.3", "0.3")
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


def test_phantom_out_on_an_existing_file_is_one_clean_line_and_debug_keeps_the_traceback(tmp_path):
    target = tmp_path / "a_file"
    target.write_text("not a folder")
    code, output = _run("phantom", "--out", str(target), "--patients", "2", "--shape", "24", "24", "4")
    assert code == 2 and target.read_text() == "not a folder"
    _one_clean_error(output, str(target))
    with pytest.raises(OSError):
        main(["--debug", "phantom", "--out", str(target), "--patients", "2", "--shape", "24", "24", "4"])


@pytest.mark.parametrize("where", ["same", "inside", "file"])
def test_preprocessing_refuses_an_output_that_overlaps_the_input_or_is_a_file(tmp_path, where):
    raw = tmp_path / "raw"
    (raw / "P001").mkdir(parents=True)
    output = {"same": raw, "inside": raw / "derived", "file": tmp_path / "out.txt"}[where]
    if where == "file":
        output.write_text("x")
    code, text = _run("run", "--input", str(raw), "--output", str(output), module="preprocessing")
    assert code == 2 and "Traceback" not in text
    assert ("is a file" if where == "file" else "overlap") in text
    assert sorted(p.name for p in raw.iterdir()) == ["P001"]  # nothing written into the raw folder


# -- trained models: weights files and inference masks -----------------------------------------------
TINY_SYNTHESIS = {**TINY_DATA, **TINY_NETWORKS["cg_samr"]}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, tiny_phantom_cache) -> dict:
    """Tiny trained CG-SAMR and SAMR runs (one epoch) on the tiny phantom."""
    import os
    from pathlib import Path

    from monai.bundle import run

    from medsynth.utils.bundles import bundle_config_files

    repo = Path(__file__).resolve().parents[1]
    os.chdir(repo)
    root = tmp_path_factory.mktemp("runs")
    train = {**TINY_SYNTHESIS, **TINY_TRAINING}
    runs = {}
    for name in ("cg_samr", "samr"):
        runs[name] = root / name
        files = bundle_config_files(repo / "bundles" / name, "train")
        run(config_file=files, output_dir=str(runs[name]), cache_dir=tiny_phantom_cache, **train)
    return {"runs": runs, "cache": tiny_phantom_cache, "repo": repo}


def _synthesize(tiny_runs, run_dir, *extra: str) -> tuple[int, str]:
    settings = [f"{k}={json.dumps(v)}" for k, v in TINY_SYNTHESIS.items()]
    settings += [f"cache_dir={tiny_runs['cache']}", f"inference_dir={run_dir.parent / 'inference_out'}"]
    return _run("synthesize", "--output-dir", str(run_dir), *extra, "--set", *settings)


def test_weights_of_another_bundle_are_refused_with_the_bundle_that_fits(tiny_runs, monkeypatch):
    monkeypatch.chdir(tiny_runs["repo"])
    code, output = _synthesize(tiny_runs, tiny_runs["runs"]["samr"], "--bundle", "bundles/cg_samr")
    assert code == 2
    _one_clean_error(
        output, "model.pt", "hold a SAMR generator", "builds a CG-SAMR generator", "use bundles/samr"
    )
    assert "Missing key" not in output and "state_dict" not in output


@pytest.mark.parametrize(
    "damage, words", [("empty", "is an empty file"), ("truncated", "not a readable PyTorch")]
)
def test_empty_or_truncated_weights_are_named_as_such(tiny_runs, monkeypatch, tmp_path, damage, words):
    import shutil

    monkeypatch.chdir(tiny_runs["repo"])
    run_dir = tmp_path / "damaged"
    shutil.copytree(tiny_runs["runs"]["cg_samr"], run_dir)
    weights = run_dir / "models" / "model.pt"
    weights.write_bytes(b"" if damage == "empty" else weights.read_bytes()[:200])
    code, output = _synthesize(tiny_runs, run_dir)
    assert code == 2
    _one_clean_error(output, str(weights), words)


def test_a_model_built_with_other_settings_names_the_difference(tiny_runs, monkeypatch):
    monkeypatch.chdir(tiny_runs["repo"])
    code, output = _run("synthesize", "--output-dir", str(tiny_runs["runs"]["cg_samr"]), "--set",
                        *[f"{k}={json.dumps(v)}" for k, v in {**TINY_SYNTHESIS, "base_width": 8}.items()],
                        f"cache_dir={tiny_runs['cache']}")  # fmt: skip
    assert code == 2
    _one_clean_error(output, "built with other settings", "reshaped", "base_width")


def test_an_inference_mask_with_non_integer_values_is_refused(tiny_runs, monkeypatch, tmp_path):
    import nibabel as nib

    from medsynth.data.cohort import resolve_cohort

    monkeypatch.chdir(tiny_runs["repo"])
    manifest = resolve_cohort(
        "", tiny_runs["cache"], phantom_patients=3, phantom_shape=(40, 40, 6), progress=False
    )
    source = nib.load(manifest.iloc[0]["label"])
    data = source.get_fdata().astype(np.float32)
    data[data == 2] = 1.5
    mask = tmp_path / "mask_1_5.nii.gz"
    nib.save(nib.Nifti1Image(data, source.affine), mask)
    code, output = _synthesize(tiny_runs, tiny_runs["runs"]["cg_samr"], "--mask-file", str(mask))
    assert code == 2
    _one_clean_error(output, "mask_1_5.nii.gz", "non-integer values [1.5]")
    assert not (tmp_path / "inference_out").exists()


def test_brats_folders_without_seg_and_unmatched_files_are_listed_with_a_warning(tmp_path):
    rng = np.random.default_rng(0)
    for case in ("a", "b"):
        write_tiny_brats_case(tmp_path / "brats", case, rng)
    _, files = write_tiny_brats_case(tmp_path / "brats", "no_seg", rng)
    Path(files["seg"]).unlink()
    extra = tmp_path / "brats" / "a" / "a_T2_TSE_axial.nii.gz"
    extra.write_bytes(Path(files["t2w"]).read_bytes())
    code, output = _run("cohort", str(tmp_path / "brats"), "--cache-dir", str(tmp_path / "cache"),
                        "--split-fractions", "0.5", "0", "0.5")  # fmt: skip
    assert code == 0, output[-2000:]
    assert "1 folder(s) without a <case>_seg.nii.gz are left out of the cohort: no_seg" in output
    assert "match no BraTS sequence" in output and "a/a_T2_TSE_axial.nii.gz" in output


def test_the_temporary_files_of_a_killed_write_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "P001_t1w.nii.gz"
    leftover = tmp_path / ".P001_t1w.nii.gz.k1ll3d.nii.gz"  # what a kill during save_nifti leaves
    leftover.write_bytes(b"half")
    other = tmp_path / ".P002_t1w.nii.gz.busy.nii.gz"  # another file's temporary: not touched
    other.write_bytes(b"x")
    save_nifti(np.zeros((2, 2, 2), np.float32), np.eye(4), target)
    assert target.is_file() and not leftover.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, target.name]


def test_preprocessing_refuses_a_patient_lacking_a_sequence_the_others_have():
    from preprocessing.runner import cohort_sequences

    kept, lacking, dropped = cohort_sequences(
        {"P1": ["t1w", "flair", "aptw"], "P2": ["t1w", "flair"], "P3": ["t1w", "flair"], "P4": ["t1w"]}
    )
    assert kept == ["t1w", "flair"]  # more than half the patients have them
    assert lacking == {"P4": ["flair"]}  # refused by name, with what it lacks
    assert dropped == {"aptw": ["P1"]}  # too rare: left out of the cohort, said once
    assert cohort_sequences({"P1": ["t1w"], "P2": ["t1w"]}) == (["t1w"], {}, {})
    # A tie keeps the patients: the sequence half of them have is dropped.
    assert cohort_sequences({"P1": ["t1w", "aptw"], "P2": ["t1w"]}) == (["t1w"], {}, {"aptw": ["P1"]})
    # --drop-incomplete-sequences: every patient kept, the cohort has what all of them have.
    kept, lacking, dropped = cohort_sequences(
        {"P1": ["t1w", "flair", "aptw"], "P2": ["t1w", "flair"], "P3": ["t1w", "flair"], "P4": ["t1w"]},
        drop_incomplete=True,
    )
    assert (kept, lacking) == (["t1w"], {}) and dropped == {"flair": ["P1", "P2", "P3"], "aptw": ["P1"]}


def test_an_unwritable_output_folder_is_named_before_any_work(tmp_path):
    place = Path("/sys/medsynth_cannot_write_here")
    try:
        place.mkdir()
        place.rmdir()
        pytest.skip("/sys is writable here: no unwritable place to try")
    except OSError:
        pass
    code, output = _run("phantom", "--out", str(place), "--patients", "2", "--shape", "24", "24", "4")
    assert code == 2
    _one_clean_error(output, "phantom output folder /sys/medsynth_cannot_write_here cannot be written")


def test_a_bundle_run_by_monai_says_the_input_problem_in_one_line_before_monais_traceback(tmp_path):
    missing = tmp_path / "no_such_dataset"
    config = "bundles/lesion_seg/configs/train.json"
    arguments = [
        "--config_file",
        config,
        "--dataset_dir",
        str(missing),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    code, output = _run("run", *arguments, module="monai.bundle")
    assert code != 0
    ours = [line for line in output.splitlines() if "ERROR" in line and str(missing) in line]
    assert ours, output[-2000:]
    assert output.index(ours[0]) < output.index("Traceback")  # said clearly before MONAI's wrapping


def test_a_truncated_brats_file_is_named_before_anything_is_derived(tmp_path):
    rng = np.random.default_rng(0)
    for case in ("a", "b", "c"):
        _, files = write_tiny_brats_case(tmp_path / "brats", case, rng)
    broken = Path(files["t1w"])
    broken.write_bytes(broken.read_bytes()[: len(broken.read_bytes()) // 2])  # a copy that stopped half-way
    cache = tmp_path / "cache"
    code, output = _run("cohort", str(tmp_path / "brats"), "--cache-dir", str(cache))
    assert code == 2
    _one_clean_error(output, "c_t1.nii.gz", "patient c", "cannot read voxel data")
    assert not list(cache.rglob("*label*")) and not list(cache.rglob("atlas_*"))  # no half-built cache


def test_a_nan_sequence_in_a_csv_cohort_is_named_as_such(tmp_path):
    manifest = read_manifest(write_tiny_cohort(tmp_path / "data", num_patients=4))
    csv = tmp_path / "cohort.csv"
    manifest[["patient_id", "t1w", "gd_t1w", "t2w", "flair", "aptw", "label"]].to_csv(csv, index=False)
    volume = np.ones((24, 20, 6), np.float32)
    volume[3, 3, 3] = np.nan
    save_nifti(volume, np.diag([1.0, 1.0, 2.0, 1.0]), manifest.iloc[2]["flair"])
    code, output = _run("cohort", str(csv), "--cache-dir", str(tmp_path / "cache"))
    assert code == 2
    _one_clean_error(output, manifest.iloc[2]["patient_id"], "flair", "NaN/inf")
    assert "p99.5" not in output


def test_a_raw_exam_file_named_unexpectedly_is_listed_with_a_warning(tmp_path, caplog):
    from preprocessing.pipeline import discover_exam

    patient = tmp_path / "P001"
    patient.mkdir()
    for name in ("t1c.nii.gz", "flair.nii.gz", "T2_TSE_axial.nii.gz", "notes.txt"):
        (patient / name).write_bytes(b"")
    with caplog.at_level("WARNING"):
        exam = discover_exam(patient)
    assert list(exam.sequences) == ["gd_t1w", "flair"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "P001: T2_TSE_axial.nii.gz match(es) no sequence role" in warnings[0]
    assert "notes.txt" not in warnings[0]


def test_weights_saved_by_an_older_release_still_load_through_the_check(tmp_path):
    """The generators rename medsynth 0.1's parameter names when loading; the check must let them."""
    import torch

    from medsynth.networks import CGSAMRGenerator, SynthesisInferenceNetwork
    from medsynth.utils.checkpoints import load_checked_weights

    torch.manual_seed(0)
    source = SynthesisInferenceNetwork(
        CGSAMRGenerator(5, base_width=4, num_res_blocks=1), with_confidence=True
    )
    renames = {
        "encoder.mask_encoder.": "mask_encoder.",
        "trunk.": "res_blocks.",
        "decoder.branches.": "branches.",
    }
    old_style = {}
    for key, value in source.state_dict().items():
        for new, old in renames.items():
            if key.startswith(f"generator.{new}"):
                key = f"generator.{old}{key[len('generator.') + len(new) :]}"
                break
        old_style[key] = value
    assert old_style.keys() != source.state_dict().keys()
    torch.save(old_style, tmp_path / "model.pt")
    target = SynthesisInferenceNetwork(
        CGSAMRGenerator(5, base_width=4, num_res_blocks=1), with_confidence=True
    )
    load_checked_weights(target, tmp_path / "model.pt")
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


@pytest.mark.parametrize("damage", ["truncated mask", "atlas of other sequences"])
def test_a_truncated_mask_or_an_atlas_of_other_sequences_is_named(tiny_runs, monkeypatch, tmp_path, damage):
    """Two of the issue's buried messages: a truncated mask file, and an atlas folder with fewer
    sequences than the model (it used to end in ``size mismatch ... state_dict``)."""
    import shutil

    from medsynth.data.cohort import resolve_cohort

    monkeypatch.chdir(tiny_runs["repo"])
    manifest = resolve_cohort(
        "", tiny_runs["cache"], phantom_patients=3, phantom_shape=(40, 40, 6), progress=False
    )
    mask = tmp_path / "mask.nii.gz"
    shutil.copy(manifest.iloc[0]["label"], mask)
    atlas = tmp_path / "atlas"
    shutil.copytree(Path(manifest.iloc[0]["atlas_t1w"]).parent, atlas)
    if damage == "truncated mask":
        mask.write_bytes(mask.read_bytes()[:300])
        words = ("mask.nii.gz", "truncated")
    else:
        (atlas / "atlas_aptw.nii.gz").unlink()
        words = ("atlas folder holds", "missing ['aptw']")
    code, output = _synthesize(
        tiny_runs, tiny_runs["runs"]["cg_samr"], "--mask-file", str(mask), "--atlas-dir", str(atlas)
    )
    assert code == 2, output[-2000:]
    _one_clean_error(output, *words)
    assert "size mismatch" not in output and "state_dict" not in output
    assert not (tmp_path / "inference_out").exists()


# -- python -m preprocessing: every subcommand, one clean line and exit 2 ----------------------------
def _preprocessing_cases(tmp_path: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """name -> (argv, words the one line must hold) for bad input to each subcommand."""
    raw = tmp_path / "raw"
    (raw / "P001").mkdir(parents=True)
    (tmp_path / "notdicom").mkdir()
    (tmp_path / "notdicom" / "readme.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    bad_roles = tmp_path / "roles.json"
    bad_roles.write_text('{"rules": [{"role": "t3w", "when": {"SeriesNumber": 4}}]}')
    out = str(tmp_path / "out")
    return {
        "run: missing input": (["run", "--input", str(tmp_path / "nowhere"), "--output", out], ("nowhere",)),
        "run: bad sequence-roles file": (
            ["run", "--input", str(raw), "--output", out, "--sequence-roles", str(bad_roles)],
            ("roles.json", "role 't3w' is not one of"),
        ),
        "run: bad BIDS entity": (
            ["run", "--input", str(raw), "--output", out, "--bids-aptw", "APT"],
            ("--bids-aptw 'APT'", "key-value"),
        ),
        "dicom2nifti: empty folder": (["dicom2nifti", str(tmp_path / "empty"), out], ("empty", "no file")),
        "dicom2nifti: no DICOM": (
            ["dicom2nifti", str(tmp_path / "notdicom"), out],
            ("notdicom", "no series"),
        ),
        "dicom2nifti: dcm2niix cannot select": (
            [
                "dicom2nifti",
                str(tmp_path / "notdicom"),
                out,
                "--converter",
                "dcm2niix",
                "--series-number",
                "3",
            ],
            ("--series-number selects with --converter pydicom",),
        ),
    }


CASES = [
    "run: missing input",
    "run: bad sequence-roles file",
    "run: bad BIDS entity",
    "dicom2nifti: empty folder",
    "dicom2nifti: no DICOM",
    "dicom2nifti: dcm2niix cannot select",
]


@pytest.mark.parametrize("case", CASES)
def test_every_preprocessing_subcommand_says_an_input_problem_in_one_line(tmp_path, case):
    cases = _preprocessing_cases(tmp_path)
    assert sorted(cases) == sorted(CASES)  # every case is run
    argv, words = cases[case]
    code, text = _run(*argv, module="preprocessing")
    assert code == 2, text[-1500:]
    _one_clean_error(text, *words)
    assert len([line for line in text.splitlines() if "ERROR" in line]) == 1, text
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    code, text = _run("--debug", *argv, module="preprocessing")
    assert code != 0 and "Traceback" in text  # --debug keeps it
