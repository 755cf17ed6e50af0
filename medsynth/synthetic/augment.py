"""Synthetic cohorts: N new labelled cases from a trained synthesis model, gated, with provenance.

:class:`SyntheticCohortBuilder` is what a synthesis bundle's ``augment.json`` runs (and
``medsynth augment``). Candidates are numbered; candidate ``i`` depends on ``(seed, i)`` alone:

1. a source patient drawn from the training split (never validation or test);
2. a random lesion manipulation (:mod:`.manipulation`): transplant another training patient's
   lesion, mirror, grow or shrink the tumour, or a combination;
3. the mask gate (:class:`~medsynth.synthetic.masks.LesionMaskPlausibility`);
4. synthesis of every sequence through the bundle's own ``preprocessing`` and ``inferer``, with
   CG-SAMR's confidence maps, brought back to the source's grid;
5. the image gates (:mod:`.gates`): segmentation consistency, memorisation, intensity sanity;
6. an accepted case is written into ``output_dir/<case>/`` (the sequences, ``label``,
   ``brain_mask``, ``confidence_<sequence>``, ``provenance.json``) by one folder rename, and listed
   in ``output_dir/manifest.csv`` (split ``train``, column ``source_patient``).

Candidates are drawn until ``num_cases`` are accepted (or ``max_candidates`` were tried). Every
candidate's outcome is kept in ``output_dir/.state/``, so a killed run continues where it stopped
and redoes nothing; candidates run in order, in waves on Dask workers when ``workers > 1``, and the
accepted set is the same for any number of workers. At the end: ``augment_summary.json`` (accepted
and rejected per reason, gate distributions, time per case) and ``contact_sheet.png``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from torch import nn
from tqdm.auto import tqdm

import medsynth
from medsynth.constants import (
    MANIFEST_BRAIN_MASK_COLUMN,
    MANIFEST_LABEL_COLUMN,
    NUM_LABELS,
    TISSUE_COLUMNS,
    atlas_column,
    confidence_column,
)
from medsynth.data.cohort import PREPROCESSING_FINGERPRINT_NAME, preprocessing_fingerprint
from medsynth.errors import InputDataError
from medsynth.inference.transforms import SOURCE_COLUMN, add_manifest_row, restore_input_grid, source_file_key
from medsynth.synthetic.gates import (
    GateResult,
    IntensityGate,
    MemorisationGate,
    SegmentationConsistencyGate,
    TrainingSliceBank,
)
from medsynth.synthetic.manipulation import apply_plan, draw_plan, left_right_axis
from medsynth.synthetic.masks import LesionMaskPlausibility, LesionVolumeRange
from medsynth.transforms.lesion import ManipulationNotPossibleError
from medsynth.utils.bundles import as_flag
from medsynth.utils.hashing import file_digest
from medsynth.utils.io import save_json, save_nifti
from medsynth.utils.parallel import start_client

logger = logging.getLogger(__name__)

__all__ = [
    "SUMMARY_NAME",
    "SyntheticCohortBuilder",
    "confidence_column",
    "publish_case",
    "record_or_check_run",
    "training_sources",
]

STATE_DIRNAME = ".state"
WORK_DIRNAME = ".work"
RUN_RECORD_NAME = "augment_run.json"
SUMMARY_NAME = "augment_summary.json"
CONTACT_SHEET_NAME = "contact_sheet.png"
PROVENANCE_NAME = "provenance.json"
GATE_ORDER = ("segmentation", "memorisation", "intensity")


def training_sources(manifest: pd.DataFrame, patients: Sequence[str] | None = None) -> pd.DataFrame:
    """The training rows synthetic cases may be made from, indexed by patient.

    Raises:
        ValueError: a patient in two splits, a requested patient that is not a training patient (named
            with its split), or no training patient.
    """
    from medsynth.data.manifest import check_patient_level_split

    check_patient_level_split(manifest)
    train = manifest[manifest["split"] == "train"].set_index("patient_id", drop=False)
    if patients:
        splits = dict(zip(manifest["patient_id"].astype(str), manifest["split"], strict=True))
        refused = [
            f"{p} ({splits.get(p, 'not in the cohort')})" for p in patients if splits.get(p) != "train"
        ]
        if refused:
            raise ValueError(
                "synthetic cases are made from training patients only; refused: " + ", ".join(refused)
            )
        train = train.loc[list(patients)]
    if train.empty:
        raise ValueError("the cohort has no training patient to make synthetic cases from")
    return train


def _load_label(path: str, patient: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    try:
        image = nib.load(str(path))
        return np.rint(np.asanyarray(image.dataobj)).astype(np.int16), image
    except (OSError, ValueError) as error:
        raise InputDataError(f"cannot read the label map: {error}", path, patient) from error


def _tensor(value: Any) -> torch.Tensor:
    return (value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)).detach().cpu()


class SyntheticCohortBuilder:
    """Make a gated synthetic cohort of ``num_cases`` accepted cases (see the module docstring).

    Args:
        manifest: the training cohort (absolute paths) with the model's atlas attached.
        sequences: the network's sequences, in channel order.
        network: the synthesis network (one tensor in, one out; ``with_confidence`` for CG-SAMR).
        preprocessing: the bundle's inference ``preprocessing`` (no manipulation of its own).
        inferer: the bundle's inferer.
        output_dir: the synthetic cohort's folder.
        num_cases: accepted cases wanted.
        seed: the run's seed; candidate ``i`` depends on ``(seed, i)`` only.
        ckpt_path: the synthesis weights (loaded here; hashed into the provenance).
        image_size: the network's plane size (the memorisation bank's grid).
        device: where the networks run.
        segmenter: lesion segmenter of the segmentation gate; ``None`` disables the gate.
        segmenter_path: its weights (loaded here when given; hashed into the provenance).
        segmentation_threshold: smallest whole-lesion Dice that passes (Qu et al.: 0.95 with a fully
            trained segmenter), or ``"auto"``: 0.9 of the segmenter's median Dice on the real
            training patients.
        memorisation_threshold: near-copy distance (mean absolute difference in the brain, [-1, 1]).
        memorisation_action: ``"refuse"`` or ``"flag"`` near-copies.
        intensity_margin: widening of the training windows for the intensity gate.
        volume_margin, min_component_voxels, max_core_exposure, core_exposure_margin: the mask gate's
            settings (:class:`medsynth.synthetic.masks.LesionMaskPlausibility`).
        mirror_prob, resize_prob, resize_percent_range, transplant_prob: the manipulation draws.
        source_patients: restrict the sources to these training patients (others are refused).
        max_candidates: candidates tried at most (default ``10 * num_cases``).
        bundle: the bundle's name (provenance).
        dataset_dir: the training cohort's source (its preprocessing fingerprint).
        workers, scheduler: Dask worker processes, or an existing scheduler's address.
        contact_sheet_cases: accepted cases drawn on the contact sheet.
        export: ``""``, ``"nnunet"`` or ``"brats"`` (:mod:`medsynth.synthetic.export`), written after the run.
        export_real: the export also holds the real training cases.
        export_dir: where the export goes (default ``output_dir/export_<kind>``).
        nnunet_dataset_id: the nnU-Net dataset id.
        progress: show a progress bar.
    """

    def __init__(
        self,
        manifest: pd.DataFrame,
        sequences: Sequence[str],
        network: nn.Module,
        preprocessing: Compose,
        inferer: Any,
        output_dir: str,
        num_cases: int = 50,
        seed: int = 0,
        ckpt_path: str = "",
        image_size: int = 128,
        device: torch.device | str = "cpu",
        segmenter: nn.Module | None = None,
        segmenter_path: str = "",
        segmentation_threshold: float | str = "auto",
        memorisation_threshold: float = 0.03,
        memorisation_action: str = "refuse",
        intensity_margin: float = 0.1,
        volume_margin: float = 0.25,
        min_component_voxels: int = 20,
        max_core_exposure: float = 0.5,
        core_exposure_margin: float = 0.1,
        mirror_prob: float = 0.5,
        resize_prob: float = 0.5,
        resize_percent_range: Sequence[float] = (-50.0, 100.0),
        transplant_prob: float = 0.3,
        source_patients: Sequence[str] | None = None,
        max_candidates: int | None = None,
        bundle: str = "",
        dataset_dir: str = "",
        workers: int = 1,
        scheduler: str | None = None,
        contact_sheet_cases: int = 4,
        export: str = "",
        export_real: bool = False,
        export_dir: str = "",
        nnunet_dataset_id: int = 501,
        progress: bool = True,
    ) -> None:
        if num_cases < 1:
            raise ValueError(f"num_cases must be at least 1, got {num_cases}")
        self.sequences = list(sequences)
        self.sources = training_sources(manifest, source_patients)
        self._source_grids: dict[str, torch.Tensor] = {}
        self.network, self.preprocessing, self.inferer = network, preprocessing, inferer
        self.output_dir = Path(output_dir)
        self.num_cases, self.seed = int(num_cases), int(seed)
        self.max_candidates = int(max_candidates or 10 * num_cases)
        self.ckpt_path, self.segmenter_path = str(ckpt_path), str(segmenter_path or "")
        self.image_size, self.device = int(image_size), torch.device(device)
        self.segmenter = segmenter
        self.settings = {
            # None: the gate is off (a model that trains no U-Net, e.g. the pix2pix family).
            "segmentation_threshold": segmentation_threshold
            if segmentation_threshold in ("auto", None)
            else float(segmentation_threshold),
            "memorisation_threshold": float(memorisation_threshold),
            "memorisation_action": memorisation_action,
            "intensity_margin": float(intensity_margin),
            "volume_margin": float(volume_margin),
            "min_component_voxels": int(min_component_voxels),
            "max_core_exposure": float(max_core_exposure),
            "core_exposure_margin": float(core_exposure_margin),
            "mirror_prob": float(mirror_prob),
            "resize_prob": float(resize_prob),
            "resize_percent_range": [float(v) for v in resize_percent_range],
            "transplant_prob": float(transplant_prob),
        }
        self.bundle, self.dataset_dir = bundle, dataset_dir
        self.workers, self.scheduler = int(workers), scheduler
        self.contact_sheet_cases, self.progress = int(contact_sheet_cases), progress
        if export not in ("", "nnunet", "brats"):
            raise ValueError(f"export must be '', 'nnunet' or 'brats', got {export!r}")
        self.export, self.export_real = export, as_flag(export_real, "export_real")
        self.export_dir = export_dir or str(self.output_dir / f"export_{export}")
        self.nnunet_dataset_id = int(nnunet_dataset_id)
        self._ready = False

    # -- set-up (once per process) ------------------------------------------------------------------
    def _load_weights(self, module: nn.Module, path: str) -> None:
        if not Path(path).is_file():
            hint = (
                "a model trained before medsynth saved its U-Net has none: retrain, give --segmenter, or "
                "switch the segmentation gate off with --set segmentation_threshold=null"
                if module is self.segmenter
                else "train the bundle first"
            )
            raise FileNotFoundError(f"weights not found: {path} ({hint})")
        from medsynth.utils.checkpoints import load_checked_weights

        load_checked_weights(module, path, "segmenter" if module is self.segmenter else "synthesis model")
        module.to(self.device).eval()

    def _prepare(self) -> None:
        if self._ready:
            return
        if self.ckpt_path:
            self._load_weights(self.network, self.ckpt_path)
        if self.segmenter is not None and self.segmenter_path:
            self._load_weights(self.segmenter, self.segmenter_path)
        labels = [str(p) for p in self.sources[MANIFEST_LABEL_COLUMN]]
        self.validator = LesionMaskPlausibility(
            LesionVolumeRange.from_label_files(labels, self.settings["volume_margin"]),
            self.settings["min_component_voxels"],
            self.settings["max_core_exposure"],
            self.settings["core_exposure_margin"],
        )
        volumes = self._training_volumes()
        bank = TrainingSliceBank.from_volumes([(p, image, brain) for p, image, _, brain in volumes])
        self.gates: dict[str, Any] = {
            "memorisation": MemorisationGate(
                bank, self.settings["memorisation_threshold"], self.settings["memorisation_action"]
            ),
            "intensity": IntensityGate.from_windows(
                self._training_windows(), margin=self.settings["intensity_margin"]
            ),
        }
        if self.segmenter is not None:
            gate = SegmentationConsistencyGate(self.segmenter, self.settings["segmentation_threshold"])
            gate.calibrate([(image, label) for _, image, label, _ in volumes])
            self.gates["segmentation"] = gate
        self._ready = True

    def _training_volumes(self) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(patient, images (N, S, S, D) in [-1, 1], label (S, S, D), brain (S, S, D))`` of every
        training patient, processed exactly as for training."""
        from medsynth.data.dataset import patient_volume_transforms

        transform = patient_volume_transforms(self.sequences, self.image_size)
        volumes = []
        for patient, row in self.sources.iterrows():
            data = transform(
                {
                    key: row[key]
                    for key in (*self.sequences, MANIFEST_LABEL_COLUMN, MANIFEST_BRAIN_MASK_COLUMN)
                }
            )
            volumes.append(
                (
                    str(patient),
                    data["image"].permute(0, 2, 3, 1),  # axial-first (N, D, S, S) -> (N, S, S, D)
                    data[MANIFEST_LABEL_COLUMN][0].permute(1, 2, 0).long(),
                    data[MANIFEST_BRAIN_MASK_COLUMN][0].permute(1, 2, 0),
                )
            )
        return volumes

    def _training_windows(self) -> torch.Tensor:
        """``(P, N, 2)`` intensity windows of the training patients, computed as for synthesis."""
        windows = []
        for _, row in self.sources.iterrows():
            data = self.preprocessing(self._item(str(row["patient_id"]), row, row[MANIFEST_LABEL_COLUMN]))
            windows.append(torch.as_tensor(data["window"]))
        return torch.stack(windows)

    # -- one candidate -------------------------------------------------------------------------------
    def case_name(self, index: int) -> str:
        return f"synth{self.seed}_{index:05d}"

    def _state_path(self, index: int) -> Path:
        return self.output_dir / STATE_DIRNAME / f"{self.case_name(index)}.json"

    def _item(self, case: str, row: pd.Series, label_path: str) -> dict[str, Any]:
        item: dict[str, Any] = {
            "case": case,
            "source_patient": str(row["patient_id"]),
            "split": "train",
            MANIFEST_LABEL_COLUMN: str(label_path),
        }
        brain = str(row.get(MANIFEST_BRAIN_MASK_COLUMN, "") or "")
        if brain:
            item[MANIFEST_BRAIN_MASK_COLUMN] = brain
        for sequence in self.sequences:
            item[atlas_column(sequence)] = item[source_file_key(atlas_column(sequence))] = row[
                atlas_column(sequence)
            ]
            # The source's real images set the intensity windows the synthesis is mapped back into.
            item[sequence] = row[sequence]
        # A model conditioned on tissue maps (Shin et al.) takes the source's, with the new lesion excluded.
        item.update({c: row[c] for c in TISSUE_COLUMNS if str(row.get(c, "") or "")})
        return item

    def _source_grid_label(self, row: pd.Series) -> torch.Tensor:
        """The source patient's own label map on the network's grid (cached per source), against
        which the memorisation gate finds the slices a manipulation changed."""
        source = str(row["patient_id"])
        if source not in self._source_grids:
            data = self.preprocessing(self._item(source, row, str(row[MANIFEST_LABEL_COLUMN])))
            self._source_grids[source] = _tensor(data["image"][:NUM_LABELS]).argmax(dim=0)
        return self._source_grids[source]

    def candidate(self, index: int) -> dict[str, Any]:
        """Make (or read back) candidate ``index``; returns its state record."""
        state_path = self._state_path(index)
        if state_path.is_file():
            return json.loads(state_path.read_text())
        self._prepare()
        start = time.perf_counter()
        case = self.case_name(index)
        rng = np.random.default_rng([self.seed, index])
        source = str(self.sources.index[int(rng.integers(len(self.sources)))])
        row = self.sources.loc[source]
        donors = [p for p in self.sources.index if p != source]
        plan = draw_plan(
            rng,
            donors,
            self.settings["mirror_prob"],
            self.settings["resize_prob"],
            self.settings["resize_percent_range"],
            self.settings["transplant_prob"],
        )
        state: dict[str, Any] = {
            "case": case,
            "index": index,
            "seed": self.seed,
            "source_patient": source,
            "manipulation": plan.to_dict(),
            "accepted": False,
            "reason": None,
        }
        try:
            state.update(self._make(case, row, plan))
        finally:
            shutil.rmtree(self.output_dir / WORK_DIRNAME / case, ignore_errors=True)
        state["seconds"] = round(time.perf_counter() - start, 3)
        save_json(state, state_path)
        return state

    def _make(self, case: str, row: pd.Series, plan) -> dict[str, Any]:
        source = str(row["patient_id"])
        label, image = _load_label(row[MANIFEST_LABEL_COLUMN], source)
        brain_path = str(row.get(MANIFEST_BRAIN_MASK_COLUMN, "") or "")
        brain = (np.asanyarray(nib.load(brain_path).dataobj) >= 0.5) if brain_path else label > 0
        voxel_volume = float(np.prod(image.header.get_zooms()[:3]))
        try:
            candidate, achieved = apply_plan(
                plan,
                label,
                brain,
                left_right_axis(image.affine),
                lambda donor: _load_label(self.sources.loc[donor, MANIFEST_LABEL_COLUMN], donor)[0],
            )
        except ManipulationNotPossibleError as error:
            return {"reason": "manipulation_impossible", "detail": str(error)}
        verdict = self.validator(candidate, brain, source_label=label, voxel_volume=voxel_volume)
        result: dict[str, Any] = {"achieved": achieved, "mask": verdict.to_dict()}
        if not verdict.accepted:
            return {**result, "reason": verdict.reason, "detail": verdict.detail}
        work = self.output_dir / WORK_DIRNAME / case
        candidate_path = save_nifti(candidate, image.affine, work / "input_label.nii.gz", np.uint8)
        data = self.preprocessing(self._item(case, row, str(candidate_path)))
        inputs = data["image"]
        prediction = self.inferer(MetaTensor(_tensor(inputs)[None], meta=dict(inputs.meta)), self.network)[0]
        n = len(self.sequences)
        images = _tensor(prediction[:n])
        confidence = _tensor(prediction[n : 2 * n]) if prediction.shape[0] >= 2 * n else None
        grid_label = _tensor(inputs[:NUM_LABELS]).argmax(dim=0)
        gates: dict[str, GateResult] = {}
        if "segmentation" in self.gates:
            gates["segmentation"] = self.gates["segmentation"](images, grid_label, grid_label > 0)
        changed = (grid_label != self._source_grid_label(row)).flatten(0, 1).any(dim=0)
        # A change too small to survive the network's grid leaves a copy of the source: compare all.
        compared = changed if bool(changed.any()) else None
        gates["memorisation"] = self.gates["memorisation"](images, grid_label, grid_label > 0, compared)
        restored = dict(data)
        restored["pred"] = MetaTensor(images)  # Invertd inverts MetaTensors (a plain tensor is skipped)
        keys = ["pred"]
        if confidence is not None:
            restored["confidence"] = MetaTensor(confidence)
            keys.append("confidence")
        restored = Compose(restore_input_grid(self.preprocessing, self.sequences, keys))(restored)
        gates["intensity"] = self.gates["intensity"](
            _tensor(restored["pred"]), None, _tensor(restored[MANIFEST_BRAIN_MASK_COLUMN])
        )
        result["gates"] = {name: gate.to_dict() for name, gate in gates.items()}
        failed = [name for name in GATE_ORDER if name in gates and not gates[name].passed]
        if failed:
            return {**result, "reason": failed[0], "detail": gates[failed[0]].detail}
        result["flagged"] = [name for name, gate in gates.items() if gate.flagged]
        self._write_case(case, row, plan, result, restored)
        return {**result, "accepted": True, "reason": None}

    def _write_case(self, case: str, row: pd.Series, plan, result: dict, data: Mapping[str, Any]) -> None:
        label = data[MANIFEST_LABEL_COLUMN]
        affine = np.asarray(label.meta.get("original_affine", label.affine), dtype=np.float64)
        stage = self.output_dir / WORK_DIRNAME / case / "case"
        names: dict[str, str] = {}
        for channel, sequence in enumerate(self.sequences):
            save_nifti(
                _tensor(data["pred"][channel]).numpy(), affine, stage / f"{sequence}.nii.gz", np.float32
            )
            names[sequence] = f"{sequence}.nii.gz"
            if "confidence" in data:
                stem = confidence_column(sequence)
                save_nifti(
                    _tensor(data["confidence"][channel]).numpy(), affine, stage / f"{stem}.nii.gz", np.float32
                )
                names[stem] = f"{stem}.nii.gz"
        save_nifti(np.rint(_tensor(label[0]).numpy()), affine, stage / "label.nii.gz", np.uint8)
        brain = _tensor(data[MANIFEST_BRAIN_MASK_COLUMN][0]).numpy() > 0
        save_nifti(brain, affine, stage / "brain_mask.nii.gz", np.uint8)
        names[MANIFEST_LABEL_COLUMN], names[MANIFEST_BRAIN_MASK_COLUMN] = "label.nii.gz", "brain_mask.nii.gz"
        provenance = {
            "case": case,
            "source_patient": str(row["patient_id"]),
            "source_split": "train",
            "seed": self.seed,
            "manipulation": {"requested": plan.to_dict(), "achieved": result["achieved"]},
            "mask_check": result["mask"],
            "gates": result["gates"],
            "flagged": result["flagged"],
            **self._run_record(),
            "files": names,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        save_json(provenance, stage / PROVENANCE_NAME)
        extra = {atlas_column(s): str(row[atlas_column(s)]) for s in self.sequences}
        publish_case(self.output_dir, case, stage, names, {**extra, SOURCE_COLUMN: str(row["patient_id"])})

    # -- the run -------------------------------------------------------------------------------------
    def _run_record(self) -> dict[str, Any]:
        if not hasattr(self, "_record"):
            self._record = {
                "bundle": self.bundle,
                "medsynth_version": medsynth.__version__,
                "checkpoint": {
                    "file": Path(self.ckpt_path).name,
                    "sha256": file_digest(self.ckpt_path) if self.ckpt_path else "",
                },
                "segmenter": {
                    "file": Path(self.segmenter_path).name,
                    "sha256": file_digest(self.segmenter_path) if self.segmenter_path else "",
                }
                if self.segmenter is not None
                else None,
                "preprocessing_fingerprint": preprocessing_fingerprint(self.dataset_dir),
                "settings": self.settings,
            }
        return self._record

    def _check_run_record(self) -> None:
        """One output folder, one model and one training cohort: a rerun must match the first run."""
        path = self.output_dir / RUN_RECORD_NAME
        record = {
            key: self._run_record()[key] for key in ("checkpoint", "preprocessing_fingerprint", "settings")
        }
        record["seed"] = self.seed
        record_or_check_run(path, record, self.output_dir)

    def run(self) -> dict[str, Any]:
        """Make the cohort; returns the summary (also written to ``augment_summary.json``)."""
        from medsynth.utils.io import require_writable_folder

        require_writable_folder(self.output_dir, "synthetic cohort folder")
        run_start = time.perf_counter()
        self._prepare()  # first: it refuses missing weights before anything is hashed or written
        self._check_run_record()
        states: list[dict[str, Any]] = []
        bar = tqdm(total=self.num_cases, desc="synthetic cases", unit="case", disable=not self.progress)
        with ExitStack() as stack:
            client = start_client(stack, self.workers, self.scheduler)
            index = 0
            while sum(s["accepted"] for s in states) < self.num_cases and index < self.max_candidates:
                wave = range(
                    index,
                    min(index + self.num_cases - sum(s["accepted"] for s in states), self.max_candidates),
                )
                states += self._run_wave(client, list(wave))
                index = wave.stop
                bar.n = min(sum(s["accepted"] for s in states), self.num_cases)
                bar.set_postfix(candidates=index)
                bar.refresh()
        bar.close()
        summary = self._summary(states, time.perf_counter() - run_start)
        save_json(summary, self.output_dir / SUMMARY_NAME)
        self._contact_sheet([s["case"] for s in states if s["accepted"]][: self.contact_sheet_cases])
        logger.info(format_summary(summary))
        if self.export and summary["accepted"]:
            summary["export"] = str(self.write_export())
            save_json(summary, self.output_dir / SUMMARY_NAME)
        if summary["accepted"] < self.num_cases:
            logger.warning(
                "only %d of %d cases accepted after %d candidates; see the rejection reasons",
                summary["accepted"],
                self.num_cases,
                summary["candidates"],
            )
        return summary

    def write_export(self) -> Path:
        """Write the chosen export of the cohort's accepted cases (and the real training cases)."""
        from medsynth.data.manifest import read_manifest
        from medsynth.synthetic.export import export_brats, export_nnunet

        manifest = read_manifest(self.output_dir / "manifest.csv")
        real = self.sources.reset_index(drop=True) if self.export_real else None
        if self.export == "nnunet":
            path = export_nnunet(manifest, self.export_dir, self.nnunet_dataset_id, real=real)
        else:
            path = export_brats(manifest, self.export_dir, real=real)
        logger.info("%s export in %s", self.export, path)
        return path

    def _run_wave(self, client, indices: list[int]) -> list[dict[str, Any]]:
        if client is None:
            return [self.candidate(i) for i in indices]
        pending = [i for i in indices if not self._state_path(i).is_file()]
        if pending:
            builder = client.scatter(self, broadcast=True, hash=False)
            futures = [client.submit(_candidate_task, builder, i, pure=False) for i in pending]
            client.gather(futures)
        return [self.candidate(i) for i in indices]  # all read back from their state files

    def _summary(self, states: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
        reasons = Counter(s["reason"] for s in states if not s["accepted"])
        distributions = {}
        for gate in GATE_ORDER:
            scores = [s["gates"][gate]["score"] for s in states if gate in s.get("gates", {})]
            if scores:
                distributions[gate] = _describe(scores)
                reached = len(scores)
                distributions[gate]["filter_rate"] = reasons.get(gate, 0) / reached
        accepted = [s for s in states if s["accepted"]]
        between = self.gates["memorisation"].bank.between_patients()
        if between.numel():  # the scale: real patients' slices to their nearest other patient's
            distributions.setdefault("memorisation", {})["real_to_other_patients"] = _describe(
                between.tolist()
            )
        segmentation = self.gates.get("segmentation")
        if segmentation is not None:
            distributions.setdefault("segmentation", {}).update(
                threshold=segmentation.threshold,
                real_training_dice=[round(v, 4) for v in segmentation.real_dice],
            )
        return {
            "candidates": len(states),
            "accepted": len(accepted),
            "rejected": dict(sorted(reasons.items())),
            "flagged": dict(Counter(name for s in accepted for name in s.get("flagged", []))),
            "gates": distributions,
            "operations": dict(Counter("+".join(s["manipulation"]["operations"]) for s in accepted)),
            "seconds_per_candidate": statistics.mean(s["seconds"] for s in states) if states else 0.0,
            "seconds_per_accepted_case": sum(s["seconds"] for s in states) / max(len(accepted), 1),
            "wall_seconds_this_run": round(seconds, 2),
        }

    def _contact_sheet(self, cases: Sequence[str]) -> Path | None:
        if not cases:
            return None
        from medsynth.visualize import contact_sheet

        return contact_sheet(self.output_dir, cases, self.sequences, self.output_dir / CONTACT_SHEET_NAME)


def publish_case(
    output_dir: Path, case: str, stage: Path, files: Mapping[str, str], columns: Mapping[str, str]
) -> Path:
    """Move a case written in ``stage`` to ``output_dir/case`` (one rename, so it is whole or absent)
    and list it in ``output_dir/manifest.csv`` (split ``train``): ``files`` maps a manifest column to
    its file in the case folder, ``columns`` gives the other columns' values."""
    final = output_dir / case
    if final.exists():  # left by a run killed after the rename, before its state was written
        shutil.rmtree(final)
    os.replace(stage, final)
    paths = {column: str(final / name) for column, name in files.items()}
    add_manifest_row(output_dir, {"patient_id": case, "split": "train", **paths, **columns})
    return final


def record_or_check_run(path: Path, record: Mapping[str, Any], output_dir: Path) -> None:
    """A synthetic cohort's first run writes ``record`` (models, settings, the training cohort's
    ``preprocessing_fingerprint``, also written beside the manifest for the mixing check); a later run
    into the same ``output_dir`` must match it.

    Raises:
        ValueError: the folder holds a cohort made with other models or settings (named).
    """
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = [key for key in record if previous.get(key) != json.loads(json.dumps(record[key]))]
        if changed:
            raise ValueError(
                f"{output_dir} holds a synthetic cohort made with another {', '.join(changed)}; "
                "use a new output folder"
            )
        return
    save_json(dict(record), path)
    fingerprint = record.get("preprocessing_fingerprint")
    if fingerprint:
        save_json(fingerprint, output_dir / PREPROCESSING_FINGERPRINT_NAME)


def _candidate_task(builder: SyntheticCohortBuilder, index: int) -> bool:
    """A Dask task: one candidate, recorded in its state file (top level: picklable)."""
    torch.set_num_threads(1)
    return builder.candidate(index)["accepted"]


def _describe(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]  # a gate without a score (no brain slice) does not blank the summary
    if not array.size:
        return {"n": 0}
    return {
        "n": int(array.size),
        "min": float(array.min()),
        "p05": float(np.percentile(array, 5)),
        "median": float(np.median(array)),
        "p95": float(np.percentile(array, 95)),
        "max": float(array.max()),
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """The summary as lines a person reads."""
    lines = [
        f"synthetic cohort: {summary['accepted']} accepted of {summary['candidates']} candidates, "
        f"{summary['seconds_per_accepted_case']:.1f} s per accepted case",
    ]
    for reason, count in summary["rejected"].items():
        lines.append(f"  rejected {count:4d}  {reason}")
    for gate, stats in summary["gates"].items():
        lines.append(
            f"  gate {gate}: median {stats['median']:.4f} (p05 {stats['p05']:.4f}, p95 {stats['p95']:.4f}), "
            f"filter rate {stats['filter_rate']:.1%}"
        )
    return "\n".join(lines)
