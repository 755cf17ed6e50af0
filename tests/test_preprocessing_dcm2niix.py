"""DICOM through dcm2niix (the PyPI wheel's binary): every series of a folder, gzip-compressed files
inflated first, the sidecar anonymised and allow-listed, no identifier in any output, name or print."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from test_preprocessing_dicom import FREE_TEXT_AND_PEOPLE, IDENTIFIERS, _volume, write_series

from medsynth.errors import InputDataError
from preprocessing.dcm2niix import allowed_sidecar, convert_with_dcm2niix
from preprocessing.dicom import read_dicom_series

REPO = Path(__file__).resolve().parents[1]


def _canonical(image: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    canonical = nib.as_closest_canonical(image)
    return np.asarray(canonical.dataobj, dtype=np.float64), canonical.affine


def test_the_xa30_series_agree_with_dcm2niixs_reference(dicom_dir, tmp_path):
    dicom_xa30i = dicom_dir
    written = convert_with_dcm2niix(dicom_xa30i / "In", tmp_path / "out")
    volumes = [p for p in written if p.name.endswith(".nii.gz")]
    assert {p.name.split("_")[1].split(".")[0] for p in volumes} >= {"5001", "6001"}
    for number in ("5001", "6001"):
        path = next(p for p in volumes if p.name.startswith(f"series_{number}"))
        ours = nib.load(path)
        reference = nib.load(next((dicom_xa30i / "Ref").glob(f"{number}_*.nii.gz")))
        np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(reference.dataobj))
        np.testing.assert_allclose(ours.affine, reference.affine, atol=1e-4)
        sidecar = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
        assert "SeriesDescription" not in sidecar and sidecar["SeriesNumber"] == int(number)
        assert set(sidecar) == set(allowed_sidecar(sidecar))


def test_a_planted_exam_converts_without_any_identifier_and_matches_the_projects_reader(tmp_path):
    planted = "PLANTED_Jane_Roe"
    for number in (3, 7):
        write_series(
            tmp_path / "exam", _volume(seed=number), series_number=number, description=f"{planted}_{number}"
        )
    for path in (tmp_path / "exam").rglob("*.dcm"):  # the plain files; every second one is gzipped
        ds = pydicom.dcmread(path)
        for keyword in FREE_TEXT_AND_PEOPLE:
            setattr(ds, keyword, f"{planted} {keyword}")
        ds.private_block(0x0011, "ACME PRIVATE", create=True).add_new(0x01, "LO", f"{planted} private")
        ds.save_as(path)
    result = subprocess.run(
        [sys.executable, "-m", "preprocessing", "dicom2nifti", str(tmp_path / "exam"), str(tmp_path / "out"),
         "--converter", "dcm2niix"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    printed = result.stdout + result.stderr
    assert result.returncode == 0, printed[-2000:]
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["series_3.json", "series_3.nii.gz", "series_7.json", "series_7.nii.gz"]
    texts = [printed] + [p.read_text() for p in (tmp_path / "out").glob("*.json")]
    for nifti in (tmp_path / "out").glob("*.nii.gz"):
        offset = int(nib.load(nifti).header["vox_offset"])
        texts.append(gzip.decompress(nifti.read_bytes())[:offset].decode("latin-1"))
    for identifier in (planted, *IDENTIFIERS):
        assert not any(identifier in text for text in texts), identifier
    for number in (3, 7):  # the same voxels in world space as the project's own reader
        ours, _ = read_dicom_series(tmp_path / "exam", series_number=number)
        theirs = nib.load(tmp_path / "out" / f"series_{number}.nii.gz")
        data_ours, affine_ours = _canonical(ours)
        data_theirs, affine_theirs = _canonical(theirs)
        np.testing.assert_allclose(data_theirs, data_ours, atol=1e-3)
        np.testing.assert_allclose(affine_theirs, affine_ours, atol=1e-3)
    with_text = convert_with_dcm2niix(tmp_path / "exam", tmp_path / "with_text", free_text=True)
    assert any(f"{planted}_3" in p.read_text() for p in with_text if p.suffix == ".json")


def test_a_folder_without_dicom_is_one_clean_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not DICOM")
    with pytest.raises(InputDataError, match="converted no series"):
        convert_with_dcm2niix(tmp_path / "empty", tmp_path / "out")
    result = subprocess.run(
        [sys.executable, "-m", "preprocessing", "dicom2nifti", str(tmp_path / "empty"), str(tmp_path / "o"),
         "--converter", "dcm2niix"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (
        result.returncode == 2
        and "Traceback" not in result.stderr
        and "converted no series" in result.stdout + result.stderr
    )
