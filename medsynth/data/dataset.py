"""The 2D-instance dataset: one item per axial slice of every patient of a cohort manifest.

Volume-level work (loading, RAS reorientation, fitting the axial plane to ``image_size``,
intensity scaling to [-1, 1], one-hot label) runs once per patient through MONAI
``CacheDataset`` (``cache="memory"``), ``PersistentDataset`` (``"disk"``) or a plain ``Dataset``
(``"none"``); slices are then cut from the processed volumes, which are stored axial-first
``(C, D, H, W)`` so that a slice is one contiguous block. The group atlas, usually shared by the
whole cohort, is processed and cached once per distinct set of atlas files.

An item (all tensors, ``H = W = image_size``, ``N`` sequences in manifest order):

* ``"image"`` float32 ``(N, H, W)`` in [-1, 1]; ``"window"`` float32 ``(N, 2)``: the intensity windows
  that map it back (:func:`medsynth.transforms.intensity.unit_to_intensity`);
* ``"atlas"`` float32 ``(3N, H, W)`` in [-1, 1]: channel ``3*i + k`` is sequence ``i`` at slice
  ``z + k - 1`` (edge slices repeat); ``"atlas_window"`` ``(N, 2)``;
* ``"mask"`` float32 ``(5, H, W)``: one-hot label map; ``"label"`` int64 ``(1, H, W)``;
  ``"brain_mask"`` float32 ``(1, H, W)``; ``"patient_id"`` str; ``"slice_index"`` int (axial index
  in RAS orientation);
* with ``with_confidence`` (synthetic cohorts of CG-SAMR, :mod:`medsynth.synthetic`): ``"confidence"``
  float32 ``(N, H, W)`` in (0, 1), the synthesis model's confidence map of each sequence;
* with ``with_tissue`` (Shin et al.'s input): ``"tissue"`` float32 ``(3, H, W)``, the CSF, grey- and
  white-matter probability maps of the normal brain, lesion excluded
  (:class:`medsynth.transforms.TissueMapsForLabel`).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import (
    AsDiscreted,
    CastToTyped,
    Compose,
    ConcatItemsd,
    DeleteItemsd,
    EnsureTyped,
    Lambdad,
    Transposed,
    convert_to_contiguous,
)
from tqdm.auto import tqdm

from medsynth.constants import (
    ATLAS_NEIGHBOURS,
    BRAIN_MASK_THRESHOLD,
    MANIFEST_BRAIN_MASK_COLUMN,
    MANIFEST_LABEL_COLUMN,
    SPLITS,
    TISSUE_COLUMNS,
    atlas_column,
    confidence_column,
)
from medsynth.data.manifest import sequences_of
from medsynth.transforms.intensity import ScaleToUnitd, WindowSpec, windows_for
from medsynth.transforms.slices import FitInPlaned, axial_slice_stats, neighbour_slices, select_slices
from medsynth.transforms.tissue import stacked_tissue_maps
from medsynth.transforms.volume import load_ras, one_hot_mask, scaled_atlas
from medsynth.utils.errors import reports_input_problems
from medsynth.utils.hashing import files_fingerprint, json_digest

logger = logging.getLogger(__name__)

CACHE_MODES: tuple[str, ...] = ("memory", "disk", "none")
_TISSUE_HINT = (
    "tissue maps come with the phantom, with `python -m preprocessing run --tissue-maps`, "
    "or as tissue_csf, tissue_gm, tissue_wm columns of a cohort CSV"
)
# Bump when the volume transforms change meaning: it is part of the disk-cache folder name.
VOLUME_FORMAT_VERSION = 2
_LABEL_KEYS = (MANIFEST_LABEL_COLUMN, MANIFEST_BRAIN_MASK_COLUMN)


def _axial_first(keys: Sequence[str]) -> list:
    """(C, H, W, D) -> contiguous (C, D, H, W): every axial slice of a cached volume is one memory block."""
    return [Transposed(keys, indices=(0, 3, 1, 2)), Lambdad(keys, func=convert_to_contiguous)]


def patient_volume_transforms(
    sequences: Sequence[str],
    image_size: int = 256,
    windows: Mapping[str, WindowSpec] | None = None,
    crop_tolerance: float = 0.0,
    confidence_keys: Sequence[str] = (),
    tissue_maps: bool = False,
) -> Compose:
    """Manifest row (paths) -> processed patient volumes.

    Output keys, axial-first (``D`` slices): ``"image"`` float32 ``(N, D, S, S)`` in [-1, 1],
    ``"window"`` ``(N, 2)``, ``"mask"`` uint8 one-hot ``(5, D, S, S)``, ``"label"`` and
    ``"brain_mask"`` uint8 ``(1, D, S, S)``.
    The plane is fitted before scaling so that padding is intensity 0 (which scales to -1 for
    anatomical sequences and to 0 for APTw).

    Args:
        sequences: sequence keys, in channel order.
        image_size: in-plane output size ``S``.
        windows: per-sequence window overrides (see :mod:`medsynth.transforms.intensity`).
        crop_tolerance: see :class:`medsynth.transforms.slices.FitInPlane`.
        confidence_keys: manifest columns of per-sequence confidence maps (in channel order), fitted
            like the images and stacked, unscaled, as ``"confidence"`` ``(N, D, S, S)``.
        tissue_maps: also read the ``tissue_<class>`` maps, made to agree with the label map on its own
            grid, then fitted like the images: ``"tissue"`` ``(3, D, S, S)``.
    """
    sequences, confidence_keys = list(sequences), list(confidence_keys)
    keys = [*sequences, *_LABEL_KEYS, *confidence_keys]
    confidence = ["confidence"] if confidence_keys else []
    tissue = ["tissue"] if tissue_maps else []
    return Compose(
        [
            *load_ras([*keys, *(TISSUE_COLUMNS if tissue_maps else ())]),
            *(stacked_tissue_maps(MANIFEST_LABEL_COLUMN) if tissue_maps else []),
            FitInPlaned(
                [*keys, *tissue],
                image_size,
                mode=["area"] * len(sequences)
                + ["nearest", "nearest"]
                + ["area"] * (len(confidence_keys) + len(tissue)),
                crop_tolerance=crop_tolerance,
            ),
            ConcatItemsd(sequences, name="image"),
            DeleteItemsd(sequences),
            *(
                [ConcatItemsd(confidence_keys, name="confidence"), DeleteItemsd(confidence_keys)]
                if confidence
                else []
            ),
            AsDiscreted(MANIFEST_BRAIN_MASK_COLUMN, threshold=BRAIN_MASK_THRESHOLD, dtype=torch.uint8),
            ScaleToUnitd(
                "image",
                windows_for(sequences, windows),
                window_keys="window",
                mask_key=MANIFEST_BRAIN_MASK_COLUMN,
            ),
            *one_hot_mask(MANIFEST_LABEL_COLUMN, "mask"),
            CastToTyped(MANIFEST_LABEL_COLUMN, dtype=torch.uint8),
            *_axial_first(["image", "mask", *_LABEL_KEYS, *confidence, *tissue]),
            EnsureTyped(
                ["image", "window", "mask", *_LABEL_KEYS, *confidence, *tissue],
                data_type="tensor",
                track_meta=False,
            ),
        ]
    )


def atlas_volume_transforms(
    sequences: Sequence[str],
    image_size: int = 256,
    windows: Mapping[str, WindowSpec] | None = None,
    crop_tolerance: float = 0.0,
) -> Compose:
    """Atlas paths (``atlas_<sequence>`` keys) -> ``"atlas"`` ``(N, D, S, S)`` in [-1, 1], ``"atlas_window"``.

    Same scaling as the patients' images; percentile bounds use the atlas's non-zero voxels.
    """
    return Compose(
        [
            *load_ras([atlas_column(s) for s in sequences]),
            *scaled_atlas(sequences, image_size, windows, crop_tolerance),
            *_axial_first(["atlas"]),
            EnsureTyped(["atlas", "atlas_window"], data_type="tensor", track_meta=False),
        ]
    )


def slice_table(manifest: pd.DataFrame, progress: bool = True) -> pd.DataFrame:
    """Per axial slice of every patient: ``patient_id, split, slice_index, brain_fraction,
    lesion_fraction, has_lesion``.

    Reads only the label maps and brain masks (RAS-oriented, on their own grid).
    """
    loader = Compose(load_ras(list(_LABEL_KEYS)))
    frames = []
    for _, row in tqdm(list(manifest.iterrows()), desc="indexing slices", disable=not progress):
        volumes = loader({key: row[key] for key in _LABEL_KEYS})
        stats = axial_slice_stats(
            volumes[MANIFEST_LABEL_COLUMN], volumes[MANIFEST_BRAIN_MASK_COLUMN], BRAIN_MASK_THRESHOLD
        )
        frames.append(
            pd.DataFrame(
                {
                    "patient_id": row["patient_id"],
                    "split": row["split"],
                    "slice_index": np.arange(len(stats["brain_fraction"])),
                    "brain_fraction": stats["brain_fraction"],
                    "lesion_fraction": stats["lesion_fraction"],
                    "has_lesion": stats["has_lesion"],
                }
            )
        )
    columns = ["patient_id", "split", "slice_index", "brain_fraction", "lesion_fraction", "has_lesion"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def selected_slices(
    table: pd.DataFrame, slice_selection: str = "brain", min_brain_fraction: float = 0.05
) -> pd.DataFrame:
    """Rows of a :func:`slice_table` kept by ``slice_selection`` (``"all"``, ``"brain"``, ``"lesion"``)."""
    keep = select_slices(
        table["brain_fraction"].to_numpy(),
        table["has_lesion"].to_numpy(),
        slice_selection,
        min_brain_fraction,
    )
    return table.iloc[keep].reset_index(drop=True)


class SliceDataset(torch.utils.data.Dataset):
    """Axial slices cut from per-patient processed volumes (see the module docstring for an item).

    Args:
        volumes: dataset of processed patient volumes (:func:`patient_volume_transforms` output).
        atlases: dataset of processed atlases (:func:`atlas_volume_transforms` output); ``None``: the
            items have no ``"atlas"`` (a cohort without one, e.g. cases generated from noise).
        patient_ids: patient id of each entry of ``volumes``.
        atlas_of_patient: index into ``atlases`` of each patient.
        slices: ``(patient position, axial index)`` of every item.
        sequences: the sequences of the ``"image"`` channels, in order.
        slice_table: per-item statistics (:func:`slice_table` rows of the items), for summaries.
        volume_cache_size: processed volumes kept in memory per process when ``volumes`` does not
            hold them already (disk or no cache), so consecutive slices of a patient reuse them.
    """

    def __init__(
        self,
        volumes: torch.utils.data.Dataset,
        atlases: torch.utils.data.Dataset | None,
        patient_ids: Sequence[str],
        atlas_of_patient: Sequence[int],
        slices: Sequence[tuple[int, int]],
        sequences: Sequence[str],
        slice_table: pd.DataFrame | None = None,
        volume_cache_size: int = 0,
    ):
        self.volumes = volumes
        self.atlases = atlases
        self.patient_ids = list(patient_ids)
        self.atlas_of_patient = list(atlas_of_patient)
        self.slices = [(int(p), int(z)) for p, z in slices]
        self.sequences = tuple(sequences)
        self.slice_table = slice_table
        self.volume_cache_size = int(volume_cache_size)
        self._recent: OrderedDict[tuple[str, int], Mapping[str, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.slices)

    def _cached(self, kind: str, dataset: torch.utils.data.Dataset, index: int) -> Mapping[str, Any]:
        if self.volume_cache_size <= 0:
            return dataset[index]
        key = (kind, index)
        if key in self._recent:
            self._recent.move_to_end(key)
            return self._recent[key]
        value = dataset[index]
        self._recent[key] = value
        while len(self._recent) > self.volume_cache_size:
            self._recent.popitem(last=False)
        return value

    def __getitem__(self, index: int) -> dict[str, Any]:
        patient, z = self.slices[index]
        volume = self._cached("patient", self.volumes, patient)
        atlas = (
            None
            if self.atlases is None
            else self._cached("atlas", self.atlases, self.atlas_of_patient[patient])
        )
        if atlas is not None and atlas["atlas"].shape[1] != volume["image"].shape[1]:
            raise ValueError(
                f"patient {self.patient_ids[patient]}: atlas depth {atlas['atlas'].shape[1]} differs from "
                f"the patient's {volume['image'].shape[1]} slices"
            )
        # Volumes are axial-first (C, D, H, W); clone() so items never share the cache's memory.
        item = {
            "image": volume["image"][:, z].clone(),
            "mask": volume["mask"][:, z].float(),
            "label": volume[MANIFEST_LABEL_COLUMN][:, z].long(),
            "brain_mask": volume[MANIFEST_BRAIN_MASK_COLUMN][:, z].float(),
            "window": volume["window"].clone(),
            "patient_id": self.patient_ids[patient],
            "slice_index": z,
        }
        if atlas is not None:
            item["atlas"] = neighbour_slices(atlas["atlas"], z, ATLAS_NEIGHBOURS, axis=1).float()
            item["atlas_window"] = atlas["atlas_window"].clone()
        for optional in ("confidence", "tissue"):
            if optional in volume:
                item[optional] = volume[optional][:, z].float()
        return item


@reports_input_problems
def make_slice_dataset(
    manifest: pd.DataFrame,
    splits: str | Sequence[str],
    image_size: int = 256,
    slice_selection: str = "brain",
    min_brain_fraction: float = 0.05,
    cache: str = "memory",
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
    windows: Mapping[str, WindowSpec] | None = None,
    crop_tolerance: float = 0.0,
    progress: bool = True,
    with_confidence: bool = False,
    with_tissue: bool = False,
    with_atlas: bool = True,
) -> SliceDataset:
    """The 2D-instance dataset of the patients of ``splits``.

    Args:
        manifest: cohort manifest with absolute paths (:func:`medsynth.data.cohort.resolve_cohort`).
        splits: ``"train"``, ``"val"``, ``"test"``, several of them, or ``"all"``.
        image_size: height and width of every item.
        slice_selection: ``"all"``, ``"brain"`` (brain fraction of the slice >= ``min_brain_fraction``)
            or ``"lesion"`` (slices holding lesion labels).
        min_brain_fraction: see ``slice_selection``.
        cache: ``"memory"`` (MONAI ``CacheDataset``), ``"disk"`` (``PersistentDataset`` under
            ``cache_dir``) or ``"none"``.
        cache_dir: folder of the disk cache (required with ``cache="disk"``).
        num_workers: threads filling the memory cache.
        windows: per-sequence intensity-window overrides, e.g. ``{"aptw": (-4.0, 4.0)}``.
        crop_tolerance: see :class:`medsynth.transforms.slices.FitInPlane`.
        progress: show progress bars.
        with_confidence: items carry ``"confidence"``; the manifest must have the
            ``confidence_<sequence>`` columns of a CG-SAMR synthetic cohort.
        with_atlas: items carry ``"atlas"`` (the default); ``False`` for a cohort without atlas
            columns (cases generated from noise have no atlas) whose consumers need none.
        with_tissue: items carry ``"tissue"``; the manifest must have the ``tissue_<class>`` columns
            (the phantom's ground truth, or made by ``python -m preprocessing run --tissue-maps``).
    """
    split_list = list(SPLITS) if splits == "all" else [splits] if isinstance(splits, str) else list(splits)
    unknown = sorted(set(split_list) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; allowed: {list(SPLITS)}")
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    if cache == "disk" and cache_dir is None:
        raise ValueError('cache="disk" needs a cache_dir')
    rows = manifest[manifest["split"].isin(split_list)].sort_values("patient_id").reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"no patient in split(s) {split_list}")
    sequences = sequences_of(manifest)
    atlas_keys = [atlas_column(s) for s in sequences] if with_atlas else []
    confidence_keys = [confidence_column(s) for s in sequences] if with_confidence else []
    tissue_keys = list(TISSUE_COLUMNS) if with_tissue else []
    missing = [
        c for c in (*_LABEL_KEYS, *atlas_keys, *confidence_keys, *tissue_keys) if c not in rows.columns
    ]
    if tissue_keys and not missing:
        empty = rows.loc[(rows[tissue_keys].astype(str) == "").any(axis=1), "patient_id"].tolist()
        if empty:
            raise ValueError(f"patient(s) {empty} have no tissue maps ({tissue_keys}): {_TISSUE_HINT}")
    if missing:
        hint = " (confidence maps come with synthetic cohorts of a model that predicts them: CG-SAMR)"
        hint = hint if confidence_keys else ""
        hint += f": {_TISSUE_HINT}" if set(missing) & set(tissue_keys) else ""
        raise ValueError(f"manifest lacks column(s) {missing}" + hint)
    patient_keys = (*sequences, *_LABEL_KEYS, *confidence_keys, *tissue_keys)

    table = selected_slices(slice_table(rows, progress), slice_selection, min_brain_fraction)
    position = {pid: i for i, pid in enumerate(rows["patient_id"])}
    slices = list(zip(table["patient_id"].map(position), table["slice_index"], strict=True))
    if not slices:
        raise ValueError(f"no slice of split(s) {split_list} passes slice_selection={slice_selection!r}")

    atlas_sets = (
        sorted({tuple(row[k] for k in atlas_keys) for _, row in rows.iterrows()}) if with_atlas else []
    )
    atlas_index = {paths: i for i, paths in enumerate(atlas_sets)}
    patient_items, atlas_items = [], []
    for _, row in rows.iterrows():
        files = [row[k] for k in patient_keys]
        patient_items.append(
            {
                "patient_id": row["patient_id"],
                **{k: row[k] for k in patient_keys},
                "files_stamp": files_fingerprint(files) if cache == "disk" else "",
            }
        )
    for paths in atlas_sets:
        atlas_items.append(
            {
                **dict(zip(atlas_keys, paths, strict=True)),
                "files_stamp": files_fingerprint(paths) if cache == "disk" else "",
            }
        )

    config = {
        "sequences": sequences,
        "image_size": image_size,
        "windows": windows_for(sequences, windows),
        "crop_tolerance": crop_tolerance,
        **({"confidence": True} if confidence_keys else {}),  # older cache folders keep their names
        **({"tissue": True} if tissue_keys else {}),
    }
    patient_transform = patient_volume_transforms(
        sequences, image_size, windows, crop_tolerance, confidence_keys, tissue_maps=bool(tissue_keys)
    )
    atlas_transform = atlas_volume_transforms(sequences, image_size, windows, crop_tolerance)
    if cache == "memory":
        workers = max(1, num_workers)
        volumes = CacheDataset(
            patient_items, patient_transform, num_workers=workers, progress=progress, copy_cache=False
        )
        atlases = CacheDataset(
            atlas_items, atlas_transform, num_workers=workers, progress=progress, copy_cache=False
        )
        recent = 0
    elif cache == "disk":
        root = Path(cache_dir) / f"volumes_v{VOLUME_FORMAT_VERSION}_{json_digest(config, length=12)}"
        volumes = PersistentDataset(patient_items, patient_transform, cache_dir=root / "patients")
        atlases = PersistentDataset(atlas_items, atlas_transform, cache_dir=root / "atlas")
        recent = 2 + len(atlas_sets)
    else:
        volumes = Dataset(patient_items, patient_transform)
        atlases = Dataset(atlas_items, atlas_transform)
        recent = 2 + len(atlas_sets)
    logger.info(
        "%d slice(s) of %d patient(s) in split(s) %s (selection %s)",
        len(slices),
        len(rows),
        split_list,
        slice_selection,
    )
    dataset = SliceDataset(
        volumes,
        atlases if with_atlas else None,
        rows["patient_id"].tolist(),
        [atlas_index[tuple(row[k] for k in atlas_keys)] if with_atlas else -1 for _, row in rows.iterrows()],
        slices,
        sequences,
        slice_table=table,
        volume_cache_size=recent,
    )
    return dataset


@reports_input_problems
def make_volume_dataset(
    manifest: pd.DataFrame,
    splits: str | Sequence[str],
    image_size: int = 256,
    cache: str = "memory",
    windows: Mapping[str, WindowSpec] | None = None,
    progress: bool = True,
) -> Dataset:
    """One item per patient of ``splits``, processed as for training
    (:func:`patient_volume_transforms`: ``"image"`` ``(N, D, S, S)`` in [-1, 1], ``"label"`` and
    ``"brain_mask"`` ``(1, D, S, S)``, axial-first) plus ``"patient_id"``: what a segmentation is
    evaluated on, per patient on the stacked slices.

    Args:
        manifest: cohort manifest with absolute paths.
        splits: a split, several, or ``"all"``.
        image_size: the plane size ``S``.
        cache: ``"memory"`` (MONAI ``CacheDataset``) or ``"none"``.
        windows: per-sequence intensity-window overrides.
        progress: show the caching progress bar.
    """
    split_list = list(SPLITS) if splits == "all" else [splits] if isinstance(splits, str) else list(splits)
    rows = manifest[manifest["split"].isin(split_list)].sort_values("patient_id")
    if rows.empty:
        raise ValueError(f"no patient in split(s) {split_list}")
    sequences = list(sequences_of(manifest))
    keys = [*sequences, *_LABEL_KEYS]
    items = [
        {"patient_id": str(row["patient_id"]), **{k: row[k] for k in keys}} for _, row in rows.iterrows()
    ]
    transform = patient_volume_transforms(sequences, image_size, windows)
    if cache == "memory":
        return CacheDataset(items, transform, progress=progress)
    if cache == "none":
        return Dataset(items, transform)
    raise ValueError(f"cache must be 'memory' or 'none' for volumes, got {cache!r}")
