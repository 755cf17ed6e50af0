"""Write a phantom volume as a DICOM MR series (one file per axial slice), like a scanner export.

Only phantom identifiers go into the headers: ``PatientName`` ``Phantom^<pid>``, ``PatientID`` the
phantom id; no birth date, no real names, no acquisition dates. UIDs are derived from the phantom's
seed so that a rerun writes the same series.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

import medsynth
from medsynth.data.phantom.sampling import Grid
from medsynth.utils.dicom import save_dicom
from medsynth.utils.geometry import RAS_TO_LPS
from medsynth.utils.io import atomic_path

# DICOM patient coordinates are LPS; the phantom's world is RAS.


def write_dicom_series(
    volume: np.ndarray,
    grid: Grid,
    folder: str | os.PathLike,
    patient_id: str,
    series_description: str,
    uid_seed: str,
    rescale_slope: float = 0.5,
    series_number: int = 1,
) -> list[Path]:
    """Write ``volume`` (``[x, y, z]`` on ``grid``, RAS) as one ``.dcm`` per slice into ``folder``.

    Stored pixels are ``round(volume / rescale_slope)`` as signed 16-bit with ``RescaleSlope`` set, so
    a reader that applies the rescale gets ``volume`` back (to ``rescale_slope / 2``).

    Returns:
        The written files, in slice order.
    """
    affine = np.asarray(grid.affine, dtype=np.float64)
    linear = affine[:3, :3]
    spacing = grid.spacing
    directions = linear / spacing
    # Rows of the DICOM image run along -y (anterior first), columns along -x (patient's right first):
    # the usual axial display. In LPS terms both are +L/+P directions.
    row_cosine = RAS_TO_LPS @ (-directions[:, 0])  # direction in which the column index increases
    column_cosine = RAS_TO_LPS @ (-directions[:, 1])  # direction in which the row index increases
    stored = np.rint(np.asarray(volume, dtype=np.float64) / rescale_slope)
    if stored.min() < np.iinfo(np.int16).min or stored.max() > np.iinfo(np.int16).max:
        raise ValueError(
            f"volume range {volume.min()}..{volume.max()} does not fit int16 with slope {rescale_slope}"
        )
    stored = stored.astype(np.int16)
    nx, ny, nz = volume.shape
    study_uid = generate_uid(entropy_srcs=[uid_seed, "study"])
    series_uid = generate_uid(entropy_srcs=[uid_seed, "series", series_description])
    frame_uid = generate_uid(entropy_srcs=[uid_seed, "frame"])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(nz):
        first_pixel = affine @ np.array([nx - 1, ny - 1, k, 1.0])
        position = RAS_TO_LPS @ first_pixel[:3]
        pixels = stored[::-1, ::-1, k].T  # [row, column] = [x reversed, y reversed] transposed
        dataset = _slice_dataset(
            pixels=np.ascontiguousarray(pixels),
            position=position,
            orientation=np.concatenate([row_cosine, column_cosine]),
            pixel_spacing=(float(spacing[1]), float(spacing[0])),
            slice_thickness=float(spacing[2]),
            slice_location=float(position[2]),
            instance=k + 1,
            patient_id=patient_id,
            description=series_description,
            study_uid=study_uid,
            series_uid=series_uid,
            frame_uid=frame_uid,
            sop_uid=generate_uid(entropy_srcs=[uid_seed, "slice", series_description, str(k)]),
            series_number=series_number,
            rescale_slope=rescale_slope,
        )
        path = folder / f"slice_{k + 1:04d}.dcm"
        with atomic_path(path) as tmp:
            save_dicom(dataset, tmp)
        files.append(path)
    return files


def _slice_dataset(
    pixels,
    position,
    orientation,
    pixel_spacing,
    slice_thickness,
    slice_location,
    instance,
    patient_id,
    description,
    study_uid,
    series_uid,
    frame_uid,
    sop_uid,
    series_number,
    rescale_slope,
) -> pydicom.Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid(entropy_srcs=["medsynth", medsynth.__version__])

    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "MR"
    ds.Manufacturer = "medsynth digital phantom"
    ds.ImageType = ["DERIVED", "SECONDARY", "M"]
    ds.PatientName = f"Phantom^{patient_id}"
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance
    ds.SeriesDescription = description
    ds.BodyPartExamined = "BRAIN"
    ds.MRAcquisitionType = "3D"
    ds.MagneticFieldStrength = 3.0
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = list(pixel_spacing)
    ds.SliceThickness = slice_thickness
    ds.SpacingBetweenSlices = slice_thickness
    ds.SliceLocation = slice_location
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = rescale_slope
    ds.RescaleIntercept = 0.0
    ds.RescaleType = "US"
    ds.PixelData = pixels.astype("<i2").tobytes()
    return ds
