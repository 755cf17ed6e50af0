"""DICOM series to NIfTI: series discovery, geometry, validation and an identifier-free sidecar.

Files may be plain DICOM or gzip-compressed (detected by the gzip magic number, so ``.dcm.gz`` and
extension-less files both work). A folder (searched recursively) may hold several series; choose one
by ``series_number`` or ``series_description``.

Geometry follows the DICOM standard: for a slice with ImagePositionPatient ``p``,
ImageOrientationPatient ``(r, c)`` (row and column direction cosines, LPS) and PixelSpacing
``(dr, dc)``, the voxel at column ``i`` and row ``j`` is at ``p + i * dc * r + j * dr * c``. Slices are
ordered by their position along the normal ``n = r x c`` (never by InstanceNumber), so the NIfTI
voxel ``(i, j, k)`` is column ``i``, row ``j`` of the ``k``-th slice along ``n``; the affine is this
mapping converted from LPS to RAS. No reorientation is applied (dcm2niix additionally permutes/flips
orthogonal volumes towards RAS; both describe the same voxels in world space).

The JSON sidecar holds acquisition parameters from an allow-list only (BIDS names and units: times in
seconds); patient, institution, date and UID fields can never reach it, and log messages only name
folders and counts. SeriesDescription and ProtocolName are free text that sites fill with anything,
names included: they reach the sidecar, file names and messages only with ``free_text=True``
(``dicom2nifti --free-text``); series are otherwise referred to by number.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from medsynth.errors import InputDataError
from medsynth.utils.geometry import RAS_TO_LPS
from medsynth.utils.io import atomic_path, save_json

logger = logging.getLogger(__name__)

__all__ = [
    "SIDECAR_FIELDS",
    "SLICE_SPACING_MODES",
    "SeriesInfo",
    "convert_series",
    "list_series",
    "read_dicom_series",
]

GZIP_MAGIC = b"\x1f\x8b"
# Relative tolerances of slice-geometry checks (scanner positions are rounded to ~1e-4 mm).
_POSITION_ATOL_MM = 1e-2
_SPACING_RTOL = 1e-2
SLICE_SPACING_MODES = ("first_pair", "fit")

# DICOM keyword -> (sidecar name, unit scale). Allow-list: nothing else is ever copied.
SIDECAR_FIELDS: dict[str, tuple[str, float | None]] = {
    "Modality": ("Modality", None),
    "Manufacturer": ("Manufacturer", None),
    "ManufacturerModelName": ("ManufacturersModelName", None),
    "SoftwareVersions": ("SoftwareVersions", None),
    "MagneticFieldStrength": ("MagneticFieldStrength", 1.0),
    "ImagingFrequency": ("ImagingFrequency", 1.0),
    "BodyPartExamined": ("BodyPart", None),
    "PatientPosition": ("PatientPosition", None),
    "MRAcquisitionType": ("MRAcquisitionType", None),
    "SeriesDescription": ("SeriesDescription", None),
    "ProtocolName": ("ProtocolName", None),
    "SeriesNumber": ("SeriesNumber", None),
    "ScanningSequence": ("ScanningSequence", None),
    "SequenceVariant": ("SequenceVariant", None),
    "ScanOptions": ("ScanOptions", None),
    "SequenceName": ("SequenceName", None),
    "ImageType": ("ImageType", None),
    "SliceThickness": ("SliceThickness", 1.0),
    "SpacingBetweenSlices": ("SpacingBetweenSlices", 1.0),
    "EchoTime": ("EchoTime", 1e-3),
    "RepetitionTime": ("RepetitionTime", 1e-3),
    "InversionTime": ("InversionTime", 1e-3),
    "FlipAngle": ("FlipAngle", 1.0),
    "EchoTrainLength": ("EchoTrainLength", None),
    "NumberOfAverages": ("NumberOfAverages", 1.0),
    "PixelBandwidth": ("PixelBandwidth", 1.0),
    "PercentSampling": ("PercentSampling", 1.0),
    "PercentPhaseFieldOfView": ("PercentPhaseFOV", 1.0),
    "InPlanePhaseEncodingDirection": ("InPlanePhaseEncodingDirectionDICOM", None),
    "ReceiveCoilName": ("ReceiveCoilName", None),
}


# Header fields whose values are free text (they may hold names): out of sidecars, names and
# messages unless the user asks for them.
FREE_TEXT_FIELDS = frozenset({"SeriesDescription", "ProtocolName"})


@dataclass(frozen=True)
class SeriesInfo:
    """One series found in a folder (no patient or study identifiers)."""

    series_number: int | None
    series_description: str
    protocol_name: str
    n_files: int

    def __str__(self) -> str:
        return f"series {self.series_number} ({self.n_files} files)"  # no free text in messages


@dataclass
class _Slice:
    path: Path
    dataset: pydicom.Dataset


def is_gzipped(path: str | os.PathLike) -> bool:
    """Whether the file starts with the gzip magic number (``.dcm.gz``, or a compressed file of any name)."""
    with open(path, "rb") as handle:
        return handle.read(2) == GZIP_MAGIC


def _read_dataset(path: Path, stop_before_pixels: bool) -> pydicom.Dataset | None:
    """Read one (possibly gzipped) DICOM file; ``None`` when it is not DICOM."""
    try:
        if is_gzipped(path):
            with gzip.open(path, "rb") as handle:
                stream = io.BytesIO(handle.read())
        else:
            stream = open(path, "rb")  # noqa: SIM115 - closed below
        with stream:
            return pydicom.dcmread(stream, stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, EOFError, gzip.BadGzipFile):
        return None
    except OSError as err:
        raise InputDataError(f"cannot read file: {err}", path=path) from err


def _scan(folder: Path, stop_before_pixels: bool) -> dict[tuple, list[_Slice]]:
    """Group every image file under ``folder`` by series (number, instance UID)."""
    if not folder.is_dir():
        raise InputDataError("DICOM folder does not exist", path=folder)
    groups: dict[tuple, list[_Slice]] = defaultdict(list)
    n_skipped = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        dataset = _read_dataset(path, stop_before_pixels)
        if (
            dataset is None
            or "ImagePositionPatient" not in dataset
            and "PerFrameFunctionalGroupsSequence" not in dataset
        ):
            n_skipped += 1
            continue
        number = dataset.get("SeriesNumber")
        key = (None if number is None else int(number), str(dataset.get("SeriesInstanceUID", "")))
        groups[key].append(_Slice(path, dataset))
    if n_skipped:
        logger.debug("%s: skipped %d non-image files", folder, n_skipped)
    if not groups:
        raise InputDataError("no DICOM image files found", path=folder)
    return groups


def _info(slices: list[_Slice]) -> SeriesInfo:
    first = slices[0].dataset
    number = first.get("SeriesNumber")
    return SeriesInfo(
        series_number=None if number is None else int(number),
        series_description=str(first.get("SeriesDescription", "")),
        protocol_name=str(first.get("ProtocolName", "")),
        n_files=len(slices),
    )


def list_series(folder: str | os.PathLike) -> list[SeriesInfo]:
    """List the image series under ``folder`` (recursively), sorted by series number."""
    groups = _scan(Path(folder), stop_before_pixels=True)
    infos = [_info(slices) for slices in groups.values()]
    return sorted(infos, key=lambda s: (s.series_number is None, s.series_number or 0, s.series_description))


def _select(
    folder: Path, groups: dict[tuple, list[_Slice]], series_number: int | None, series_description: str | None
) -> list[_Slice]:
    candidates = list(groups.values())
    if series_number is not None:
        candidates = [s for s in candidates if _info(s).series_number == int(series_number)]
    if series_description is not None:
        candidates = [s for s in candidates if _info(s).series_description == series_description]
    if len(candidates) == 1:
        return candidates[0]
    available = "; ".join(str(_info(s)) for s in groups.values())
    if not candidates:
        raise InputDataError(
            f"no series matches number={series_number} description={series_description!r}; available: "
            f"{available}",
            path=folder,
        )
    raise InputDataError(
        f"{len(candidates)} series are mixed in this folder ({available}): keep one series per sequence "
        "folder, or convert one with dicom2nifti --series-number",
        path=folder,
    )


def _float_list(value: Any, n: int, keyword: str, path: Path) -> np.ndarray:
    try:
        array = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InputDataError(f"invalid {keyword}: {value!r}", path=path) from err
    if array.shape != (n,):
        raise InputDataError(f"{keyword} has {array.size} values, expected {n}", path=path)
    return array


def _geometry(slices: list[_Slice], folder: Path, slice_spacing: str) -> tuple[list[_Slice], np.ndarray]:
    """Sort slices along their normal, validate the stack, return (sorted slices, RAS affine)."""
    if slice_spacing not in SLICE_SPACING_MODES:
        raise ValueError(f"slice_spacing must be one of {SLICE_SPACING_MODES}, got {slice_spacing!r}")
    first = slices[0]
    if "PerFrameFunctionalGroupsSequence" in first.dataset:
        raise InputDataError(
            "enhanced (multi-frame) DICOM: the project's reader takes classic series only; convert with "
            "dcm2niix (the default of dicom2nifti and of preprocessing run)",
            path=first.path,
        )
    image_type = [str(v).upper() for v in (first.dataset.get("ImageType") or [])]
    if "MOSAIC" in image_type or (0x0019, 0x100A) in first.dataset:
        raise InputDataError(
            "Siemens mosaic (slices tiled in one image per volume): the project's reader does not un-tile "
            "them; convert with dcm2niix (the default of dicom2nifti and of preprocessing run)",
            path=first.path,
        )
    orientation = _float_list(first.dataset.ImageOrientationPatient, 6, "ImageOrientationPatient", first.path)
    spacing = _float_list(first.dataset.PixelSpacing, 2, "PixelSpacing", first.path)
    shape = (int(first.dataset.Rows), int(first.dataset.Columns))
    for item in slices[1:]:
        other = _float_list(item.dataset.ImageOrientationPatient, 6, "ImageOrientationPatient", item.path)
        if not np.allclose(other, orientation, atol=1e-4):
            raise InputDataError(
                f"inconsistent orientation in the series: {other.tolist()} vs {orientation.tolist()}",
                path=item.path,
            )
        if (int(item.dataset.Rows), int(item.dataset.Columns)) != shape:
            raise InputDataError(
                f"inconsistent matrix size {item.dataset.Rows}x{item.dataset.Columns} vs "
                f"{shape[0]}x{shape[1]}",
                path=item.path,
            )
        if not np.allclose(
            _float_list(item.dataset.PixelSpacing, 2, "PixelSpacing", item.path), spacing, atol=1e-4
        ):
            raise InputDataError("inconsistent PixelSpacing in the series", path=item.path)

    row_cosine, col_cosine = orientation[:3], orientation[3:]
    normal = np.cross(row_cosine, col_cosine)
    positions = np.stack(
        [_float_list(s.dataset.ImagePositionPatient, 3, "ImagePositionPatient", s.path) for s in slices]
    )
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    positions, along = positions[order], along[order]

    if len(slices) > 1:
        steps = np.diff(along)
        duplicated = np.flatnonzero(steps < _POSITION_ATOL_MM)
        if duplicated.size:
            i = int(duplicated[0])
            raise InputDataError(
                f"duplicated slice: {slices[i].path.name} and {slices[i + 1].path.name} share position "
                f"{along[i]:.3f} mm along the slice normal (several echoes/volumes in one series?)",
                path=folder,
            )
        step = float(np.median(steps))
        deviation = np.abs(steps - step)
        bad = np.flatnonzero(deviation > max(_POSITION_ATOL_MM, _SPACING_RTOL * step))
        if bad.size:
            i = int(bad[0])
            ratio = steps[i] / step
            if abs(ratio - round(ratio)) < _SPACING_RTOL and round(ratio) >= 2:
                problem = (
                    f"missing slice(s): gap of {steps[i]:.3f} mm between {slices[i].path.name} and "
                    f"{slices[i + 1].path.name} where the spacing is {step:.3f} mm "
                    f"({round(ratio) - 1} slice(s) missing)"
                )
            else:
                problem = (
                    f"inconsistent slice spacing: {steps[i]:.3f} mm between {slices[i].path.name} and "
                    f"{slices[i + 1].path.name}, median {step:.3f} mm"
                )
            raise InputDataError(problem, path=folder)
        instances = [s.dataset.get("InstanceNumber") for s in slices]
        if all(n is not None for n in instances) and int(instances[0]) > int(instances[-1]):
            # Keep acquisition order along the slice axis (as dcm2niix does): the stack was sorted by
            # position, only its direction follows InstanceNumber.
            slices, positions = slices[::-1], positions[::-1]
        index = np.arange(len(slices), dtype=np.float64)
        # Least-squares line through all slice origins (a gantry tilt gives an oblique straight line).
        design = np.stack([np.ones_like(index), index], axis=1)
        (fit_origin, fit_vector), *_ = np.linalg.lstsq(design, positions, rcond=None)
        off_line = np.linalg.norm(positions - design @ np.stack([fit_origin, fit_vector]), axis=1)
        if off_line.max() > max(0.1, _SPACING_RTOL * step):
            i = int(np.argmax(off_line))
            raise InputDataError(
                f"slice {slices[i].path.name} is {off_line[i]:.3f} mm off the stack's straight line",
                path=folder,
            )
        if slice_spacing == "fit":
            origin, slice_vector = fit_origin, fit_vector
        else:
            origin, slice_vector = positions[0], positions[1] - positions[0]
    else:
        origin = positions[0]
        thickness = float(
            first.dataset.get("SpacingBetweenSlices", first.dataset.get("SliceThickness", 1.0)) or 1.0
        )
        slice_vector = normal * thickness

    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cosine * spacing[1]  # column index i moves along the row direction
    affine_lps[:3, 1] = col_cosine * spacing[0]  # row index j moves along the column direction
    affine_lps[:3, 2] = slice_vector
    affine_lps[:3, 3] = origin
    flip = np.diag([*np.diag(RAS_TO_LPS), 1.0])
    return slices, flip @ affine_lps


def _pixels(slices: list[_Slice]) -> np.ndarray:
    """Stack pixel data as (columns, rows, slices), applying RescaleSlope/Intercept when present."""
    planes, slopes, intercepts = [], [], []
    for item in slices:
        try:
            planes.append(item.dataset.pixel_array)
        except Exception as err:  # pydicom raises many types for missing decoders / truncated data
            raise InputDataError(f"cannot decode pixel data: {err}", path=item.path) from err
        slopes.append(float(item.dataset.get("RescaleSlope", 1.0) or 1.0))
        intercepts.append(float(item.dataset.get("RescaleIntercept", 0.0) or 0.0))
        if planes[-1].ndim != 2:
            raise InputDataError(
                f"expected a single-frame 2D image, got shape {planes[-1].shape}", path=item.path
            )
    stack = np.stack(planes, axis=-1)  # (rows, columns, slices)
    slopes_arr, intercepts_arr = np.asarray(slopes), np.asarray(intercepts)
    if np.all(slopes_arr == 1.0) and np.all(intercepts_arr == 0.0):
        data = stack
    else:
        data = stack.astype(np.float32) * slopes_arr.astype(np.float32) + intercepts_arr.astype(np.float32)
        # Integer-valued results (e.g. CT-like intercept only) stay compact integers.
        if np.all(np.mod(slopes_arr, 1) == 0) and np.all(np.mod(intercepts_arr, 1) == 0):
            low, high = data.min(), data.max()
            for dtype in (np.int16, np.int32):
                if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
                    data = data.astype(dtype)
                    break
    return np.ascontiguousarray(data.transpose(1, 0, 2))


def _jsonable(value: Any, scale: float | None) -> Any:
    if isinstance(value, (pydicom.multival.MultiValue, list, tuple)):
        return [_jsonable(v, scale) for v in value]
    if scale is not None:
        try:
            number = float(value) * scale
        except (TypeError, ValueError):
            return str(value)
        return round(number, 10)
    if isinstance(value, (int, np.integer)) or type(value).__name__ == "IS":
        return int(value)
    if isinstance(value, (float, np.floating)) or type(value).__name__ in ("DSfloat", "DSdecimal"):
        return float(value)
    return str(value)


def _sidecar(dataset: pydicom.Dataset, n_slices: int, free_text: bool = False) -> dict[str, Any]:
    sidecar: dict[str, Any] = {}
    for keyword, (name, scale) in SIDECAR_FIELDS.items():
        if keyword in FREE_TEXT_FIELDS and not free_text:
            continue
        value = dataset.get(keyword)
        if value is None or value == "":
            continue
        sidecar[name] = _jsonable(value, scale)
    sidecar["NumberOfSlices"] = n_slices
    sidecar["ConversionSoftware"] = "medsynth.preprocessing.dicom"
    return sidecar


def read_dicom_series(
    folder: str | os.PathLike,
    series_number: int | None = None,
    series_description: str | None = None,
    slice_spacing: str = "first_pair",
    free_text: bool = False,
) -> tuple[nib.Nifti1Image, dict[str, Any]]:
    """Read one DICOM series into a NIfTI image and an acquisition-parameter sidecar.

    Args:
        folder: folder searched recursively for (possibly gzipped) DICOM files.
        series_number: select this SeriesNumber when several series are present.
        series_description: select this SeriesDescription when several series are present.
        slice_spacing: how the slice axis of the affine is derived from the (validated, evenly
            spaced) slice positions: ``"first_pair"`` (origin and step from the first two slices,
            the dcm2niix and ITK convention, the default for interoperability) or ``"fit"``
            (least-squares line through all positions; averages out the ~1e-4 mm rounding of
            ImagePositionPatient, which ``first_pair`` multiplies by the number of slices).
        free_text: copy SeriesDescription and ProtocolName into the sidecar (:data:`FREE_TEXT_FIELDS`).

    Returns:
        ``(image, sidecar)``: voxels in DICOM order (column, row, slice along the normal), RAS affine;
        the sidecar holds only allow-listed acquisition parameters (no identifiers).

    Raises:
        InputDataError: no or ambiguous series, missing/duplicated slices, inconsistent spacing,
            orientation or matrix size, undecodable pixels.
    """
    folder = Path(folder)
    groups = _scan(folder, stop_before_pixels=False)
    slices = _select(folder, groups, series_number, series_description)
    slices, affine = _geometry(slices, folder, slice_spacing)
    data = _pixels(slices)
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image = nib.Nifti1Image(data, affine, image.header)  # keep the exact float64 affine in memory
    info = _info(slices)
    logger.info(
        "%s: read series %s (%d slices, shape %s, voxel %s mm)",
        folder,
        info.series_number,
        len(slices),
        data.shape,
        tuple(round(float(z), 3) for z in image.header.get_zooms()[:3]),
    )
    return image, _sidecar(slices[0].dataset, len(slices), free_text)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "series"


def convert_series(
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    series_number: int | None = None,
    series_description: str | None = None,
    name_template: str = "series_{series_number}",
    overwrite: bool = False,
    slice_spacing: str = "first_pair",
    free_text: bool = False,
) -> list[Path]:
    """Convert the selected series (all series when no selection) to ``.nii.gz`` + ``.json``.

    Files are written atomically; existing outputs are kept unless ``overwrite`` (resumable).

    Args:
        folder: input DICOM folder.
        out_dir: output folder.
        series_number: convert only this series.
        series_description: convert only the series with this description.
        name_template: file stem, formatted with the fields of :class:`SeriesInfo`; the free-text
            fields (``series_description``, ``protocol_name``) need ``free_text``.
        overwrite: rewrite outputs that already exist.
        slice_spacing: see :func:`read_dicom_series`.
        free_text: allow SeriesDescription and ProtocolName in the sidecars and names.

    Returns:
        The written (or already present) paths, NIfTI then JSON per series.
    """
    folder, out_dir = Path(folder), Path(out_dir)
    if not free_text and ("{series_description" in name_template or "{protocol_name" in name_template):
        raise ValueError(
            f"name_template {name_template!r} uses free-text header fields, which may hold names: "
            "allow them with free_text=True (dicom2nifti --free-text) or name files by series number"
        )
    if series_number is None and series_description is None:
        targets = list_series(folder)
    else:
        groups = _scan(folder, stop_before_pixels=True)
        targets = [_info(_select(folder, groups, series_number, series_description))]
    written: list[Path] = []
    for info in targets:
        stem = _safe_name(name_template.format(**info.__dict__))
        nifti_path, json_path = out_dir / f"{stem}.nii.gz", out_dir / f"{stem}.json"
        if not overwrite and nifti_path.exists() and json_path.exists():
            logger.info("%s exists, skipping", nifti_path)
        else:
            image, sidecar = read_dicom_series(
                folder,
                series_number=info.series_number,
                series_description=info.series_description,
                slice_spacing=slice_spacing,
                free_text=free_text,
            )
            with atomic_path(nifti_path) as tmp:
                nib.save(image, tmp)
            save_json(sidecar, json_path)
        written += [nifti_path, json_path]
    return written
