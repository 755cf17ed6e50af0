"""Per-patient preprocessing: ingest, skull strip, co-register, resample, N4, standardize, write.

Every step is a plain function over images (reusable on its own) wrapped by :func:`run_step`, which
writes the step's outputs atomically under ``OUT/<pid>/work/<step>/`` and then a marker
``_step.json`` (timing, parameters, content hashes of the inputs and outputs). A rerun skips a step
whose marker matches its current inputs and parameters and whose outputs all exist, so an
interrupted cohort resumes where it stopped, and a killed step leaves no half-written file.

Order (the papers' section IV-A, with the skull stripping moved to the native grid of the sharpest
anatomical sequence so that thin slices, not the 4.4 mm APTw slab, decide the brain boundary):

0. ``convert`` (a raw DICOM exam: the patient folder holds DICOM files, no per-sequence names): every
   series through dcm2niix, roles from the headers (:mod:`preprocessing.roles`), ``roles.json``.
1. ``ingest``: NIfTI files or DICOM folders (dcm2niix) -> ``<seq>.nii.gz`` (no header metadata is
   carried); a 4D series is refused unless ``volume`` picks one of its volumes.
2. ``skullstrip``: deepbet brain mask on the best anatomical sequence, on its own grid.
3. ``register``: rigid/affine transforms of every sequence to the reference (the APTw slab when
   present, else Gd-T1w, else the first sequence). With an APTw reference the anatomical sequences
   are registered at high resolution to a *hub* (T2w: measured closest in contrast to APTw's
   saturated reference image) and only the hub is registered to the slab; the maps are composed.
4. ``resample``: every sequence, the brain mask and the label onto the reference grid.
5. ``n4``: N4 inside the brain mask (not APTw: a quantitative map in % has no coil bias).
6. ``standardize`` (after the cohort-level Nyúl fit on the train split): Nyúl mapping of the
   anatomical sequences inside the mask, zero outside; final files ``OUT/<pid>/<pid>_<seq>.nii.gz``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform

from medsynth.constants import (
    CLINICAL_SEQUENCES,
    LESION_LABELS,
    TISSUE_CLASSES,
    canonical_sequence,
    tissue_column,
)
from medsynth.errors import InputDataError
from medsynth.utils.hashing import file_digest, json_digest
from medsynth.utils.io import save_json, save_nifti
from medsynth.utils.labels import label_map_problem
from preprocessing.imageio import like_input, load_image, new_image_like, to_nifti
from preprocessing.registration import (
    load_transform,
    register_to_reference,
    resample_to_reference,
    save_transform,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ANATOMICAL_SEQUENCES",
    "STEP_MARKER",
    "CoRegisterd",
    "Exam",
    "PipelineConfig",
    "StepRecord",
    "choose_hub",
    "choose_reference",
    "choose_skull_strip_sequence",
    "convert_dicom_exam",
    "coregister_exam",
    "discover_exam",
    "final_paths",
    "ingest_exam",
    "preprocess_patient",
    "run_step",
    "standardize_patient",
]

STEP_MARKER = "_step.json"
ANATOMICAL_SEQUENCES: tuple[str, ...] = tuple(s for s in CLINICAL_SEQUENCES if s != "aptw")
# Quantitative sequences: no bias correction, no histogram standardization.
QUANTITATIVE_SEQUENCES: tuple[str, ...] = ("aptw",)
_NIFTI = (".nii.gz", ".nii")
_SKULL_STRIP_PREFERENCE = ("gd_t1w", "t1w", "t2w", "flair")
# Hub for an APTw reference: T2w registered to the slab best in our measurements (docs/preprocessing.md).
_HUB_PREFERENCE = ("t2w", "gd_t1w", "t1w", "flair")


@dataclass
class PipelineConfig:
    """Settings of the per-patient pipeline (plain types, so a config file or the CLI can build it).

    Attributes:
        reference: preferred reference sequence; falls back to Gd-T1w, then the first available.
        transform: ``rigid`` or ``affine`` co-registration.
        seed: random seed of the registrations.
        registration_iterations: iterations per level of every registration.
        registration_shrink: shrink factors per level.
        registration_smoothing: smoothing sigmas (voxels) per level.
        registration_sampling: metric sampling rate.
        exclude_lesion: mask the label's lesion out of the registration metric (when a label exists).
        skull_strip_method: see :func:`preprocessing.skull_strip.extract_brain`.
        skull_strip_resample_mm: isotropic grid the skull-stripping network sees.
        n4_shrink: N4 shrink factor.
        n4_iterations: N4 iterations per fitting level.
        label_globs: file patterns (relative to the patient folder) of an expert label/segmentation.
        label_space: sequence whose world space the label is drawn in (default: the reference).
        sequence_roles: a user's sequence-roles file for raw DICOM exams (tried before the defaults,
            :data:`preprocessing.roles.DEFAULT_ROLES_FILE`).
        volume: index of the volume to take from a 4D (multi-volume) series; ``None`` refuses them.
    """

    reference: str = "aptw"
    transform: str = "rigid"
    seed: int = 0
    registration_iterations: tuple[int, ...] = (100, 50, 25)
    registration_shrink: tuple[int, ...] = (4, 2, 1)
    registration_smoothing: tuple[float, ...] = (2.0, 1.0, 0.0)
    registration_sampling: float = 0.1
    exclude_lesion: bool = False
    skull_strip_method: str = "deepbet"
    skull_strip_resample_mm: float = 1.0
    n4_shrink: int = 4
    n4_iterations: tuple[int, ...] = (50, 50, 30)
    label_globs: tuple[str, ...] = ("label.nii.gz", "seg.nii.gz", "label.nii", "seg.nii")
    label_space: str | None = None
    sequence_roles: str | None = None
    volume: int | None = None

    def registration_kwargs(self) -> dict[str, Any]:
        return dict(
            transform=self.transform,
            iterations=tuple(self.registration_iterations),
            shrink_factors=tuple(self.registration_shrink),
            smoothing_sigmas=tuple(self.registration_smoothing),
            sampling_rate=float(self.registration_sampling),
            seed=int(self.seed),
        )


@dataclass
class Exam:
    """One raw exam: where each sequence (file or DICOM folder) and the optional label are.

    ``dicom_exam``: the folder is a raw DICOM exam whose series get their roles from their headers
    (``sequences`` is empty until the ``convert`` step).
    """

    patient_id: str
    folder: Path
    sequences: dict[str, Path]
    label: Path | None = None
    dicom_exam: bool = False


@dataclass
class StepRecord:
    """What :func:`run_step` did: ``skipped`` when a valid marker was found."""

    step: str
    seconds: float
    skipped: bool
    outputs: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Discovery and choices
# ---------------------------------------------------------------------------------------------
def _stem(path: Path) -> str:
    name = path.name
    for suffix in _NIFTI:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def discover_exam(folder: str | os.PathLike, label_globs: Sequence[str] = PipelineConfig.label_globs) -> Exam:
    """List the sequences of a raw patient folder.

    ``<seq>.nii.gz`` files and ``<seq>/`` DICOM folders are recognised through
    :func:`~medsynth.constants.canonical_sequence` (``t1c.nii.gz`` is Gd-T1w); a ``truth/`` folder and
    other files are ignored, except the first match of ``label_globs`` (the expert label). A folder
    with no such name but DICOM files (anywhere below it) is a raw DICOM exam (``dicom_exam``).

    Raises:
        InputDataError: missing folder, a sequence given twice, or no sequence at all.
    """
    folder = Path(folder)
    patient_id = folder.name
    if not folder.is_dir():
        raise InputDataError("patient folder does not exist", path=folder, patient_id=patient_id)
    sequences: dict[str, Path] = {}
    ignored = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.name == "truth":
            continue
        is_nifti = entry.is_file() and entry.name.lower().endswith(_NIFTI)
        if not (is_nifti or entry.is_dir()):
            ignored.append(entry.name)
            continue
        try:
            sequence = canonical_sequence(_stem(entry))
        except ValueError:
            ignored.append(entry.name)
            continue
        if sequence in sequences:
            raise InputDataError(
                f"sequence {sequence} given twice ({sequences[sequence].name} and {entry.name})",
                path=entry,
                patient_id=patient_id,
            )
        sequences[sequence] = entry
    label = None
    for pattern in label_globs:
        matches = sorted(p for p in folder.glob(pattern) if p.is_file())
        if matches:
            label = matches[0]
            break
    ignored = [n for n in ignored if label is None or n != label.name]
    if not sequences and _holds_dicom(folder):
        return Exam(patient_id=patient_id, folder=folder, sequences={}, label=label, dicom_exam=True)
    images = [n for n in ignored if n.lower().endswith(_NIFTI) or (folder / n).is_dir()]
    if images:  # image data under a name no role matches: say it, it may be a sequence misnamed
        logger.warning(
            "%s: %s match(es) no sequence role and is ignored (name a sequence t1w, t1c, t2w, flair or "
            "aptw; aliases such as t1, t1ce, t2 are accepted)",
            patient_id,
            ", ".join(images),
        )
    if set(ignored) - set(images):
        logger.debug("%s: ignored %s", patient_id, sorted(set(ignored) - set(images)))
    if not sequences:
        raise InputDataError(
            "no sequence found (expected <seq>.nii.gz files or <seq>/ DICOM folders, e.g. t1c.nii.gz, "
            "flair/)",
            path=folder,
            patient_id=patient_id,
        )
    ordered = {s: sequences[s] for s in CLINICAL_SEQUENCES if s in sequences}
    return Exam(patient_id=patient_id, folder=folder, sequences=ordered, label=label)


def _holds_dicom(folder: Path, probe: int = 20) -> bool:
    """Whether one of the first ``probe`` non-NIfTI files below ``folder`` is DICOM (gzipped or not)."""
    import gzip

    from preprocessing.dicom import is_gzipped

    files = (
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".") and not p.name.lower().endswith(_NIFTI)
    )
    for _, path in zip(range(probe), files, strict=False):
        try:
            with (gzip.open if is_gzipped(path) else open)(path, "rb") as handle:
                head = handle.read(132)
        except OSError:  # a damaged gzip file: not a sign of DICOM
            continue
        if head[128:132] == b"DICM":
            return True
    return False


def choose_reference(sequences: Sequence[str], preferred: str = "aptw") -> str:
    """The reference sequence: ``preferred`` if present, else Gd-T1w, else the first available."""
    available = [canonical_sequence(s) for s in sequences]
    if not available:
        raise ValueError("no sequences to choose a reference from")
    for candidate in (canonical_sequence(preferred), "gd_t1w"):
        if candidate in available:
            return candidate
    return available[0]


def _voxel_volume(img: nib.Nifti1Image) -> float:
    return float(np.prod(img.header.get_zooms()[:3]))


def choose_skull_strip_sequence(images: Mapping[str, nib.Nifti1Image]) -> str:
    """The anatomical sequence with the smallest voxels (ties: Gd-T1w, T1w, T2w, FLAIR)."""
    candidates = [s for s in _SKULL_STRIP_PREFERENCE if s in images] or list(images)
    return min(candidates, key=lambda s: (round(_voxel_volume(images[s]), 3), candidates.index(s)))


def choose_hub(sequences: Sequence[str], reference: str) -> str:
    """Sequence the others are registered to before the reference (the reference itself if anatomical)."""
    if reference not in QUANTITATIVE_SEQUENCES:
        return reference
    for candidate in _HUB_PREFERENCE:
        if candidate in sequences:
            return candidate
    return reference


# ---------------------------------------------------------------------------------------------
# Resumable steps
# ---------------------------------------------------------------------------------------------
def run_step(
    step_dir: str | os.PathLike,
    name: str,
    inputs: Mapping[str, str | os.PathLike],
    params: Mapping[str, Any],
    compute: Callable[[Path], tuple[Mapping[str, Path], Mapping[str, Any]]],
    force: bool = False,
) -> StepRecord:
    """Run ``compute(step_dir)`` unless a marker says it already ran on the same inputs.

    Args:
        step_dir: the step's folder (outputs and marker live here; outputs may also live elsewhere).
        name: step name (logged, stored in the marker).
        inputs: files/folders the step reads; their content hashes decide whether to rerun.
        params: settings of the step (JSON-serialisable); a change forces a rerun.
        compute: writes the outputs atomically and returns ``(outputs, info)``.
        force: rerun even when the marker is valid.
    """
    step_dir = Path(step_dir)
    marker = step_dir / STEP_MARKER
    input_hashes = {key: file_digest(value) for key, value in inputs.items()}
    fingerprint = json_digest({"inputs": dict(sorted(input_hashes.items())), "params": params})
    if not force and marker.is_file():
        try:
            record = json.loads(marker.read_text())
        except json.JSONDecodeError:
            record = {}
        outputs = {k: step_dir / v for k, v in record.get("outputs", {}).items()}
        if record.get("fingerprint") == fingerprint and all(p.exists() for p in outputs.values()):
            logger.debug("%s: up to date, skipped", step_dir)
            return StepRecord(
                name,
                float(record.get("seconds", 0.0)),
                True,
                record.get("outputs", {}),
                record.get("info", {}),
            )
    marker.unlink(missing_ok=True)  # an interrupted rerun must not look finished
    step_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    outputs, info = compute(step_dir)
    seconds = time.perf_counter() - start
    relative = {k: os.path.relpath(Path(v), step_dir) for k, v in outputs.items()}
    save_json(
        {
            "step": name,
            "fingerprint": fingerprint,
            "params": params,
            "input_hashes": input_hashes,
            "outputs": relative,
            "output_hashes": {k: file_digest(v) for k, v in outputs.items()},
            "seconds": round(seconds, 3),
            "finished_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "info": dict(info),
        },
        marker,
    )
    logger.info("%s: %s done in %.1f s", step_dir.parent.parent.name, name, seconds)
    return StepRecord(name, seconds, False, relative, dict(info))


# ---------------------------------------------------------------------------------------------
# Step bodies (plain functions over images)
# ---------------------------------------------------------------------------------------------
def _check_image(img: nib.Nifti1Image, path: Path, patient_id: str) -> None:
    data = np.asanyarray(img.dataobj)
    if data.ndim != 3 or min(data.shape) < 2:
        raise InputDataError(
            f"expected a 3D volume, got shape {data.shape}", path=path, patient_id=patient_id
        )
    if not np.all(np.isfinite(data)):
        raise InputDataError("contains NaN/inf voxels", path=path, patient_id=patient_id)
    if float(np.ptp(data)) == 0.0:
        raise InputDataError("image is constant", path=path, patient_id=patient_id)


def ingest_exam(exam: Exam, volume: int | None = None) -> dict[str, nib.Nifti1Image]:
    """Load every sequence of ``exam`` (NIfTI, or a DICOM folder through dcm2niix) and validate it.

    Args:
        exam: the exam.
        volume: the volume to take from a 4D series (``None``: a 4D series is refused).
    """
    images = {}
    for sequence, path in exam.sequences.items():
        try:
            img = load_image(path, volume=volume, converter="dcm2niix")
        except InputDataError as err:
            raise InputDataError(err.problem, path=path, patient_id=exam.patient_id) from err
        _check_image(img, path, exam.patient_id)
        images[sequence] = img
    return images


def coregister_exam(
    images: Mapping[str, nib.Nifti1Image],
    reference: str,
    hub: str | None = None,
    exclude_mask: nib.Nifti1Image | None = None,
    out_dir: str | os.PathLike | None = None,
    **registration_kwargs,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Transforms (reference point -> sequence point, 4x4 RAS) of every sequence to ``reference``.

    Sequences other than the hub are registered to the hub at their native resolution; the hub is
    registered to the reference (mutual information); the two maps are composed.

    Returns:
        ``(matrices, metrics)`` keyed by sequence (the reference maps to the identity).
    """
    hub = hub or choose_hub(list(images), reference)
    matrices: dict[str, np.ndarray] = {reference: np.eye(4)}
    metrics: dict[str, float] = {}
    out = None if out_dir is None else Path(out_dir)
    if hub != reference:
        result = register_to_reference(
            images[hub], images[reference], exclude_mask=exclude_mask, **registration_kwargs
        )
        matrices[hub], metrics[hub] = result.matrix, result.metric
    for sequence, img in images.items():
        if sequence in (reference, hub):
            continue
        result = register_to_reference(img, images[hub], **registration_kwargs)
        # reference -> hub, then hub -> sequence.
        matrices[sequence] = result.matrix @ matrices[hub]
        metrics[sequence] = result.metric
    if out is not None:
        for sequence, matrix in matrices.items():
            via = [] if sequence == reference else ([hub] if sequence != hub else [])
            save_transform(
                matrix,
                out / f"{sequence}_to_{reference}",
                reference=reference,
                via=via,
                metric=metrics.get(sequence),
            )
    return matrices, metrics


