"""Write a whole phantom cohort to disk: the ``ready`` layout (model grid + manifest + atlas) or the
``raw`` layout (scanner-like exams with ground truth for scoring preprocessing).

Deterministic: patient ``i`` of a cohort with seed ``s`` depends only on ``(s, i)`` (and the grid
shape), never on the number of patients or workers. Resumable: each finished patient gets a
``.complete.json`` marker written last; a rerun with the same arguments skips those patients and
redoes any that are incomplete. All files are written atomically.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from medsynth.constants import (
    CLINICAL_SEQUENCES,
    MANIFEST_BRAIN_MASK_COLUMN,
    MANIFEST_LABEL_COLUMN,
    SEQUENCE_TITLES,
    TISSUE_CLASSES,
    atlas_column,
    tissue_column,
)
from medsynth.data.manifest import DEFAULT_SPLIT_FRACTIONS, split_patients, write_manifest
from medsynth.data.phantom.acquisition import RawSequence, acquire_raw, acquire_ready
from medsynth.data.phantom.dicom import write_dicom_series
from medsynth.data.phantom.patient import DEFAULT_SHAPE, PhantomPatient
from medsynth.utils.io import atomic_path, require_writable_folder, save_json, save_nifti

logger = logging.getLogger(__name__)

LAYOUTS: tuple[str, ...] = ("ready", "raw")
COHORT_FILE = "phantom.json"
COMPLETE_MARKER = ".complete.json"
# Bumped whenever the generated images change, so an old cohort is not silently mixed with new patients.
PHANTOM_VERSION = 1
APTW_DISPLAY_RANGE = (-5.0, 5.0)  # percent, the papers' APTw colour scale


def patient_id(index: int) -> str:
    """``phantom_000``, ``phantom_001``, ..."""
    return f"phantom_{index:03d}"


def ready_paths(out_dir: Path, pid: str) -> dict[str, Path]:
    """Every file of one patient in the ``ready`` layout, by manifest column (plus ``montage``)."""
    folder = out_dir / pid
    paths = {sequence: folder / f"{pid}_{sequence}.nii.gz" for sequence in CLINICAL_SEQUENCES}
    paths[MANIFEST_LABEL_COLUMN] = folder / f"{pid}_label.nii.gz"
    paths[MANIFEST_BRAIN_MASK_COLUMN] = folder / f"{pid}_brainmask.nii.gz"
    for tissue in TISSUE_CLASSES:  # ground truth for Shin et al.'s input: the normal brain, lesion excluded
        paths[tissue_column(tissue)] = folder / f"{pid}_tissue_{tissue}.nii.gz"
    paths["montage"] = folder / f"{pid}_montage.png"
    return paths


def atlas_paths(out_dir: Path) -> dict[str, Path]:
    """The atlas file of each sequence."""
    return {sequence: out_dir / "atlas" / f"atlas_{sequence}.nii.gz" for sequence in CLINICAL_SEQUENCES}


def generate_phantom_cohort(
    out_dir: str | os.PathLike,
    num_patients: int,
    seed: int = 0,
    layout: str = "ready",
    shape: Sequence[int] = DEFAULT_SHAPE,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    workers: int = 1,
    progress: bool = True,
    raw_scale: float | None = None,
) -> Path:
    """Generate (or complete) a digital phantom cohort of glioma patients.

    Args:
        out_dir: cohort folder; created if needed.
        num_patients: patients ``phantom_000`` ... ``phantom_<N-1>``.
        seed: cohort seed; patient ``i`` is drawn from ``(seed, i)``.
        layout: ``"ready"`` (model-grid volumes, manifest, atlas) or ``"raw"`` (scanner-like exams with
            truth).
        shape: model grid ``(X, Y, Z)``: the papers' 209.9 x 209.9 x 66 mm slab divided into this many
            voxels (default 256 x 256 x 15, i.e. 0.82 x 0.82 x 4.4 mm).
        split_fractions: train/val/test fractions for :func:`~medsynth.data.manifest.split_patients`.
        workers: processes generating patients in parallel.
        progress: show a progress bar.
        raw_scale: ``raw`` only: factor on the raw anatomical voxel size (default 1 x 1 x 1.2 mm); ``None``
            follows the model grid (``256 / shape[0]``), so small test cohorts stay small.

    Returns:
        The manifest path for ``ready``, the cohort folder for ``raw``.

    Raises:
        ValueError: bad arguments, or ``out_dir`` holds a cohort made with other settings.
    """
    out_dir = Path(out_dir)
    shape = tuple(int(s) for s in shape)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    if int(num_patients) < 1:
        raise ValueError(f"num_patients must be at least 1, got {num_patients}")
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"shape must be three sizes of at least 4 voxels, got {shape}")
    if int(workers) < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    split_patients(
        [patient_id(i) for i in range(int(num_patients))], split_fractions
    )  # refuse bad fractions now
    if raw_scale is None:
        raw_scale = max(1.0, DEFAULT_SHAPE[0] / shape[0])
    settings = {
        "layout": layout,
        "seed": int(seed),
        "shape": list(shape),
        "raw_scale": float(raw_scale) if layout == "raw" else None,
        "version": PHANTOM_VERSION,
    }
    require_writable_folder(out_dir, "phantom output folder")
    _claim_cohort_folder(out_dir, settings)

    ids = [patient_id(i) for i in range(int(num_patients))]
    todo = [i for i, pid in enumerate(ids) if not _is_complete(out_dir / pid, settings)]
    if len(todo) < len(ids):
        logger.info(
            "%d of %d phantom patients already complete in %s; skipping them",
            len(ids) - len(todo),
            len(ids),
            out_dir,
        )
    job = {
        "out_dir": str(out_dir),
        "seed": int(seed),
        "layout": layout,
        "shape": shape,
        "raw_scale": float(raw_scale),
        "settings": settings,
    }
    bar = tqdm(total=len(todo), desc=f"phantom ({layout})", unit="patient", disable=not progress or not todo)
    if int(workers) == 1 or len(todo) <= 1:
        for index in todo:
            _generate_patient(index, **job)
            bar.update()
    else:
        # A fresh interpreter per worker: safe with torch's thread pools, which do not survive fork.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=min(int(workers), len(todo)), mp_context=context, initializer=_init_worker
        ) as pool:
            futures = [pool.submit(_generate_patient, index, **job) for index in todo]
            for future in as_completed(futures):
                future.result()
                bar.update()
    bar.close()

    if layout == "raw":
        return out_dir
    return _write_ready_manifest(out_dir, ids, seed, split_fractions)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _claim_cohort_folder(out_dir: Path, settings: dict) -> None:
    cohort_file = out_dir / COHORT_FILE
    if cohort_file.is_file():
        existing = json.loads(cohort_file.read_text())
        if existing != settings:
            raise ValueError(
                f"{cohort_file}: the folder holds a phantom cohort made with {existing}, not {settings}; "
                "use another --out folder or delete this one"
            )
    else:
        save_json(settings, cohort_file)


def _is_complete(folder: Path, settings: dict) -> bool:
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        record = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    if record.get("settings") != settings:
        return False
    if settings.get("layout") == "ready":  # a patient written before a file joined the layout is redone
        expected = {str(p.relative_to(folder)) for p in ready_paths(folder.parent, folder.name).values()}
        if not expected <= set(record.get("files", [])):
            return False
    return all((folder / name).is_file() for name in record.get("files", []))


def _generate_patient(
    index: int, out_dir: str, seed: int, layout: str, shape, raw_scale: float, settings: dict
) -> str:
    out = Path(out_dir)
    pid = patient_id(index)
    folder = out / pid
    # A rerun redoes an incomplete patient from scratch: forget any previous marker first.
    (folder / COMPLETE_MARKER).unlink(missing_ok=True)
    patient = PhantomPatient.create(seed, index, shape)
    if layout == "ready":
        written = _write_ready_patient(patient, out, shape)
    else:
        written = _write_raw_patient(patient, folder, shape, raw_scale)
    record = {
        "patient_id": pid,
        "settings": settings,
        "lesion_kind": patient.lesion.kind,
        "tumor_radius_mm": patient.lesion.tumor_radius_mm,
        "files": sorted(str(Path(p).relative_to(folder)) for p in written),
    }
    save_json(record, folder / COMPLETE_MARKER)
    logger.debug("%s written (%s lesion)", pid, patient.lesion.kind)
    return pid


# --------------------------------------------------------------------------------------------- ready
def _write_ready_patient(patient: PhantomPatient, out_dir: Path, shape) -> list[Path]:
    volumes = acquire_ready(patient, shape)
    paths = ready_paths(out_dir, patient.patient_id)
    affine = volumes.grid.affine
    written = []
    for sequence, image in volumes.images.items():
        written.append(save_nifti(image, affine, paths[sequence], dtype=np.float32))
    written.append(save_nifti(volumes.label, affine, paths[MANIFEST_LABEL_COLUMN], dtype=np.uint8))
    written.append(save_nifti(volumes.brain_mask, affine, paths[MANIFEST_BRAIN_MASK_COLUMN], dtype=np.uint8))
    for tissue, probability in volumes.tissue.items():
        written.append(save_nifti(probability, affine, paths[tissue_column(tissue)], dtype=np.float32))
    written.append(write_montage(volumes.images, volumes.label, paths["montage"], title=patient.patient_id))
    return written


def montage_slices(label: np.ndarray, count: int = 4) -> list[int]:
    """Axial slices to show: spread over the lesion's extent, always including its largest slice."""
    lesion_area = (label >= 2).sum(axis=(0, 1))
    with_lesion = np.flatnonzero(lesion_area)
    if len(with_lesion) == 0:
        with_lesion = np.flatnonzero((label > 0).sum(axis=(0, 1)))
    if len(with_lesion) == 0:
        with_lesion = np.arange(label.shape[2])
    chosen = {int(np.argmax(lesion_area))} if lesion_area.any() else set()
    for position in np.linspace(with_lesion[0], with_lesion[-1], count):
        if len(chosen) >= count:
            break
        chosen.add(round(position))
    return sorted(chosen)[:count]


