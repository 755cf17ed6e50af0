"""Synthesis quality as in Table I of CG-SAMR: lesion pixel accuracy, SSIM and PSNR per sequence.

Images arrive on the networks' scale, [-1, 1] by default, and are mapped linearly onto the 0-255
scale of the papers, ``(x + 1) * 127.5``, then clipped to [0, 255] (what an 8-bit export of the
images would hold; no rounding). Every number is computed on that scale:

* pixel accuracy of a lesion class: the percentage of its pixels whose synthesized intensity lies
  within ``tolerance`` (16, inclusive) of the truth, pooled over all images of the evaluation;
* SSIM and PSNR with a data range of 255, per image and sequence on the whole image, averaged over
  images, as in the papers (MONAI's ``compute_ssim_and_cs`` with ``SSIMMetric``'s defaults, and
  ``PSNRMetric``). On [-1, 1] with data range 2 both would be identical, up to the clipping.
  Identical images give SSIM 1 and PSNR ``inf``. The whole-image figures are dominated by the
  background, so when a brain mask is given three brain-only columns are added:
* ``SSIM brain``: the SSIM map averaged over the brain pixels, per image, averaged over images;
* ``PSNR brain``: the PSNR of the brain pixels' mean squared error, per image, averaged over images;
* ``MAE brain``: the mean absolute error of the brain pixels (grey levels), pooled over all images.

Images without brain pixels do not count towards the brain columns. :meth:`SynthesisMetrics.per_case`
gives the sums behind every number per case and sequence, so any table can be recomputed from them
(:func:`table_from_cases`) or bootstrapped over cases.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from monai.config import NdarrayOrTensor
from monai.metrics import SSIMMetric
from monai.metrics.regression import compute_ssim_and_cs
from monai.utils import convert_to_tensor

from medsynth.constants import CAVITY, CLINICAL_SEQUENCES, EDEMA, NUM_LABELS, SEQUENCE_TITLES, TUMOR

logger = logging.getLogger(__name__)

__all__ = [
    "AVERAGE_ROW",
    "BRAIN_COLUMNS",
    "SYNTHESIS_CLASSES",
    "SynthesisMetrics",
    "table_from_cases",
    "to_uint8_scale",
]

AVERAGE_ROW = "Avg."
SYNTHESIS_CLASSES: dict[str, int] = {"Edema": EDEMA, "Cavity": CAVITY, "Tumor": TUMOR}
DATA_RANGE = 255.0
BRAIN_COLUMNS = ("SSIM brain", "PSNR brain", "MAE brain")
# Float rounding of the [-1, 1] <-> [0, 255] mapping must not flip a difference of exactly
# `tolerance` to "wrong"; 1e-4 grey levels is far below any real difference.
_TOLERANCE_SLACK = 1e-4


def to_uint8_scale(image: torch.Tensor, input_range: Sequence[float] = (-1.0, 1.0)) -> torch.Tensor:
    """Map ``image`` linearly from ``input_range`` onto [0, 255] and clip (float64, not rounded)."""
    low, high = (float(v) for v in input_range)
    if not high > low:
        raise ValueError(f"input_range must be (low, high) with high > low, got {input_range}")
    scaled = (image.to(torch.float64) - low) * (DATA_RANGE / (high - low))
    return scaled.clamp(0.0, DATA_RANGE)


class SynthesisMetrics:
    """Accumulate Table I metrics over batches; :meth:`aggregate` returns one row per sequence + "Avg.".

    Args:
        sequences: sequence keys in channel order of ``pred`` / ``target``.
        tolerance: largest absolute difference (0-255 scale, inclusive) of a correct pixel.
        classes: column name -> label value (or tuple of values, e.g. ``{"Lesion": (2, 3, 4)}`` as in
            the ablation tables) of the classes scored by pixel accuracy; default edema, cavity, tumour.
        input_range: intensity range of the inputs, mapped onto 0-255.
        ssim_win_size: SSIM window (MONAI default 11; images must be at least this large).

    Example::

        metrics = SynthesisMetrics(("t1w", "gd_t1w", "t2w", "flair"))
        for batch in loader:
            pred = net(batch["label"])
            metrics.update(pred, batch["image"], batch["label"], batch["brain_mask"], batch["patient_id"])
        table, cases = metrics.aggregate(), metrics.per_case()
    """

    def __init__(
        self,
        sequences: Sequence[str] = CLINICAL_SEQUENCES,
        tolerance: float = 16.0,
        classes: Mapping[str, int | Sequence[int]] | None = None,
        input_range: Sequence[float] = (-1.0, 1.0),
        ssim_win_size: int = 11,
    ):
        if len(sequences) == 0:
            raise ValueError("at least one sequence is needed")
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        self.sequences = tuple(sequences)
        self.tolerance = float(tolerance)
        classes = SYNTHESIS_CLASSES if classes is None else classes
        if not classes:
            raise ValueError("at least one lesion class is needed")
        self.classes = {
            name: (value,) if isinstance(value, (int, np.integer)) else tuple(value)
            for name, value in classes.items()
        }
        self.input_range = tuple(float(v) for v in input_range)
        self.ssim_win_size = ssim_win_size
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        # Per image (lists of per-batch tensors): [correct, total] pixel counts (B, sequences, classes, 2),
        # SSIM and PSNR (B, sequences), and with a brain mask: brain SSIM and PSNR (B, sequences),
        # summed absolute brain error (B, sequences) and brain pixels (B,).
        self._per_image: dict[str, list[torch.Tensor]] = {
            "counts": [],
            "ssim": [],
            "psnr": [],
            "ssim_brain": [],
            "psnr_brain": [],
            "abs_error_brain": [],
            "brain_pixels": [],
        }
        self._cases: list[str] = []
        self._spatial_shape: tuple[int, ...] | None = None
        self._images = 0
        self._with_brain: bool | None = None
        self._ssim_settings: SSIMMetric | None = None

    def update(
        self,
        pred: NdarrayOrTensor,
        target: NdarrayOrTensor,
        label: NdarrayOrTensor,
        brain_mask: NdarrayOrTensor | None = None,
        case_ids: Sequence[str] | None = None,
    ) -> None:
        """Add a batch.

        Args:
            pred: synthesized images ``(B, len(sequences), *spatial)`` on ``input_range``.
            target: real images of the same shape.
            label: label maps ``(B, 1, *spatial)`` or ``(B, *spatial)`` (0..4).
            brain_mask: brain masks of the label maps' shape (non-zero: brain); adds the brain columns.
                Give it for every batch or for none.
            case_ids: the patient of each image, for :meth:`per_case` (default: one unnamed case).
        """
        pred_t = convert_to_tensor(pred, track_meta=False)
        target_t = convert_to_tensor(target, track_meta=False)
        label_t = self._check_inputs(pred_t, target_t, convert_to_tensor(label, track_meta=False))
        batch = pred_t.shape[0]
        if self._with_brain is None:
            self._with_brain = brain_mask is not None
        elif self._with_brain != (brain_mask is not None):
            raise ValueError("give a brain mask with every batch or with none")
        if case_ids is not None and len(case_ids) != batch:
            raise ValueError(f"{len(case_ids)} case ids for a batch of {batch} images")
        pred_u8 = to_uint8_scale(pred_t, self.input_range)
        target_u8 = to_uint8_scale(target_t, self.input_range)

        correct = (pred_u8 - target_u8).abs() <= self.tolerance + _TOLERANCE_SLACK
        spatial_axes = tuple(range(2, pred_u8.ndim))
        counts = []
        for values in self.classes.values():
            members = torch.tensor(values, dtype=label_t.dtype, device=label_t.device)
            # (B, 1, *spatial), broadcast over sequences
            in_class = torch.isin(label_t, members).to(pred_u8.device)
            hits = (correct & in_class).sum(dim=spatial_axes)
            total = in_class.expand_as(correct).sum(dim=spatial_axes)
            counts.append(torch.stack([hits, total], dim=-1))
        self._per_image["counts"].append(torch.stack(counts, dim=2).cpu())

        if self._ssim_settings is None:  # MONAI's SSIM defaults, for the SSIM map
            self._ssim_settings = SSIMMetric(
                spatial_dims=len(spatial_axes), data_range=DATA_RANGE, win_size=self.ssim_win_size
            )
        settings = self._ssim_settings
        ssim_map, _ = compute_ssim_and_cs(
            pred_u8,
            target_u8,
            settings.spatial_dims,
            settings.kernel_size,
            settings.kernel_sigma,
            DATA_RANGE,
            settings.kernel_type,
            settings.k1,
            settings.k2,
        )  # (B, S, *valid), the valid-convolution region
        ssim_axes = tuple(range(2, ssim_map.ndim))
        self._per_image["ssim"].append(ssim_map.mean(dim=ssim_axes).double().cpu())
        squared_error = (pred_u8 - target_u8) ** 2
        # PSNRMetric's formula, per image and sequence.
        psnr = 20 * np.log10(DATA_RANGE) - 10 * torch.log10(squared_error.mean(dim=spatial_axes))
        self._per_image["psnr"].append(psnr.double().cpu())
        if brain_mask is not None:
            brain = convert_to_tensor(brain_mask, track_meta=False).to(pred_u8.device)
            brain = (brain.reshape(label_t.shape) != 0).to(torch.float64)  # (B, 1, *spatial)
            pixels = brain.sum(dim=spatial_axes)  # (B, 1)
            # The SSIM map covers the valid-convolution region: the brain cropped by half a window.
            valid = ssim_map.shape[2:]
            margin = [(full - size) // 2 for full, size in zip(pred_u8.shape[2:], valid, strict=True)]
            window = tuple(slice(m, m + size) for m, size in zip(margin, valid, strict=True))
            inner = brain[(slice(None), slice(None), *window)]
            inner_pixels = inner.sum(dim=ssim_axes)
            ssim_brain = (ssim_map * inner).sum(dim=ssim_axes) / inner_pixels
            squared = (squared_error * brain).sum(dim=spatial_axes)
            absolute = ((pred_u8 - target_u8).abs() * brain).sum(dim=spatial_axes)
            mse = squared / pixels
            psnr_brain = 20 * np.log10(DATA_RANGE) - 10 * torch.log10(mse)
            no_brain = (pixels == 0).expand_as(mse)
            nan = torch.full_like(mse, float("nan"))
            self._per_image["ssim_brain"].append(
                torch.where(inner_pixels.expand_as(ssim_brain) == 0, nan, ssim_brain).cpu()
            )
            self._per_image["psnr_brain"].append(torch.where(no_brain, nan, psnr_brain).cpu())
            self._per_image["abs_error_brain"].append(absolute.cpu())
            self._per_image["brain_pixels"].append(pixels[:, 0].cpu())
        self._cases.extend([str(c) for c in case_ids] if case_ids is not None else [""] * batch)
        self._images += batch

    def _check_inputs(self, pred: torch.Tensor, target: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(
                f"pred shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}"
            )
        if pred.ndim not in (4, 5):
            raise ValueError(
                "images must be (batch, sequences, *spatial) with 2 or 3 spatial dims, "
                f"got {tuple(pred.shape)}"
            )
        if pred.shape[1] != len(self.sequences):
            raise ValueError(
                f"images have {pred.shape[1]} channels but {len(self.sequences)} sequences {self.sequences}"
            )
        for name, image in (("pred", pred), ("target", target)):
            if not torch.isfinite(image).all():
                raise ValueError(f"{name} contains {int((~torch.isfinite(image)).sum())} NaN/inf values")
        spatial = tuple(pred.shape[2:])
        if self._spatial_shape is not None and len(spatial) != len(self._spatial_shape):
            raise ValueError(f"spatial dims changed between batches: {self._spatial_shape} then {spatial}")
        self._spatial_shape = spatial
        if label.ndim == pred.ndim - 1:
            label = label.unsqueeze(1)
        if tuple(label.shape) != (pred.shape[0], 1, *spatial):
            raise ValueError(
                f"label shape {tuple(label.shape)} does not match images {tuple(pred.shape)} (one channel)"
            )
        if label.numel() and (label.min() < 0 or label.max() >= NUM_LABELS or (label != label.round()).any()):
            raise ValueError(f"label map holds values outside the labels 0..{NUM_LABELS - 1}")
        return label

    def _stacked(self, key: str) -> torch.Tensor:
        return torch.cat(self._per_image[key]).to(torch.float64)

    def aggregate(self) -> pd.DataFrame:
        """Table I: rows sequences + "Avg.", columns pixel accuracy (%) per class, SSIM, PSNR (dB) and,
        with brain masks, SSIM brain, PSNR brain (dB) and MAE brain (grey levels).

        A class with no pixel in the whole evaluation gives NaN (not 0) in its column. The average
        row is the mean over sequences. ``df.attrs`` records the settings and notes.
        """
        if self._images == 0:
            raise ValueError("no batch was added; call update() first")
        return table_from_cases(self.per_case(), self.sequences, list(self.classes), self._table_attrs())

    def _table_attrs(self) -> dict:
        return {
            "tolerance": self.tolerance,
            "scale": "0-255 from (x - low) * 255 / (high - low), clipped",
            "input_range": self.input_range,
            "data_range": DATA_RANGE,
            "images": self._images,
        }

    def per_case(self) -> pd.DataFrame:
        """One row per case and sequence with the sums behind every number of :meth:`aggregate`:
        ``slices``, ``ssim_sum``, ``psnr_sum``, ``<class>_correct`` / ``<class>_pixels`` and, with brain
        masks, ``brain_slices``, ``ssim_brain_sum``, ``psnr_brain_sum``, ``brain_pixels``,
        ``abs_error_brain_sum``; plus the case's own means (``ssim``, ``psnr``, ``mae_brain``, ...)."""
        if self._images == 0:
            raise ValueError("no batch was added; call update() first")
        counts = self._stacked("counts")  # (I, S, K, 2)
        ssim, psnr = self._stacked("ssim"), self._stacked("psnr")
        cases = np.asarray(self._cases)
        rows = []
        for case in dict.fromkeys(self._cases):
            images = torch.as_tensor(np.flatnonzero(cases == case))
            for s, sequence in enumerate(self.sequences):
                row = {"case": case, "sequence": sequence, "slices": len(images)}
                row["ssim_sum"] = float(ssim[images, s].sum())
                row["psnr_sum"] = float(psnr[images, s].sum())
                for k, name in enumerate(self.classes):
                    row[f"{name}_correct"] = int(counts[images, s, k, 0].sum())
                    row[f"{name}_pixels"] = int(counts[images, s, k, 1].sum())
                if self._with_brain:
                    ssim_brain = self._stacked("ssim_brain")[images, s]
                    psnr_brain = self._stacked("psnr_brain")[images, s]
                    with_brain = ~torch.isnan(ssim_brain)
                    row["brain_slices"] = int(with_brain.sum())
                    row["ssim_brain_sum"] = float(ssim_brain[with_brain].sum())
                    row["psnr_brain_sum"] = float(psnr_brain[with_brain].sum())
                    row["brain_pixels"] = int(self._stacked("brain_pixels")[images].sum())
                    row["abs_error_brain_sum"] = float(self._stacked("abs_error_brain")[images, s].sum())
                rows.append(row)
        table = pd.DataFrame(rows)
        table["ssim"] = table["ssim_sum"] / table["slices"]
        table["psnr"] = table["psnr_sum"] / table["slices"]
        if self._with_brain:
            table["ssim_brain"] = table["ssim_brain_sum"] / table["brain_slices"]
            table["psnr_brain"] = table["psnr_brain_sum"] / table["brain_slices"]
            table["mae_brain"] = table["abs_error_brain_sum"] / table["brain_pixels"]
        return table


