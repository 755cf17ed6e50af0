"""BIDS in and out: a BIDS raw dataset as the cohort's input, a BIDS derivatives dataset beside the manifest.

**In.** A folder with ``dataset_description.json`` is read as BIDS raw data: one patient per
``sub-<label>`` (patient id ``sub-<label>``, so splits stay subject-level), ``anat/`` files named by
the BIDS entity rules (``key-value`` pairs joined by ``_``, then the suffix):

=================================  ===========
file                               role
=================================  ===========
``*_T1w`` without ``ce``           T1w
``*_ce-<agent>_T1w`` (any ``ce``)  Gd-T1w
``*_T2w``                          T2w
``*_FLAIR``                        FLAIR
the APTw entity, any suffix        APTw
=================================  ===========

BIDS has no suffix for amide-proton-transfer imaging, so APTw is read from an entity a user
chooses, ``acq-APT`` by default (``preprocessing run --bids-aptw acq-APT``); a file with that entity
takes the APTw role whatever its suffix. A subject with several sessions needs ``--bids-session``;
an expert label is the first ``*_dseg.nii[.gz]`` of the subject in ``derivatives/*/`` (or a
``--label-glob`` relative to the subject folder).

**Out.** ``OUT/bids_derivatives/`` is a BIDS derivatives dataset of the final images:
``dataset_description.json`` (``DatasetType: derivative``, ``GeneratedBy``), ``participants.tsv``
(``participant_id``, the cohort's ``patient_id`` and split), and per subject
``anat/sub-<label>_[ce-gadolinium_|acq-APT_]space-individual_desc-preproc_<suffix>.nii.gz`` with a
sidecar, the brain mask (``desc-brain_mask``), the label map (``_dseg`` with a ``dseg.tsv`` lookup) and,
with tissue maps, ``label-<CSF|GM|WM>_probseg``. ``space-individual``: the subject's own reference
grid (the APTw slab, else Gd-T1w), named in each sidecar's ``SpatialReference``. APTw is written as
``acq-APT_MTRmap`` (it is an MTR-asymmetry map). Files are hard links of the cohort's files where the
file system allows, copies otherwise, written atomically.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from medsynth.constants import CLINICAL_SEQUENCES, LABEL_NAMES, TISSUE_CLASSES, tissue_column
from medsynth.errors import InputDataError
from medsynth.utils.io import atomic_path, save_json, save_text
from preprocessing.pipeline import Exam

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_APTW_ENTITY",
    "DERIVATIVES_FOLDER",
    "aptw_entity",
    "bids_exams",
    "bids_name",
    "is_bids_dataset",
    "parse_bids_name",
    "write_bids_derivatives",
]

DEFAULT_APTW_ENTITY = "acq-APT"
DERIVATIVES_FOLDER = "bids_derivatives"
BIDS_VERSION = "1.10.0"
# The BIDS entity order (the specification's entity table) of the entities this module writes or reads.
_ENTITY_ORDER = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "mod", "echo", "flip", "inv",
                 "mt", "part", "space", "res", "den", "label", "desc")  # fmt: skip
_NIFTI = (".nii.gz", ".nii")
_SUFFIX_ROLES = {"T1w": "t1w", "T2w": "t2w", "FLAIR": "flair"}
_ROLE_SUFFIXES = {"t1w": ("T1w", {}), "gd_t1w": ("T1w", {"ce": "gadolinium"}), "t2w": ("T2w", {}),
                  "flair": ("FLAIR", {}), "aptw": ("MTRmap", {"acq": "APT"})}  # fmt: skip
_SPACE = "individual"
_LABEL = re.compile(r"^[A-Za-z0-9]+$")


def is_bids_dataset(folder: str | os.PathLike) -> bool:
    """A folder holding ``dataset_description.json`` and at least one ``sub-*`` folder."""
    folder = Path(folder)
    return (folder / "dataset_description.json").is_file() and any(folder.glob("sub-*"))


def parse_bids_name(name: str) -> tuple[dict[str, str], str, str]:
    """``sub-01_ce-gadolinium_T1w.nii.gz`` -> ``({"sub": "01", "ce": "gadolinium"}, "T1w", ".nii.gz")``.

    Raises:
        ValueError: the name does not follow the entity rules (``key-value`` pairs, then a suffix).
    """
    extension = next((e for e in (".nii.gz", ".nii", ".json", ".tsv") if name.endswith(e)), "")
    parts = name[: len(name) - len(extension)].split("_")
    entities: dict[str, str] = {}
    for part in parts[:-1]:
        key, dash, value = part.partition("-")
        if not dash or not key or not value:
            raise ValueError(f"{name}: {part!r} is not a key-value entity")
        entities[key] = value
    if not parts[-1] or "-" in parts[-1]:
        raise ValueError(f"{name}: no suffix")
    return entities, parts[-1], extension


def bids_name(entities: Mapping[str, str], suffix: str, extension: str) -> str:
    """The file name of ``entities`` (in the specification's order) + ``suffix`` + ``extension``."""
    unknown = set(entities) - set(_ENTITY_ORDER)
    if unknown:
        raise ValueError(f"entities {sorted(unknown)} are not in the order table")
    pairs = [f"{key}-{entities[key]}" for key in _ENTITY_ORDER if key in entities]
    return "_".join([*pairs, suffix]) + extension


def aptw_entity(spec: str) -> tuple[str, str]:
    """``("acq", "APT")`` of ``"acq-APT"``: the entity that marks a BIDS dataset's APTw files."""
    key, dash, value = spec.partition("-")
    if not dash or not _LABEL.match(key) or not _LABEL.match(value):
        raise InputDataError(f"--bids-aptw {spec!r}: expected one BIDS entity as key-value, e.g. acq-APT")
    return key, value


def _role(entities: Mapping[str, str], suffix: str, aptw: tuple[str, str]) -> str | None:
    if entities.get(aptw[0]) == aptw[1]:
        return "aptw"
    role = _SUFFIX_ROLES.get(suffix)
    if role == "t1w" and "ce" in entities:
        return "gd_t1w"
    return role


def _subject_exam(
    root: Path, subject: Path, aptw: tuple[str, str], session: str | None, label_globs: Sequence[str]
) -> Exam:
    pid = subject.name
    sessions = sorted(p.name for p in subject.glob("ses-*") if p.is_dir())
    base = subject
    if sessions:
        if session is None and len(sessions) > 1:
            raise InputDataError(
                f"has {len(sessions)} sessions ({', '.join(sessions)}); choose one with --bids-session LABEL "
                "(a patient is one exam)",
                path=subject,
                patient_id=pid,
            )
        chosen = f"ses-{session}" if session is not None else sessions[0]
        if chosen not in sessions:
            raise InputDataError(
                f"has no session {chosen} ({', '.join(sessions)})", path=subject, patient_id=pid
            )
        base = subject / chosen
    sequences: dict[str, Path] = {}
    for path in sorted((base / "anat").glob("*")):
        if not path.name.endswith(_NIFTI):
            continue
        try:
            entities, suffix, _ = parse_bids_name(path.name)
        except ValueError as err:
            raise InputDataError(f"not a BIDS file name: {err}", path=path, patient_id=pid) from None
        if entities.get("sub") != pid[len("sub-") :]:
            raise InputDataError(
                f"belongs to sub-{entities.get('sub')}, not {pid}", path=path, patient_id=pid
            )
        role = _role(entities, suffix, aptw)
        if role is None:
            logger.debug("%s: %s has no sequence role, ignored", pid, path.name)
            continue
        if role in sequences:
            raise InputDataError(
                f"two files take the {role} role ({sequences[role].name} and {path.name}); keep one "
                "(e.g. move the other run out of anat/)",
                path=path,
                patient_id=pid,
            )
        sequences[role] = path
    if not sequences:
        raise InputDataError(
            "no anatomical file with a sequence role in anat/ (_T1w, _ce-*_T1w, _T2w, _FLAIR, "
            f"{aptw[0]}-{aptw[1]})",
            path=base,
            patient_id=pid,
        )
    relative = base.relative_to(root)
    label = None
    candidates = [p for pattern in label_globs for p in sorted(subject.glob(pattern))]
    candidates += sorted((root / "derivatives").glob(f"*/{relative}/anat/{pid}_*dseg.nii*"))
    label = next((p for p in candidates if p.is_file()), None)
    ordered = {s: sequences[s] for s in CLINICAL_SEQUENCES if s in sequences}
    return Exam(patient_id=pid, folder=base, sequences=ordered, label=label)


def bids_exams(
    root: str | os.PathLike,
    aptw_spec: str = DEFAULT_APTW_ENTITY,
    session: str | None = None,
    label_globs: Sequence[str] = (),
) -> tuple[list[Exam], dict[str, str]]:
    """The exams of a BIDS raw dataset, one per subject.

    Returns:
        ``(exams, problems)``: the subjects that could be read, and subject -> problem for the others
        (each one clean line; the cohort runner records them as failures).
    """
    root = Path(root)
    aptw = aptw_entity(aptw_spec)
    exams, problems = [], {}
    for subject in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        try:
            exams.append(_subject_exam(root, subject, aptw, session, label_globs))
        except InputDataError as err:
            problems[subject.name] = str(err)
    return exams, problems


# -- out ---------------------------------------------------------------------------------------------
def _subject_label(patient_id: str, taken: set[str]) -> str:
    """A BIDS subject label (alphanumeric) for a patient id, unique within the dataset."""
    if patient_id.startswith("sub-") and _LABEL.match(patient_id[4:]):
        label = patient_id[4:]
    else:
        label = re.sub(r"[^A-Za-z0-9]", "", patient_id) or "patient"
    unique, n = label, 1
    while unique in taken:
        n += 1
        unique = f"{label}{n}"
    taken.add(unique)
    return unique


def _place(source: Path, target: Path) -> Path:
    """``target`` as a hard link of ``source`` (a copy across file systems), atomically."""
    with atomic_path(target) as tmp:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
    return target


def write_bids_derivatives(
    out_dir: str | os.PathLike,
    finals: Mapping[str, Mapping[str, Any]],
    splits: Mapping[str, str],
    references: Mapping[str, str],
    version: str,
) -> Path:
    """Write ``out_dir/bids_derivatives`` from the cohort's final files (see the module docstring).

    Args:
        out_dir: the cohort's output folder.
        finals: patient id -> final file paths (``<seq>``, ``brain_mask``, ``label``, tissue columns).
        splits: patient id -> split.
        references: patient id -> the reference sequence of its grid.
        version: the medsynth version (``GeneratedBy``).

    Returns:
        The derivatives folder.
    """
    root = Path(out_dir) / DERIVATIVES_FOLDER
    root.mkdir(parents=True, exist_ok=True)
    save_json(
        {
            "Name": "medsynth preprocessing derivatives",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": [
                {
                    "Name": "medsynth",
                    "Version": version,
                    "Description": "python -m preprocessing run: ANTs co-registration to the reference "
                    "sequence, deepbet skull stripping, N4, Nyul standardization",
                }
            ],
        },
        root / "dataset_description.json",
    )
    save_text(
        "Preprocessed images of a medsynth cohort (python -m preprocessing run). The manifest beside this "
        "folder (../manifest.csv) is what medsynth's models read; this folder holds the same files named "
        "by BIDS derivative rules. space-individual is each subject's own reference grid (see each "
        "sidecar's SpatialReference).\n",
        root / "README",
    )
    taken: set[str] = set()
    rows = []
    lookup = pd.DataFrame({"index": list(LABEL_NAMES), "name": list(LABEL_NAMES.values())})
    for pid in sorted(finals):
        final = finals[pid]
        label = _subject_label(pid, taken)
        rows.append({"participant_id": f"sub-{label}", "patient_id": pid, "split": splits.get(pid, "n/a")})
        anat = root / f"sub-{label}" / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        reference_role = references.get(pid)
        suffix_of_reference, extra_of_reference = _ROLE_SUFFIXES[reference_role]
        reference_name = bids_name(
            {"sub": label, **extra_of_reference, "space": _SPACE, "desc": "preproc"},
            suffix_of_reference,
            ".nii.gz",
        )
        spatial_reference = f"sub-{label}/anat/{reference_name}"
        for role, (suffix, extra) in _ROLE_SUFFIXES.items():
            if not final.get(role):
                continue
            entities = {"sub": label, **extra, "space": _SPACE, "desc": "preproc"}
            image = _place(Path(final[role]), anat / bids_name(entities, suffix, ".nii.gz"))
            sidecar = {"SkullStripped": True, "SpatialReference": spatial_reference, "Sequence": role}
            save_json(sidecar, image.with_name(bids_name(entities, suffix, ".json")))
        common = {"SpatialReference": spatial_reference}
        if final.get("brain_mask"):
            entities = {"sub": label, "space": _SPACE, "desc": "brain"}
            _place(Path(final["brain_mask"]), anat / bids_name(entities, "mask", ".nii.gz"))
            save_json({**common, "Type": "Brain"}, anat / bids_name(entities, "mask", ".json"))
        if final.get("label"):
            entities = {"sub": label, "space": _SPACE}
            _place(Path(final["label"]), anat / bids_name(entities, "dseg", ".nii.gz"))
            save_json(common, anat / bids_name(entities, "dseg", ".json"))
            with atomic_path(anat / bids_name(entities, "dseg", ".tsv")) as tmp:
                lookup.to_csv(tmp, sep="\t", index=False)
        for tissue in TISSUE_CLASSES:
            if final.get(tissue_column(tissue)):
                entities = {"sub": label, "space": _SPACE, "label": tissue.upper()}
                _place(Path(final[tissue_column(tissue)]), anat / bids_name(entities, "probseg", ".nii.gz"))
                save_json(common, anat / bids_name(entities, "probseg", ".json"))
    with atomic_path(root / "participants.tsv") as tmp:
        pd.DataFrame(rows, columns=["participant_id", "patient_id", "split"]).to_csv(
            tmp, sep="\t", index=False
        )
    save_json(
        {
            "patient_id": {"Description": "the patient id in the cohort's manifest.csv"},
            "split": {
                "Description": "the patient-level split",
                "Levels": {s: s for s in ("train", "val", "test")},
            },
        },
        root / "participants.json",
    )
    logger.info("BIDS derivatives: %d subject(s) in %s", len(rows), root)
    return root


def read_participants(root: str | os.PathLike) -> pd.DataFrame:
    """``participants.tsv`` of a derivatives folder written by :func:`write_bids_derivatives`."""
    return pd.read_csv(Path(root) / "participants.tsv", sep="\t", dtype=str)
