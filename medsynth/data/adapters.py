"""Adapters turning a dataset on disk into a cohort manifest (absolute paths in memory).

Three sources are understood:

* a *ready* cohort folder (the phantom generator's or the preprocessing's output): ``DIR/manifest.csv``;
* a *BraTS* folder, ``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``: the label map of this project and
  a brain mask are derived per case, and a group atlas is averaged over the train split;
* a *user CSV*: ``patient_id``, one path column per sequence (aliases such as ``t1ce`` allowed),
  ``label``; optional ``brain_mask`` (else ``label > 0``), ``split`` (else assigned from the seed),
  ``atlas_<sequence>`` columns (else averaged over the train split, which needs a common grid) and
  ``tissue_csf``, ``tissue_gm``, ``tissue_wm`` (probability maps on the label's grid, Shin et al.'s input).

Derived files go to an output folder, are written atomically, and are reused when present, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from medsynth.constants import (
    BRAIN_MASK_THRESHOLD,
    BRATS_SEQUENCES,
    CLINICAL_SEQUENCES,
    MANIFEST_BRAIN_MASK_COLUMN,
    MANIFEST_LABEL_COLUMN,
    SPLITS,
    TISSUE_COLUMNS,
    atlas_column,
    canonical_sequence,
)
from medsynth.data.conventions import (
    LABEL_CONVENTIONS,
    PROJECT_CONVENTION,
    LabelConvention,
    to_project_labels,
)
from medsynth.data.conventions import label_convention as label_convention_of
from medsynth.data.manifest import (
    DEFAULT_SPLIT_FRACTIONS,
    check_patient_level_split,
    read_manifest,
    sequences_of,
    split_patients,
    write_manifest,
)
from medsynth.data.validation import grid_problem, source_file_problems
from medsynth.errors import CohortValidationError, InputDataError
from medsynth.utils.hashing import file_digest, files_fingerprint, parts_digest
from medsynth.utils.io import save_json, save_nifti

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
# Optional user-CSV column: the label convention of the row's label map (medsynth.data.conventions).
LABEL_CONVENTION_COLUMN = "label_convention"
NIFTI_SUFFIXES = (".nii.gz", ".nii")
ATLAS_DIRNAME = "atlas"
ATLAS_RECORD = "atlas.json"
# Brain normalisation before averaging: anatomical sequences are in arbitrary scanner units, so each
# volume is divided by its brain p99.5; APTw is already in physical units (percent) and is averaged as is.
ATLAS_NORMALISATION_PERCENTILE: dict[str, float | None] = {
    sequence: (None if sequence == "aptw" else 99.5) for sequence in CLINICAL_SEQUENCES
}


# ----------------------------------------------------------------------------------------------
# Ready cohorts


def is_ready_cohort(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a ``manifest.csv`` (phantom or preprocessing output)."""
    return (Path(directory) / MANIFEST_NAME).is_file()


def read_ready_cohort(directory: str | os.PathLike) -> pd.DataFrame:
    """The manifest of a ready cohort folder, with absolute paths."""
    return read_manifest(Path(directory) / MANIFEST_NAME)


# ----------------------------------------------------------------------------------------------
# Shared helpers


