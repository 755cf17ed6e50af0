"""Constructed DICOM series of known geometry: a Siemens mosaic (one file per volume) and an
Enhanced MR multi-frame file, written with pydicom from a voxel array and a RAS affine.

Every builder takes ``volume[i, j, k]`` (``int16``; a 4th axis for volumes where allowed) and the RAS
voxel-to-world ``affine`` of that array, and writes the DICOM geometry in LPS as the standard says:
``i`` runs along a row (ImageOrientationPatient's row cosine, PixelSpacing[1]), ``j`` down the
columns (column cosine, PixelSpacing[0]), ``k`` along the slice axis. Slices must not be tilted (the
slice axis is parallel to the normal of the image plane); it may point either way along it.

All attribute values are synthetic. The planted identifiers (:data:`PLANTED`) all contain
:data:`PLANTED_MARK`, and the planted free-text ImageComments (:data:`PLANTED_FREE_TEXT`, which sites
fill with anything, names included) contains :data:`FREE_TEXT_MARK`, so a test can check that none
reaches an output.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

__all__ = [
    "ENHANCED_MR_STORAGE",
    "FREE_TEXT_MARK",
    "PLANTED",
    "PLANTED_FREE_TEXT",
    "PLANTED_MARK",
    "LpsGeometry",
    "csa_header",
    "lps_geometry",
    "oblique_affine",
    "write_enhanced_mr",
    "write_mosaic_series",
]

ENHANCED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
PLANTED_MARK = "PLANTED"
# Identifying attributes filled with fake values; none may appear in any output.
PLANTED = {
    "PatientName": "PLANTED^NAME",
    "PatientID": "PLANTED-ID-123",
    "InstitutionName": "PLANTED INSTITUTE",
    "InstitutionAddress": "PLANTED STREET 1",
    "ReferringPhysicianName": "PLANTED^REFERRER",
    "OperatorsName": "PLANTED^OPERATOR",
    "StationName": "PLANTED-STATION",
    "AccessionNumber": "PLANTED-ACC",
}
FREE_TEXT_MARK = "FREETEXT-MARK"
PLANTED_FREE_TEXT = {"ImageComments": "FREETEXT-MARK comment"}
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (its own inverse)


def oblique_affine(
    angle_deg: float = 15.0,
    axis: tuple[float, float, float] = (1.0, 0.5, 0.3),
    spacing: tuple[float, float, float] = (0.9, 1.1, 3.0),
    origin: tuple[float, float, float] = (-80.3, -95.7, -30.2),
    slice_sign: float = 1.0,
) -> np.ndarray:
    """A RAS voxel-to-world affine: rotation by ``angle_deg`` about ``axis``, voxel ``spacing`` (mm);
    ``slice_sign=-1`` makes the slice axis point against the image plane's normal."""
    axis_v = np.asarray(axis, dtype=np.float64)
    axis_v /= np.linalg.norm(axis_v)
    theta = np.deg2rad(angle_deg)
    cross = np.array(
        [[0.0, -axis_v[2], axis_v[1]], [axis_v[2], 0.0, -axis_v[0]], [-axis_v[1], axis_v[0], 0.0]]
    )
    rotation = np.eye(3) + np.sin(theta) * cross + (1.0 - np.cos(theta)) * cross @ cross  # Rodrigues
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([spacing[0], spacing[1], slice_sign * spacing[2]])
    affine[:3, 3] = origin
    return affine