def write_montage(
    images: dict[str, np.ndarray], label: np.ndarray, path: Path, title: str | None = None
) -> Path:
    """A few axial slices x the five sequences plus the label overlaid on FLAIR."""
    from medsynth.visualize.figures import save_grid

    slices = montage_slices(label)
    sequences = [s for s in CLINICAL_SEQUENCES if s in images]
    panels, overlays = [], []
    for k in slices:
        panels.append(
            [images[s][:, :, k] for s in sequences] + [images.get("flair", images[sequences[0]])[:, :, k]]
        )
        overlays.append([None] * len(sequences) + [label[:, :, k]])
    cmaps = ["jet" if s == "aptw" else "gray" for s in sequences] + ["gray"]
    # One intensity window per sequence for the whole patient, from its brain voxels.
    vranges = [APTW_DISPLAY_RANGE if s == "aptw" else _brain_window(images[s], label) for s in sequences]
    vranges.append(_brain_window(images.get("flair", images[sequences[0]]), label))
    return save_grid(
        panels,
        path,
        row_titles=[f"slice {k}" for k in slices],
        col_titles=[SEQUENCE_TITLES.get(s, s) for s in sequences] + ["label"],
        cmaps=cmaps,
        vranges=vranges,
        overlays=overlays,
        title=title,
        panel_size=1.6,
        dpi=80,
    )


