"""The pre- and post-transforms of synthesis inference (the ``preprocessing`` and ``postprocessing``
sections of a synthesis bundle's ``inference.json``).

An inference item is a dict of file paths (:func:`medsynth.inference.cases.synthesis_cases`):
``case``, ``label``, ``atlas_<sequence>`` for every sequence, and optionally ``brain_mask``,
``donor`` (the donor label map of a transplant) and the real images ``<sequence>`` (whose
intensity windows then map the synthesis back to intensities; otherwise the atlas' own are used);
for a network conditioned on tissue maps (Shin et al.), ``tissue_<class>`` of every class.

:func:`synthesis_preprocessing` reads, checks and orients them (RAS), derives the brain, applies the
lesion-mask manipulation, fits the plane to the network's size, scales the atlas to [-1, 1] and
one-hot encodes the label map: ``"image"`` is then ``(5 + 3N, S, S, D)`` (``+ 3`` tissue maps, made
to agree with the manipulated label map, with ``tissue_maps``), the input of
:class:`~medsynth.inference.inferer.SliceStackInferer`. :func:`synthesis_postprocessing` brings
the prediction back to the input grid (MONAI ``Invertd``) and to intensities, and writes the case
(:class:`SaveSynthesisd`), every file in the geometry of the input label map.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from filelock import FileLock
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    ConcatItemsd,
    DeleteItemsd,
    Invertd,
    MapTransform,
)

from medsynth.constants import (
    BRAIN_MASK_THRESHOLD,
    MANIFEST_BRAIN_MASK_COLUMN,
    MANIFEST_LABEL_COLUMN,
    TISSUE_COLUMNS,
    atlas_column,
    confidence_column,
)
from medsynth.data.conventions import foreign_convention_problem
from medsynth.errors import InputDataError
from medsynth.transforms.intensity import ScaleToUnit, UnitToIntensityd, WindowSpec, windows_for
from medsynth.transforms.lesion import LesionManipulationd
from medsynth.transforms.slices import FitInPlaned
from medsynth.transforms.tissue import stacked_tissue_maps
from medsynth.transforms.volume import load_ras, one_hot_mask, scaled_atlas
from medsynth.utils.geometry import same_grid_geometry
from medsynth.utils.io import save_json, save_nifti
from medsynth.utils.labels import label_map_problem

logger = logging.getLogger(__name__)

__all__ = [
    "BrainMaskd",
    "CheckSynthesisInputsd",
    "OutputWindowsd",
    "RealImageWindowsd",
    "SaveSynthesisd",
    "SplitConfidenced",
    "add_manifest_row",
    "restore_input_grid",
    "source_file_key",
    "synthesis_postprocessing",
    "synthesis_preprocessing",
]

MANIFEST_NAME = "manifest.csv"
SOURCE_COLUMN = "source_patient"


def source_file_key(key: str) -> str:
    """The entry of an inference item that keeps the path of ``key`` after ``key`` is loaded."""
    return f"{key}_path"


def _path(value: Any) -> str:
    """The file a loaded volume came from (``""`` when unknown)."""
    meta = getattr(value, "meta", {})
    return str(meta.get("filename_or_obj", "")) if isinstance(meta, Mapping) else ""


class CheckSynthesisInputsd(MapTransform):
    """Refuse an inference item that cannot be synthesised, naming the case and the file.

    Checks, on the loaded (channel-first) volumes: the label map holds only the project's labels and
    looks like the project's convention (not a lesion-only segmentation);
    every other volume of ``keys`` lies on the label map's grid (shape and affine) and is finite.

    Args:
        keys: volumes to check against the label map (atlas, brain mask, images; the donor is
            allowed a grid of its own).
        label_key: the label map.
        case_key: the entry naming the case (for messages).
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: Sequence[str],
        label_key: str = "label",
        case_key: str = "case",
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_key = label_key
        self.case_key = case_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        case = str(d.get(self.case_key, "")) or None
        label = d[self.label_key]
        problem = label_map_problem(np.asarray(label))
        if problem is None:
            problem = foreign_convention_problem(np.asarray(label))
        if problem is not None:
            raise InputDataError(f"label map {problem}", path=_path(label) or None, patient_id=case)
        for key in self.key_iterator(d):
            volume = d[key]
            if not same_grid_geometry(volume.shape[1:], volume.affine, label.shape[1:], label.affine):
                raise InputDataError(
                    f"{key} is not on the grid of the label map (shape {list(volume.shape[1:])} vs "
                    f"{list(label.shape[1:])}, or the affines differ)",
                    path=_path(volume) or None,
                    patient_id=case,
                )
            bad = int(torch.count_nonzero(~torch.isfinite(torch.as_tensor(volume))))
            if bad:
                raise InputDataError(
                    f"{key} contains {bad} NaN/inf voxel(s)", path=_path(volume) or None, patient_id=case
                )
        return d


