"""Synthesize NIfTI volumes for a cohort or for one lesion mask, optionally after manipulating the mask.

Used by the bundles' ``inference.json``. Every output is written in the geometry of its input label
map (same shape and affine, same voxel order) and in intensity units: the real images' windows
when the patient has them, otherwise the atlas' own.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from medsynth.constants import (
    CLINICAL_SEQUENCES,
    MANIFEST_BRAIN_MASK_COLUMN,
    MANIFEST_LABEL_COLUMN,
    atlas_column,
    canonical_sequence,
)
from medsynth.data.validation import BRAIN_MASK_THRESHOLD
from medsynth.errors import InputDataError
from medsynth.inference.accelerate import BACKENDS, PRECISIONS, optimize_for_inference
from medsynth.inference.synthesis import random_slices, synthesize_volume
from medsynth.transforms.intensity import ScaleToUnit, windows_for
from medsynth.utils.io import save_json, save_nifti

logger = logging.getLogger(__name__)

__all__ = ["MANIPULATIONS", "SynthesisInference", "find_atlas_files", "make_manipulation", "resolve_inputs"]

MANIPULATIONS: tuple[str, ...] = ("none", "mirror", "grow", "shrink", "transplant", "random")
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


def make_manipulation(
    name: str,
    grow_percent: float = 100.0,
    shrink_percent: float = -50.0,
    donor: np.ndarray | None = None,
    seed: int = 0,
    mirror_prob: float = 0.5,
    resize_prob: float = 0.5,
    resize_percent_range: Sequence[float] = (-50.0, 100.0),
) -> Any:
    """The lesion-mask transform for ``name`` (see :data:`MANIPULATIONS`); ``None`` for ``"none"``.

    The transforms are those of :mod:`medsynth.transforms.mask`, called as ``t(label, brain_mask)``
    with ``return_info=True``. ``"random"`` is seeded and adds a transplant when a donor is given.
    """
    from medsynth.transforms.mask import MirrorLesion, RandomLesionManipulation, ResizeTumor, TransplantLesion

    if name not in MANIPULATIONS:
        raise ValueError(f"unknown manipulation {name!r}; choose one of {MANIPULATIONS}")
    if name == "none":
        return None
    if name == "mirror":
        return MirrorLesion(return_info=True)
    if name == "grow":
        return ResizeTumor(percent=grow_percent, return_info=True)
    if name == "shrink":
        return ResizeTumor(percent=shrink_percent, return_info=True)
    if name == "transplant":
        if donor is None:
            raise ValueError("manipulation 'transplant' needs a donor label map (donor_file, or another patient)")
        return TransplantLesion(donor=donor, return_info=True)
    random = RandomLesionManipulation(
        mirror_prob=mirror_prob,
        resize_prob=resize_prob,
        resize_percent_range=tuple(resize_percent_range),
        transplant_prob=0.5 if donor is not None else 0.0,
        donors=None if donor is None else [donor],
        return_info=True,
    )
    random.set_random_state(seed)
    return random


def find_atlas_files(atlas_dir: str | os.PathLike, sequences: Sequence[str] | None = None) -> dict[str, str]:
    """Atlas NIfTI files of a folder by sequence: ``atlas_<seq>.nii.gz`` or ``<seq>.nii.gz`` (aliases such
    as ``t1ce`` or ``T2`` are recognised). Raises :class:`InputDataError` when a sequence is missing."""
    folder = Path(atlas_dir)
    if not folder.is_dir():
        raise InputDataError("atlas folder does not exist", path=folder)
    found: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        stem = next((path.name[: -len(s)] for s in _NIFTI_SUFFIXES if path.name.lower().endswith(s)), None)
        if stem is None:
            continue
        stem = stem[len("atlas_") :] if stem.lower().startswith("atlas_") else stem
        try:
            found.setdefault(canonical_sequence(stem), str(path))
        except ValueError:
            continue
    wanted = list(sequences) if sequences is not None else [s for s in CLINICAL_SEQUENCES if s in found]
    missing = [s for s in wanted if s not in found]
    if missing or not wanted:
        raise InputDataError(f"no atlas file for sequence(s) {missing or list(CLINICAL_SEQUENCES)}", path=folder)
    return {s: found[s] for s in wanted}


def resolve_inputs(
    dataset_dir: str = "",
    cache_dir: str = "runs/cache",
    mask_file: str = "",
    atlas_dir: str = "",
    seed: int = 0,
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    phantom_patients: int = 12,
    phantom_shape: Sequence[int] = (256, 256, 15),
) -> dict[str, Any]:
    """What an inference run reads: ``{"manifest": DataFrame or None, "sequences": [...]}``.

    With ``mask_file`` the sequences are those of the atlas files in ``atlas_dir`` and no cohort is
    touched; otherwise the cohort of ``dataset_dir`` is resolved as in training
    (:func:`medsynth.data.cohort.resolve_cohort`; empty means the phantom cohort).
    """
    if mask_file:
        if not atlas_dir:
            raise ValueError("mask_file needs atlas_dir: the folder of the atlas volumes on the mask's grid")
        return {"manifest": None, "sequences": list(find_atlas_files(atlas_dir))}
    from medsynth.data.cohort import resolve_cohort
    from medsynth.data.manifest import sequences_of

    manifest = resolve_cohort(
        dataset_dir,
        cache_dir,
        seed=seed,
        split_fractions=split_fractions,
        phantom_patients=phantom_patients,
        phantom_shape=phantom_shape,
    )
    return {"manifest": manifest, "sequences": list(sequences_of(manifest))}


class _Oriented:
    """A NIfTI volume reoriented to RAS (the training orientation) with the way back to its own."""

    def __init__(self, path: str | os.PathLike, patient_id: str | None = None):
        self.path = str(path)
        try:
            image = nib.load(self.path)
        except Exception as error:  # nibabel raises several types for unreadable files
            raise InputDataError(f"cannot read NIfTI file ({error})", path=self.path, patient_id=patient_id) from error
        data = np.asanyarray(image.dataobj)
        if data.ndim == 4 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise InputDataError(f"expected a 3D volume, got shape {data.shape}", path=self.path, patient_id=patient_id)
        if not np.all(np.isfinite(data)):
            raise InputDataError(
                f"contains {int((~np.isfinite(data)).sum())} NaN/inf voxels", path=self.path, patient_id=patient_id
            )
        self.affine = image.affine
        self.shape = data.shape
        self.to_ras = nib.orientations.ornt_transform(
            nib.orientations.io_orientation(image.affine), nib.orientations.axcodes2ornt("RAS")
        )
        self.from_ras = nib.orientations.ornt_transform(
            nib.orientations.axcodes2ornt("RAS"), nib.orientations.io_orientation(image.affine)
        )
        self.ras = nib.orientations.apply_orientation(data, self.to_ras)

    def back(self, ras_array: np.ndarray) -> np.ndarray:
        """``ras_array`` in this file's voxel order."""
        out = nib.orientations.apply_orientation(ras_array, self.from_ras)
        if out.shape != self.shape:
            raise RuntimeError(f"orientation round trip gave shape {out.shape}, expected {self.shape}")
        return np.ascontiguousarray(out)