def _strip_nifti_suffix(name: str) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _safe_name(patient_id: str) -> str:
    """``patient_id`` as a file-name component (derived files are named after the patient)."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", patient_id) or patient_id in (".", ".."):
        raise InputDataError(
            "patient_id must contain only letters, digits, '.', '_' and '-' (it names derived files)",
            patient_id=patient_id,
        )
    return patient_id


def _is_up_to_date(derived: Sequence[Path], sources: Sequence[str | os.PathLike]) -> bool:
    """Whether every derived file exists and is newer than every source (else it is derived again)."""
    if not all(Path(p).is_file() for p in derived):
        return False
    newest_source = max(os.stat(s).st_mtime_ns for s in sources)
    return min(Path(p).stat().st_mtime_ns for p in derived) >= newest_source


def _load_volume(path: str | os.PathLike) -> tuple[np.ndarray, nib.spatialimages.SpatialImage]:
    image = nib.load(str(path))
    data = np.asanyarray(image.dataobj)
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    return data, image


def brain_normalised(volume: np.ndarray, brain: np.ndarray, percentile: float | None) -> np.ndarray:
    """``volume`` / its ``percentile`` over ``brain`` (float32); unchanged when ``percentile`` is None."""
    volume = volume.astype(np.float32, copy=False)
    if percentile is None:
        return volume
    values = volume[brain]
    scale = float(np.percentile(values, percentile)) if values.size else 0.0
    if not scale > 0:
        raise ValueError(f"cannot brain-normalise: the brain p{percentile} is {scale}")
    return volume / np.float32(scale)


def build_group_atlas(
    patients: Mapping[str, Mapping[str, str]],
    brain_masks: Mapping[str, str],
    sequences: Sequence[str],
    out_dir: str | os.PathLike,
    progress: bool = True,
) -> dict[str, str]:
    """Voxelwise average of brain-normalised volumes: ``out_dir/atlas_<sequence>.nii.gz`` per sequence.

    Args:
        patients: patient id -> {sequence: path}; every volume must lie on one common grid
            (co-registered, e.g. BraTS in SRI24), otherwise a ``ValueError`` lists the grids found.
        brain_masks: patient id -> brain-mask path (defines the voxels used for normalisation).
        sequences: sequences to average.
        out_dir: atlas folder. An ``atlas.json`` written last records the patients and a fingerprint
            of their files; while it matches, the existing atlas is reused (resumable).

    Returns:
        sequence -> atlas path.
    """
    out_dir = Path(out_dir)
    paths = {s: str(out_dir / f"atlas_{s}.nii.gz") for s in sequences}
    record_path = out_dir / ATLAS_RECORD
    sources = [patients[p][s] for p in patients for s in sequences] + [brain_masks[p] for p in patients]
    record = {
        "patients": sorted(patients),
        "sources": files_fingerprint(sorted(str(p) for p in sources), length=12) if patients else "",
        "sequences": list(sequences),
        "normalisation_percentile": {s: ATLAS_NORMALISATION_PERCENTILE.get(s, 99.5) for s in sequences},
    }
    complete = record_path.is_file() and all(Path(p).is_file() for p in paths.values())
    if complete and json.loads(record_path.read_text()) == record:
        logger.info("reusing the group atlas in %s", out_dir)
        return paths
    if not patients:
        raise ValueError("cannot build a group atlas without train patients")
    _require_common_grid(patients, brain_masks, sequences)

    sums: dict[str, np.ndarray] = {}
    affine = None
    for pid in tqdm(sorted(patients), desc="group atlas", disable=not progress):
        brain_data, brain_image = _load_volume(brain_masks[pid])
        brain = brain_data >= BRAIN_MASK_THRESHOLD
        affine = brain_image.affine
        for sequence in sequences:
            volume, _ = _load_volume(patients[pid][sequence])
            try:
                normalised = brain_normalised(
                    volume, brain, ATLAS_NORMALISATION_PERCENTILE.get(sequence, 99.5)
                )
            except ValueError as error:
                raise InputDataError(str(error), patients[pid][sequence], pid) from error
            sums.setdefault(sequence, np.zeros(volume.shape, dtype=np.float64))
            sums[sequence] += normalised
    for sequence in sequences:
        save_nifti((sums[sequence] / len(patients)).astype(np.float32), affine, paths[sequence])
    save_json(record, record_path)
    logger.info("group atlas of %d train patient(s) written to %s", len(patients), out_dir)
    return paths


def _require_common_grid(
    patients: Mapping[str, Mapping[str, str]], brain_masks: Mapping[str, str], sequences: Sequence[str]
) -> None:
    grids: dict[tuple, list[str]] = {}
    reference = None
    mismatched = []
    for pid in sorted(patients):
        files = [(s, patients[pid][s]) for s in sequences] + [(MANIFEST_BRAIN_MASK_COLUMN, brain_masks[pid])]
        for column, path in files:
            try:
                image = nib.load(str(path))
            except Exception as error:  # missing or corrupt: name the file before averaging anything
                raise InputDataError(
                    f"cannot read {column} for the group atlas: {error}", path, pid
                ) from error
            key = (tuple(int(v) for v in image.shape[:3]), tuple(np.round(image.affine, 2).ravel().tolist()))
            grids.setdefault(key, []).append(f"{pid}:{column}")
            if reference is None:
                reference = (column, image)
            elif grid_problem(image, reference[1], reference[0], column):
                mismatched.append(pid)
    if mismatched:
        listing = "; ".join(
            f"shape {shape}, origin {affine[3::4][:3]} mm: {members[:4]}{' ...' if len(members) > 4 else ''}"
            for (shape, affine), members in grids.items()
        )
        raise ValueError(
            "cannot build the group atlas: the train patients' volumes are not on one common grid "
            "(a voxelwise average needs co-registered volumes of identical shape and affine). "
            f"Grids found: {listing}. Co-register the exams first (medsynth preprocessing) or give "
            "atlas_<sequence> columns."
        )


# ----------------------------------------------------------------------------------------------
# BraTS


def find_brats_cases(directory: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Cases of a BraTS folder: case id -> {"seg" or sequence key: path}. Empty when not a BraTS layout.

    A case is a sub-folder ``<case>`` holding ``<case>_<suffix>.nii[.gz]`` files whose suffix is
    ``seg`` or a sequence alias (``t1``, ``t1ce``, ``t2``, ``flair``).
    """
    directory = Path(directory)
    cases: dict[str, dict[str, str]] = {}
    if not directory.is_dir():
        return cases
    for case_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
        files: dict[str, str] = {}
        for file in sorted(case_dir.iterdir()):
            stem = _strip_nifti_suffix(file.name)
            if stem is None or not stem.startswith(f"{case_dir.name}_"):
                continue
            suffix = stem[len(case_dir.name) + 1 :]
            if suffix.lower() == "seg":
                files["seg"] = str(file)
            else:
                try:
                    files[canonical_sequence(suffix)] = str(file)
                except ValueError:
                    continue
        if "seg" in files:
            cases[case_dir.name] = files
    return cases