class BrainMaskd(MapTransform):
    """The brain as a 0/1 mask: the loaded mask thresholded at ``threshold``, or ``label > 0`` when the
    item has none (``key`` absent).

    Args:
        keys: the brain mask entry.
        label_key: the label map to derive it from.
        threshold: mask values at or above it are brain.
    """

    def __init__(
        self,
        keys: str = MANIFEST_BRAIN_MASK_COLUMN,
        label_key: str = "label",
        threshold: float = BRAIN_MASK_THRESHOLD,
    ):
        super().__init__(keys, allow_missing_keys=True)
        self.label_key = label_key
        self.threshold = threshold

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.keys:
            if key in d:
                d[key] = (d[key] >= self.threshold).to(torch.uint8)
            else:
                d[key] = (d[self.label_key] > 0).to(torch.uint8)
        return d


class RealImageWindowsd(MapTransform):
    """``window_key``: the ``(N, 2)`` intensity windows of the real images (as in training: brain
    voxels, the sequences' window specifications), when the item has every sequence; the images are
    then dropped. Items without them are left unchanged.

    Args:
        keys: the image entries, one per sequence in channel order.
        windows: window specifications per sequence, in the order of ``keys``.
        brain_key: the brain mask the percentiles are taken in.
        window_key: where the windows go.
    """

    def __init__(
        self,
        keys: Sequence[str],
        windows: Sequence[WindowSpec],
        brain_key: str = MANIFEST_BRAIN_MASK_COLUMN,
        window_key: str = "window",
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.scaler = ScaleToUnit(windows)
        self.brain_key = brain_key
        self.window_key = window_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        present = [key for key in self.keys if key in d]
        if len(present) == len(self.keys):
            stack = torch.cat([torch.as_tensor(d[key]) for key in self.keys]).float()
            d[self.window_key] = self.scaler.compute_windows(stack, torch.as_tensor(d[self.brain_key]))
        for key in present:
            del d[key]
        return d


class OutputWindowsd(MapTransform):
    """``window_key`` falls back to ``fallback_key`` (the atlas' windows) when the item has no real
    images; ``"window_source"`` records which one maps the synthesis back to intensities."""

    def __init__(self, window_key: str = "window", fallback_key: str = "atlas_window") -> None:
        super().__init__(window_key, allow_missing_keys=True)
        self.window_key = window_key
        self.fallback_key = fallback_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.window_key in d:
            d["window_source"] = "real images"
        else:
            d[self.window_key] = d[self.fallback_key]
            d["window_source"] = "atlas"
        return d


def synthesis_preprocessing(
    sequences: Sequence[str],
    image_size: int = 256,
    manipulation: str = "none",
    grow_percent: float = 100.0,
    shrink_percent: float = -50.0,
    seed: int = 0,
    windows: Mapping[str, WindowSpec] | None = None,
    crop_tolerance: float = 0.0,
    tissue_maps: bool = False,
) -> Compose:
    """The ``preprocessing`` of a synthesis bundle's ``inference.json`` (see the module docstring).

    Args:
        sequences: the network's sequences, in channel order.
        image_size: the in-plane size the network was trained on.
        manipulation: one of :data:`medsynth.transforms.MANIPULATIONS`, applied to the label map.
        grow_percent, shrink_percent: tumour change of ``"grow"`` / ``"shrink"`` (papers: +100, -50).
        seed: seed of ``"random"``.
        windows: per-sequence intensity-window overrides, as in training.
        crop_tolerance: see :class:`medsynth.transforms.slices.FitInPlane`, as in training.
        tissue_maps: the items carry ``tissue_<class>`` maps (required), appended to ``"image"`` after
            the atlas, lesion excluded as in training (:class:`medsynth.transforms.TissueMapsForLabel`).
    """
    sequences = list(sequences)
    atlas_keys = [atlas_column(s) for s in sequences]
    tissue_keys = list(TISSUE_COLUMNS) if tissue_maps else []
    volumes = [MANIFEST_LABEL_COLUMN, MANIFEST_BRAIN_MASK_COLUMN, "donor", *atlas_keys, *sequences]
    # After the manipulation, so that the maps exclude the lesion the network is asked for.
    tissue_inputs = (
        [
            *stacked_tissue_maps(MANIFEST_LABEL_COLUMN, "tissue"),
            FitInPlaned("tissue", image_size, mode="area", crop_tolerance=crop_tolerance),
        ]
        if tissue_maps
        else []
    )
    return Compose(
        [
            *load_ras(volumes, allow_missing_keys=True),
            *(load_ras(tissue_keys) if tissue_maps else []),
            CheckSynthesisInputsd(
                [MANIFEST_BRAIN_MASK_COLUMN, *atlas_keys, *sequences, *tissue_keys], MANIFEST_LABEL_COLUMN
            ),
            BrainMaskd(MANIFEST_BRAIN_MASK_COLUMN, MANIFEST_LABEL_COLUMN),
            LesionManipulationd(
                MANIFEST_LABEL_COLUMN,
                manipulation,
                brain_mask_key=MANIFEST_BRAIN_MASK_COLUMN,
                donor_key="donor",
                grow_percent=grow_percent,
                shrink_percent=shrink_percent,
                seed=seed,
            ),
            DeleteItemsd("donor"),
            *tissue_inputs,
            RealImageWindowsd(sequences, [windows_for(sequences, windows)[i] for i in range(len(sequences))]),
            *scaled_atlas(sequences, image_size, windows, crop_tolerance, keep_volumes=True),
            OutputWindowsd("window", "atlas_window"),
            # The network's mask: the label map fitted to its size, then one-hot; "label" itself stays
            # on the input grid, so the label map written out is exactly the one used.
            *one_hot_mask(MANIFEST_LABEL_COLUMN, "mask", image_size, crop_tolerance),
            ConcatItemsd(["mask", "atlas", *(["tissue"] if tissue_maps else [])], name="image"),
            DeleteItemsd(["mask", "atlas", *(["tissue"] if tissue_maps else [])]),
        ]
    )


class SaveSynthesisd(MapTransform):
    """Write a synthesised case and list it in the output cohort's ``manifest.csv``.

    In ``output_dir/<case>/``: one ``<sequence>.nii.gz`` per channel of ``pred`` (float32, intensity
    units), ``label.nii.gz`` (the label map used, after any manipulation), ``brain_mask.nii.gz``
    and ``synthesis.json`` (what was done). Every file has the shape and affine of the input label
    map (the entries must already be on that grid: ``Invertd``). ``output_dir/manifest.csv`` is the
    data layer's manifest of every case written so far (the case's source split, the atlas it was
    synthesised with, and ``source_patient``), so the folder is a cohort that ``resolve_cohort``
    and the bundles read. All writes are atomic.

    Args:
        output_dir: the output folder.
        sequences: the channels of ``pred``, in order.
        manipulation: the name of the manipulation applied (recorded).
        pred_key, label_key, brain_key: the entries written.
        extra_record: added to every ``synthesis.json`` (e.g. the model checkpoint).
    """

    def __init__(
        self,
        output_dir: str,
        sequences: Sequence[str],
        manipulation: str = "none",
        pred_key: str = "pred",
        label_key: str = MANIFEST_LABEL_COLUMN,
        brain_key: str = MANIFEST_BRAIN_MASK_COLUMN,
        extra_record: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(pred_key)
        self.output_dir = Path(output_dir)
        self.sequences = list(sequences)
        self.manipulation = manipulation
        self.pred_key = pred_key
        self.label_key = label_key
        self.brain_key = brain_key
        self.extra_record = dict(extra_record or {})

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        case = str(d["case"])
        pred = d[self.pred_key]
        if pred.shape[0] != len(self.sequences):
            raise ValueError(
                f"case {case}: prediction has {pred.shape[0]} channels for sequences {self.sequences}"
            )
        affine = np.asarray(
            d[self.label_key].meta.get("original_affine", d[self.label_key].affine), dtype=np.float64
        )
        out_dir = self.output_dir / case
        files = {}
        for channel, sequence in enumerate(self.sequences):
            files[sequence] = save_nifti(
                _array(pred[channel]), affine, out_dir / f"{sequence}.nii.gz", np.float32
            )
        label = np.rint(_array(d[self.label_key][0]))
        files[MANIFEST_LABEL_COLUMN] = save_nifti(label, affine, out_dir / "label.nii.gz", np.uint8)
        brain = _array(d[self.brain_key][0]) > 0
        files[MANIFEST_BRAIN_MASK_COLUMN] = save_nifti(brain, affine, out_dir / "brain_mask.nii.gz", np.uint8)
        if "confidence" in d:  # CG-SAMR's confidence maps, with the network's outputs requested
            for channel, sequence in enumerate(self.sequences):
                name = confidence_column(sequence)
                files[name] = save_nifti(
                    _array(d["confidence"][channel]), affine, out_dir / f"{name}.nii.gz", np.float32
                )
        record = {
            "case": case,
            "source_patient": d.get("source_patient", case),
            "manipulation": self.manipulation,
            "manipulation_info": d.get(f"{self.label_key}_manipulation", {"operation": "none"}),
            "intensity_windows": d.get("window_source", ""),
            "files": {key: str(path) for key, path in files.items()},
            **self.extra_record,
        }
        save_json(record, out_dir / "synthesis.json")
        row = {
            "patient_id": case,
            "split": d.get("split", "train"),
            **{sequence: str(files[sequence]) for sequence in self.sequences},
            MANIFEST_LABEL_COLUMN: str(files[MANIFEST_LABEL_COLUMN]),
            MANIFEST_BRAIN_MASK_COLUMN: str(files[MANIFEST_BRAIN_MASK_COLUMN]),
            **{atlas_column(s): str(d.get(source_file_key(atlas_column(s)), "")) for s in self.sequences},
            **{
                confidence_column(s): str(files[confidence_column(s)])
                for s in self.sequences
                if confidence_column(s) in files
            },
            SOURCE_COLUMN: record["source_patient"],
        }
        add_manifest_row(self.output_dir, row)
        d["synthesis_record"] = record
        return d


def add_manifest_row(output_dir: str | Path, row: Mapping[str, str]) -> Path:
    """Add (or replace, by ``patient_id``) one case of the cohort in ``output_dir/manifest.csv``, under a
    file lock (parallel writers) and atomically."""
    from medsynth.data.manifest import read_manifest, write_manifest

    output_dir = Path(output_dir)
    path = output_dir / MANIFEST_NAME
    output_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(output_dir / f".{MANIFEST_NAME}.lock")):
        rows = read_manifest(path) if path.is_file() else pd.DataFrame(columns=list(row))
        rows = rows[rows["patient_id"] != row["patient_id"]]
        rows = pd.concat([rows, pd.DataFrame([dict(row)])], ignore_index=True).sort_values("patient_id")
        write_manifest(rows.reset_index(drop=True), path)
    return path


def _array(value: Any) -> np.ndarray:
    tensor = value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)
    return tensor.detach().cpu().numpy()


