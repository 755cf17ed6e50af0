"""What a synthesis run reads: the cases of a cohort, or one lesion mask with its atlas.

:func:`synthesis_inputs` is what the bundles' ``inference.json`` calls; it returns the sequences
(which size the network) and the inference items (dicts of file paths) that the bundle's
``preprocessing`` loads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from medsynth.constants import (
    MANIFEST_BRAIN_MASK_COLUMN,
    MANIFEST_LABEL_COLUMN,
    MANIPULATIONS,
    TISSUE_CLASSES,
    TISSUE_COLUMNS,
    atlas_column,
    tissue_column,
)
from medsynth.data.atlas import find_atlas_files
from medsynth.errors import InputDataError
from medsynth.inference.transforms import source_file_key

logger = logging.getLogger(__name__)

__all__ = [
    "find_atlas_files",
    "find_tissue_files",
    "synthesis_cases",
    "synthesis_inputs",
]  # find_atlas_files: re-exported

_DONOR_MANIPULATIONS = ("transplant", "random")


def _item(
    case: str, split: str, label: str, atlas: dict[str, str], brain_mask: str = "", images=None
) -> dict:
    item: dict[str, Any] = {
        "case": case,
        "source_patient": case,
        "split": split,
        MANIFEST_LABEL_COLUMN: label,
    }
    if brain_mask:
        item[MANIFEST_BRAIN_MASK_COLUMN] = brain_mask
    for sequence, path in atlas.items():
        item[atlas_column(sequence)] = path
        item[source_file_key(atlas_column(sequence))] = path
    item.update(images or {})
    return item


def synthesis_cases(
    sequences: Sequence[str],
    manifest: pd.DataFrame | None = None,
    splits: Sequence[str] | str | None = None,
    mask_file: str = "",
    atlas_dir: str = "",
    brain_mask_file: str = "",
    case_name: str = "",
    manipulation: str = "none",
    donor_file: str = "",
    tissue_maps: bool = False,
    tissue_dir: str = "",
) -> list[dict[str, Any]]:
    """The inference items: the patients of ``splits`` of ``manifest`` (sorted), or the case of ``mask_file``.

    Args:
        sequences: the network's sequences.
        manifest: cohort manifest (absolute paths) for the cohort mode.
        splits: splits of the manifest to synthesize (``None``: all patients).
        mask_file: a label map NIfTI (0..4) for the single-mask mode (takes precedence over ``manifest``).
        atlas_dir: folder of the atlas NIfTIs (one per sequence) on the grid of ``mask_file``.
        brain_mask_file: brain mask of ``mask_file`` (default: label > 0).
        case_name: the single mask's case name (default: the mask's file stem).
        manipulation: the manipulation that will be applied; ``"transplant"`` and ``"random"`` get a
            ``donor``: ``donor_file``, or in the cohort mode the next case's label map.
        donor_file: donor label map of ``"transplant"`` / ``"random"``.
        tissue_maps: the network takes tissue maps (Shin et al.): every item gets ``tissue_<class>``,
            from the manifest's columns, or for ``mask_file`` from ``tissue_dir``.
        tissue_dir: folder with ``tissue_csf``, ``tissue_gm``, ``tissue_wm`` ``.nii.gz`` on the grid of
            ``mask_file``.
    """
    if manipulation not in MANIPULATIONS:
        raise ValueError(f"unknown manipulation {manipulation!r}; choose one of {MANIPULATIONS}")
    if mask_file:
        if not atlas_dir:
            raise ValueError("mask_file needs atlas_dir: the folder of the atlas volumes on the mask's grid")
        name = case_name or Path(mask_file).name.split(".")[0]
        # A single synthesised case has no split of its own; as a cohort it is training data.
        items = [_item(name, "train", mask_file, find_atlas_files(atlas_dir, sequences), brain_mask_file)]
        if tissue_maps:
            items[0].update(find_tissue_files(tissue_dir))
        _require_readable(
            {**items[0], "donor": donor_file},
            [MANIFEST_LABEL_COLUMN, MANIFEST_BRAIN_MASK_COLUMN, "donor", *TISSUE_COLUMNS],
        )
    else:
        if manifest is None:
            raise ValueError("give a cohort manifest or a mask_file (with atlas_dir)")
        split_list = [splits] if isinstance(splits, str) else (None if splits is None else list(splits))
        rows = manifest if split_list is None else manifest[manifest["split"].isin(split_list)]
        if rows.empty:
            raise ValueError(f"no patient in split(s) {split_list}")
        items = []
        for _, row in rows.sort_values("patient_id").iterrows():
            missing = [atlas_column(s) for s in sequences if not str(row.get(atlas_column(s), "") or "")]
            if missing:
                raise InputDataError(
                    f"manifest has no atlas column(s) {missing}", patient_id=row["patient_id"]
                )
            images = {s: row[s] for s in sequences if str(row.get(s, "") or "")}
            if tissue_maps:
                lacking = [c for c in TISSUE_COLUMNS if not str(row.get(c, "") or "")]
                if lacking:
                    raise InputDataError(
                        f"the model takes tissue maps and the manifest has no {lacking} "
                        "(make them with `python -m preprocessing run --tissue-maps`)",
                        patient_id=row["patient_id"],
                    )
                images.update({c: row[c] for c in TISSUE_COLUMNS})
            items.append(
                _item(
                    str(row["patient_id"]),
                    str(row["split"]),
                    row[MANIFEST_LABEL_COLUMN],
                    {s: row[atlas_column(s)] for s in sequences},
                    str(row.get(MANIFEST_BRAIN_MASK_COLUMN, "") or ""),
                    images,
                )
            )
    if manipulation in _DONOR_MANIPULATIONS:
        for position, item in enumerate(items):
            donor = donor_file or (
                items[(position + 1) % len(items)][MANIFEST_LABEL_COLUMN] if len(items) > 1 else ""
            )
            if donor:
                item["donor"] = donor
    return items


def _require_the_models_sequences(sequences: Sequence[str], model_dir: str, atlas_dir: str) -> None:
    """An atlas folder must hold the sequences the model synthesises (its training atlas' record says
    which), else the network would be built for other sequences and fail on its weights."""
    from medsynth.data.atlas import model_atlas_sequences

    trained = model_atlas_sequences(model_dir) if model_dir else None
    if trained and sorted(trained) != sorted(sequences):
        missing = [s for s in trained if s not in sequences]
        extra = [s for s in sequences if s not in trained]
        detail = "; ".join(
            [f"missing {missing}"] * bool(missing) + [f"not the model's {extra}"] * bool(extra)
        )
        raise InputDataError(
            f"the atlas folder holds {sorted(sequences)} but the model synthesises {trained} ({detail}): "
            "give an atlas of the model's sequences",
            path=atlas_dir,
        )


def _require_readable(item: dict[str, Any], keys: Sequence[str]) -> None:
    """The single-mask mode's files are checked before any transform reads them (a truncated file is
    named, as in a cohort's validation)."""
    from medsynth.data.validation import source_file_problems

    files = {key: str(item[key]) for key in keys if str(item.get(key, "") or "")}
    problems = source_file_problems(files, str(item["case"]), ())
    if problems:
        raise problems[0]


