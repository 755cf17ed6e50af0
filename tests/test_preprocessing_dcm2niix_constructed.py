"""dcm2niix on constructed DICOM of known geometry (tests/dicom_builders.py): a Siemens mosaic series
(one file per volume) and an Enhanced MR multi-frame file, plain and gzip-compressed.

Each conversion must give the constructed voxels at the constructed world positions (dcm2niix may
permute/flip axes; the outputs are compared through their affines), a 4D NIfTI for a multi-volume
mosaic, and no planted identifier or free text in any output byte. The project's own pydicom reader
must read these folders correctly or refuse them with an InputDataError, never anything else.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("dcm2niix")

from dicom_builders import (  # noqa: E402
    FREE_TEXT_MARK,
    PLANTED_MARK,
    oblique_affine,
    write_enhanced_mr,
    write_mosaic_series,
)

from medsynth.errors import InputDataError  # noqa: E402
from preprocessing.dcm2niix import allowed_sidecar, convert_with_dcm2niix  # noqa: E402
from preprocessing.dicom import read_dicom_series  # noqa: E402

AFFINE_ATOL_MM = 1e-3
MOSAIC_SERIES, ENHANCED_SERIES = 4, 6

# name -> (shape, affine keyword arguments, builder options)
MOSAICS = {
    "ascending_5_slices_2_volumes": ((12, 10, 5, 2), {}, {}),
    "descending_9_slices_2_volumes": ((12, 10, 9, 2), {"slice_sign": -1.0, "angle_deg": 12.0}, {}),
    "single_volume": ((12, 10, 5), {"angle_deg": 18.0, "axis": (0.2, 1.0, 0.4)}, {}),
}
SHUFFLED = {"frame_order": [3, 0, 5, 1, 4, 2], "compress": True}
ENHANCED = {
    "in_order": ((14, 11, 6), {}, {}),
    "shuffled_frames_gzipped": ((14, 11, 6), {"angle_deg": 12.0}, SHUFFLED),
    "descending_slices": ((14, 11, 7), {"slice_sign": -1.0, "axis": (0.3, 0.2, 1.0)}, {}),
}


def _volume(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-2000, 4000, size=shape).astype(np.int16)


def _build(kind: str, name: str, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Write the named constructed series into ``folder``; returns (voxels, RAS affine)."""
    table = MOSAICS if kind == "mosaic" else ENHANCED
    shape, affine_kwargs, options = table[name]
    volume = _volume(shape, seed=len(name))
    affine = oblique_affine(**affine_kwargs)
    if kind == "mosaic":
        write_mosaic_series(folder, volume, affine, series_number=MOSAIC_SERIES, **options)
    else:
        write_enhanced_mr(folder, volume, affine, series_number=ENHANCED_SERIES, **options)
    return volume, affine


def _grid_transform(image_affine: np.ndarray, known_affine: np.ndarray) -> np.ndarray:
    """The 4x4 map from output voxel indices to constructed ones: a signed axis permutation plus an
    integer offset (dcm2niix only reorders and flips axes); the affines agree within 1e-3 mm."""
    transform = np.linalg.inv(known_affine) @ image_affine
    rounded = np.round(transform)
    permutation = rounded[:3, :3]
    assert (np.abs(permutation).sum(axis=0) == 1).all() and (np.abs(permutation).sum(axis=1) == 1).all(), (
        f"the output grid is not an axis permutation/flip of the constructed one:\n{np.round(transform, 4)}"
    )
    np.testing.assert_allclose(image_affine, known_affine @ rounded, atol=AFFINE_ATOL_MM)
    return rounded


def assert_same_world_voxels(image: nib.Nifti1Image, known: np.ndarray, known_affine: np.ndarray) -> None:
    """Every output voxel holds the constructed value at the same world position (exactly)."""
    data = np.asanyarray(image.dataobj)
    assert data.ndim == known.ndim and data.shape[3:] == known.shape[3:], (data.shape, known.shape)
    for affine in (image.affine, image.get_qform()):  # dcm2niix writes both; both must be right
        transform = _grid_transform(affine, known_affine)
    axes = np.abs(transform[:3, :3]).argmax(axis=0)  # constructed axis of each output axis
    assert data.shape[:3] == tuple(known.shape[a] for a in axes), (data.shape, known.shape)
    index = np.indices(data.shape[:3]).reshape(3, -1)
    mapped = (transform[:3, :3] @ index + transform[:3, 3:]).astype(int)
    for axis in range(3):
        low, high = int(mapped[axis].min()), int(mapped[axis].max())
        assert 0 <= low and high < known.shape[axis], (
            f"the output covers constructed indices {low}..{high} of axis {axis} (size {known.shape[axis]})"
        )
    expected = known[mapped[0], mapped[1], mapped[2]].reshape(data.shape)
    assert np.issubdtype(data.dtype, np.integer), data.dtype  # no rescaling to float
    np.testing.assert_array_equal(data, expected)