class SplitConfidenced(MapTransform):
    """A prediction of ``2N`` channels (images, then CG-SAMR's confidence maps) -> ``pred_key`` with the
    ``N`` images and ``confidence_key`` with the ``N`` maps; an ``N``-channel prediction (a generator
    without confidence maps) is left alone."""

    def __init__(
        self, num_sequences: int, pred_key: str = "pred", confidence_key: str = "confidence"
    ) -> None:
        super().__init__(pred_key)
        self.num_sequences, self.pred_key, self.confidence_key = int(num_sequences), pred_key, confidence_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        pred, n = d[self.pred_key], self.num_sequences
        if pred.shape[0] == 2 * n:
            d[self.confidence_key], d[self.pred_key] = pred[n:], pred[:n]
        return d


def synthesis_postprocessing(
    preprocessing: Compose,
    output_dir: str,
    sequences: Sequence[str],
    manipulation: str = "none",
    extra_record: Mapping[str, Any] | None = None,
    with_confidence: bool = False,
) -> Compose:
    """The ``postprocessing`` of a synthesis bundle's ``inference.json``: the prediction, the label map
    and the brain back to the input grid and orientation (``Invertd`` through ``preprocessing``), the
    prediction back to intensities, then :class:`SaveSynthesisd`. With ``with_confidence`` (the
    network returns CG-SAMR's confidence maps after the images) the maps are written too.

    Args:
        preprocessing: the bundle's ``preprocessing`` (:func:`synthesis_preprocessing`).
        output_dir: where the cases and ``manifest.csv`` go.
        sequences: the network's sequences, in channel order.
        manipulation: the manipulation of ``preprocessing`` (recorded in ``synthesis.json``).
        extra_record: added to every case's ``synthesis.json``.
        with_confidence: split and write the confidence maps (``confidence_<sequence>.nii.gz``).
    """
    keys = ("pred", "confidence") if with_confidence else ("pred",)
    return Compose(
        [
            *([SplitConfidenced(len(sequences))] if with_confidence else []),
            *restore_input_grid(preprocessing, sequences, keys),
            SaveSynthesisd(output_dir, sequences, manipulation, extra_record=extra_record),
        ]
    )


def restore_input_grid(
    preprocessing: Compose, sequences: Sequence[str], pred_keys: Sequence[str] = ("pred",)
) -> list:
    """The prediction, the label map and the brain back to the input grid and orientation (``Invertd``
    through ``preprocessing``), then the prediction (``pred_keys[0]``) back to intensities; further
    ``pred_keys`` (e.g. confidence maps) are brought back to the grid only."""
    # The prediction was made on the grid of the fitted atlas: its fitting (area resampling) and
    # orientation are undone; the label map and the brain were only reoriented.
    return [
        Invertd(
            list(pred_keys),
            transform=preprocessing,
            orig_keys=atlas_column(sequences[0]),
            nearest_interp=False,
            allow_missing_keys=True,  # e.g. no confidence maps from a generator that has none
        ),
        Invertd(
            [MANIFEST_LABEL_COLUMN, MANIFEST_BRAIN_MASK_COLUMN],
            transform=preprocessing,
            orig_keys=[MANIFEST_LABEL_COLUMN, MANIFEST_BRAIN_MASK_COLUMN],
        ),
        UnitToIntensityd(pred_keys[0], window_keys="window"),
    ]
