"""Resolve "a dataset" (nothing, a folder or a CSV) into a validated cohort manifest.

:func:`resolve_cohort` is what the training bundles call: it recognises the source, runs the
matching adapter of :mod:`medsynth.data.adapters` (derived files go to ``cache_dir``), checks
every patient with :func:`medsynth.data.validation.validate_cohort`, and returns the manifest
with absolute paths.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from filelock import FileLock

from medsynth.constants import SPLITS
from medsynth.data.adapters import (
    MANIFEST_NAME,
    brats_cohort,
    brats_fingerprint,
    is_brats_layout,
    is_ready_cohort,
    read_ready_cohort,
    user_csv_cohort,
    user_csv_fingerprint,
)
from medsynth.data.conventions import PROJECT_CONVENTION
from medsynth.data.manifest import (
    DEFAULT_SPLIT_FRACTIONS,
    check_patient_level_split,
    has_tissue_maps,
    read_manifest,
    split_patients,
)
from medsynth.data.validation import validate_cohort
from medsynth.utils.errors import reports_input_problems

logger = logging.getLogger(__name__)

SOURCES_LOOKED_FOR = (
    "nothing (an empty dataset argument generates a phantom cohort)",
    f"a folder with {MANIFEST_NAME} (a phantom or preprocessed 'ready' cohort)",
    "a BraTS folder: <case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz",
    (
        "a .csv file with columns patient_id, one per sequence (t1w/t1, gd_t1w/t1ce, t2w/t2, flair, "
        "aptw/apt), label [, brain_mask, split, atlas_<sequence>]"
    ),
)


def detect_source(dataset: str | os.PathLike | None) -> str:
    """The kind of source: ``phantom``, ``ready``, ``brats`` or ``csv``.

    Raises:
        ValueError: nothing recognisable at ``dataset``; the message lists what was looked for.
    """
    if dataset is None or str(dataset).strip() == "":
        return "phantom"
    path = Path(dataset)
    if path.is_file() and path.suffix.lower() == ".csv":
        return "csv"
    if path.is_dir():
        if is_ready_cohort(path):
            return "ready"
        if is_brats_layout(path):
            return "brats"
    state = "does not exist" if not path.exists() else "is not a recognised dataset"
    looked_for = "\n".join(f"  - {item}" for item in SOURCES_LOOKED_FOR)
    raise ValueError(f"dataset {path} {state}. Looked for:\n{looked_for}")


def phantom_cohort_dir(
    cache_dir: str | os.PathLike, seed: int, num_patients: int, shape: Sequence[int]
) -> Path:
    """Where the phantom cohort of these parameters lives inside ``cache_dir``."""
    return Path(cache_dir) / f"phantom_{seed}_{num_patients}_{'x'.join(str(int(s)) for s in shape)}"


def _phantom_cohort(
    cache_dir: Path, seed: int, num_patients: int, shape: Sequence[int], split_fractions: Sequence[float]
) -> pd.DataFrame:
    out_dir = phantom_cohort_dir(cache_dir, seed, num_patients, shape)
    if is_ready_cohort(out_dir):
        manifest = read_ready_cohort(out_dir)
        expected = split_patients(manifest["patient_id"], split_fractions, seed)
        # A cohort from before the tissue maps joined the phantom is completed (same images) below.
        if (
            has_tissue_maps(manifest)
            and manifest["split"].tolist() == manifest["patient_id"].map(expected).tolist()
        ):
            logger.info("reusing the phantom cohort in %s", out_dir)
            return manifest
        # Other split fractions: the generator keeps the patients and redoes the train-split atlas.
        logger.info("phantom cohort in %s: re-splitting with fractions %s", out_dir, tuple(split_fractions))
    from medsynth.data.phantom import generate_phantom_cohort

    logger.info("generating a phantom cohort of %d patient(s) in %s", num_patients, out_dir)
    manifest_path = generate_phantom_cohort(
        out_dir,
        num_patients,
        seed=seed,
        layout="ready",
        shape=tuple(shape),
        split_fractions=tuple(split_fractions),
    )
    return read_manifest(manifest_path)


@reports_input_problems
def resolve_cohort(
    dataset_dir: str | os.PathLike | None,
    cache_dir: str | os.PathLike,
    seed: int = 0,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    phantom_patients: int = 12,
    phantom_shape: Sequence[int] = (256, 256, 15),
    validate: bool = True,
    progress: bool = True,
    build_atlas: bool = True,
    label_convention: str = PROJECT_CONVENTION,
) -> pd.DataFrame:
    """The validated manifest (absolute paths) of ``dataset_dir``.

    Args:
        dataset_dir: ``None``/empty -> a phantom cohort generated once into
            ``cache_dir/phantom_<seed>_<n>_<shape>`` (reused when complete); a folder with
            ``manifest.csv`` -> that manifest; a BraTS folder -> the BraTS adapter (derived files in
            ``cache_dir/brats_<hash>``); a ``.csv`` file -> the user-CSV adapter (derived files in
            ``cache_dir/csv_<hash>``).
        cache_dir: folder for generated and derived files (and the validation record).
        seed: seeds the phantom and the split of cohorts without one.
        split_fractions: train/val/test fractions for cohorts without a split.
        phantom_patients: number of phantom patients.
        phantom_shape: phantom grid.
        validate: check every patient (:func:`validate_cohort`); a passed check is recorded in
            ``cache_dir/validated`` and not repeated while no file changes.
        progress: show progress bars.
        build_atlas: build a group atlas from the train split where the source has none (BraTS, CSV);
            ``False`` when a trained model's atlas will be used (:mod:`medsynth.data.atlas`).
        label_convention: what the values of a CSV's label maps mean (:mod:`medsynth.data.conventions`;
            a ``label_convention`` column overrides it per row); for a BraTS folder ``"brats"`` (the
            default there) or ``"brats2023"``. Ready and phantom cohorts are in the project's.

    Raises:
        ValueError: the source is not recognised (the message lists what was looked for).
        CohortValidationError: some patients have unusable files (all of them are listed).
    """
    cache_dir = Path(cache_dir)
    source = detect_source(dataset_dir)
    logger.info("dataset %s: %s source", dataset_dir or "(none)", source)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Several processes (DDP ranks, parallel bundle runs) may resolve the same cohort at once: the
    # first one generates or derives the files, the others wait and then reuse them.
    with FileLock(str(cache_dir / ".resolve_cohort.lock")):
        return _resolve_cohort_locked(
            dataset_dir,
            source,
            cache_dir,
            seed,
            split_fractions,
            phantom_patients,
            phantom_shape,
            validate,
            progress,
            build_atlas,
            label_convention,
        )


def _resolve_cohort_locked(
    dataset_dir: str | os.PathLike | None,
    source: str,
    cache_dir: Path,
    seed: int,
    split_fractions: Sequence[float],
    phantom_patients: int,
    phantom_shape: Sequence[int],
    validate: bool,
    progress: bool,
    build_atlas: bool,
    label_convention: str,
) -> pd.DataFrame:
    if source == "phantom":
        manifest = _phantom_cohort(cache_dir, seed, phantom_patients, phantom_shape, split_fractions)
    elif source == "ready":
        manifest = read_ready_cohort(dataset_dir)
    elif source == "brats":
        convention = "brats" if label_convention == PROJECT_CONVENTION else label_convention
        out_dir = cache_dir / f"brats_{brats_fingerprint(dataset_dir, seed, split_fractions, convention)}"
        manifest = brats_cohort(
            dataset_dir, out_dir, seed, split_fractions, progress, build_atlas, convention
        )
    else:
        out_dir = cache_dir / f"csv_{user_csv_fingerprint(dataset_dir, seed, split_fractions)}"
        manifest = user_csv_cohort(
            dataset_dir, out_dir, seed, split_fractions, progress, build_atlas, label_convention
        )
    check_patient_level_split(manifest)
    if validate:
        workers = min(4, os.cpu_count() or 1)  # reading is mostly gzip inflation, which releases the GIL
        validate_cohort(manifest, num_workers=workers, record_dir=cache_dir / "validated", progress=progress)
    return manifest.reset_index(drop=True)


def cohort_summary(
    manifest: pd.DataFrame,
    slice_selection: str = "brain",
    min_brain_fraction: float = 0.05,
    progress: bool = True,
) -> pd.DataFrame:
    """Patients and axial slices per split (``all`` slices and those kept by ``slice_selection``)."""
    from medsynth.data.dataset import selected_slices, slice_table

    table = slice_table(manifest, progress)
    kept = selected_slices(table, slice_selection, min_brain_fraction)
    splits = [s for s in SPLITS if s in set(manifest["split"])]
    summary = pd.DataFrame(
        {
            "patients": [int((manifest["split"] == s).sum()) for s in splits],
            "slices": [int((table["split"] == s).sum()) for s in splits],
            f"slices_{slice_selection}": [int((kept["split"] == s).sum()) for s in splits],
        },
        index=pd.Index(splits, name="split"),
    )
    summary.loc["total"] = summary.sum()
    return summary


PREPROCESSING_FINGERPRINT_NAME = "preprocessing_fingerprint.json"
NYUL_LANDMARKS_NAME = "nyul_landmarks.json"


def preprocessing_fingerprint(dataset_dir: str | os.PathLike | None) -> dict | None:
    """What a cohort's intensities depend on, when it is known: ``{"digest", "source"}``, else ``None``.

    A cohort written by ``python -m preprocessing run`` holds its Nyúl landmarks
    (``nyul_landmarks.json``): the digest is theirs. A synthetic cohort (``medsynth augment``)
    holds its training cohort's fingerprint in ``preprocessing_fingerprint.json``. The phantom,
    BraTS folders and user CSVs have none (``None``: unknown, not "different").
    """
    import json

    from medsynth.utils.hashing import json_digest

    if dataset_dir is None or not str(dataset_dir).strip() or not Path(dataset_dir).is_dir():
        return None
    folder = Path(dataset_dir)
    recorded = folder / PREPROCESSING_FINGERPRINT_NAME
    if recorded.is_file():
        return json.loads(recorded.read_text())
    landmarks = folder / NYUL_LANDMARKS_NAME
    if landmarks.is_file():
        return {"digest": json_digest(json.loads(landmarks.read_text()), 16), "source": "nyul_landmarks"}
    return None


def require_same_preprocessing(fingerprints: dict[str, dict | None]) -> None:
    """Refuse to mix cohorts (name -> :func:`preprocessing_fingerprint`) whose known fingerprints differ.

    Raises:
        ValueError: naming the cohorts and their digests.
    """
    known = {name: record["digest"] for name, record in fingerprints.items() if record}
    if len(set(known.values())) > 1:
        listing = ", ".join(f"{name}: {digest}" for name, digest in sorted(known.items()))
        raise ValueError(
            f"these cohorts were preprocessed differently (Nyúl landmarks differ: {listing}); "
            "their intensities do not mix"
        )