def find_tissue_files(tissue_dir: str | Path) -> dict[str, str]:
    """The ``tissue_<class>`` maps of a folder, by manifest column (``tissue_csf.nii.gz``, ...).

    Raises:
        InputDataError: no folder given, or a map is missing (named).
    """
    if not str(tissue_dir or "").strip():
        raise InputDataError(
            "this model takes tissue maps: give tissue_dir, the folder of tissue_csf, tissue_gm and "
            "tissue_wm .nii.gz on the grid of mask_file"
        )
    folder = Path(tissue_dir)
    files = {}
    for tissue in TISSUE_CLASSES:
        found = [folder / f"{tissue_column(tissue)}{suffix}" for suffix in (".nii.gz", ".nii")]
        path = next((p for p in found if p.is_file()), None)
        if path is None:
            raise InputDataError(f"no {tissue_column(tissue)}.nii.gz in the tissue folder", path=folder)
        files[tissue_column(tissue)] = str(path)
    return files


def synthesis_inputs(
    dataset_dir: str = "",
    cache_dir: str = "runs/cache",
    mask_file: str = "",
    atlas_dir: str = "",
    model_dir: str = "",
    atlas: str = "model",
    resample_atlas: bool = False,
    seed: int = 0,
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    phantom_patients: int = 12,
    phantom_shape: Sequence[int] = (256, 256, 15),
    label_convention: str = "medsynth",
) -> dict[str, Any]:
    """What an inference run reads: ``{"manifest": DataFrame or None, "sequences": [...], "atlas_dir": ...}``.

    With ``mask_file`` no cohort is touched: the atlas is the model's (``model_dir``, default), or
    the files in ``atlas_dir`` when it is given (logged); the sequences are the atlas'. Otherwise the
    cohort of ``dataset_dir`` (empty: the phantom cohort) with the atlas chosen by ``atlas``
    (:func:`medsynth.data.atlas.resolve_model_cohort`: the model's by default).
    """
    from medsynth.data.atlas import MODEL_ATLAS_DIRNAME, load_model_atlas, resolve_model_cohort
    from medsynth.data.manifest import sequences_of

    if mask_file:
        if not atlas_dir:
            if atlas != "model":
                atlas_dir = atlas
            else:
                record = load_model_atlas(model_dir)
                if record.get("kind") != "shared":
                    raise ValueError(
                        "the model has no shared atlas (per-patient atlases): give atlas_dir for mask_file"
                    )
                atlas_dir = str(Path(model_dir) / MODEL_ATLAS_DIRNAME)
                logger.info("mask_file: using the model's atlas (%s)", record["fingerprint"])
        else:
            logger.warning("mask_file: using the atlas of %s, not necessarily the model's", atlas_dir)
        sequences = list(find_atlas_files(atlas_dir))
        _require_the_models_sequences(sequences, model_dir, atlas_dir)
        return {"manifest": None, "sequences": sequences, "atlas_dir": atlas_dir}
    manifest = resolve_model_cohort(
        dataset_dir,
        cache_dir,
        model_dir,
        atlas=atlas,
        resample_atlas=resample_atlas,
        seed=seed,
        split_fractions=split_fractions,
        phantom_patients=phantom_patients,
        phantom_shape=phantom_shape,
        label_convention=label_convention,
    )
    return {"manifest": manifest, "sequences": list(sequences_of(manifest)), "atlas_dir": atlas_dir}
