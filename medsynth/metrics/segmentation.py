"""Segmentation evaluation of the augmentation experiments (SAMR Table 2, CG-SAMR Table II).

Per class and per case: Dice (MONAI ``DiceMetric``), 95th-percentile Hausdorff distance
(``HausdorffDistanceMetric(percentile=95)``, in voxels unless ``spacing`` is given), sensitivity and
specificity (``ConfusionMatrixMetric``). The table reports the mean over cases.

Empty classes, handled the same way for every metric:

* class absent from the ground truth of a case: Dice, HD95 and sensitivity of that case are NaN
  (undefined) and left out of the mean; specificity is still defined and counted;
* class present in the truth but not predicted: Dice 0, sensitivity 0, HD95 ``empty_prediction_hd95``
  (NaN by default: the distance to an empty surface is undefined; BraTS uses the image diagonal);
* a class absent from every case: the whole row is NaN.

The ``Cases`` column counts the cases whose truth contains the class, and ``df.attrs["notes"]``
lists every NaN-producing situation.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from monai.config import NdarrayOrTensor
from monai.metrics import ConfusionMatrixMetric, Cumulative, DiceMetric, HausdorffDistanceMetric, compute_dice
from monai.utils import convert_to_tensor

from medsynth.constants import CAVITY, EDEMA, TUMOR

logger = logging.getLogger(__name__)

__all__ = ["SEGMENTATION_CLASSES", "SEGMENTATION_COLUMNS", "SegmentationMetrics", "binary_dice"]

SEGMENTATION_CLASSES: dict[str, int] = {"edema": EDEMA, "cavity": CAVITY, "tumor": TUMOR}
SEGMENTATION_COLUMNS: tuple[str, ...] = ("Dice", "HD95", "Sensitivity", "Specificity")


def binary_dice(prediction: NdarrayOrTensor, truth: NdarrayOrTensor) -> float:
    """Dice of two masks of the same shape (non-zero = foreground), with MONAI's ``compute_dice``;
    1.0 when both are empty. For single comparisons such as a brain mask against a reference."""
    prediction, truth = convert_to_tensor(prediction) != 0, convert_to_tensor(truth) != 0
    if prediction.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {tuple(prediction.shape)} vs {tuple(truth.shape)}")
    return float(compute_dice(prediction[None, None].float(), truth[None, None].float(), ignore_empty=False))


class SegmentationMetrics:
    """Accumulate per-class Dice, HD95, sensitivity and specificity over batches.

    Args:
        classes: class name -> label value, or a tuple of values for a region (e.g. the whole
            lesion ``(2, 3, 4)``).
        spacing: voxel spacing for HD95 in mm (one float, or one per spatial dim); voxels if ``None``.
        empty_prediction_hd95: HD95 of a case whose truth has the class but the prediction not.
    """

    def __init__(
        self,
        classes: Mapping[str, int | Sequence[int]] | None = None,
        spacing: float | Sequence[float] | None = None,
        empty_prediction_hd95: float = float("nan"),
    ):
        classes = SEGMENTATION_CLASSES if classes is None else classes
        if not classes:
            raise ValueError("at least one class is needed")
        self.classes = {
            name: (value,) if isinstance(value, (int, np.integer)) else tuple(value)
            for name, value in classes.items()
        }
        self.spacing = spacing
        self.empty_prediction_hd95 = float(empty_prediction_hd95)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self._dice = DiceMetric(include_background=True, reduction="none", ignore_empty=True)
        self._hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
        self._confusion = ConfusionMatrixMetric(
            include_background=True,
            metric_name=("sensitivity", "specificity"),
            compute_sample=True,
            reduction="none",
        )
        self._presence = Cumulative()  # per case: (classes, 2) = [in truth, in prediction]

    def _class_channels(self, seg: NdarrayOrTensor, name: str) -> torch.Tensor:
        """(B, 1, *spatial) label maps or (B, C, *spatial) one-hot/probabilities -> (B, classes, *spatial)."""
        tensor = convert_to_tensor(seg, track_meta=False)
        if tensor.ndim not in (4, 5):
            raise ValueError(
                f"{name} must be (batch, channel, *spatial) with 2 or 3 spatial dims, "
                f"got {tuple(tensor.shape)}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{name} contains NaN/inf values")
        if tensor.shape[1] == 1:
            labels = tensor[:, :1]
        else:
            highest = max(max(values) for values in self.classes.values())
            if tensor.shape[1] <= highest:
                raise ValueError(
                    f"{name} has {tensor.shape[1]} one-hot channels, too few for label value {highest}"
                )
            labels = tensor.argmax(dim=1, keepdim=True)
        channels = [
            torch.isin(labels, torch.tensor(values, dtype=labels.dtype, device=labels.device))
            for values in self.classes.values()
        ]
        return torch.cat(channels, dim=1).to(torch.float32)

    def update(self, pred: NdarrayOrTensor, target: NdarrayOrTensor) -> None:
        """Add a batch of predicted and true segmentations (label maps or one-hot, channel first)."""
        pred_c = self._class_channels(pred, "prediction")
        target_c = self._class_channels(target, "ground truth")
        if pred_c.shape != target_c.shape:
            raise ValueError(
                f"prediction shape {tuple(pred_c.shape)} differs from ground truth {tuple(target_c.shape)}"
            )
        spatial_axes = tuple(range(2, pred_c.ndim))
        in_truth = target_c.sum(dim=spatial_axes) > 0
        in_pred = pred_c.sum(dim=spatial_axes) > 0
        self._presence.extend(torch.stack([in_truth, in_pred], dim=-1).cpu())
        self._dice(pred_c, target_c)
        self._confusion(pred_c, target_c)
        with warnings.catch_warnings():
            # Empty classes are handled and reported by this class; MONAI's per-call warnings are noise.
            warnings.filterwarnings("ignore", message=".*is all 0.*")
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
            self._hd95(pred_c, target_c, spacing=self.spacing)

    def per_case(self) -> pd.DataFrame:
        """One row per (case, class) with the four metrics and the presence flags."""
        presence = self._presence.get_buffer()
        if presence is None or len(presence) == 0:
            raise ValueError("no batch was added; call update() first")
        in_truth, in_pred = presence[..., 0].bool(), presence[..., 1].bool()
        dice = self._dice.aggregate().cpu().to(torch.float64)
        hd95 = self._hd95.aggregate().cpu().to(torch.float64)
        sensitivity, specificity = (m.cpu().to(torch.float64) for m in self._confusion.aggregate())
        # MONAI gives NaN for an empty prediction; make that case explicit and consistent.
        hd95 = torch.where(in_truth & ~in_pred, torch.full_like(hd95, self.empty_prediction_hd95), hd95)
        hd95 = torch.where(~in_truth, torch.full_like(hd95, float("nan")), hd95)
        dice = torch.where(~in_truth, torch.full_like(dice, float("nan")), dice)
        sensitivity = torch.where(~in_truth, torch.full_like(sensitivity, float("nan")), sensitivity)
        rows = []
        for case in range(presence.shape[0]):
            for k, name in enumerate(self.classes):
                rows.append(
                    {
                        "case": case,
                        "class": name,
                        "Dice": float(dice[case, k]),
                        "HD95": float(hd95[case, k]),
                        "Sensitivity": float(sensitivity[case, k]),
                        "Specificity": float(specificity[case, k]),
                        "in_truth": bool(in_truth[case, k]),
                        "in_prediction": bool(in_pred[case, k]),
                    }
                )
        return pd.DataFrame(rows)

    def aggregate(self) -> pd.DataFrame:
        """Mean over cases per class: columns Dice, HD95, Sensitivity, Specificity, Cases."""
        cases = self.per_case()
        notes = []
        for name in self.classes:
            rows = cases[cases["class"] == name]
            absent = int((~rows["in_truth"]).sum())
            missed = int((rows["in_truth"] & ~rows["in_prediction"]).sum())
            if absent == len(rows):
                notes.append(f"{name}: absent from the ground truth of every case, Dice/HD95/sensitivity NaN")
            elif absent:
                notes.append(
                    f"{name}: absent from the ground truth of {absent} case(s), "
                    "their Dice/HD95/sensitivity are NaN and left out"
                )
            if missed:
                notes.append(
                    f"{name}: missed entirely in {missed} case(s): Dice 0, HD95 {self.empty_prediction_hd95}"
                )
        table = cases.groupby("class", sort=False)[list(SEGMENTATION_COLUMNS)].mean()
        table["Cases"] = cases.groupby("class", sort=False)["in_truth"].sum().astype(int)
        table.index.name = "Class"
        for note in notes:
            logger.info(note)
        table.attrs.update({"hd95_unit": "voxels" if self.spacing is None else "mm", "notes": notes})
        return table