def brats_leftovers(directory: str | os.PathLike) -> tuple[list[str], list[str]]:
    """What :func:`find_brats_cases` leaves out of a BraTS folder: sub-folders holding NIfTI files but
    no ``<case>_seg`` (not cases), and NIfTI files of cases whose name matches no sequence or ``seg``."""
    directory = Path(directory)
    cases = find_brats_cases(directory)
    known = {path for files in cases.values() for path in files.values()}
    without_seg, unmatched = [], []
    for case_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
        niftis = [f for f in sorted(case_dir.iterdir()) if _strip_nifti_suffix(f.name) is not None]
        if not niftis:
            continue
        if case_dir.name not in cases:
            without_seg.append(case_dir.name)
        else:
            unmatched += [f"{case_dir.name}/{f.name}" for f in niftis if str(f) not in known]
    return without_seg, unmatched


def is_brats_layout(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` has at least one ``<case>/<case>_seg.nii[.gz]`` case folder."""
    return bool(find_brats_cases(directory))


def brats_cohort(
    brats_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    seed: int = 0,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    progress: bool = True,
    build_atlas: bool = True,
    label_convention: str = "brats",
) -> pd.DataFrame:
    """Manifest of a BraTS folder; derived label maps, brain masks and the atlas go to ``out_dir``.

    Sequences ``t1w, gd_t1w, t2w, flair`` point to the original files. Splits are assigned per patient
    from ``seed``. The atlas averages the brain-normalised volumes of the train split only (valid
    because BraTS volumes share the SRI24 grid); ``build_atlas=False`` (a trained model's own atlas
    will be attached) leaves the atlas columns out. Resumable: existing derived files are reused,
    and ``out_dir/manifest.csv`` is written last.
    """
    brats_dir, out_dir = Path(brats_dir), Path(out_dir)
    cases = find_brats_cases(brats_dir)
    if not cases:
        raise FileNotFoundError(
            f"{brats_dir}: no BraTS case found (expected <case>/<case>_{{t1,t1ce,t2,flair,seg}}.nii.gz)"
        )
    without_seg, unmatched = brats_leftovers(brats_dir)
    if without_seg:
        logger.warning(
            "%s: %d folder(s) without a <case>_seg.nii.gz are left out of the cohort: %s",
            brats_dir,
            len(without_seg),
            ", ".join(without_seg[:10]),
        )
    if unmatched:
        logger.warning(
            "%s: %d file(s) match no BraTS sequence (t1, t1ce, t2, flair) nor seg and are ignored: %s",
            brats_dir,
            len(unmatched),
            ", ".join(unmatched[:10]),
        )
    sequences = BRATS_SEQUENCES
    convention = label_convention_of(label_convention)
    errors = []
    for case, files in cases.items():
        for key in (*sequences, "seg"):
            if key not in files:
                errors.append(
                    InputDataError(f"missing the {key} file of the BraTS case", brats_dir / case, case)
                )
    if not errors:  # the files themselves, before any label map or atlas is derived from them
        for case in tqdm(sorted(cases), desc="checking BraTS files", disable=not progress):
            errors += source_file_problems(cases[case], case, sequences)
    if errors:
        raise CohortValidationError(errors)
    splits = split_patients(cases, split_fractions, seed)

    rows = []
    for case in tqdm(sorted(cases), desc="BraTS label maps", disable=not progress):
        files = cases[case]
        name = _safe_name(case)
        label_path = out_dir / name / f"{name}_label.nii.gz"
        brain_path = out_dir / name / f"{name}_brainmask.nii.gz"
        if not _is_up_to_date([label_path, brain_path], [files[k] for k in (*sequences, "seg")]):
            try:
                _write_brats_derived(files, sequences, label_path, brain_path, case, convention)
            except InputDataError as error:
                errors.append(error)
                continue
        rows.append(
            {
                "patient_id": case,
                "split": splits[case],
                **{s: files[s] for s in sequences},
                MANIFEST_LABEL_COLUMN: str(label_path),
                MANIFEST_BRAIN_MASK_COLUMN: str(brain_path),
            }
        )
    if errors:
        raise CohortValidationError(errors)
    manifest = pd.DataFrame(rows)
    if build_atlas:
        manifest = _attach_group_atlas(manifest, sequences, out_dir / ATLAS_DIRNAME, progress)
    write_manifest(manifest, out_dir / MANIFEST_NAME)
    return manifest


def _write_brats_derived(
    files: Mapping[str, str],
    sequences: Sequence[str],
    label_path: Path,
    brain_path: Path,
    case: str,
    convention: LabelConvention,
) -> None:
    seg, seg_image = _load_volume(files["seg"])
    brain = np.zeros(seg.shape, dtype=bool)
    for sequence in sequences:
        data, image = _load_volume(files[sequence])
        problem = grid_problem(image, seg_image, "seg", sequence)
        if problem:
            raise InputDataError(problem, files[sequence], case)
        brain |= data != 0
    try:
        label = to_project_labels(seg, convention, brain)
    except ValueError as error:
        raise InputDataError(str(error), files["seg"], case) from error
    # Brain mask first: the label map is the completion marker of a case.
    save_nifti(brain.astype(np.uint8), seg_image.affine, brain_path, dtype=np.uint8)
    save_nifti(label, seg_image.affine, label_path, dtype=np.uint8)


def _attach_group_atlas(
    manifest: pd.DataFrame, sequences: Sequence[str], atlas_dir: Path, progress: bool
) -> pd.DataFrame:
    train = manifest[manifest["split"] == "train"]
    if train.empty:
        logger.info("no train patient: no group atlas is built (a trained model brings its own)")
        return manifest
    atlas = build_group_atlas(
        {row["patient_id"]: {s: row[s] for s in sequences} for _, row in train.iterrows()},
        {row["patient_id"]: row[MANIFEST_BRAIN_MASK_COLUMN] for _, row in train.iterrows()},
        sequences,
        atlas_dir,
        progress,
    )
    manifest = manifest.copy()
    for sequence in sequences:
        manifest[atlas_column(sequence)] = atlas[sequence]
    return manifest


# ----------------------------------------------------------------------------------------------
# User CSV


def canonical_csv_columns(columns: Sequence[str]) -> dict[str, str]:
    """Map a user CSV's column names to manifest columns (sequence aliases, ``atlas_<alias>``).

    Columns that are neither an id, a split, a label, a brain mask nor a (possibly aliased)
    sequence or atlas column are kept as they are. Two columns mapping to one name is an error.
    """
    fixed = {
        "patient_id",
        "split",
        MANIFEST_LABEL_COLUMN,
        MANIFEST_BRAIN_MASK_COLUMN,
        LABEL_CONVENTION_COLUMN,
    }
    mapping: dict[str, str] = {}
    for column in columns:
        key = column.strip().lower()
        if key in fixed or key in TISSUE_COLUMNS:
            mapping[column] = key
        elif key.startswith("atlas_"):
            mapping[column] = atlas_column(canonical_sequence(key[len("atlas_") :]))
        else:
            try:
                mapping[column] = canonical_sequence(key)
            except ValueError:
                mapping[column] = column
    targets = pd.Series(list(mapping.values()))
    duplicated = sorted(set(targets[targets.duplicated()]))
    if duplicated:
        raise ValueError(
            "several CSV columns mean the same thing: "
            f"{[(c, t) for c, t in mapping.items() if t in duplicated]}"
        )
    return mapping


def user_csv_cohort(
    csv_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    seed: int = 0,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    progress: bool = True,
    build_atlas: bool = True,
    label_convention: str = PROJECT_CONVENTION,
) -> pd.DataFrame:
    """Manifest from a user CSV (paths relative to the CSV's folder or absolute).

    The label maps are in ``label_convention`` (:mod:`medsynth.data.conventions`: ``"medsynth"``,
    ``"brats"``, ``"brats2023"`` or a mapping file), or in the row's ``label_convention`` column when
    the CSV has one; maps of another convention are converted into ``out_dir``.

    Missing pieces are derived into ``out_dir``: brain masks (``label > 0``), splits (from ``seed``),
    and the group atlas of the train split (requires all train volumes on one grid; a ``ValueError``
    says so otherwise). The completed manifest is also written to ``out_dir/manifest.csv``.
    """
    csv_path, out_dir = Path(csv_path), Path(out_dir)
    if not csv_path.is_file():
        raise FileNotFoundError(f"cohort CSV not found: {csv_path}")
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    table = table.rename(columns=canonical_csv_columns(list(table.columns)))
    required = ["patient_id", MANIFEST_LABEL_COLUMN]
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise ValueError(
            f"{csv_path}: missing column(s) {missing}; required: patient_id, sequence columns, label"
        )
    try:
        sequences = sequences_of(table)
    except ValueError as error:
        raise ValueError(
            f"{csv_path}: {error} (aliases such as t1, t1ce, t2, flair, apt are accepted)"
        ) from None
    known = {"patient_id", "split", LABEL_CONVENTION_COLUMN, *_manifest_columns(sequences)}
    ignored = [c for c in table.columns if c not in known]
    if ignored:
        logger.info("%s: ignoring column(s) %s", csv_path.name, ignored)
    table["patient_id"] = table["patient_id"].str.strip()
    if (table["patient_id"] == "").any():
        raise ValueError(f"{csv_path}: some rows have an empty patient_id")
    if table["patient_id"].duplicated().any():
        raise ValueError(
            f"{csv_path}: patient(s) listed more than once: "
            f"{sorted(table.loc[table['patient_id'].duplicated(), 'patient_id'])}"
        )
    root = csv_path.resolve().parent
    for column in _manifest_columns(sequences):
        if column in table.columns:
            table[column] = [str((root / v.strip()).resolve()) if v.strip() else "" for v in table[column]]

    if "split" not in table.columns:
        assignment = split_patients(table["patient_id"], split_fractions, seed)
        table["split"] = table["patient_id"].map(assignment)
    else:
        table["split"] = table["split"].str.strip().str.lower()
        empty = table.loc[table["split"] == "", "patient_id"].tolist()
        if empty:
            raise ValueError(
                f"{csv_path}: empty split for patient(s) {empty}; "
                f"fill them ({list(SPLITS)}) or drop the column"
            )
        check_patient_level_split(table)

    if MANIFEST_BRAIN_MASK_COLUMN not in table.columns:
        table[MANIFEST_BRAIN_MASK_COLUMN] = ""
    declared = table[LABEL_CONVENTION_COLUMN] if LABEL_CONVENTION_COLUMN in table.columns else None
    errors = []
    for _, row in table.iterrows():  # the files themselves, before anything is derived from them
        files = {
            c: row[c] for c in (*sequences, MANIFEST_LABEL_COLUMN, MANIFEST_BRAIN_MASK_COLUMN) if c in row
        }
        errors += source_file_problems(files, str(row["patient_id"]), sequences)
    if errors:
        raise CohortValidationError(errors)
    for index, row in table.iterrows():
        spec = (
            str(declared[index]).strip()
            if declared is not None and str(declared[index]).strip()
            else label_convention
        )
        try:
            convention = label_convention_of(spec)
        except ValueError as error:
            errors.append(InputDataError(str(error), csv_path, str(row["patient_id"])))
            continue
        if convention.values is not None:
            try:
                label, brain = _converted_label(row, convention, sequences, out_dir)
            except InputDataError as error:
                errors.append(error)
                continue
            table.at[index, MANIFEST_LABEL_COLUMN] = str(label)
            if not row[MANIFEST_BRAIN_MASK_COLUMN]:
                table.at[index, MANIFEST_BRAIN_MASK_COLUMN] = str(brain)
    if errors:
        raise CohortValidationError(errors)
    for index, row in table.iterrows():
        if not row[MANIFEST_BRAIN_MASK_COLUMN]:
            table.at[index, MANIFEST_BRAIN_MASK_COLUMN] = str(_brain_mask_from_label(row, out_dir))

    atlas_columns = [atlas_column(s) for s in sequences]
    present = [c for c in atlas_columns if c in table.columns]
    if present and len(present) != len(atlas_columns):
        raise ValueError(
            f"{csv_path}: atlas columns must be given for every sequence or for none; "
            f"have {present}, missing {sorted(set(atlas_columns) - set(present))}"
        )
    if not present and build_atlas:
        table = _attach_group_atlas(table, sequences, out_dir / ATLAS_DIRNAME, progress)
    tissue = [c for c in TISSUE_COLUMNS if c in table.columns]
    if tissue and len(tissue) != len(TISSUE_COLUMNS):
        raise ValueError(
            f"{csv_path}: tissue maps must be given for every class or for none; "
            f"have {tissue}, missing {sorted(set(TISSUE_COLUMNS) - set(tissue))}"
        )
    columns = [c for c in ["patient_id", "split", *_manifest_columns(sequences)] if c in table.columns]
    manifest = table[columns].reset_index(drop=True)
    write_manifest(manifest, out_dir / MANIFEST_NAME)
    return manifest


def _manifest_columns(sequences: Sequence[str]) -> list[str]:
    return [
        *sequences,
        MANIFEST_LABEL_COLUMN,
        MANIFEST_BRAIN_MASK_COLUMN,
        *TISSUE_COLUMNS,  # optional: Shin et al.'s input
        *(atlas_column(s) for s in sequences),
    ]


def _converted_label(
    row: Mapping[str, str], convention: LabelConvention, sequences: Sequence[str], out_dir: Path
) -> tuple[Path, Path]:
    """The row's label map in the project's convention, and the brain it was converted in (derived files).

    The brain is the row's brain mask when it has one, else every voxel where a sequence is non-zero
    (skull-stripped images, as in BraTS).
    """
    pid = _safe_name(str(row["patient_id"]))
    source = row[MANIFEST_LABEL_COLUMN]
    if not source or not os.path.isfile(source):
        raise InputDataError("label file does not exist", source or None, pid)
    key = (
        convention.name if convention.name in LABEL_CONVENTIONS else f"map{file_digest(convention.name)[:8]}"
    )
    label_path = out_dir / pid / f"{pid}_label_from_{key}.nii.gz"
    brain_path = out_dir / pid / f"{pid}_brainmask.nii.gz"
    brain_source = row.get(MANIFEST_BRAIN_MASK_COLUMN, "")
    inputs = [source, brain_source] if brain_source else [source, *(row[s] for s in sequences if row.get(s))]
    if _is_up_to_date([label_path, brain_path] if not brain_source else [label_path], inputs):
        return label_path, brain_path
    seg, image = _load_volume(source)
    if brain_source:
        brain = _load_volume(brain_source)[0] >= BRAIN_MASK_THRESHOLD
    else:
        brain = np.zeros(seg.shape, dtype=bool)
        for sequence in sequences:
            volume, volume_image = _load_volume(row[sequence])
            problem = grid_problem(volume_image, image, MANIFEST_LABEL_COLUMN, sequence)
            if problem:
                raise InputDataError(problem, row[sequence], pid)
            brain |= volume != 0
        save_nifti(brain.astype(np.uint8), image.affine, brain_path, dtype=np.uint8)
    if brain.shape != seg.shape:
        raise InputDataError(
            f"brain mask shape {brain.shape} differs from the label map's {seg.shape}", brain_source, pid
        )
    try:
        label = to_project_labels(seg, convention, brain)
    except ValueError as error:
        raise InputDataError(str(error), source, pid) from error
    save_nifti(label, image.affine, label_path, dtype=np.uint8)
    logger.info("%s: label map converted from the %r convention", pid, convention.name)
    return label_path, brain_path


def _brain_mask_from_label(row: Mapping[str, str], out_dir: Path) -> Path:
    pid = _safe_name(str(row["patient_id"]))
    path = out_dir / pid / f"{pid}_brainmask.nii.gz"
    label_path = row[MANIFEST_LABEL_COLUMN]
    if not label_path or not os.path.isfile(label_path):
        raise InputDataError(
            "label file does not exist (needed to derive the brain mask)", label_path or None, pid
        )
    if _is_up_to_date([path], [label_path]):
        return path
    label, image = _load_volume(label_path)
    save_nifti((label > 0).astype(np.uint8), image.affine, path, dtype=np.uint8)
    return path


def user_csv_fingerprint(csv_path: str | os.PathLike, seed: int, split_fractions: Sequence[float]) -> str:
    """Names the derived-files folder of a user CSV (location, content, seed, fractions)."""
    csv_path = Path(csv_path)
    return parts_digest(csv_path.resolve(), file_digest(csv_path), seed, tuple(split_fractions))


def brats_fingerprint(
    brats_dir: str | os.PathLike, seed: int, split_fractions: Sequence[float], label_convention: str = "brats"
) -> str:
    """Names the derived-files folder of a BraTS folder (location, cases, seed, fractions, convention)."""
    parts = [Path(brats_dir).resolve(), sorted(find_brats_cases(brats_dir)), seed, tuple(split_fractions)]
    return parts_digest(*parts, *([] if label_convention == "brats" else [label_convention]))
