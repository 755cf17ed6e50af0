"""Synthetic cohorts from pure noise: Qu et al.'s dataset construction (papers 003/004, Sec. 2.8).

:class:`NoiseCohortBuilder` is what ``bundles/sfm_gan/configs/synthesize.json`` runs. Candidate ``i``
depends on ``(seed, i)`` alone (so a killed run resumes and redoes nothing):

1. a structural map decoded from a code drawn from N(0, 1) (stage 1's VAE), binarised, and its
   brain area predicted by the MASK generator;
2. **Algorithm 3**: the map's closed contours filled and compared with the brain area by MAE;
   refused above the threshold (an open outline) - the structural-map filter;
3. a lesion label drawn from the training split's lesion slices (never validation or test), its
   lesion randomly scaled, rotated, translated and flipped, and accepted only inside the brain area
   (Sec. 2.5's rule; a few draws, then the candidate is refused);
4. the fused map (Sec. 2.5) decoded into every sequence by stage 2's generator;
5. **the Dice filter**: stage 2's lesion segmenters (trained on real images only) segment every
   generated sequence; the candidate is kept when the whole-lesion Dice with the fused label reaches
   the threshold (0.95 in the papers) in every sequence;
6. a kept case is written as ``output_dir/<case>/`` (``<sequence>.nii.gz`` in the training data's
   intensity units, ``label``, ``brain_mask``, ``structure``, ``provenance.json``) by one folder
   rename and listed in ``output_dir/manifest.csv`` (split ``train``, ``source_patient`` the
   label's patient), as ``medsynth augment`` writes its cases.

At the end ``noise_summary.json`` holds the candidates, the acceptances, the refusals per reason and
the two filters' pass rates, and ``contact_sheet.png`` shows the first cases.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.networks.utils import eval_mode
from scipy import ndimage
from tqdm.auto import tqdm

import medsynth
from medsynth.constants import LESION_LABELS, MANIFEST_BRAIN_MASK_COLUMN, MANIFEST_LABEL_COLUMN
from medsynth.engines.adversarial import unwrap
from medsynth.engines.qu import fused_label
from medsynth.inference.transforms import SOURCE_COLUMN
from medsynth.losses.qu import soft_label_loss
from medsynth.synthetic.augment import PROVENANCE_NAME, publish_case, record_or_check_run
from medsynth.synthetic.gates import lesion_dice
from medsynth.transforms.intensity import unit_to_intensity
from medsynth.transforms.structure import StructuralMapFilter, fuse_structure_and_label, label_inside_brain
from medsynth.utils.hashing import file_digest
from medsynth.utils.io import save_json, save_nifti

logger = logging.getLogger(__name__)

__all__ = ["NoiseCohortBuilder", "random_lesion_label"]

STATE_DIRNAME = ".state"
SUMMARY_NAME = "noise_summary.json"
REASONS = ("structure_filter", "label_outside_brain", "dice_filter")


def random_lesion_label(
    label: np.ndarray,
    rng: np.random.Generator,
    scale_range: tuple[float, float] = (0.8, 1.2),
    max_rotation_deg: float = 15.0,
    max_translation: float = 0.1,
    flip_probability: float = 0.5,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The lesion of a label map ``(H, W)`` randomly scaled, rotated, translated and flipped (Sec. 2.8).

    Only the lesion labels move (nearest neighbour, about the lesion's centre); the rest is 0.
    The papers give no ranges; the defaults are moderate ones, recorded in the case's provenance.

    Returns:
        ``(lesion label map, parameters)``.
    """
    lesion = np.where(np.isin(label, LESION_LABELS), label, 0).astype(np.int64)
    scale = float(rng.uniform(*scale_range))
    angle = float(rng.uniform(-max_rotation_deg, max_rotation_deg))
    shift = rng.uniform(-max_translation, max_translation, size=2) * np.asarray(label.shape)
    flip = bool(rng.random() < flip_probability)
    centre = np.asarray(ndimage.center_of_mass(lesion > 0)) if lesion.any() else np.asarray(label.shape) / 2
    theta = np.deg2rad(angle)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    forward = rotation * scale
    if flip:
        forward = forward @ np.diag([1.0, -1.0])
    inverse = np.linalg.inv(forward)
    # output x = forward (input - centre) + centre + shift  =>  input = inverse (x - centre - shift) + centre
    offset = centre - inverse @ (centre + shift)
    moved = ndimage.affine_transform(lesion, inverse, offset=offset, order=0, mode="constant", cval=0)
    params = {"scale": scale, "rotation_deg": angle, "translation_px": shift.tolist(), "flip": flip}
    return moved.astype(np.int64), params