def _binary_on_reference(mask: nib.Nifti1Image, reference: nib.Nifti1Image, matrix: np.ndarray) -> np.ndarray:
    # Linear interpolation of the 0/1 mask then 0.5: a smooth boundary on thick reference slices.
    soft = resample_to_reference(
        new_image_like(np.asanyarray(mask.dataobj).astype(np.float32), mask),
        reference,
        matrix,
        interpolation="linear",
    )
    return (np.asanyarray(soft.dataobj) >= 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Per-patient driver
# ---------------------------------------------------------------------------------------------
def work_dir(out_dir: str | os.PathLike, patient_id: str) -> Path:
    return Path(out_dir) / patient_id / "work"


def convert_dicom_exam(
    exam: Exam, step_dir: Path, config: PipelineConfig, records: list[StepRecord] | None = None
) -> Exam:
    """The ``convert`` step of a raw DICOM exam: every series through dcm2niix, roles from headers.

    Returns:
        The exam with its ``sequences`` set to the converted series that took a role.

    Raises:
        InputDataError: no series took a role (the unmatched ones are listed by number).
    """
    from preprocessing.dcm2niix import convert_exam
    from preprocessing.roles import RoleAssignment, load_role_rules

    rules = load_role_rules(config.sequence_roles)

    def _convert(out: Path):
        paths, assignment = convert_exam(exam.folder, out / "series", rules, exam.patient_id)
        roles_path = save_json(assignment.to_json(), out / "roles.json")
        return {"roles": roles_path, **{f"series/{k}": v for k, v in paths.items()}}, {
            "roles": assignment.roles
        }

    rec = run_step(
        step_dir,
        "convert",
        {"dicom": exam.folder},
        {"rules": [dict(r) for r in rules.rules], "prefer": [dict(p) for p in rules.prefer]},
        _convert,
    )
    if records is not None:
        records.append(rec)
    assignment = RoleAssignment.from_json(json.loads((step_dir / rec.outputs["roles"]).read_text()))
    if not assignment.roles:
        unmatched = ", ".join(assignment.unmatched) or "none"
        raise InputDataError(
            f"no series of the DICOM exam took a sequence role (unmatched: {unmatched}); "
            "give the roles with --sequence-roles FILE",
            path=exam.folder,
            patient_id=exam.patient_id,
        )
    sequences = {role: step_dir / "series" / f"{stem}.nii.gz" for role, stem in assignment.roles.items()}
    return Exam(exam.patient_id, exam.folder, sequences, exam.label)


def preprocess_patient(
    exam: Exam | str | os.PathLike, out_dir: str | os.PathLike, config: PipelineConfig | None = None
) -> dict[str, Any]:
    """Steps 1-5 for one patient (everything that does not need the cohort).

    Returns:
        A summary: patient id, reference, hub, skull-strip sequence, per-step seconds/skipped and
        the paths of the N4-corrected reference-grid images, mask and label.
    """
    config = config or PipelineConfig()
    if not isinstance(exam, Exam):
        exam = discover_exam(exam, config.label_globs)
    pid = exam.patient_id
    work = work_dir(out_dir, pid)
    records: list[StepRecord] = []

    # 0. convert a raw DICOM exam, roles from the headers ----------------------------------------
    if exam.dicom_exam:
        exam = convert_dicom_exam(exam, work / "convert", config, records)

    # 1. ingest --------------------------------------------------------------------------------
    ingest_inputs = {f"raw_{s}": p for s, p in exam.sequences.items()}
    if exam.label is not None:
        ingest_inputs["raw_label"] = exam.label

    def _ingest(step_dir: Path):
        images = ingest_exam(exam, config.volume)
        outputs = {}
        for sequence, img in images.items():
            outputs[sequence] = save_nifti(
                np.asanyarray(img.dataobj), img.affine, step_dir / f"{sequence}.nii.gz"
            )
        if exam.label is not None:
            label = load_image(exam.label)
            data = np.asanyarray(label.dataobj)
            problem = label_map_problem(data, allowed=range(256))
            if problem is not None:
                raise InputDataError(f"label map {problem}", path=exam.label, patient_id=pid)
            outputs["label"] = save_nifti(data.astype(np.uint8), label.affine, step_dir / "label.nii.gz")
        info = {
            "sequences": list(images),
            "voxel_mm": {
                s: [round(float(z), 4) for z in im.header.get_zooms()[:3]] for s, im in images.items()
            },
        }
        return outputs, info

    ingest_params = {"label": exam.label is not None, "volume": config.volume}
    rec = run_step(work / "ingest", "ingest", ingest_inputs, ingest_params, _ingest)
    records.append(rec)
    ingested = {k: work / "ingest" / v for k, v in rec.outputs.items()}
    seq_paths = {s: ingested[s] for s in exam.sequences}
    images = {s: nib.load(str(p)) for s, p in seq_paths.items()}
    reference = choose_reference(list(images), config.reference)
    strip_seq = choose_skull_strip_sequence(images)
    hub = choose_hub(list(images), reference)

    # 2. skull strip (native grid of the sharpest anatomical sequence) ----------------------------
    def _strip(step_dir: Path):
        from preprocessing.skull_strip import extract_brain

        mask = extract_brain(
            images[strip_seq], method=config.skull_strip_method, resample_mm=config.skull_strip_resample_mm
        )
        path = save_nifti(
            np.asanyarray(mask.dataobj).astype(np.uint8),
            images[strip_seq].affine,
            step_dir / f"brain_mask_{strip_seq}.nii.gz",
        )
        return {"brain_mask": path}, {"sequence": strip_seq, "voxels": int(np.asanyarray(mask.dataobj).sum())}

    rec = run_step(
        work / "skullstrip",
        "skullstrip",
        {strip_seq: seq_paths[strip_seq]},
        {
            "method": config.skull_strip_method,
            "resample_mm": config.skull_strip_resample_mm,
            "sequence": strip_seq,
        },
        _strip,
    )
    records.append(rec)
    native_mask_path = work / "skullstrip" / rec.outputs["brain_mask"]

    # 3. register --------------------------------------------------------------------------------
    label_space = canonical_sequence(config.label_space) if config.label_space else reference
    use_exclude = config.exclude_lesion and "label" in ingested and label_space == reference

    def _register(step_dir: Path):
        exclude = None
        if use_exclude:
            label = np.asanyarray(nib.load(str(ingested["label"])).dataobj)
            exclude = new_image_like(np.isin(label, LESION_LABELS).astype(np.uint8), images[reference])
        matrices, metrics = coregister_exam(
            images, reference, hub, exclude_mask=exclude, out_dir=step_dir, **config.registration_kwargs()
        )
        outputs = {s: step_dir / f"{s}_to_{reference}.json" for s in matrices}
        outputs.update({f"{s}_mat": step_dir / f"{s}_to_{reference}.mat" for s in matrices})
        return outputs, {"reference": reference, "hub": hub, "metrics": metrics}

    reg_inputs = dict(seq_paths)
    if use_exclude:
        reg_inputs["label"] = ingested["label"]
    rec = run_step(
        work / "register",
        "register",
        reg_inputs,
        {**config.registration_kwargs(), "reference": reference, "hub": hub, "exclude": use_exclude},
        _register,
    )
    records.append(rec)
    matrices = {s: load_transform(work / "register" / rec.outputs[s]) for s in images}

    # 4. resample onto the reference grid ---------------------------------------------------------
    def _resample(step_dir: Path):
        ref_img = images[reference]
        outputs = {}
        for sequence, img in images.items():
            moved = resample_to_reference(img, ref_img, matrices[sequence], interpolation="linear")
            outputs[sequence] = save_nifti(
                np.asanyarray(moved.dataobj).astype(np.float32),
                ref_img.affine,
                step_dir / f"{sequence}.nii.gz",
            )
        mask = _binary_on_reference(nib.load(str(native_mask_path)), ref_img, matrices[strip_seq])
        if not mask.any():
            raise InputDataError(
                "brain mask is empty on the reference grid (registration failed?)",
                path=native_mask_path,
                patient_id=pid,
            )
        outputs["brain_mask"] = save_nifti(mask, ref_img.affine, step_dir / "brain_mask.nii.gz")
        if "label" in ingested:
            label = nib.load(str(ingested["label"]))
            if label_space not in matrices:
                raise InputDataError(
                    f"label space {label_space} is not a sequence of this exam",
                    path=exam.label,
                    patient_id=pid,
                )
            moved = resample_to_reference(
                label, ref_img, matrices[label_space], interpolation="nearestNeighbor"
            )
            outputs["label"] = save_nifti(
                np.asanyarray(moved.dataobj).astype(np.uint8), ref_img.affine, step_dir / "label.nii.gz"
            )
        return outputs, {}

    res_inputs = {
        **seq_paths,
        "brain_mask_native": native_mask_path,
        **{f"tx_{s}": work / "register" / rec.outputs[s] for s in images},
    }
    if "label" in ingested:
        res_inputs["label"] = ingested["label"]
    rec = run_step(work / "resample", "resample", res_inputs, {"label_space": label_space}, _resample)
    records.append(rec)
    resampled = {k: work / "resample" / v for k, v in rec.outputs.items()}

    # 5. N4 inside the brain mask ----------------------------------------------------------------
    def _n4(step_dir: Path):
        from preprocessing.bias import n4_correct

        mask = nib.load(str(resampled["brain_mask"]))
        outputs, info = {}, {}
        for sequence in images:
            img = nib.load(str(resampled[sequence]))
            if sequence in QUANTITATIVE_SEQUENCES:
                outputs[sequence] = save_nifti(
                    np.asanyarray(img.dataobj), img.affine, step_dir / f"{sequence}.nii.gz"
                )
                continue
            corrected, bias = n4_correct(
                img, mask, shrink_factor=config.n4_shrink, iterations=config.n4_iterations
            )
            outputs[sequence] = save_nifti(
                np.asanyarray(corrected.dataobj), img.affine, step_dir / f"{sequence}.nii.gz"
            )
            outputs[f"bias_{sequence}"] = save_nifti(
                np.asanyarray(bias.dataobj), img.affine, step_dir / f"bias_{sequence}.nii.gz"
            )
            inside = np.asanyarray(mask.dataobj) > 0
            info[sequence] = {
                "bias_min": float(np.asanyarray(bias.dataobj)[inside].min()),
                "bias_max": float(np.asanyarray(bias.dataobj)[inside].max()),
            }
        return outputs, info

    rec = run_step(
        work / "n4",
        "n4",
        {**{s: resampled[s] for s in images}, "brain_mask": resampled["brain_mask"]},
        {"shrink": config.n4_shrink, "iterations": list(config.n4_iterations)},
        _n4,
    )
    records.append(rec)
    corrected = {k: work / "n4" / v for k, v in rec.outputs.items()}

    return {
        "patient_id": pid,
        "reference": reference,
        "hub": hub,
        "skull_strip_sequence": strip_seq,
        "sequences": list(images),
        "n4": {s: str(corrected[s]) for s in images},
        "brain_mask": str(resampled["brain_mask"]),
        "label": str(resampled["label"]) if "label" in resampled else "",
        "steps": [asdict(r) for r in records],
    }


def final_paths(out_dir: str | os.PathLike, patient_id: str, sequences: Sequence[str]) -> dict[str, Path]:
    """The final per-patient files the data layer reads (see ``docs/preprocessing.md``)."""
    folder = Path(out_dir) / patient_id
    paths = {s: folder / f"{patient_id}_{s}.nii.gz" for s in sequences}
    paths["brain_mask"] = folder / f"{patient_id}_brainmask.nii.gz"
    paths["label"] = folder / f"{patient_id}_label.nii.gz"
    for s in sequences:
        paths[f"atlas_{s}"] = folder / f"{patient_id}_atlas_{s}.nii.gz"
    for tissue in TISSUE_CLASSES:
        paths[tissue_column(tissue)] = folder / f"{patient_id}_tissue_{tissue}.nii.gz"
    return paths


def standardize_patient(
    summary: Mapping[str, Any], out_dir: str | os.PathLike, landmarks_path: str | os.PathLike
) -> dict[str, Any]:
    """Step 6: Nyúl-standardize the N4 outputs inside the mask and write the final files."""
    from preprocessing.standardize import NyulLandmarks

    pid = summary["patient_id"]
    sequences = summary["sequences"]
    final = final_paths(out_dir, pid, sequences)
    landmarks_path = Path(landmarks_path)

    def _standardize(step_dir: Path):
        landmarks = NyulLandmarks.load(landmarks_path)
        mask_img = nib.load(summary["brain_mask"])
        inside = np.asanyarray(mask_img.dataobj) > 0
        outputs = {}
        for sequence in sequences:
            img = nib.load(summary["n4"][sequence])
            if sequence in landmarks:
                data = np.asanyarray(landmarks[sequence].transform(img, mask_img).dataobj)
            else:
                data = np.asanyarray(img.dataobj)
            outputs[sequence] = save_nifti(
                np.where(inside, data, 0).astype(np.float32), mask_img.affine, final[sequence]
            )
        outputs["brain_mask"] = save_nifti(inside.astype(np.uint8), mask_img.affine, final["brain_mask"])
        if summary.get("label"):
            label = nib.load(summary["label"])
            outputs["label"] = save_nifti(
                np.asanyarray(label.dataobj).astype(np.uint8), label.affine, final["label"]
            )
        return outputs, {}

    inputs = {
        **{s: summary["n4"][s] for s in sequences},
        "brain_mask": summary["brain_mask"],
        "landmarks": landmarks_path,
    }
    if summary.get("label"):
        inputs["label"] = summary["label"]
    rec = run_step(work_dir(out_dir, pid) / "standardize", "standardize", inputs, {}, _standardize)
    step_dir = work_dir(out_dir, pid) / "standardize"
    return {
        "patient_id": pid,
        "outputs": {k: str((step_dir / v).resolve()) for k, v in rec.outputs.items()},
        "step": asdict(rec),
    }


class CoRegisterd(MapTransform):
    """Dictionary transform: register every key to ``reference_key`` and resample it on its grid.

    Args:
        keys: image keys (NIfTI images or MONAI MetaTensors) to align.
        reference_key: key of the fixed image (left unchanged).
        transform: ``rigid`` or ``affine``.
        matrix_key_postfix: the fixed-to-moving 4x4 RAS matrix is stored under ``<key>_<postfix>``.
        registration_kwargs: forwarded to :func:`~preprocessing.registration.register_to_reference`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        reference_key: str,
        transform: str = "rigid",
        matrix_key_postfix: str = "to_reference",
        allow_missing_keys: bool = False,
        **registration_kwargs,
    ):
        super().__init__(keys, allow_missing_keys)
        self.reference_key = reference_key
        self.transform = transform
        self.postfix = matrix_key_postfix
        self.kwargs = registration_kwargs

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        fixed = to_nifti(d[self.reference_key])
        for key in self.key_iterator(d):
            if key == self.reference_key:
                continue
            result = register_to_reference(to_nifti(d[key]), fixed, transform=self.transform, **self.kwargs)
            d[key] = like_input(result.warped, d[key])
            d[f"{key}_{self.postfix}"] = result.matrix
        return d
