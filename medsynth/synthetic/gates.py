"""Quality gates on a synthesised case: is the lesion found again, is it a copy, are the values sane?

Every gate takes the case as the synthesis network sees it (``images`` ``(N, S, S, D)`` in [-1, 1],
the ``label`` map ``(S, S, D)`` and the ``brain`` ``(S, S, D)`` on the network's grid) and returns
a :class:`GateResult`: passed or not, a score, and a sentence.

* :class:`SegmentationConsistencyGate`: a lesion segmenter trained on real training data segments
  the synthetic case inside its brain; it passes when the whole-lesion Dice against the input mask
  reaches the threshold. Qu et al. keep Dice >= 0.95 with a fully trained segmenter; with
  ``"auto"`` the threshold is a fraction of the Dice the segmenter reaches on the real training
  patients (:meth:`SegmentationConsistencyGate.calibrate`), which suits a segmenter of any quality.
* :class:`MemorisationGate`: the distance of every synthetic brain slice to its nearest real
  training slice (:class:`TrainingSliceBank`: mean absolute difference inside the brain, on the
  [-1, 1] scale); a case with a slice closer than the threshold is a near-copy, refused or flagged.
* :class:`IntensityGate`: no NaN/inf, and intensities (after mapping back) inside the training
  cohort's windows widened by a margin.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from medsynth.constants import LESION_LABELS

logger = logging.getLogger(__name__)

__all__ = [
    "GateResult",
    "IntensityGate",
    "MemorisationGate",
    "SegmentationConsistencyGate",
    "TrainingSliceBank",
    "lesion_dice",
]


@dataclass
class GateResult:
    """What a gate found: ``passed``, its ``score`` (the gate's measure), ``flagged`` when the case is
    kept but marked, a ``detail`` sentence and further ``measures``."""

    gate: str
    passed: bool
    score: float
    detail: str = ""
    flagged: bool = False
    measures: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "score": self.score,
            "flagged": self.flagged,
            "detail": self.detail,
            **self.measures,
        }


def lesion_dice(prediction: torch.Tensor, label: torch.Tensor) -> float:
    """Whole-lesion (labels 2-4) Dice of two label maps; 1.0 when neither has a lesion."""
    lesion_values = torch.tensor(LESION_LABELS, device=label.device)
    predicted, truth = torch.isin(prediction, lesion_values), torch.isin(label, lesion_values)
    total = int(predicted.sum() + truth.sum())
    return 1.0 if total == 0 else 2.0 * int((predicted & truth).sum()) / total


class SegmentationConsistencyGate:
    """Segment the synthetic images slice by slice and compare the lesion with the input mask.

    Args:
        segmenter: 2D network ``(B, N, S, S)`` images in [-1, 1] -> ``(B, 5, S, S)`` label logits
            (the lesion-segmentation bundle's model, or the synthesis model's jointly trained U-Net).
        threshold: smallest whole-lesion Dice that passes, or ``"auto"``: ``auto_fraction`` of the
            median Dice on real training patients (set by :meth:`calibrate`).
        batch_size: slices per forward pass.
        auto_fraction: see ``threshold``.
    """

    name = "segmentation"

    def __init__(
        self,
        segmenter: nn.Module,
        threshold: float | str = 0.95,
        batch_size: int = 16,
        auto_fraction: float = 0.9,
    ) -> None:
        self.segmenter = segmenter
        if threshold != "auto" and not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"segmentation threshold must be 'auto' or in [0, 1], got {threshold!r}")
        self.threshold: float | None = None if threshold == "auto" else float(threshold)
        self.batch_size = int(batch_size)
        self.auto_fraction = float(auto_fraction)
        self.real_dice: list[float] = []

    def calibrate(self, cases: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Measure the segmenter on real ``(images, label)`` cases; sets an ``"auto"`` threshold.
        Returns the median real Dice (kept in ``real_dice``, reported)."""
        self.real_dice = [self.dice(images, label, label > 0) for images, label in cases]
        median = float(np.median(self.real_dice))
        if self.threshold is None:
            self.threshold = self.auto_fraction * median
            logger.info(
                "segmentation gate: median Dice %.3f on the real training patients, threshold %.3f",
                median,
                self.threshold,
            )
        return median

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """Label map ``(S, S, D)`` of ``images`` ``(N, S, S, D)``."""
        device = next(self.segmenter.parameters()).device
        self.segmenter.eval()
        slices = images.permute(3, 0, 1, 2).float()
        labels = []
        with torch.inference_mode():
            for start in range(0, slices.shape[0], self.batch_size):
                logits = self.segmenter(slices[start : start + self.batch_size].to(device))
                labels.append(logits.argmax(dim=1).cpu())
        return torch.cat(labels).permute(1, 2, 0)

    def dice(self, images: torch.Tensor, label: torch.Tensor, brain: torch.Tensor) -> float:
        """Whole-lesion Dice of the segmentation of ``images`` inside ``brain`` against ``label``."""
        prediction = torch.where(brain.cpu() > 0, self.segment(images), 0)
        return lesion_dice(prediction, label.cpu().long())

    def __call__(self, images: torch.Tensor, label: torch.Tensor, brain: torch.Tensor) -> GateResult:
        if self.threshold is None:
            raise RuntimeError("the 'auto' segmentation threshold needs calibrate() on real cases first")
        dice = self.dice(images, label, brain)
        passed = dice >= self.threshold
        return GateResult(
            self.name,
            passed,
            dice,
            f"whole-lesion Dice {dice:.3f} of the segmenter against the input mask "
            f"({'>=' if passed else '<'} {self.threshold:.3f})",
            measures={"threshold": self.threshold},
        )


def _pooled(slices: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, C, S, S)`` -> ``(B, C, size, size)`` by area averaging (a cheap, faithful summary)."""
    return slices if slices.shape[-1] == size else F.adaptive_avg_pool2d(slices.float(), size)


class TrainingSliceBank:
    """The real training slices that synthetic slices are compared with, downsampled to ``size``.

    Args:
        images: ``(M, N, size, size)`` real slices in [-1, 1].
        brains: ``(M, 1, size, size)`` their brain masks (fractions after pooling).
        patients: the patient of each slice.
    """

    def __init__(self, images: torch.Tensor, brains: torch.Tensor, patients: Sequence[str]) -> None:
        if images.shape[0] != brains.shape[0] or images.shape[0] != len(patients):
            raise ValueError("images, brains and patients must have one entry per slice")
        self.images, self.brains, self.patients = images.float(), brains.float(), list(patients)

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    @classmethod
    def from_volumes(
        cls, volumes: Sequence[tuple[str, torch.Tensor, torch.Tensor]], size: int = 64
    ) -> TrainingSliceBank:
        """The brain slices of ``(patient, images (N, S, S, D), brain (S, S, D))`` volumes."""
        images, brains, patients = [], [], []
        for patient, image, brain in volumes:
            slices = image.permute(3, 0, 1, 2).float()  # (D, N, S, S)
            masks = brain.permute(2, 0, 1)[:, None].float()
            keep = masks.flatten(1).sum(dim=1) > 0
            images.append(_pooled(slices[keep], size))
            brains.append(_pooled(masks[keep], size))
            patients += [str(patient)] * int(keep.sum())
        if not patients:
            raise ValueError("the memorisation bank needs training slices with brain; there are none")
        return cls(torch.cat(images), torch.cat(brains), patients)

    def nearest(
        self, images: torch.Tensor, brains: torch.Tensor, chunk: int = 64, exclude: str | None = None
    ) -> tuple[torch.Tensor, list]:
        """For each slice of ``images`` ``(B, N, S, S)`` with ``brains`` ``(B, 1, S, S)``: the mean absolute
        difference inside its brain to the nearest bank slice (not of patient ``exclude``), and that
        slice's patient."""
        images, brains = _pooled(images, self.size), _pooled(brains.float(), self.size)
        excluded = torch.tensor([p == exclude for p in self.patients])
        weight = brains / brains.flatten(1).sum(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)
        best = torch.full((images.shape[0],), float("inf"))
        best_index = torch.zeros(images.shape[0], dtype=torch.long)
        for start in range(0, self.images.shape[0], chunk):
            bank = self.images[start : start + chunk]
            # (B, 1, ...) - (1, M, ...): mean over channels of |a - b|, weighted by the synthetic brain.
            difference = (images[:, None] - bank[None]).abs().mean(dim=2)  # (B, M, s, s)
            distance = (difference * weight).flatten(2).sum(dim=2)
            distance[:, excluded[start : start + chunk]] = float("inf")
            value, index = distance.min(dim=1)
            better = value < best
            best[better], best_index[better] = value[better], index[better] + start
        return best, [self.patients[i] for i in best_index.tolist()]

    def between_patients(self) -> torch.Tensor:
        """For every bank slice, the distance to the nearest slice of another patient: how far real
        patients are from each other, the scale against which synthetic distances are read."""
        if len(set(self.patients)) < 2:
            return torch.empty(0)
        distances = []
        for patient in dict.fromkeys(self.patients):
            own = torch.tensor([p == patient for p in self.patients])
            distances.append(self.nearest(self.images[own], self.brains[own], exclude=patient)[0])
        return torch.cat(distances)


class MemorisationGate:
    """Refuse (or flag) a synthetic case one of whose compared brain slices nearly copies a real
    training slice.

    The synthetic cohort compares the slices whose label map the manipulation changed: a slice whose
    mask is still the source patient's own is rendered from that patient's anatomy and is expected
    to resemble it (on BraTS, a model trained on 6 patients reproduces them within 0.002), while a
    changed slice that comes out as a real slice means the model ignored the new mask.

    Args:
        bank: the real training slices.
        threshold: a slice closer than this (mean absolute difference in the brain, [-1, 1] scale) is
            a near-copy.
        action: ``"refuse"`` fails the case; ``"flag"`` keeps it, marked.
    """

    name = "memorisation"

    def __init__(self, bank: TrainingSliceBank, threshold: float = 0.03, action: str = "refuse") -> None:
        if action not in ("refuse", "flag"):
            raise ValueError(f"memorisation action must be 'refuse' or 'flag', got {action!r}")
        self.bank, self.threshold, self.action = bank, float(threshold), action

    def __call__(
        self,
        images: torch.Tensor,
        label: torch.Tensor,
        brain: torch.Tensor,
        compared_slices: torch.Tensor | None = None,
    ) -> GateResult:
        """``images`` ``(N, S, S, D)``, ``brain`` ``(S, S, D)``; ``compared_slices`` ``(D,)`` bool
        chooses the axial slices to compare (default: every brain slice)."""
        slices = images.permute(3, 0, 1, 2)
        brains = brain.permute(2, 0, 1)[:, None].float()
        has_brain = brains.flatten(1).sum(dim=1) > 0
        if not has_brain.any():
            return GateResult(self.name, False, float("nan"), "the case has no brain slice")
        keep = has_brain if compared_slices is None else has_brain & compared_slices.to(has_brain.device)
        if not keep.any():
            return GateResult(self.name, True, float("nan"), "no changed brain slice to compare")
        distances, patients = self.bank.nearest(slices[keep], brains[keep])
        closest = int(distances.argmin())
        score = float(distances[closest])
        near_copy = score < self.threshold
        detail = (
            f"nearest real training slice at {score:.4f} (patient {patients[closest]}); "
            f"near-copy below {self.threshold:.4f}"
        )
        return GateResult(
            self.name,
            passed=not (near_copy and self.action == "refuse"),
            score=score,
            detail=detail,
            flagged=near_copy,
            measures={
                "slice_distances": [round(float(v), 5) for v in distances],
                "nearest_patient": patients[closest],
            },
        )


class IntensityGate:
    """No NaN/inf, and the case's intensities inside the training windows widened by ``margin``.

    Args:
        low, high: per-sequence bounds (intensity units) of the training cohort's windows.
        margin: widening, as a fraction of each window's width.
        max_outside_fraction: largest fraction of brain voxels allowed outside the widened bounds.
    """

    name = "intensity"

    def __init__(
        self,
        low: Sequence[float],
        high: Sequence[float],
        margin: float = 0.1,
        max_outside_fraction: float = 0.001,
    ) -> None:
        self.low, self.high = (
            torch.as_tensor(low, dtype=torch.float32),
            torch.as_tensor(high, dtype=torch.float32),
        )
        self.margin, self.max_outside_fraction = float(margin), float(max_outside_fraction)

    @classmethod
    def from_windows(cls, windows: torch.Tensor, **kwargs: Any) -> IntensityGate:
        """Bounds from the training patients' windows ``(P, N, 2)``: the lowest lower and highest upper."""
        windows = torch.as_tensor(windows, dtype=torch.float32)
        return cls(windows[..., 0].amin(dim=0).tolist(), windows[..., 1].amax(dim=0).tolist(), **kwargs)

    def __call__(self, intensities: torch.Tensor, label: torch.Tensor, brain: torch.Tensor) -> GateResult:
        """``intensities`` ``(N, ...)`` in intensity units, ``brain`` on the same grid."""
        finite = torch.isfinite(intensities)
        bad = int((~finite).sum())
        if bad:
            return GateResult(self.name, False, float(bad), f"{bad} NaN/inf voxel(s)")
        width = (self.high - self.low) * self.margin
        shape = (-1,) + (1,) * (intensities.dim() - 1)
        low, high = (self.low - width).view(shape), (self.high + width).view(shape)
        inside_brain = (brain > 0).expand_as(intensities)
        outside = ((intensities < low) | (intensities > high)) & inside_brain
        fraction = float(outside.sum()) / max(int(inside_brain.sum()), 1)
        passed = fraction <= self.max_outside_fraction
        return GateResult(
            self.name,
            passed,
            fraction,
            f"{fraction:.2%} of brain voxels outside the training windows (+{self.margin:.0%}); "
            f"at most {self.max_outside_fraction:.2%}",
        )
