"""The field's formats end to end: a raw DICOM exam of mixed series (classic, Siemens mosaic, Enhanced
MR multi-frame, gzipped) whose roles come from the headers, and a BIDS raw dataset, each taken by one
``python -m preprocessing run`` to a model-ready cohort with a BIDS derivatives dataset beside it.

The derivatives' file names are checked against the BIDS schema's own derivative rules
(``bidsschematools``, the specification's machine-readable rules) where it is installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

pytest.importorskip("dcm2niix")

from dicom_builders import PLANTED_MARK, write_enhanced_mr, write_mosaic_series  # noqa: E402

from medsynth.data.manifest import read_manifest  # noqa: E402
from preprocessing.bids import DERIVATIVES_FOLDER, bids_name, parse_bids_name  # noqa: E402
from preprocessing.roles import assign_roles, load_role_rules  # noqa: E402

SHAPE = (64, 64, 15)
T1_SERIES = 5
# The series descriptions written below: free text, used for the roles, never written out.
DESCRIPTIONS = ("t1_mprage_tra", "T1 MPRAGE post Gd", "t2_tse_tra", "flair_tra", "APTw_3D", "AAHead_Scout",
                "research_sequence_x")  # fmt: skip
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # two preprocessing runs of one small phantom patient each


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "preprocessing", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=900)  # fmt: skip


@pytest.fixture(scope="module")
def raw_phantom(tmp_path_factory) -> Path:
    from medsynth.data.phantom import generate_phantom_cohort

    raw = tmp_path_factory.mktemp("phantom")
    generate_phantom_cohort(raw, 1, seed=3, layout="raw", shape=SHAPE, progress=False)
    return raw / "phantom_000"


def _int16(path: Path, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.round(image.get_fdata() * scale).astype(np.int16), image.affine


def _dicom_exam(phantom: Path, exam: Path) -> None:
    """The phantom as a scanner exports it: one folder of series, no per-sequence names."""
    series = exam / "DICOM"
    shutil.copytree(phantom / "t1w", series / "t1_classic")  # classic, one file per slice
    import pydicom

    for path in (series / "t1_classic").iterdir():
        ds = pydicom.dcmread(path)
        ds.SeriesDescription = ds.ProtocolName = "t1_mprage_tra"
        # The phantom says its images are DERIVED (they are synthetic); a scanner's are ORIGINAL.
        ds.ImageType, ds.SeriesNumber = ["ORIGINAL", "PRIMARY", "M", "ND"], T1_SERIES
        ds.PatientName = f"{PLANTED_MARK}^Name"
        ds.save_as(path)
    write_enhanced_mr(series / "gd", *_int16(phantom / "gd_t1w.nii.gz"), series_number=7,
                      description="T1 MPRAGE post Gd", compress=True)  # fmt: skip
    write_enhanced_mr(
        series / "t2", *_int16(phantom / "t2w.nii.gz"), series_number=8, description="t2_tse_tra"
    )
    write_mosaic_series(series / "flair", *_int16(phantom / "flair.nii.gz"), series_number=9,
                        description="flair_tra")  # fmt: skip
    # APTw in % as integers of 0.01 % (the builders write int16 without rescaling).
    write_enhanced_mr(series / "apt", *_int16(phantom / "aptw.nii.gz", 100.0), series_number=11,
                      description="APTw_3D")  # fmt: skip
    scout = np.full((12, 10, 3), 100, np.int16)
    scout[3:9, 3:7] = 900
    write_enhanced_mr(series / "scout", scout, np.diag([4.0, 4.0, 10.0, 1.0]), series_number=1,
                      description="AAHead_Scout")  # fmt: skip
    write_enhanced_mr(series / "odd", scout, np.diag([4.0, 4.0, 10.0, 1.0]), series_number=13,
                      description="research_sequence_x")  # fmt: skip
    (exam / "truth").mkdir()
    shutil.copy(phantom / "truth" / "label.nii.gz", exam / "truth" / "label.nii.gz")


@pytest.fixture(scope="module")
def dicom_run(raw_phantom, tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom_cohort")
    _dicom_exam(raw_phantom, root / "raw" / "exam_a")
    # A second exam whose FLAIR is a 2-volume mosaic: refused with the series named.
    _dicom_exam(raw_phantom, root / "raw" / "exam_b")
    shutil.rmtree(root / "raw" / "exam_b" / "DICOM" / "flair")
    flair, affine = _int16(raw_phantom / "flair.nii.gz")
    flair_folder = root / "raw" / "exam_b" / "DICOM" / "flair"
    write_mosaic_series(
        flair_folder, np.stack([flair, flair], -1), affine, series_number=9, description="flair_tra"
    )
    result = _run("run", "--input", str(root / "raw"), "--output", str(root / "out"),
                  "--splits", "1", "0", "0", "--label-glob", "truth/label.nii.gz", "--atlas-iterations", "1",
                  "--no-progress", "--no-qc")  # fmt: skip
    return root, result


def test_a_raw_dicom_exam_of_mixed_series_becomes_a_cohort(dicom_run, raw_phantom):
    root, result = dicom_run
    printed = result.stdout + result.stderr
    assert result.returncode == 1, printed[-3000:]  # exam_b failed, exam_a went through
    out = root / "out"
    manifest = read_manifest(out / "manifest.csv")
    assert list(manifest["patient_id"]) == ["exam_a"]
    row = manifest.iloc[0]
    for sequence in ("t1w", "gd_t1w", "t2w", "flair", "aptw", "label", "brain_mask"):
        assert nib.load(row[sequence]).shape == SHAPE, sequence
    roles = json.loads((out / "exam_a" / "work" / "convert" / "roles.json").read_text())
    assert roles["roles"] == {"t1w": f"series_{T1_SERIES}", "gd_t1w": "series_7",
                              "t2w": "series_8", "flair": "series_9", "aptw": "series_11"}  # fmt: skip
    assert roles["matched"]["series_1"] == [None, "scout or localizer"]
    assert list(roles["unmatched"]) == ["series_13"]
    assert "series_13 matches no sequence-role rule" in printed  # listed, not guessed
    # The ingested APTw is the phantom's, through the Enhanced MR file and dcm2niix (in 0.01 %).
    ingested = nib.load(out / "exam_a" / "work" / "ingest" / "aptw.nii.gz")
    truth = nib.load(raw_phantom / "aptw.nii.gz")
    np.testing.assert_allclose(
        nib.as_closest_canonical(ingested).get_fdata(),
        np.round(nib.as_closest_canonical(truth).get_fdata() * 100),
        atol=0.5,
    )
    canonical_affines = [nib.as_closest_canonical(image).affine for image in (ingested, truth)]
    np.testing.assert_allclose(*canonical_affines, atol=1e-3)
    failures = json.loads((out / "failures.json").read_text())["failures"]
    assert list(failures) == ["exam_b"]
    assert "series_9.nii.gz: is a multi-volume series (2 volumes" in failures["exam_b"]
    assert "--volume" in failures["exam_b"] and "Traceback" not in printed
    assert "FAILED exam_b: InputDataError: patient exam_b, file" in printed
    # No header text reaches the outputs: the planted name nor the free-text series descriptions.
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".csv", ".tsv"):
            text = path.read_text()
            assert not [m for m in (PLANTED_MARK, *DESCRIPTIONS) if m in text], path
    assert not [m for m in (PLANTED_MARK, *DESCRIPTIONS) if m in printed]


def test_dicom_exam_derivatives_are_bids(dicom_run):
    root, _ = dicom_run
    deriv = root / "out" / DERIVATIVES_FOLDER
    description = json.loads((deriv / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "medsynth"
    participants = pd.read_csv(deriv / "participants.tsv", sep="\t")
    assert participants.to_dict("records") == [{"participant_id": "sub-exama", "patient_id": "exam_a",
                                                "split": "train"}]  # fmt: skip
    anat = deriv / "sub-exama" / "anat"
    names = sorted(p.name for p in anat.iterdir())
    for expected in (
        "sub-exama_space-individual_desc-preproc_T1w.nii.gz",
        "sub-exama_ce-gadolinium_space-individual_desc-preproc_T1w.nii.gz",
        "sub-exama_space-individual_desc-preproc_T2w.nii.gz",
        "sub-exama_space-individual_desc-preproc_FLAIR.nii.gz",
        "sub-exama_acq-APT_space-individual_desc-preproc_MTRmap.nii.gz",
        "sub-exama_space-individual_desc-brain_mask.nii.gz",
        "sub-exama_space-individual_dseg.nii.gz",
        "sub-exama_space-individual_dseg.tsv",
    ):
        assert expected in names, (expected, names)
    manifest = read_manifest(root / "out" / "manifest.csv").iloc[0]
    same = nib.load(anat / "sub-exama_space-individual_desc-preproc_FLAIR.nii.gz")
    np.testing.assert_array_equal(same.get_fdata(), nib.load(manifest["flair"]).get_fdata())
    sidecar = json.loads((anat / "sub-exama_space-individual_desc-preproc_T2w.json").read_text())
    assert sidecar["SpatialReference"].endswith("_acq-APT_space-individual_desc-preproc_MTRmap.nii.gz")
    _assert_schema_valid(deriv)


def _assert_schema_valid(deriv: Path) -> None:
    """Every file of the derivatives matches a rule of the BIDS schema (common + derivative rules)."""
    rules = pytest.importorskip("bidsschematools.rules")
    schema_module = pytest.importorskip("bidsschematools.schema")
    import re

    schema = schema_module.load_schema()
    regexes = []
    regexes += rules.regexify_filename_rules(schema.rules.files.common, schema, level=2)
    for group in ("imaging", "tables"):
        regexes += rules.regexify_filename_rules(schema.rules.files.deriv[group], schema, level=1)
    patterns = [re.compile(r["regex"]) for r in regexes]
    files = [str(p.relative_to(deriv)) for p in sorted(deriv.rglob("*")) if p.is_file()]
    unmatched = [f for f in files if not any(p.match(f) for p in patterns)]
    assert not unmatched, unmatched
    assert len(files) > 10
    # The rules can fail: entities out of the specification's order, or an unknown suffix.
    for wrong in (
        "sub-01/anat/sub-01_desc-preproc_space-individual_T1w.nii.gz",
        "sub-01/anat/sub-01_APTw.nii.gz",
    ):
        assert not any(p.match(wrong) for p in patterns), wrong


@pytest.fixture(scope="module")
def bids_run(raw_phantom, tmp_path_factory):
    root = tmp_path_factory.mktemp("bids_cohort")
    bids = root / "bids"
    anat = bids / "sub-01" / "anat"
    anat.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "phantom", "BIDSVersion": "1.10.0"}))
    t1 = nib.load(_t1w_nifti(raw_phantom, root))
    nib.save(t1, anat / "sub-01_T1w.nii.gz")
    shutil.copy(raw_phantom / "gd_t1w.nii.gz", anat / "sub-01_ce-gadolinium_T1w.nii.gz")
    shutil.copy(raw_phantom / "t2w.nii.gz", anat / "sub-01_T2w.nii.gz")
    shutil.copy(raw_phantom / "flair.nii.gz", anat / "sub-01_FLAIR.nii.gz")
    shutil.copy(raw_phantom / "aptw.nii.gz", anat / "sub-01_acq-APT_MTRmap.nii.gz")
    shutil.copy(raw_phantom / "t2w.nii.gz", anat / "sub-01_T2starw.nii.gz")  # no role: ignored
    labels = bids / "derivatives" / "manual" / "sub-01" / "anat"
    labels.mkdir(parents=True)
    shutil.copy(raw_phantom / "truth" / "label.nii.gz", labels / "sub-01_dseg.nii.gz")
    # A subject with two sessions and no --bids-session: one clean line, the cohort goes on.
    for session in ("ses-1", "ses-2"):
        (bids / "sub-02" / session / "anat").mkdir(parents=True)
        shutil.copy(
            raw_phantom / "t2w.nii.gz", bids / "sub-02" / session / "anat" / f"sub-02_{session}_T2w.nii.gz"
        )
    result = _run("run", "--input", str(bids), "--output", str(root / "out"), "--splits", "1", "0", "0",
                  "--atlas-iterations", "1", "--no-progress", "--no-qc")  # fmt: skip
    return root, result


def _t1w_nifti(phantom: Path, root: Path) -> Path:
    from preprocessing.dcm2niix import load_dicom_folder

    target = root / "t1w.nii.gz"
    nib.save(load_dicom_folder(phantom / "t1w"), target)
    return target


def test_a_bids_dataset_preprocesses_and_its_derivatives_validate(bids_run):
    root, result = bids_run
    printed = result.stdout + result.stderr
    assert result.returncode == 1, printed[-3000:]
    manifest = read_manifest(root / "out" / "manifest.csv")
    assert list(manifest["patient_id"]) == ["sub-01"]
    assert manifest.iloc[0]["label"] and nib.load(manifest.iloc[0]["aptw"]).shape == SHAPE
    failures = json.loads((root / "out" / "failures.json").read_text())["failures"]
    assert list(failures) == ["sub-02"] and "2 sessions (ses-1, ses-2)" in failures["sub-02"]
    assert "--bids-session" in failures["sub-02"]
    deriv = root / "out" / DERIVATIVES_FOLDER
    participants = pd.read_csv(deriv / "participants.tsv", sep="\t", dtype=str)
    assert list(participants["participant_id"]) == ["sub-01"]  # the subject keeps its label
    assert (deriv / "sub-01" / "anat" / "sub-01_space-individual_dseg.nii.gz").is_file()
    _assert_schema_valid(deriv)


def test_bids_names_follow_the_entity_rules():
    assert parse_bids_name("sub-01_ses-2_ce-gadolinium_T1w.nii.gz") == (
        {"sub": "01", "ses": "2", "ce": "gadolinium"},
        "T1w",
        ".nii.gz",
    )
    with pytest.raises(ValueError, match="not a key-value entity"):
        parse_bids_name("sub-01_bad_T1w.nii.gz")
    # Written in the specification's entity order whatever the order given.
    assert bids_name(
        {"desc": "preproc", "space": "individual", "sub": "01", "ce": "gd"}, "T1w", ".nii.gz"
    ) == ("sub-01_ce-gd_space-individual_desc-preproc_T1w.nii.gz")


def _sidecar(**fields) -> dict:
    return {"SeriesNumber": 1, **fields}


def test_sequence_roles_from_header_fields_and_a_user_file(tmp_path):
    sidecars = {
        "series_2": _sidecar(SeriesNumber=2, SeriesDescription="AX T1 pre", ScanningSequence="SE"),
        "series_3": _sidecar(SeriesNumber=3, ProtocolName="t1_mprage", ContrastBolusAgent="Gadovist"),
        "series_4": _sidecar(SeriesNumber=4, ScanningSequence="SE", EchoTime=0.1, RepetitionTime=5.0),
        "series_5": _sidecar(
            SeriesNumber=5, SeriesDescription="ax 3d", InversionTime=2.5, RepetitionTime=9.0
        ),
        "series_6": _sidecar(SeriesNumber=6, SeriesDescription="T1 +C", ImageType=["ORIGINAL", "PRIMARY"]),
        "series_7": _sidecar(SeriesNumber=7, SeriesDescription="CEST_APT"),
        "series_8": _sidecar(SeriesNumber=8, SeriesDescription="ADC", ImageType=["DERIVED", "PRIMARY"]),
        "series_9": _sidecar(SeriesNumber=9, SeriesDescription="mystery"),
        "series_10": _sidecar(
            SeriesNumber=10, SeriesDescription="t1 post gad", ImageType=["ORIGINAL", "NORM"]
        ),
    }
    assignment = assign_roles(sidecars)
    assert assignment.roles == {"t1w": "series_2", "gd_t1w": "series_10", "t2w": "series_4",
                                "flair": "series_5", "aptw": "series_7"}  # fmt: skip
    assert assignment.matched["series_4"] == ("t2w", "t2w by timing")
    assert assignment.matched["series_5"] == ("flair", "flair by inversion time")
    assert assignment.matched["series_8"][0] is None
    # series_3 (contrast agent tag), series_6 (+C) and series_10 (NORM, preferred) all are Gd-T1w.
    assert sorted(assignment.passed_over["gd_t1w"]) == ["series_3", "series_6"]
    assert list(assignment.unmatched) == ["series_9"]
    user = tmp_path / "roles.json"
    user.write_text(json.dumps({"rules": [{"name": "site T2", "role": "t2w", "when": {"SeriesNumber": 9}}]}))
    # Both series 4 and 9 are T2w now; the later series wins the tie, and is said to.
    with_user = assign_roles(sidecars, load_role_rules(user))
    assert with_user.roles["t2w"] == "series_9" and with_user.passed_over["t2w"] == ["series_4"]
    replaced = tmp_path / "only.json"
    replaced.write_text(json.dumps({"replace_defaults": True, "rules": [
        {"name": "site T2", "role": "t2w", "when": {"SeriesNumber": 9}}]}))  # fmt: skip
    only = assign_roles(sidecars, load_role_rules(replaced))
    assert only.roles == {"t2w": "series_9"} and len(only.unmatched) == len(sidecars) - 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rules": [{"role": "t3w", "when": {"SeriesNumber": 1}}]}))
    from medsynth.errors import InputDataError

    with pytest.raises(InputDataError, match="role 't3w' is not one of"):
        load_role_rules(bad)
