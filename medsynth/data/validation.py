"""Input checks of a cohort before anything trains on it.

Every problem becomes an :class:`~medsynth.errors.InputDataError` naming the patient, the file and
the problem; :func:`validate_cohort` checks every patient and raises one
:class:`~medsynth.errors.CohortValidationError` listing all of them. Headers are checked first (cheap:
existence, readability, shapes, affines); voxel data is then read once per file (non-finite voxels,
label values, empty brain). Files shared by several patients (the atlas) are read once and their
data problems are reported once, without a patient.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from medsynth.constants import (
    BRAIN_MASK_THRESHOLD,
    MANIFEST_BRAIN_MASK_COLUMN,
    MANIFEST_LABEL_COLUMN,
    TISSUE_COLUMNS,
    atlas_column,
)
from medsynth.data.conventions import foreign_convention_problem
from medsynth.data.manifest import check_patient_level_split, path_columns, sequences_of
from medsynth.errors import CohortValidationError, InputDataError
from medsynth.utils.geometry import AFFINE_ATOL_MM
from medsynth.utils.hashing import files_fingerprint, parts_digest
from medsynth.utils.io import save_json
from medsynth.utils.labels import label_map_problem

logger = logging.getLogger(__name__)


def _spatial_shape(image: nib.spatialimages.SpatialImage) -> tuple[int, ...]:
    shape = tuple(int(s) for s in image.shape)
    while len(shape) > 3 and shape[-1] == 1:  # (X, Y, Z, 1) is a 3D volume written as 4D
        shape = shape[:-1]
    return shape


def _load_header(
    path: str, column: str, patient_id: str | None
) -> tuple[nib.spatialimages.SpatialImage | None, list]:
    if not path:
        return None, [InputDataError(f"no file given in column {column!r}", None, patient_id)]
    if not os.path.isfile(path):
        return None, [InputDataError(f"file does not exist ({column})", path, patient_id)]
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises many types for corrupt files
        return None, [InputDataError(f"unreadable image ({column}): {error}", path, patient_id)]
    shape = _spatial_shape(image)
    if len(shape) != 3:
        return None, [InputDataError(f"expected a 3D volume ({column}), got shape {shape}", path, patient_id)]
    return image, []


def _read_data(image: nib.spatialimages.SpatialImage, path: str, column: str, patient_id: str | None):
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as error:
        return None, [InputDataError(f"cannot read voxel data ({column}): {error}", path, patient_id)]
    return data.reshape(_spatial_shape(image)), []


def _nonfinite_problem(data: np.ndarray, column: str) -> str | None:
    if not np.issubdtype(data.dtype, np.floating):
        return None
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    return f"contains {bad} NaN/inf voxel(s) ({column})" if bad else None


def grid_problem(image, reference, reference_column: str, column: str, what: str = "") -> str | None:
    """Why ``image`` (from ``column``) is not on the grid of ``reference``, or ``None`` when it is."""
    shape, ref_shape = _spatial_shape(image), _spatial_shape(reference)
    if shape != ref_shape:
        return f"{what}shape {shape} ({column}) differs from {ref_shape} ({reference_column})"
    difference = float(np.abs(np.asarray(image.affine) - np.asarray(reference.affine)).max())
    if difference > AFFINE_ATOL_MM:
        return (
            f"{what}affine ({column}) differs from the affine of {reference_column} "
            f"by up to {difference:.4g} mm "
            f"(tolerance {AFFINE_ATOL_MM} mm)"
        )
    return None


def _constant_problem(data: np.ndarray, column: str) -> str | None:
    """An image holding one value everywhere (all zero: an empty or failed export) has nothing to
    learn from and would scale to NaN or a constant."""
    if data.size and float(np.max(data)) == float(np.min(data)):
        value = float(np.min(data))
        what = "all zero" if value == 0 else f"constant ({value:g} everywhere)"
        return f"sequence {column} is {what}: an empty or failed export? Re-export or remove this patient"
    return None


def source_file_problems(
    files: Mapping[str, str], patient_id: str, sequences: Sequence[str]
) -> list[InputDataError]:
    """The per-file checks of :func:`validate_patient` on a patient's source files (``column ->
    path``) before anything is derived from them: readable header and voxels (a truncated file is
    named), finite values, sequences not constant. The adapters (BraTS, CSV) run it first, so that
    a bad file gets the same message whatever the source, and no half-derived cache is left."""
    errors: list[InputDataError] = []
    for column, path in files.items():
        if not path:
            continue
        image, problems = _load_header(str(path), column, patient_id)
        errors += problems
        if image is None:
            continue
        data, problems = _read_data(image, str(path), column, patient_id)
        errors += problems
        if data is None:
            continue
        problem = _nonfinite_problem(data, column)
        if problem is None and column in sequences:
            problem = _constant_problem(data, column)
        if problem:
            errors.append(InputDataError(problem, str(path), patient_id))
    return errors


def check_shared_file(path: str, column: str) -> list[InputDataError]:
    """Header and data checks of a file that several patients share (an atlas volume)."""
    image, errors = _load_header(path, column, None)
    if image is None:
        return errors
    data, errors = _read_data(image, path, column, None)
    if data is None:
        return errors
    problem = _nonfinite_problem(data, column)
    return [InputDataError(problem, path)] if problem else []


def validate_patient(
    row: Mapping[str, str], sequences: Sequence[str], check_atlas: bool = True
) -> list[InputDataError]:
    """All problems of one manifest row (empty when the patient is usable).

    The atlas is checked against the patient's grid here; its voxel data, which patients share,
    is checked by :func:`check_shared_file`.
    """
    pid = str(row.get("patient_id", "?"))
    errors: list[InputDataError] = []
    own_columns = [*sequences, MANIFEST_LABEL_COLUMN, MANIFEST_BRAIN_MASK_COLUMN]
    own_columns += [c for c in TISSUE_COLUMNS if str(row.get(c, "") or "")]  # optional, Shin et al.
    headers: dict[str, nib.spatialimages.SpatialImage] = {}
    for column in own_columns:
        image, problems = _load_header(str(row.get(column, "") or ""), column, pid)
        errors += problems
        if image is not None:
            headers[column] = image
    if not headers:
        return errors
    reference_column = next(iter(headers))
    reference = headers[reference_column]
    grid_ok = {reference_column}
    for column, image in list(headers.items())[1:]:
        problem = grid_problem(image, reference, reference_column, column)
        if problem:
            errors.append(InputDataError(problem, row[column], pid))
        else:
            grid_ok.add(column)
    if check_atlas:
        for sequence in sequences:
            column = atlas_column(sequence)
            image, problems = _load_header(str(row.get(column, "") or ""), column, pid)
            errors += problems
            if image is not None:
                problem = grid_problem(
                    image, reference, reference_column, column, what="atlas grid mismatch: "
                )
                if problem:
                    errors.append(InputDataError(problem, row[column], pid))

    # Voxel data, once per file; only for files whose grid agrees (the rest already failed).
    for column in own_columns:
        if column not in headers or column not in grid_ok:
            continue
        path = row[column]
        data, problems = _read_data(headers[column], path, column, pid)
        errors += problems
        if data is None:
            continue
        problem = _nonfinite_problem(data, column)
        if problem:
            errors.append(InputDataError(problem, path, pid))
            continue
        if column in sequences:
            problem = _constant_problem(data, column)
            if problem:
                errors.append(InputDataError(problem, path, pid))
        elif column == MANIFEST_LABEL_COLUMN:
            errors += _label_problems(data, path, pid)
        elif column in TISSUE_COLUMNS and (
            data.min() < -_PROBABILITY_SLACK or data.max() > 1 + _PROBABILITY_SLACK
        ):
            errors.append(
                InputDataError(
                    f"{column} is not a probability map: values {data.min():g}..{data.max():g}, "
                    "expected 0..1",
                    path,
                    pid,
                )
            )
        elif column == MANIFEST_BRAIN_MASK_COLUMN and not np.any(data >= BRAIN_MASK_THRESHOLD):
            errors.append(
                InputDataError(f"brain mask is empty (no voxel >= {BRAIN_MASK_THRESHOLD})", path, pid)
            )
    return errors


# Resampling and storage rounding may leave a probability map slightly outside [0, 1].
_PROBABILITY_SLACK = 0.01


def _label_problems(label: np.ndarray, path: str, pid: str) -> list[InputDataError]:
    problem = label_map_problem(label)
    if problem is not None:
        return [InputDataError(f"label map {problem}", path, pid)]
    if not np.any(label > 0):
        return [InputDataError("label map has no brain (every voxel is background 0)", path, pid)]
    foreign = foreign_convention_problem(label)
    if foreign is not None:
        return [InputDataError(f"label map {foreign}", path, pid)]
    return []


def cohort_fingerprint(manifest: pd.DataFrame) -> str:
    """A key of every file of the cohort (path, size, modification time) and of its split: changes when any
    does."""
    columns = [c for c in (*path_columns(sequences_of(manifest)), *TISSUE_COLUMNS) if c in manifest.columns]
    rows = manifest.sort_values("patient_id")
    assignment = [f"{row['patient_id']}|{row['split']}" for _, row in rows.iterrows()]
    files = [str(row[column] or "") for _, row in rows.iterrows() for column in columns]
    return parts_digest(*assignment, files_fingerprint(files, length=64), length=20)


def validate_cohort(
    manifest: pd.DataFrame,
    check_atlas: bool = True,
    num_workers: int = 1,
    record_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> None:
    """Check every patient of ``manifest``; raise one :class:`CohortValidationError` listing all problems.

    Args:
        manifest: an in-memory manifest (absolute paths).
        check_atlas: also check the ``atlas_<sequence>`` columns.
        num_workers: threads reading files (decompression releases the GIL).
        record_dir: if given, a passed validation is recorded there under the cohort's
            :func:`cohort_fingerprint` and skipped next time while no file changed.
        progress: show a progress bar.
    """
    check_patient_level_split(manifest)
    if manifest["patient_id"].duplicated().any():
        duplicated = sorted(manifest.loc[manifest["patient_id"].duplicated(), "patient_id"].unique())
        raise CohortValidationError(
            [InputDataError("listed more than once", None, pid) for pid in duplicated]
        )
    record = None
    if record_dir is not None:
        record = Path(record_dir) / f"validated_{cohort_fingerprint(manifest)}.json"
        if record.is_file():
            logger.debug("cohort already validated (%s)", record)
            return
    sequences = sequences_of(manifest)
    atlas_columns = [atlas_column(s) for s in sequences]
    if check_atlas and not any(c in manifest.columns and (manifest[c] != "").any() for c in atlas_columns):
        logger.info(
            "the cohort has no atlas columns: atlas checks skipped (a trained model brings its atlas)"
        )
        check_atlas = False
    rows = [row for _, row in manifest.iterrows()]
    errors: list[InputDataError] = []
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        results = pool.map(lambda row: validate_patient(row, sequences, check_atlas), rows)
        for problems in tqdm(results, total=len(rows), desc="validating patients", disable=not progress):
            errors += problems
        if check_atlas:
            shared = {
                (str(row[atlas_column(s)]), atlas_column(s))
                for row in rows
                for s in sequences
                if str(row.get(atlas_column(s), "") or "") and os.path.isfile(str(row[atlas_column(s)]))
            }
            for problems in pool.map(lambda item: check_shared_file(*item), sorted(shared)):
                errors += problems
    if errors:
        raise CohortValidationError(errors)
    logger.info("validated %d patient(s): no problems", len(rows))
    if record is not None:
        save_json({"patients": len(rows), "sequences": list(sequences)}, record)


__all__ = [
    "BRAIN_MASK_THRESHOLD",
    "check_shared_file",
    "cohort_fingerprint",
    "grid_problem",
    "source_file_problems",
    "validate_cohort",
    "validate_patient",
]
