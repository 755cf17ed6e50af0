"""DICOM series reading: reference agreement with dcm2niix, geometry, validation, no identifiers."""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from medsynth.errors import InputDataError
from medsynth.utils.dicom import save_dicom
from preprocessing.dicom import convert_series, list_series, read_dicom_series
from preprocessing.imageio import load_image

# Identifiers planted in the synthetic headers; none may appear in sidecars or logs.
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-937451"
BIRTH_DATE = "19610412"
STUDY_DATE = "20240229"
INSTITUTION = "Saint Example Hospital"
ACCESSION = "ACC-55731"
IDENTIFIERS = (PATIENT_NAME, "Doe", PATIENT_ID, BIRTH_DATE, STUDY_DATE, INSTITUTION, ACCESSION)
# Further identifying or free-text header fields a site may fill with names.
FREE_TEXT_AND_PEOPLE = (
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "StudyDescription",
    "ImageComments",
    "StationName",
    "InstitutionAddress",
    "RequestingPhysician",
)


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


def write_series(
    folder: Path,
    volume: np.ndarray,
    *,
    series_number: int = 3,
    description: str = "t1_axial",
    spacing: tuple[float, float, float] = (0.9, 0.8, 5.5),
    rotation: np.ndarray | None = None,
    origin: tuple[float, float, float] = (-100.0, -120.0, -40.0),
    slope: float = 1.0,
    intercept: float = 0.0,
    positions_mm: list[float] | None = None,
    gzip_every: int = 2,
    shuffle_seed: int = 0,
) -> dict:
    """Write ``volume`` (columns, rows, slices) as a classic single-frame MR series (LPS geometry).

    Returns the ground truth: LPS row/column cosines, slice normal, origin and slice positions.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rotation = np.eye(3) if rotation is None else rotation
    row_cos, col_cos = rotation[:, 0], rotation[:, 1]
    normal = np.cross(row_cos, col_cos)
    n_slices = volume.shape[2]
    positions_mm = [k * spacing[2] for k in range(n_slices)] if positions_mm is None else positions_mm
    series_uid = generate_uid()
    order = np.random.default_rng(shuffle_seed).permutation(len(positions_mm))
    for file_index, k in enumerate(order):
        stored = np.round((volume[:, :, k].T - intercept) / slope).astype(np.uint16)  # (rows, columns)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4.5.6", series_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, BIRTH_DATE
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = STUDY_DATE
        ds.InstitutionName, ds.AccessionNumber = INSTITUTION, ACCESSION
        ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = "MR", "ACME", "Imager 3000"
        ds.MagneticFieldStrength, ds.EchoTime, ds.RepetitionTime, ds.FlipAngle = 3, 12.5, 2300, 90
        ds.SliceThickness, ds.SeriesDescription, ds.ProtocolName = spacing[2], description, description
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M"]
        ds.SeriesNumber, ds.InstanceNumber = series_number, int(k) + 1
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (*row_cos, *col_cos)]
        position = np.asarray(origin) + positions_mm[k] * normal
        ds.ImagePositionPatient = [round(float(v), 6) for v in position]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # (between rows, between columns)
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = stored.tobytes()
        path = folder / f"img_{series_number}_{file_index:03d}.dcm"
        save_dicom(ds, path)
        if gzip_every and file_index % gzip_every == 0:
            with open(path, "rb") as src, gzip.open(f"{path}.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            path.unlink()
    return {
        "row": row_cos,
        "col": col_cos,
        "normal": normal,
        "origin": np.asarray(origin),
        "spacing": spacing,
    }


def _volume(shape=(12, 10, 6), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3000, size=shape).astype(np.float64)


def _world_lps(affine: np.ndarray, ijk) -> np.ndarray:
    ras = affine @ np.array([*ijk, 1.0])
    return ras[:3] * np.array([-1, -1, 1])


def test_reference_series_match_dcm2niix(dicom_dir):
    """Every series of the XA30 set: voxels identical and affine within 1e-3 mm of dcm2niix."""
    series = list_series(dicom_dir / "In")
    assert [s.series_number for s in series] == [1001, 5001, 6001]
    for info in series:
        image, sidecar = read_dicom_series(dicom_dir / "In", series_number=info.series_number, free_text=True)
        stem = f"{info.series_number}_{info.protocol_name}"
        reference = nib.load(dicom_dir / "Ref" / f"{stem}.nii.gz")
        ours, theirs = nib.as_closest_canonical(image), nib.as_closest_canonical(reference)
        # dcm2niix reorients orthogonal volumes towards RAS; in canonical (RAS) voxel order both agree.
        assert ours.shape == theirs.shape
        np.testing.assert_array_equal(np.asanyarray(ours.dataobj), np.asanyarray(theirs.dataobj))
        np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-3, rtol=0)
        with gzip.open(dicom_dir / "Ref" / f"{stem}.json.gz", "rt") as handle:
            ref_sidecar = json.load(handle)
        for key in ("EchoTime", "RepetitionTime", "FlipAngle", "MagneticFieldStrength", "SliceThickness"):
            assert sidecar[key] == pytest.approx(ref_sidecar[key]), key
        assert sidecar["SeriesDescription"] == ref_sidecar["SeriesDescription"]
        for forbidden in ("InstitutionName", "InstitutionAddress", "DeviceSerialNumber", "StationName"):
            assert forbidden not in sidecar
        assert ref_sidecar["InstitutionName"] not in json.dumps(sidecar)


def test_fit_spacing_places_slices_closer_to_their_positions(dicom_dir):
    """The least-squares slice axis averages out IPP rounding; first_pair extrapolates it."""
    folder = dicom_dir / "In" / "5001_anat-T1w_acq-tfl"
    files = sorted(folder.iterdir())
    positions = {}
    for path in files:
        with gzip.open(path) as handle:
            ds = pydicom.dcmread(handle, stop_before_pixels=True)
        positions[int(ds.InstanceNumber)] = np.array([float(v) for v in ds.ImagePositionPatient])
    ipp = np.stack([positions[n] for n in sorted(positions)])  # instance order = our slice order here
    residual = {}
    for mode in ("first_pair", "fit"):
        image, _ = read_dicom_series(folder, slice_spacing=mode)
        predicted = np.stack([_world_lps(image.affine, (0, 0, k)) for k in range(image.shape[2])])
        residual[mode] = np.abs(predicted - ipp).max()
    assert residual["fit"] < 1e-3 < residual["first_pair"] < 0.05


def test_oblique_gzipped_shuffled_series_geometry_and_rescale(tmp_path, caplog):
    volume = _volume()
    truth = write_series(
        tmp_path / "exam",
        volume,
        rotation=_rotation(0.3, -0.2, 0.5),
        slope=0.5,
        intercept=-100.0,
        gzip_every=2,
    )
    with caplog.at_level(logging.DEBUG):
        image, sidecar = read_dicom_series(tmp_path / "exam")
    data = np.asanyarray(image.dataobj)
    np.testing.assert_allclose(data, np.round((volume + 100.0) / 0.5) * 0.5 - 100.0, atol=1e-4)
    assert data.dtype == np.float32
    np.testing.assert_allclose(image.header.get_zooms()[:3], truth["spacing"], atol=1e-5)
    # Voxel (i, j, k) lies at origin + i*dc*row + j*dr*col + k*dz*normal (LPS), whatever the file order.
    for ijk in [(0, 0, 0), (11, 0, 0), (0, 9, 0), (3, 4, 5)]:
        expected = (
            truth["origin"]
            + ijk[0] * truth["spacing"][0] * truth["row"]
            + ijk[1] * truth["spacing"][1] * truth["col"]
            + ijk[2] * truth["spacing"][2] * truth["normal"]
        )
        np.testing.assert_allclose(_world_lps(image.affine, ijk), expected, atol=1e-4)
    assert sidecar["EchoTime"] == pytest.approx(0.0125) and sidecar["RepetitionTime"] == pytest.approx(2.3)
    assert "SeriesDescription" not in sidecar and sidecar["NumberOfSlices"] == 6  # free text: only when asked
    text = json.dumps(sidecar) + "\n".join(r.getMessage() for r in caplog.records)
    for identifier in IDENTIFIERS + ("1.2.3.4.5.6",):
        assert identifier not in text
    for key in sidecar:
        assert not key.endswith("UID") and "Patient" not in key.replace("PatientPosition", "")


def test_load_image_reads_a_dicom_folder(tmp_path):
    volume = _volume(seed=1)
    write_series(tmp_path / "exam", volume, gzip_every=0)
    image = load_image(tmp_path / "exam")
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), volume.astype(np.uint16))


@pytest.mark.parametrize(
    ("positions", "message"),
    [
        ([0.0, 5.5, 11.0, 22.0, 27.5], "missing slice"),
        ([0.0, 5.5, 11.0, 11.0, 16.5], "duplicated slice"),
        ([0.0, 5.5, 11.0, 15.0, 20.5], "inconsistent slice spacing"),
    ],
)
def test_broken_stacks_are_refused(tmp_path, positions, message):
    write_series(tmp_path / "exam", _volume(shape=(8, 8, 5)), positions_mm=positions)
    with pytest.raises(InputDataError, match=message) as err:
        read_dicom_series(tmp_path / "exam")
    assert str(tmp_path / "exam") in str(err.value)


def test_inconsistent_orientation_is_refused(tmp_path):
    write_series(tmp_path / "exam", _volume(shape=(8, 8, 4)), gzip_every=0)
    victim = sorted((tmp_path / "exam").glob("*.dcm"))[1]
    ds = pydicom.dcmread(victim)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, -0.0998334]
    ds.save_as(victim)
    with pytest.raises(InputDataError, match="inconsistent orientation") as err:
        read_dicom_series(tmp_path / "exam")
    assert victim.name in str(err.value)


def test_several_series_selection_and_ambiguity(tmp_path):
    write_series(tmp_path / "exam", _volume(seed=2), series_number=3, description="t1_axial")
    write_series(
        tmp_path / "exam", _volume(shape=(12, 10, 4), seed=3), series_number=7, description="flair_ax"
    )
    infos = list_series(tmp_path / "exam")
    assert [(s.series_number, s.series_description, s.n_files) for s in infos] == [
        (3, "t1_axial", 6),
        (7, "flair_ax", 4),
    ]
    with pytest.raises(InputDataError, match="2 series are mixed in this folder") as err:
        read_dicom_series(tmp_path / "exam")
    assert "series 3 (6 files)" in str(err.value) and "series 7 (4 files)" in str(err.value)
    assert "t1_axial" not in str(err.value) and "--series-number" in str(err.value)
    assert read_dicom_series(tmp_path / "exam", series_number=7)[0].shape == (12, 10, 4)
    assert read_dicom_series(tmp_path / "exam", series_description="t1_axial")[0].shape == (12, 10, 6)
    with pytest.raises(InputDataError, match="no series matches"):
        read_dicom_series(tmp_path / "exam", series_number=99)


def test_convert_series_writes_nifti_and_clean_json(tmp_path, caplog):
    volume = _volume(seed=4)
    write_series(tmp_path / "exam", volume, series_number=3, description="t1 axial/post")
    write_series(tmp_path / "exam", _volume(shape=(12, 10, 4), seed=5), series_number=7, description="flair")
    with caplog.at_level(logging.DEBUG):
        paths = convert_series(tmp_path / "exam", tmp_path / "out")
    assert [p.name for p in paths] == ["series_3.nii.gz", "series_3.json", "series_7.nii.gz", "series_7.json"]
    by_protocol = "{series_number}_{protocol_name}"
    named = convert_series(tmp_path / "exam", tmp_path / "named", name_template=by_protocol, free_text=True)
    assert [p.name for p in named][::2] == ["3_t1_axial_post.nii.gz", "7_flair.nii.gz"]
    assert json.loads(named[1].read_text())["SeriesDescription"] == "t1 axial/post"
    with pytest.raises(ValueError, match="free-text header fields"):
        convert_series(tmp_path / "exam", tmp_path / "x", name_template="{protocol_name}")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in paths
    )  # no temp left
    np.testing.assert_array_equal(np.asanyarray(nib.load(paths[0]).dataobj), volume.astype(np.uint16))
    sidecar_text = paths[1].read_text()
    assert json.loads(sidecar_text)["SeriesNumber"] == 3
    logs = "\n".join(r.getMessage() for r in caplog.records)
    for identifier in IDENTIFIERS:
        assert identifier not in sidecar_text and identifier not in logs
    # Resumable: existing outputs are kept untouched.
    mtime = paths[0].stat().st_mtime_ns
    convert_series(tmp_path / "exam", tmp_path / "out", series_number=3)
    assert paths[0].stat().st_mtime_ns == mtime


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not dicom")
    with pytest.raises(InputDataError, match="no DICOM image files"):
        read_dicom_series(tmp_path / "empty")


# --- preprocessing.imageio: geometry-exact conversions (used by every step) ----------------------


def _oblique_image(dtype=np.float32, flip: bool = False) -> nib.Nifti1Image:
    linear = _rotation(0.2, -0.35, 0.6) @ np.diag([0.9, 1.1, 5.5])
    if flip:
        linear[:, 0] *= -1  # left-handed voxel axes, as in radiological storage
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = linear, [12.5, -30.25, 41.0]
    data = np.random.default_rng(7).normal(0, 500, size=(9, 8, 7)).astype(dtype)
    return nib.Nifti1Image(data, affine)


@pytest.mark.parametrize("flip", [False, True])
def test_ants_and_sitk_roundtrips_are_exact_with_oblique_affines(flip):
    from preprocessing.imageio import from_ants, from_sitk, to_ants, to_sitk

    image = _oblique_image(flip=flip)
    data = np.asanyarray(image.dataobj)
    for back in (from_ants(to_ants(image)), from_sitk(to_sitk(image))):
        np.testing.assert_array_equal(np.asanyarray(back.dataobj), data)
        np.testing.assert_allclose(back.affine, image.affine, atol=1e-9)
    # The world position of a voxel agrees between nibabel (RAS) and ITK (LPS) conventions.
    sitk_image, ants_image = to_sitk(image), to_ants(image)
    for ijk in [(0, 0, 0), (8, 0, 3), (2, 7, 6)]:
        lps = np.array(sitk_image.TransformIndexToPhysicalPoint(ijk))
        np.testing.assert_allclose(lps, _world_lps(image.affine, ijk), atol=1e-9)
        assert sitk_image.GetPixel(ijk) == pytest.approx(float(data[ijk]))
        np.testing.assert_allclose(ants_image.origin, _world_lps(image.affine, (0, 0, 0)), atol=1e-9)
    assert ants_image.numpy()[2, 7, 6] == pytest.approx(float(data[2, 7, 6]))


def test_to_ants_keeps_negative_integers_and_same_grid():
    from preprocessing.imageio import from_ants, same_grid, to_ants

    image = _oblique_image(dtype=np.int16)
    ants_image = to_ants(image)
    assert ants_image.pixeltype == "float"  # ANTs would otherwise cast int16 to unsigned
    back = from_ants(ants_image, like=image)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), np.asanyarray(image.dataobj))
    np.testing.assert_array_equal(back.affine, image.affine)
    assert same_grid(back, image)
    shifted = image.affine.copy()
    shifted[0, 3] += 0.01
    moved = nib.Nifti1Image(np.asanyarray(image.dataobj), shifted)
    assert same_grid(back, moved, atol=0.02) and not same_grid(back, moved)


def test_load_image_errors(tmp_path):
    with pytest.raises(InputDataError, match="does not exist"):
        load_image(tmp_path / "missing.nii.gz")
    data = np.ones((4, 4, 4), np.float32)
    data[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(InputDataError, match="NaN") as err:
        load_image(tmp_path / "nan.nii.gz")
    assert "nan.nii.gz" in str(err.value)
    four_d = np.stack([np.ones((4, 4, 4)), 2 * np.ones((4, 4, 4))], axis=-1).astype(np.float32)
    nib.save(nib.Nifti1Image(four_d, np.eye(4)), tmp_path / "four_d.nii.gz")
    with pytest.raises(
        InputDataError, match=r"four_d.nii.gz: is a multi-volume series \(2 volumes.*--volume"
    ):
        load_image(tmp_path / "four_d.nii.gz")
    assert float(np.asanyarray(load_image(tmp_path / "four_d.nii.gz", volume=1).dataobj).max()) == 2.0
    with pytest.raises(InputDataError, match="--volume 2 is not one of 0..1"):
        load_image(tmp_path / "four_d.nii.gz", volume=2)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 1), np.int16), np.eye(4)), tmp_path / "singleton.nii.gz")
    assert load_image(tmp_path / "singleton.nii.gz").shape == (4, 4, 4)


def test_no_free_text_or_identifier_leaves_the_dicom_entry_points(tmp_path):
    """Identifiers planted in every identifying and free-text field (private tags included) reach no
    output file, name or message of ``python -m preprocessing dicom2nifti``, nor its refusal of mixed
    series; with ``--free-text`` the descriptions (and only they) come through, as documented."""
    import subprocess
    import sys

    planted = "PLANTED_Jane_Roe"
    for number in (3, 7):
        write_series(
            tmp_path / "exam", _volume(seed=number), series_number=number, description=f"{planted}_{number}"
        )
    for path in (tmp_path / "exam").rglob("*.dcm*"):
        if path.suffix == ".gz":
            continue
        ds = pydicom.dcmread(path)
        for keyword in FREE_TEXT_AND_PEOPLE:
            setattr(ds, keyword, f"{planted} {keyword}")
        block = ds.private_block(0x0011, "ACME PRIVATE", create=True)
        block.add_new(0x01, "LO", f"{planted} private")
        ds.save_as(path)
    repo = Path(__file__).resolve().parents[1]

    def run(*argv: str) -> str:
        result = subprocess.run([sys.executable, "-m", "preprocessing", *argv], cwd=repo, capture_output=True,
                                text=True, timeout=300)  # fmt: skip
        return f"{result.returncode}\n{result.stdout}{result.stderr}"

    out = tmp_path / "out"
    printed = run("dicom2nifti", str(tmp_path / "exam"), str(out))
    assert printed.startswith("0\n"), printed[-2000:]
    texts = [printed] + [p.read_text() for p in out.glob("*.json")]
    names = [p.name for p in out.iterdir()]
    assert sorted(names) == ["series_3.json", "series_3.nii.gz", "series_7.json", "series_7.nii.gz"]
    for identifier in (planted, *IDENTIFIERS):
        assert not any(identifier in text for text in texts), identifier
        assert not any(identifier in name for name in names)
    for nifti in out.glob("*.nii.gz"):
        assert planted.encode() not in gzip.decompress(nifti.read_bytes())  # no header text either
    with_text = tmp_path / "with_text"
    printed = run("dicom2nifti", str(tmp_path / "exam"), str(with_text), "--free-text")
    sidecars = " ".join(p.read_text() for p in with_text.glob("*.json"))
    assert (
        f"{planted}_3" in sidecars
        and f"{planted} private" not in sidecars
        and "StudyDescription" not in sidecars
    )