def _brain_window(image: np.ndarray, label: np.ndarray) -> tuple[float, float]:
    inside = image[label > 0]
    if inside.size == 0:
        return float(image.min()), float(image.max()) + 1.0
    high = float(np.percentile(inside, 99.5))
    return 0.0, high if high > 0 else 1.0


def _write_ready_manifest(out_dir: Path, ids: list[str], seed: int, split_fractions) -> Path:
    splits = split_patients(ids, split_fractions, seed)
    train = [pid for pid in ids if splits[pid] == "train"]
    # No train patient (a cohort kept whole for testing a model): no atlas, the model brings its own.
    atlas = atlas_paths(out_dir) if train else {}
    for sequence in CLINICAL_SEQUENCES if train else ():
        total, affine = None, None
        for pid in train:
            image = nib.load(ready_paths(out_dir, pid)[sequence])
            data = np.asarray(image.dataobj, dtype=np.float64)
            total = data if total is None else total + data
            affine = image.affine
        save_nifti((total / len(train)).astype(np.float32), affine, atlas[sequence], dtype=np.float32)
    rows = []
    for pid in ids:
        paths = ready_paths(out_dir, pid)
        row = {"patient_id": pid, "split": splits[pid]}
        row.update({s: str(paths[s]) for s in CLINICAL_SEQUENCES})
        row[MANIFEST_LABEL_COLUMN] = str(paths[MANIFEST_LABEL_COLUMN])
        row[MANIFEST_BRAIN_MASK_COLUMN] = str(paths[MANIFEST_BRAIN_MASK_COLUMN])
        row.update({tissue_column(t): str(paths[tissue_column(t)]) for t in TISSUE_CLASSES})
        row.update({atlas_column(s): str(atlas[s]) for s in CLINICAL_SEQUENCES if s in atlas})
        rows.append(row)
    manifest_path = out_dir / "manifest.csv"
    write_manifest(pd.DataFrame(rows), manifest_path)
    logger.info("phantom cohort: %d patients (%d train) in %s", len(ids), len(train), out_dir)
    return manifest_path