class SynthesisInference:
    """Synthesize every sequence for each patient of a cohort, or for one lesion mask with its atlas.

    Outputs per case, in ``output_dir/<case>/``: one ``<sequence>.nii.gz`` per sequence (float32,
    intensity units), ``label.nii.gz`` (the label map used, i.e. after the manipulation) and
    ``synthesis.json`` (what was done). Every file has the shape and affine of the input label map.

    Args:
        network: ``cat([mask, atlas]) -> images`` (e.g. ``SynthesisInferenceNetwork``), or a generator.
        output_dir: output folder.
        sequences: the network's sequences, in channel order.
        image_size: the in-plane size the network was trained on.
        checkpoint: weights to load into ``network`` first (a ``state_dict`` file); ``""`` keeps them.
        manifest: cohort manifest (absolute paths) for the cohort mode.
        splits: splits of the manifest to synthesize (``None``: all patients).
        mask_file: a label map NIfTI (0..4) for the single-mask mode (takes precedence over ``manifest``).
        atlas_dir: folder of the atlas NIfTIs (one per sequence) on the grid of ``mask_file``.
        brain_mask_file: brain mask of ``mask_file`` (default: label > 0).
        case_name: output sub-folder of the single-mask mode (default: the mask's file stem).
        manipulation: one of :data:`MANIPULATIONS`.
        grow_percent, shrink_percent: tumour resize of ``"grow"`` / ``"shrink"`` (papers: +100, -50).
        donor_file: donor label map of ``"transplant"`` (cohort mode default: the next patient's).
        seed: seed of ``"random"``.
        batch_size: slices per forward pass.
        device: where the network runs.
        backend: ``"none"`` runs the network as it is; ``"auto"``, ``"eager"``, ``"jit"`` or
            ``"compile"`` first optimizes it with
            :func:`~medsynth.inference.accelerate.optimize_for_inference` (checked against the
            original on random slices; on CPU, ``"auto"`` compiles: ~2x faster in float32 for whole
            cohorts, after a one-off compilation of 10-30 s).
        precision: ``"fp32"`` or ``"bf16"`` for an optimized network (bf16: about twice as fast
            again on CPUs with AVX512-BF16, largest error ~0.04 on the [-1, 1] image scale).
    """

    def __init__(
        self,
        network: nn.Module,
        output_dir: str,
        sequences: Sequence[str],
        image_size: int = 256,
        checkpoint: str = "",
        manifest: pd.DataFrame | None = None,
        splits: Sequence[str] | str | None = None,
        mask_file: str = "",
        atlas_dir: str = "",
        brain_mask_file: str = "",
        case_name: str = "",
        manipulation: str = "none",
        grow_percent: float = 100.0,
        shrink_percent: float = -50.0,
        donor_file: str = "",
        seed: int = 0,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        backend: str = "none",
        precision: str = "fp32",
    ) -> None:
        if manipulation not in MANIPULATIONS:
            raise ValueError(f"unknown manipulation {manipulation!r}; choose one of {MANIPULATIONS}")
        if not mask_file and manifest is None:
            raise ValueError("give a cohort manifest or a mask_file (with atlas_dir)")
        if mask_file and not atlas_dir:
            raise ValueError("mask_file needs atlas_dir: the folder of the atlas volumes on the mask's grid")
        self.device = torch.device(device)
        self.network = network.to(self.device)
        self.checkpoint = checkpoint
        self.output_dir = Path(output_dir)
        self.sequences = list(sequences)
        self.image_size = int(image_size)
        self.manifest = manifest
        self.splits = [splits] if isinstance(splits, str) else (None if splits is None else list(splits))
        self.mask_file = mask_file
        self.atlas_dir = atlas_dir
        self.brain_mask_file = brain_mask_file
        self.case_name = case_name
        self.manipulation = manipulation
        self.grow_percent = grow_percent
        self.shrink_percent = shrink_percent
        self.donor_file = donor_file
        self.seed = seed
        self.batch_size = batch_size
        if backend != "none" and backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose 'none' or one of {BACKENDS}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
        self.backend = backend
        self.precision = precision

    def _load_weights(self) -> None:
        if not self.checkpoint:
            return
        if not Path(self.checkpoint).is_file():
            raise FileNotFoundError(f"model checkpoint not found: {self.checkpoint} (train the bundle first)")
        state = torch.load(self.checkpoint, map_location=self.device, weights_only=True)
        self.network.load_state_dict(state)
        logger.info("loaded %s", self.checkpoint)

    def _optimize(self) -> None:
        """Replace the network by its optimized inference form (``backend`` other than ``"none"``)."""
        if self.backend == "none":
            return
        example = random_slices(self.batch_size, self.image_size, len(self.sequences), seed=self.seed)
        self.network = optimize_for_inference(
            self.network, example, self.device, precision=self.precision, backend=self.backend
        )

    def cases(self) -> list[dict[str, Any]]:
        """The cases to synthesize: ``name``, ``label``, ``brain_mask``, ``atlas`` files, ``images`` files."""
        if self.mask_file:
            name = self.case_name or Path(self.mask_file).name.split(".")[0]
            return [
                {
                    "name": name,
                    "label": self.mask_file,
                    "brain_mask": self.brain_mask_file,
                    "atlas": find_atlas_files(self.atlas_dir, self.sequences),
                    "images": {},
                }
            ]
        rows = self.manifest
        if self.splits is not None:
            rows = rows[rows["split"].isin(self.splits)]
        if rows.empty:
            raise ValueError(f"no patient in split(s) {self.splits}")
        cases = []
        for _, row in rows.sort_values("patient_id").iterrows():
            missing = [atlas_column(s) for s in self.sequences if atlas_column(s) not in row or not row[atlas_column(s)]]
            if missing:
                raise InputDataError(f"manifest has no atlas column(s) {missing}", patient_id=row["patient_id"])
            cases.append(
                {
                    "name": str(row["patient_id"]),
                    "label": row[MANIFEST_LABEL_COLUMN],
                    "brain_mask": row.get(MANIFEST_BRAIN_MASK_COLUMN, ""),
                    "atlas": {s: row[atlas_column(s)] for s in self.sequences},
                    "images": {s: row[s] for s in self.sequences if s in row and row[s]},
                }
            )
        return cases

    def run(self) -> list[dict[str, Any]]:
        """Synthesize all cases; returns one record per case (also written as ``synthesis.json``)."""
        self._load_weights()
        self._optimize()
        cases = self.cases()
        records = []
        for position, case in enumerate(tqdm(cases, desc="synthesizing", unit="case")):
            donor_path = self.donor_file
            if self.manipulation in ("transplant", "random") and not donor_path and len(cases) > 1:
                donor_path = cases[(position + 1) % len(cases)]["label"]
            records.append(self.synthesize_case(case, donor_path))
        return records

    def synthesize_case(self, case: Mapping[str, Any], donor_path: str = "") -> dict[str, Any]:
        """Synthesize one case and write its files; returns its record."""
        name = case["name"]
        label = _Oriented(case["label"], name)
        label_ras = np.rint(label.ras).astype(np.int64)
        brain_ras = (
            _Oriented(case["brain_mask"], name).ras >= BRAIN_MASK_THRESHOLD if case.get("brain_mask") else label_ras > 0
        )
        if brain_ras.shape != label_ras.shape:
            raise InputDataError(f"brain mask shape {brain_ras.shape} differs from the label map's {label_ras.shape}", patient_id=name)
        atlas = {}
        for sequence, path in case["atlas"].items():
            volume = _Oriented(path, name)
            if volume.ras.shape != label_ras.shape or not np.allclose(volume.affine, label.affine, atol=1e-3):
                raise InputDataError("atlas is not on the grid of the label map (shape or affine differ)", path=path, patient_id=name)
            atlas[sequence] = volume.ras.astype(np.float32)

        info: Any = {"operation": "none"}
        transform = make_manipulation(
            self.manipulation,
            self.grow_percent,
            self.shrink_percent,
            donor=_Oriented(donor_path, name).ras if donor_path else None,
            seed=self.seed,
        )
        if transform is not None:
            label_ras, info = transform(label_ras, brain_ras)
            label_ras = np.asarray(label_ras).astype(np.int64)

        windows = self._image_windows(case.get("images", {}), brain_ras, label_ras.shape, name)
        volumes = synthesize_volume(
            self.network,
            label_ras,
            atlas,
            sequences=self.sequences,
            image_size=self.image_size,
            windows=windows,
            batch_size=self.batch_size,
            device=self.device,
        )
        out_dir = self.output_dir / name
        files = {}
        for sequence, volume in volumes.items():
            files[sequence] = str(save_nifti(label.back(volume), label.affine, out_dir / f"{sequence}.nii.gz", np.float32))
        files["label"] = str(save_nifti(label.back(label_ras), label.affine, out_dir / "label.nii.gz", np.uint8))
        record = {
            "case": name,
            "manipulation": self.manipulation,
            "manipulation_info": info,
            "intensity_windows": "real images" if windows is not None else "atlas",
            "files": files,
        }
        save_json(record, out_dir / "synthesis.json")
        return record

    def _image_windows(
        self, images: Mapping[str, str], brain: np.ndarray, shape: tuple, patient_id: str
    ) -> torch.Tensor | None:
        """The real images' ``(N, 2)`` windows (as in training), or ``None`` when the case has none."""
        if not images or any(s not in images for s in self.sequences):
            return None
        stack = []
        for sequence in self.sequences:
            volume = _Oriented(images[sequence], patient_id).ras
            if volume.shape != shape:
                raise InputDataError(f"image shape {volume.shape} differs from the label map's {shape}", path=images[sequence], patient_id=patient_id)
            stack.append(volume.astype(np.float32))
        scaler = ScaleToUnit(windows_for(self.sequences))
        return scaler.compute_windows(torch.as_tensor(np.stack(stack)), torch.as_tensor(brain))