@dataclass(frozen=True)
class LpsGeometry:
    """The DICOM (LPS) description of a RAS affine."""

    row: np.ndarray  # direction of increasing column index i
    col: np.ndarray  # direction of increasing row index j
    normal: np.ndarray  # row x col
    pixel_spacing: tuple[float, float]  # (between rows, between columns) = (|dj|, |di|)
    slice_step: np.ndarray  # LPS displacement from slice k to slice k + 1
    spacing_between_slices: float
    origin: np.ndarray  # LPS position of voxel (0, 0, 0)

    def position(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice ``k`` (its first transmitted pixel, i = j = 0)."""
        return self.origin + k * self.slice_step


def lps_geometry(affine: np.ndarray) -> LpsGeometry:
    """Split a RAS affine into DICOM's cosines, spacings and positions (refusing tilted slices)."""
    lps = _LPS @ np.asarray(affine, dtype=np.float64)
    step_i, step_j, step_k = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    row, col = step_i / np.linalg.norm(step_i), step_j / np.linalg.norm(step_j)
    if abs(row @ col) > 1e-9:
        raise ValueError("the in-plane axes of the affine are not orthogonal")
    normal = np.cross(row, col)
    spacing = float(np.linalg.norm(step_k))
    if abs(abs(normal @ step_k) - spacing) > 1e-9 * spacing:
        raise ValueError("the slice axis is tilted against the image plane's normal")
    return LpsGeometry(
        row=row,
        col=col,
        normal=normal,
        pixel_spacing=(float(np.linalg.norm(step_j)), float(np.linalg.norm(step_i))),
        slice_step=step_k,
        spacing_between_slices=spacing,
        origin=lps[:3, 3],
    )


def _ds(values) -> list[str]:
    """Decimal strings of at most 16 characters, as precise as that allows."""
    out = []
    for value in values:
        value = float(value)
        for digits in range(12, 0, -1):
            text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
            if len(text) <= 16:
                break
        out.append("0" if text in ("-0", "") else text)
    return out


def _base(sop_class: str, series_uid: str, series_number: int, description: str) -> Dataset:
    """An MR dataset with file meta, synthetic study/series attributes and the planted identifiers."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.2"
    for keyword, value in {**PLANTED, **PLANTED_FREE_TEXT}.items():
        setattr(ds, keyword, value)
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID = "1"
    ds.Modality = "MR"
    ds.MagneticFieldStrength = 3
    ds.PatientPosition = "HFS"
    ds.SeriesNumber = series_number
    ds.SeriesDescription = ds.ProtocolName = description
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    return ds


def _save(ds: Dataset, path: Path, compress: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not compress:
        ds.save_as(path, enforce_file_format=True)
        return path
    target = path.with_name(path.name + ".gz")
    with gzip.open(target, "wb") as handle:
        ds.save_as(handle, enforce_file_format=True)
    return target


def _int16(volume: np.ndarray) -> np.ndarray:
    volume = np.asarray(volume)
    if volume.dtype != np.int16:
        raise TypeError(f"expected an int16 volume, got {volume.dtype}")
    return volume


# --- Siemens CSA header (format "SV10") ---------------------------------------------------------


def csa_header(elements: dict[str, tuple[str, list[str]]]) -> bytes:
    """A Siemens CSA header, format SV10: ``{name: (vr, [values as text])}``.

    Layout: ``"SV10" 04 03 02 01``, uint32 count, uint32 77; per element a 64-byte name, int32 VM,
    4-byte VR, int32 SyngoDT, int32 number of items, int32 77; per item four int32 (the length,
    repeated, then 77 and the length again) and the NUL-terminated value padded to 4 bytes.
    """
    out = bytearray(b"SV10\x04\x03\x02\x01")
    out += struct.pack("<2I", len(elements), 77)
    for name, (vr, values) in elements.items():
        out += struct.pack("<64si4s3i", name.encode(), len(values), vr.encode(), 0, len(values), 77)
        for value in values:
            data = value.encode() + b"\x00"
            out += struct.pack("<4i", len(data), len(data), 77, len(data))
            out += data + b"\x00" * (-len(data) % 4)
    return bytes(out)


# --- Siemens mosaic -------------------------------------------------------------------------------


def write_mosaic_series(
    folder: str | Path,
    volumes: np.ndarray,
    affine: np.ndarray,
    *,
    series_number: int = 4,
    description: str = "constructed_mosaic",
    with_csa: bool = True,
    repetition_time_ms: float = 2000.0,
) -> list[Path]:
    """Write ``volumes`` (x, y, z[, t]) as a Siemens mosaic series, one file per volume.

    Slice ``k`` is the tile in grid row ``k // g``, column ``k % g`` of a ``g x g`` mosaic,
    ``g = ceil(sqrt(z))`` (unused tiles are zero). ImagePositionPatient is Siemens': the position of
    the mosaic's first pixel if the whole mosaic were one image centred on slice 0. The slice count is
    (0019,100A) NumberOfImagesInMosaic; with ``with_csa`` the CSA image header (0029,1010) also holds
    it and SliceNormalVector, the direction of increasing slice index.
    """
    volumes = _int16(volumes)
    if volumes.ndim == 3:
        volumes = volumes[..., None]
    nx, ny, nz, nt = volumes.shape
    geometry = lps_geometry(affine)
    grid = int(np.ceil(np.sqrt(nz)))
    # Siemens' position: slice 0's centre minus half the mosaic, in pixels along rows and columns.
    step_i = geometry.row * geometry.pixel_spacing[1]
    step_j = geometry.col * geometry.pixel_spacing[0]
    position = geometry.origin - (grid - 1) * (nx * step_i + ny * step_j) / 2.0
    slice_direction = geometry.slice_step / geometry.spacing_between_slices
    series_uid = generate_uid()
    paths = []
    for t in range(nt):
        mosaic = np.zeros((grid * ny, grid * nx), dtype=np.int16)
        for k in range(nz):
            r, c = divmod(k, grid)
            mosaic[r * ny : (r + 1) * ny, c * nx : (c + 1) * nx] = volumes[:, :, k, t].T
        ds = _base(MRImageStorage, series_uid, series_number, description)
        ds.Manufacturer = "SIEMENS"
        ds.ManufacturerModelName = "Constructed"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
        ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "EP", "SK", "2D"
        ds.EchoTime, ds.RepetitionTime, ds.FlipAngle = 30.0, repetition_time_ms, 90.0
        ds.InstanceNumber = ds.AcquisitionNumber = t + 1
        seconds = t * repetition_time_ms / 1000.0
        ds.AcquisitionTime = f"{12 * 10000 + int(seconds // 60) * 100 + seconds % 60:013.6f}"
        ds.SliceThickness = _ds([0.9 * geometry.spacing_between_slices])[0]  # a gap between slices
        ds.SpacingBetweenSlices = _ds([geometry.spacing_between_slices])[0]
        ds.ImageOrientationPatient = _ds([*geometry.row, *geometry.col])
        ds.ImagePositionPatient = _ds(position)
        ds.SliceLocation = _ds([geometry.origin @ geometry.normal])[0]
        ds.PixelSpacing = _ds(geometry.pixel_spacing)
        ds.Rows, ds.Columns = mosaic.shape
        header = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
        header.add_new(0x0A, "US", nz)  # NumberOfImagesInMosaic
        if with_csa:
            csa = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
            elements = {
                "NumberOfImagesInMosaic": ("US", [str(nz)]),
                "SliceNormalVector": ("FD", [f"{v:.8f}" for v in slice_direction]),
                "ProtocolSliceNumber": ("IS", ["0"]),
            }
            csa.add_new(0x08, "CS", "IMAGE NUM 4")
            csa.add_new(0x09, "LO", "20000101")
            csa.add_new(0x10, "OB", csa_header(elements))
        ds.PixelData = mosaic.tobytes()
        paths.append(_save(ds, Path(folder) / f"mosaic_{t:03d}.dcm"))
    return paths


# --- Enhanced MR (multi-frame) --------------------------------------------------------------------


def _item(**attributes) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def write_enhanced_mr(
    folder: str | Path,
    volume: np.ndarray,
    affine: np.ndarray,
    *,
    series_number: int = 6,
    description: str = "constructed_enhanced",
    compress: bool = False,
    frame_order: np.ndarray | None = None,
) -> Path:
    """Write ``volume`` (x, y, z) as one Enhanced MR Image file of ``z`` frames (one per slice).

    Frame ``f`` holds slice ``frame_order[f]`` (default: in order); its FrameContentSequence gives
    that slice's InStackPositionNumber (1-based) and DimensionIndexValues ``[1, k + 1]`` under a
    DimensionIndexSequence of (StackID, InStackPositionNumber). With ``compress`` the file is
    written gzip-compressed as ``.dcm.gz``.
    """
    volume = _int16(volume)
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {volume.shape}")
    nx, ny, nz = volume.shape
    geometry = lps_geometry(affine)
    order = np.arange(nz) if frame_order is None else np.asarray(frame_order)
    if sorted(order.tolist()) != list(range(nz)):
        raise ValueError("frame_order must be a permutation of the slice indices")
    ds = _base(ENHANCED_MR_STORAGE, generate_uid(), series_number, description)
    ds.Manufacturer = "CONSTRUCTED"
    ds.ManufacturerModelName = "Constructed"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.InstanceNumber = 1
    ds.AcquisitionDateTime = "20000101120000"
    ds.ContentQualification = "RESEARCH"
    ds.BurnedInAnnotation = "NO"
    ds.PixelPresentation, ds.VolumetricProperties, ds.VolumeBasedCalculationTechnique = (
        "MONOCHROME",
        "VOLUME",
        "NONE",
    )
    ds.ComplexImageComponent, ds.AcquisitionContrast = "MAGNITUDE", "T1"
    ds.MRAcquisitionType = "3D"
    ds.EchoPulseSequence = "GRADIENT"
    ds.NumberOfFrames = nz
    ds.Rows, ds.Columns = ny, nx
    ds.DimensionOrganizationType = "3D"
    organization = generate_uid()
    ds.DimensionOrganizationSequence = Sequence([_item(DimensionOrganizationUID=organization)])
    frame_content = 0x00209111
    ds.DimensionIndexSequence = Sequence(
        [
            _item(
                DimensionOrganizationUID=organization,
                DimensionIndexPointer=0x00209056,  # StackID
                FunctionalGroupPointer=frame_content,
                DimensionDescriptionLabel="Stack ID",
            ),
            _item(
                DimensionOrganizationUID=organization,
                DimensionIndexPointer=0x00209057,  # InStackPositionNumber
                FunctionalGroupPointer=frame_content,
                DimensionDescriptionLabel="In-Stack Position Number",
            ),
        ]
    )
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence(
        [
            _item(
                PixelSpacing=_ds(geometry.pixel_spacing),
                SliceThickness=_ds([geometry.spacing_between_slices])[0],
                SpacingBetweenSlices=_ds([geometry.spacing_between_slices])[0],
            )
        ]
    )
    shared.PlaneOrientationSequence = Sequence(
        [_item(ImageOrientationPatient=_ds([*geometry.row, *geometry.col]))]
    )
    shared.PixelValueTransformationSequence = Sequence(
        [_item(RescaleIntercept="0", RescaleSlope="1", RescaleType="US")]
    )
    shared.MRTimingAndRelatedParametersSequence = Sequence(
        [_item(RepetitionTime=8.0, FlipAngle=8.0, EchoTrainLength=1)]
    )
    shared.MREchoSequence = Sequence([_item(EffectiveEchoTime=3.5)])
    shared.MRImageFrameTypeSequence = Sequence(
        [
            _item(
                FrameType=["ORIGINAL", "PRIMARY", "M", "NONE"],
                PixelPresentation="MONOCHROME",
                VolumetricProperties="VOLUME",
                VolumeBasedCalculationTechnique="NONE",
                ComplexImageComponent="MAGNITUDE",
                AcquisitionContrast="T1",
            )
        ]
    )
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in order:
        frame = Dataset()
        frame.FrameContentSequence = Sequence(
            [
                _item(
                    StackID="1",
                    InStackPositionNumber=int(k) + 1,
                    DimensionIndexValues=[1, int(k) + 1],
                    FrameAcquisitionNumber=1,
                )
            ]
        )
        frame.PlanePositionSequence = Sequence([_item(ImagePositionPatient=_ds(geometry.position(int(k))))])
        per_frame.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    frames = np.stack([volume[:, :, int(k)].T for k in order])  # (frames, rows, columns)
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    return _save(ds, Path(folder) / "enhanced.dcm", compress=compress)