# ----------------------------------------------------------------------------------------------- raw
def _write_raw_patient(patient: PhantomPatient, folder: Path, shape, raw_scale: float) -> list[Path]:
    acquisitions = acquire_raw(patient, shape, raw_scale)
    truth = folder / "truth"
    written: list[Path] = []
    aptw = acquisitions["aptw"]
    written.append(save_nifti(aptw.image, aptw.grid.affine, folder / "aptw.nii.gz", dtype=np.float32))
    written.append(save_nifti(aptw.label, aptw.grid.affine, truth / "label.nii.gz", dtype=np.uint8))
    written.append(save_nifti(aptw.brain_mask, aptw.grid.affine, truth / "brain_mask.nii.gz", dtype=np.uint8))
    for tissue, probability in aptw.extras["tissue"].items():  # scores preprocessing's Atropos maps
        written.append(
            save_nifti(probability, aptw.grid.affine, truth / f"tissue_{tissue}.nii.gz", np.float32)
        )
    written.append(
        save_nifti(aptw.brain_mask, aptw.grid.affine, truth / "brain_mask_aptw.nii.gz", dtype=np.uint8)
    )
    written.append(
        save_nifti(aptw.white_matter_mask, aptw.grid.affine, truth / "wm_aptw.nii.gz", dtype=np.uint8)
    )
    for sequence in ("t1w", "gd_t1w", "t2w", "flair"):
        acquisition = acquisitions[sequence]
        affine = acquisition.grid.affine
        if sequence == "t1w":
            written += write_dicom_series(
                acquisition.image,
                acquisition.grid,
                folder / "t1w",
                patient_id=patient.patient_id,
                series_description="T1w phantom",
                uid_seed=f"{patient.seed_sequence.entropy}-{patient.seed_sequence.spawn_key}",
            )
        else:
            written.append(
                save_nifti(acquisition.image, affine, folder / f"{sequence}.nii.gz", dtype=np.int16)
            )
        written.append(
            save_nifti(
                acquisition.image_without_bias, affine, truth / f"{sequence}_nobias.nii.gz", dtype=np.int16
            )
        )
        written.append(_save_scaled(acquisition.bias, affine, truth / f"bias_{sequence}.nii.gz"))
        written.append(
            save_nifti(
                acquisition.brain_mask, affine, truth / f"brain_mask_{sequence}.nii.gz", dtype=np.uint8
            )
        )
        written.append(
            save_nifti(acquisition.white_matter_mask, affine, truth / f"wm_{sequence}.nii.gz", dtype=np.uint8)
        )
    written.append(save_json(_transforms_record(acquisitions), truth / "transforms.json"))
    written.append(_write_raw_montage(acquisitions, truth / "montage.png", patient.patient_id))
    return written