class NoiseCohortBuilder:
    """Builds a cohort of cases generated from noise and chosen lesion labels (module docstring).

    Args:
        manifest: the training cohort (its train split gives the lesion labels and intensity windows).
        vae, mask_generator: stage 1's networks; ``generator``, ``segmenters``: stage 2's.
        structure_path, generation_path: their weights (``models/structure.pt``, ``models/generation.pt``
            of the bundle's output folder), loaded here and hashed into the provenance.
        output_dir: the cohort folder.
        sequences: the sequences of the image channels.
        num_cases: cases to accept.
        max_candidates: candidates to try at most (default ``20 * num_cases``).
        image_size: height and width of the generated slices.
        label_weight: of the fusion.
        structure_filter_mae: Algorithm 3's threshold (paper 003: 0.05).
        dice_threshold: of the Dice filter (the papers: 0.95).
        label_tries: lesion-label draws per candidate before it is refused.
        seed: of everything random.
        device: where the networks run.
        bundle: the bundle's name (provenance).
        progress: show a progress bar.
        judge: lesion segmenters that score the generated images for the Dice filter instead of the
            generator's own (Table 1 scores every guidance scheme with segmenters trained on real data).
        judge_path: the ``generation.pt`` whose ``segmenters`` the judge loads.
        dataset_dir: the training cohort's source (its preprocessing fingerprint is the cohort's, so
            that the segmentation bundle's mixing can check the two were standardised alike).
        label_paths: chosen lesion labels (2D label maps, or 3D whose lesion slices are all taken, in
            the project's labels) to draw from instead of the training split's; they are moved and
            accepted like those. The intensity windows still come from the training split.
    """

    def __init__(
        self,
        manifest: pd.DataFrame,
        vae: torch.nn.Module,
        mask_generator: torch.nn.Module,
        generator: torch.nn.Module,
        segmenters: torch.nn.Module,
        structure_path: str,
        generation_path: str,
        output_dir: str,
        sequences: Sequence[str],
        num_cases: int = 20,
        max_candidates: int | None = None,
        image_size: int = 64,
        label_weight: float = 0.5,
        structure_filter_mae: float = 0.05,
        dice_threshold: float = 0.95,
        label_tries: int = 10,
        seed: int = 0,
        device: str | torch.device = "cpu",
        bundle: str = "sfm_gan",
        progress: bool = True,
        judge: torch.nn.Module | None = None,
        judge_path: str | None = None,
        dataset_dir: str = "",
        label_paths: Sequence[str] | None = None,
    ) -> None:
        from medsynth.data.manifest import check_patient_level_split

        check_patient_level_split(manifest)
        self.manifest, self.sequences = manifest, list(sequences)
        self.vae, self.mask_generator = unwrap(vae), unwrap(mask_generator)
        self.generator, self.segmenters = unwrap(generator), unwrap(segmenters)
        self.structure_path, self.generation_path = Path(structure_path), Path(generation_path)
        for path, names in ((self.structure_path, ("vae", "mask_generator")),
                            (self.generation_path, ("generator", "segmenters"))):  # fmt: skip
            self._load(path, names)
        self.output_dir = Path(output_dir)
        self.num_cases = int(num_cases)
        self.max_candidates = int(max_candidates) if max_candidates else 20 * self.num_cases
        self.image_size, self.label_weight = int(image_size), float(label_weight)
        self.filter = StructuralMapFilter(structure_filter_mae)
        self.dice_threshold, self.label_tries = float(dice_threshold), int(label_tries)
        self.seed, self.device = int(seed), torch.device(device)
        self.bundle, self.progress = bundle, progress
        self.judge = self.segmenters
        if judge is not None:
            if not judge_path:
                raise ValueError("a judge needs judge_path, the generation.pt of its segmenters")
            self.judge = unwrap(judge)
            self.judge.load_state_dict(
                torch.load(judge_path, map_location="cpu", weights_only=True)["segmenters"]
            )
        self._sources: list[dict[str, Any]] | None = None
        self.dataset_dir = dataset_dir
        self._digests: dict[str, str] | None = None
        self.label_paths = [str(p) for p in label_paths or []]

    def _load(self, path: Path, names: Sequence[str]) -> None:
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no trained weights; train the stage first (see bundles/sfm_gan)"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        for name in names:
            getattr(self, name).load_state_dict(state[name])

    # -- lesion-label sources: the train split's lesion slices ------------------------------------
    def sources(self) -> list[dict[str, Any]]:
        if self._sources is None:
            from medsynth.data.dataset import make_slice_dataset

            dataset = make_slice_dataset(
                self.manifest, "train", image_size=self.image_size, slice_selection="lesion", cache="none"
            )
            self._sources = [
                {
                    "patient_id": str(item["patient_id"]),
                    "slice_index": int(item["slice_index"]),
                    "label": np.asarray(item["label"])[0],
                    "window": np.asarray(item["window"], dtype=np.float64),
                }
                for item in (dataset[i] for i in range(len(dataset)))
            ]
            if not self._sources:
                raise ValueError("the training split has no lesion slice to draw labels from")
            if self.label_paths:
                window = self._sources[0]["window"]
                self._sources = [{**s, "window": window} for s in self._chosen_labels()]
        return self._sources

    def _chosen_labels(self) -> list[dict[str, Any]]:
        """The lesion slices of the chosen label files, resized to the slices (nearest neighbour)."""
        import nibabel as nib

        from medsynth.errors import InputDataError

        chosen = []
        for path in self.label_paths:
            try:
                data = np.asanyarray(nib.load(path).dataobj)
            except Exception as error:  # nibabel raises several types for unreadable files
                raise InputDataError(f"cannot read the label: {error}", path=path) from None
            volume, found = data.reshape(*data.shape[:2], -1), len(chosen)
            for z in range(volume.shape[2]):
                plane = np.rint(volume[:, :, z]).astype(np.int64)
                if not np.isin(plane, LESION_LABELS).any():
                    continue
                factors = (self.image_size / plane.shape[0], self.image_size / plane.shape[1])
                resized = ndimage.zoom(plane, factors, order=0)[: self.image_size, : self.image_size]
                chosen.append(
                    {"patient_id": Path(path).name.split(".")[0], "slice_index": z, "label": resized}
                )
            if len(chosen) == found:
                raise InputDataError("holds no lesion label (2, 3 or 4)", path=path)
        return chosen

    # -- one candidate ------------------------------------------------------------------------------
    def candidate(self, index: int) -> dict[str, Any]:
        """Try candidate ``index``; returns its outcome (written to ``.state`` by :meth:`run`)."""
        rng = np.random.default_rng([self.seed, index])
        torch_rng = torch.Generator(device=self.device).manual_seed(int(rng.integers(2**62)))
        size = self.image_size
        with torch.no_grad(), eval_mode(self.vae, self.mask_generator, self.generator, self.judge):
            probability = self.vae.sample(1, size, size, generator=torch_rng)
            structure = (probability > 0.5).float()
            brain = (self.mask_generator(probability) > 0.5).float()
            mae = self.filter.mae(structure[0, 0], brain[0, 0])
            outcome: dict[str, Any] = {"candidate": index, "structure_mae": mae}
            if mae >= self.filter.mae_threshold:
                return {**outcome, "reason": "structure_filter"}
            sources = self.sources()
            attempts = 0
            for _ in range(self.label_tries):
                attempts += 1
                source = sources[int(rng.integers(len(sources)))]
                moved, params = random_lesion_label(source["label"], rng)
                label = torch.as_tensor(moved, device=self.device)[None, None]
                if label.bool().any() and label_inside_brain(label, brain, LESION_LABELS).item():
                    break
            else:
                return {**outcome, "reason": "label_outside_brain", "label_tries": self.label_tries}
            onehot = fused_label(label, brain)
            fused = fuse_structure_and_label(structure, onehot, self.label_weight)
            images = self.generator.generate(fused)
            target = onehot.argmax(dim=1)
            logits = [self.judge.segment(images[:, i : i + 1], i) for i in range(len(self.sequences))]
            dice = {s: lesion_dice(logits[i].argmax(dim=1), target) for i, s in enumerate(self.sequences)}
            label_mse = float(np.mean([float(soft_label_loss(x, onehot)) for x in logits]))
        outcome.update(
            {
                "label_source": {"patient_id": source["patient_id"], "slice_index": source["slice_index"]},
                "label_attempts": attempts,
                "label_transform": params,
                "dice": dice,
                "label_mse": label_mse,
            }
        )
        if min(dice.values()) < self.dice_threshold:
            return {**outcome, "reason": "dice_filter"}
        self._write_case(f"noise_{index:05d}", outcome, images[0], target[0], brain[0, 0], structure[0, 0],
                         source["window"])  # fmt: skip
        return {**outcome, "accepted": True, "reason": None}

    def _write_case(self, case: str, outcome: dict, images, label, brain, structure, windows) -> None:
        affine = np.eye(4)  # one 2D slice on a 1 mm grid: the papers generate slices
        stage = self.output_dir / STATE_DIRNAME / "work" / case
        if stage.exists():
            shutil.rmtree(stage)
        names: dict[str, str] = {}
        for channel, sequence in enumerate(self.sequences):
            intensity = unit_to_intensity(images[channel].cpu().numpy().astype(np.float64), windows[channel])
            save_nifti(intensity[..., None], affine, stage / f"{sequence}.nii.gz", np.float32)
            names[sequence] = f"{sequence}.nii.gz"
        save_nifti(label.cpu().numpy()[..., None], affine, stage / "label.nii.gz", np.uint8)
        save_nifti(brain.cpu().numpy()[..., None], affine, stage / "brain_mask.nii.gz", np.uint8)
        save_nifti(structure.cpu().numpy()[..., None], affine, stage / "structure.nii.gz", np.uint8)
        names.update({MANIFEST_LABEL_COLUMN: "label.nii.gz", MANIFEST_BRAIN_MASK_COLUMN: "brain_mask.nii.gz"})
        source = outcome["label_source"]["patient_id"]
        provenance = {
            "case": case,
            "source_patient": source,
            "source_split": "chosen label" if self.label_paths else "train",
            "seed": self.seed,
            "candidate": outcome["candidate"],
            "generated_from": "noise: a structural map decoded from N(0, 1), fused with a moved real label",
            "label_source": outcome["label_source"],
            "label_transform": outcome["label_transform"],
            "structure_filter": {"mae": outcome["structure_mae"], "threshold": self.filter.mae_threshold},
            "dice_filter": {"dice": outcome["dice"], "threshold": self.dice_threshold},
            "bundle": self.bundle,
            "medsynth_version": medsynth.__version__,
            "checkpoints": {name: {"sha256": digest} for name, digest in self.checkpoint_digests().items()},
            "files": names,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        save_json(provenance, stage / PROVENANCE_NAME)
        publish_case(self.output_dir, case, stage, names, {SOURCE_COLUMN: source})

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Try candidates until ``num_cases`` are accepted (resumable); returns and writes the summary."""
        from medsynth.utils.io import require_writable_folder

        require_writable_folder(self.output_dir, "output_dir")
        state = self.output_dir / STATE_DIRNAME
        state.mkdir(parents=True, exist_ok=True)
        self._check_run_record(state / "run.json")
        outcomes: list[dict[str, Any]] = []
        accepted = 0
        bar = tqdm(total=self.num_cases, desc="noise cohort", unit="case", disable=not self.progress)
        for index in range(self.max_candidates):
            if accepted >= self.num_cases:
                break
            record = state / f"candidate_{index:05d}.json"
            if record.is_file():
                outcome = json.loads(record.read_text())
            else:
                outcome = self.candidate(index)
                save_json(outcome, record)
            outcomes.append(outcome)
            if outcome.get("accepted"):
                accepted += 1
                bar.update(1)
        bar.close()
        summary = self.summarize(outcomes)
        save_json(summary, self.output_dir / SUMMARY_NAME)
        if accepted:
            self._contact_sheet()
        logger.info(
            "noise cohort: %d case(s) accepted of %d candidate(s); structure filter pass rate %.2f, Dice "
            "filter pass rate %s", accepted, len(outcomes), summary["structure_filter_pass_rate"],
            "n/a" if summary["dice_filter_pass_rate"] is None else f"{summary['dice_filter_pass_rate']:.2f}",
        )  # fmt: skip
        return summary

    def checkpoint_digests(self) -> dict[str, str]:
        """SHA-256 of the two weights files, computed once (every case's provenance holds them)."""
        if self._digests is None:
            self._digests = {p.name: file_digest(p) for p in (self.structure_path, self.generation_path)}
        return self._digests

    def _check_run_record(self, path: Path) -> None:
        """A resumed cohort must come from the same models and settings (else: a new folder)."""
        from medsynth.data.cohort import preprocessing_fingerprint

        record = {
            "checkpoints": self.checkpoint_digests(),
            "judge": self.judge is not self.segmenters,
            "label_paths": self.label_paths,
            "settings": {
                "seed": self.seed,
                "image_size": self.image_size,
                "label_weight": self.label_weight,
                "structure_filter_mae": self.filter.mae_threshold,
                "dice_threshold": self.dice_threshold,
            },  # fmt: skip
            "preprocessing_fingerprint": preprocessing_fingerprint(self.dataset_dir),
        }
        record_or_check_run(path, record, self.output_dir)

    def summarize(self, outcomes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        reasons = Counter(o["reason"] for o in outcomes if not o.get("accepted"))
        reached_dice = [o for o in outcomes if "dice" in o]
        return {
            "candidates": len(outcomes),
            "accepted": sum(1 for o in outcomes if o.get("accepted")),
            "requested": self.num_cases,
            "rejected": {reason: reasons.get(reason, 0) for reason in REASONS},
            "structure_filter_pass_rate": (
                sum(1 for o in outcomes if o["reason"] != "structure_filter") / len(outcomes)
                if outcomes
                else 0.0
            ),
            "dice_filter_pass_rate": (
                sum(1 for o in reached_dice if o.get("accepted")) / len(reached_dice)
                if reached_dice
                else None
            ),
            "mean_label_mse_reaching_the_filter": (
                float(np.mean([o["label_mse"] for o in reached_dice])) if reached_dice else None
            ),
            "mean_dice_reaching_the_filter": (
                {s: float(np.mean([o["dice"][s] for o in reached_dice])) for s in self.sequences}
                if reached_dice
                else None
            ),
            "thresholds": {"structure_mae": self.filter.mae_threshold, "dice": self.dice_threshold},
            "seed": self.seed,
        }

    def _contact_sheet(self) -> None:
        import nibabel as nib

        from medsynth.data.manifest import read_manifest
        from medsynth.visualize.figures import save_grid

        rows = read_manifest(self.output_dir / "manifest.csv").head(6)
        panels, overlays = [], []
        for _, row in rows.iterrows():
            folder = Path(row[MANIFEST_LABEL_COLUMN]).parent
            structure = np.asarray(nib.load(folder / "structure.nii.gz").dataobj)[..., 0]
            label = np.asarray(nib.load(row[MANIFEST_LABEL_COLUMN]).dataobj)[..., 0].astype(np.int64)
            images = [np.asarray(nib.load(row[s]).dataobj)[..., 0] for s in self.sequences]
            panels.append([structure, np.zeros_like(structure), *images])
            overlays.append([None, label] + [None] * len(images))
        save_grid(
            panels,
            self.output_dir / "contact_sheet.png",
            row_titles=list(rows["patient_id"]),
            col_titles=["structure", "label", *self.sequences],
            overlays=overlays,
            overlay_alpha=1.0,
            title="cases generated from noise (structure from N(0, 1), moved real lesion labels)",
            orientation="none",
        )