def table_from_cases(
    cases: pd.DataFrame, sequences: Sequence[str], classes: Sequence[str], attrs: Mapping | None = None
) -> pd.DataFrame:
    """Table I from per-case rows (:meth:`SynthesisMetrics.per_case`, or a subset or resample of them).

    Pixel accuracy pools the pixels, SSIM / PSNR average the images, MAE brain pools the brain
    pixels, exactly as :meth:`SynthesisMetrics.aggregate`.
    """
    totals = cases.groupby("sequence", sort=False).sum(numeric_only=True)
    missing = [s for s in sequences if s not in totals.index]
    if missing:
        raise ValueError(f"no rows for sequence(s) {missing}")
    totals = totals.loc[list(sequences)]
    table = pd.DataFrame(index=[SEQUENCE_TITLES.get(s, s) for s in sequences])
    notes = []
    for name in classes:
        pixels = totals[f"{name}_pixels"].to_numpy(dtype=float)
        correct = totals[f"{name}_correct"].to_numpy(dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            table[name] = np.where(pixels > 0, 100.0 * correct / np.maximum(pixels, 1), np.nan)
        if not pixels.any():
            notes.append(f"no {name.lower()} pixels in the evaluation: its accuracy is NaN")
    table["SSIM"] = (totals["ssim_sum"] / totals["slices"]).to_numpy()
    table["PSNR"] = (totals["psnr_sum"] / totals["slices"]).to_numpy()
    if "brain_pixels" in totals.columns:
        table["SSIM brain"] = (totals["ssim_brain_sum"] / totals["brain_slices"]).to_numpy()
        table["PSNR brain"] = (totals["psnr_brain_sum"] / totals["brain_slices"]).to_numpy()
        table["MAE brain"] = (totals["abs_error_brain_sum"] / totals["brain_pixels"]).to_numpy()
    table.loc[AVERAGE_ROW] = table.mean(axis=0, skipna=True)
    table.index.name = "Sequence"
    for note in notes:
        logger.warning(note)
    table.attrs.update({**(attrs or {}), "cases": int(cases["case"].nunique()), "notes": notes})
    return table