def _save_scaled(field: np.ndarray, affine: np.ndarray, path: Path, step: float = 1e-4) -> Path:
    """A smooth float field as int16 with the NIfTI ``scl_slope`` (readers get floats back, to ``step``);
    float32 noise in the low mantissa bits would make the file ten times larger."""
    image = nib.Nifti1Image(
        np.rint(np.clip(field, 0.0, 3.2) / step).astype(np.int16), np.asarray(affine, dtype=np.float64)
    )
    image.header.set_slope_inter(step, 0.0)
    image.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(image, tmp)
    return path


def _transforms_record(acquisitions: dict[str, RawSequence]) -> dict:
    reference = acquisitions["aptw"].pose
    record = {
        "convention": (
            "World coordinates are RAS+ millimetres (x increases toward the patient's right, y toward "
            "anterior, "
            "z toward superior), the same frame as every NIfTI affine here. 'Truth space' is the "
            "phantom's anatomical space. For each sequence, 'patient_to_scanner' is the 4x4 matrix M that "
            "moves a "
            "truth-space point p to the scanner-world point M p where that tissue lies in this sequence's "
            "image "
            "(the head pose during that acquisition); M is a rotation by 'rotation_degrees' (Euler angles "
            "about "
            "x, then y, then z, applied as Rz Ry Rx) about 'rotation_centre_mm', followed by "
            "'translation_mm'. "
            "'to_reference' is the 4x4 matrix that maps a scanner-world point of this sequence to the "
            "scanner-world "
            "point of the APTw slab (the reference grid) showing the same tissue: M_aptw @ inv(M_sequence). "
            "A "
            "perfect co-registration that resamples this sequence onto the APTw grid reads it at "
            "inv(to_reference) @ q for each reference point q. truth/label.nii.gz and "
            "truth/brain_mask.nii.gz lie "
            "on the APTw slab grid exactly as the anatomy appears in aptw.nii.gz."
        ),
        "reference": "aptw",
        "sequences": {},
    }
    for sequence, acquisition in acquisitions.items():
        record["sequences"][sequence] = {
            "patient_to_scanner": np.asarray(acquisition.pose).tolist(),
            "to_reference": (reference @ np.linalg.inv(acquisition.pose)).tolist(),
            "rotation_degrees": list(acquisition.rotation_degrees),
            "rotation_centre_mm": list(acquisition.rotation_centre_mm),
            "translation_mm": list(acquisition.translation_mm),
            "grid_shape": list(acquisition.grid.shape),
            "grid_affine": np.asarray(acquisition.grid.affine).tolist(),
            "file": "t1w/" if sequence == "t1w" else f"{sequence}.nii.gz",
        }
    return record


def _write_raw_montage(acquisitions: dict[str, RawSequence], path: Path, pid: str) -> Path:
    from medsynth.visualize.figures import save_grid

    panels, titles, cmaps, ranges, contours = [], [], [], [], []
    for sequence in ("t1w", "gd_t1w", "t2w", "flair", "aptw"):
        acquisition = acquisitions[sequence]
        brain = acquisition.brain_mask
        k = (
            int(np.argmax((acquisition.label >= 2).sum(axis=(0, 1))))
            if (acquisition.label >= 2).any()
            else brain.shape[2] // 2
        )
        panels.append(acquisition.image[:, :, k].astype(np.float32))
        contours.append(brain[:, :, k])
        titles.append(f"{SEQUENCE_TITLES[sequence]} (z={k})")
        cmaps.append("jet" if sequence == "aptw" else "gray")
        ranges.append(APTW_DISPLAY_RANGE if sequence == "aptw" else None)
    return save_grid(
        [panels],
        path,
        col_titles=titles,
        cmaps=cmaps,
        vranges=ranges,
        contours=[contours],
        title=f"{pid} raw (brain outline)",
        panel_size=2.4,
        dpi=80,
    )