def _convert(folder: Path, out: Path, series: int) -> tuple[nib.Nifti1Image, dict]:
    written = convert_with_dcm2niix(folder, out)
    assert [p.name for p in written] == [f"series_{series}.json", f"series_{series}.nii.gz"]
    sidecar = json.loads(written[0].read_text())
    assert sidecar["SeriesNumber"] == series and sidecar == allowed_sidecar(sidecar)
    return nib.load(written[1]), sidecar


def _output_texts(out: Path) -> dict[str, bytes]:
    """Every output file's bytes (NIfTI decompressed), by name."""
    texts = {}
    for path in sorted(out.iterdir()):
        texts[path.name] = (
            gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        )
    return texts


@pytest.mark.parametrize("name", list(MOSAICS))
def test_a_siemens_mosaic_becomes_the_constructed_volumes(name, tmp_path):
    known, affine = _build("mosaic", name, tmp_path / "dicom")
    image, sidecar = _convert(tmp_path / "dicom", tmp_path / "out", MOSAIC_SERIES)
    if known.ndim == 4:
        assert image.ndim == 4 and image.shape[3] == known.shape[3] == 2, image.shape
        assert image.header.get_zooms()[3] == pytest.approx(2.0)  # RepetitionTime, s
    else:
        assert image.ndim == 3, image.shape
    assert sidecar["Manufacturer"] == "Siemens" and "MOSAIC" in sidecar["ImageType"]
    assert_same_world_voxels(image, known, affine)


@pytest.mark.parametrize("name", list(ENHANCED))
def test_an_enhanced_mr_file_becomes_the_constructed_volume(name, tmp_path):
    known, affine = _build("enhanced", name, tmp_path / "dicom")
    assert any(p.name.endswith(".dcm.gz") for p in (tmp_path / "dicom").iterdir()) == ("gzipped" in name)
    image, _ = _convert(tmp_path / "dicom", tmp_path / "out", ENHANCED_SERIES)
    assert image.ndim == 3, image.shape
    assert_same_world_voxels(image, known, affine)


@pytest.mark.parametrize(
    ("kind", "name"), [("mosaic", "ascending_5_slices_2_volumes"), ("enhanced", "shuffled_frames_gzipped")]
)
def test_no_planted_identifier_reaches_any_output(kind, name, tmp_path):
    _build(kind, name, tmp_path / "dicom")
    convert_with_dcm2niix(tmp_path / "dicom", tmp_path / "out")
    texts = _output_texts(tmp_path / "out")
    assert len(texts) == 2
    for file_name, content in texts.items():
        assert PLANTED_MARK.lower() not in file_name.lower()
        assert PLANTED_MARK.lower().encode() not in content.lower(), f"a planted identifier is in {file_name}"


@pytest.mark.parametrize(
    ("kind", "name"), [("mosaic", "ascending_5_slices_2_volumes"), ("enhanced", "in_order")]
)
def test_free_text_image_comments_reach_no_output(kind, name, tmp_path):
    # ImageComments is free text (sites put names in it): only the allow-listed sidecar may carry
    # header text, and it never carries ImageComments.
    _build(kind, name, tmp_path / "dicom")
    convert_with_dcm2niix(tmp_path / "dicom", tmp_path / "out")
    for file_name, content in _output_texts(tmp_path / "out").items():
        where = content.find(FREE_TEXT_MARK.encode())
        if where >= 0 and file_name.endswith(".nii.gz"):
            header = nib.load(tmp_path / "out" / file_name).header
            fields = [
                f
                for f in ("descrip", "aux_file", "intent_name", "db_name")
                if FREE_TEXT_MARK.encode() in header[f].tobytes()
            ]
            pytest.fail(f"ImageComments reached {file_name}: NIfTI header byte {where}, fields {fields}")
        assert where < 0, f"ImageComments reached {file_name} at byte {where}"


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("mosaic", "ascending_5_slices_2_volumes"),
        ("mosaic", "single_volume"),
        ("enhanced", "in_order"),
        ("enhanced", "shuffled_frames_gzipped"),
    ],
)
def test_the_projects_reader_reads_these_correctly_or_refuses_them_cleanly(kind, name, tmp_path):
    known, affine = _build(kind, name, tmp_path / "dicom")
    try:
        image, _ = read_dicom_series(tmp_path / "dicom")
    except InputDataError as err:  # a clean refusal (another exception type fails with its traceback)
        assert "convert with dcm2niix" in err.problem, err.problem  # and it says what to do
        return
    expected_shape = known.shape[:3] if known.ndim == 4 else known.shape
    assert sorted(image.shape) == sorted(expected_shape), (
        f"read_dicom_series read the {kind} series {name} ({known.shape}) as an image of shape "
        f"{image.shape} instead of refusing it"
    )
    if known.ndim == 4:
        pytest.fail(f"read_dicom_series read only one volume of the {known.shape[3]}-volume {kind} series")
    assert_same_world_voxels(image, known, affine)
