"""Synthesis quality as in Table I of CG-SAMR: lesion pixel accuracy, SSIM and PSNR per sequence.

Images arrive on the networks' scale, [-1, 1] by default, and are mapped linearly onto the 0-255
scale of the papers, ``(x + 1) * 127.5``, then clipped to [0, 255] (what an 8-bit export of the
images would hold; no rounding). Every number is computed on that scale:

* pixel accuracy of a lesion class: the percentage of its pixels whose synthesized intensity lies
  within ``tolerance`` (16, inclusive) of the truth, pooled over all images of the evaluation;
* SSIM (MONAI ``SSIMMetric``) and PSNR (MONAI ``PSNRMetric``) with a data range of 255, per image
  and sequence on the whole image, averaged over images. (On [-1, 1] with data range 2 both would
  be identical, up to the clipping.) Identical images give SSIM 1 and PSNR ``inf``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from monai.config import NdarrayOrTensor
from monai.metrics import Cumulative, PSNRMetric, SSIMMetric
from monai.utils import convert_to_tensor

from medsynth.constants import CAVITY, CLINICAL_SEQUENCES, EDEMA, NUM_LABELS, SEQUENCE_TITLES, TUMOR

logger = logging.getLogger(__name__)

__all__ = ["AVERAGE_ROW", "SYNTHESIS_CLASSES", "SynthesisMetrics", "to_uint8_scale"]

AVERAGE_ROW = "Avg."
SYNTHESIS_CLASSES: dict[str, int] = {"Edema": EDEMA, "Cavity": CAVITY, "Tumor": TUMOR}
DATA_RANGE = 255.0
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
            metrics.update(net(batch["label"]), batch["image"], batch["label"])
        table = metrics.aggregate()
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
        # Per batch: (B, sequences, classes, 2) with [correct, total] pixel counts.
        self._counts = Cumulative()
        self._ssim: list[SSIMMetric] = []
        self._psnr = [PSNRMetric(max_val=DATA_RANGE, reduction="mean") for _ in self.sequences]
        self._spatial_shape: tuple[int, ...] | None = None
        self._images = 0

    def update(self, pred: NdarrayOrTensor, target: NdarrayOrTensor, label: NdarrayOrTensor) -> None:
        """Add a batch.

        Args:
            pred: synthesized images ``(B, len(sequences), *spatial)`` on ``input_range``.
            target: real images of the same shape.
            label: label maps ``(B, 1, *spatial)`` or ``(B, *spatial)`` (0..4).
        """
        pred_t = convert_to_tensor(pred, track_meta=False)
        target_t = convert_to_tensor(target, track_meta=False)
        label_t = self._check_inputs(pred_t, target_t, convert_to_tensor(label, track_meta=False))
        pred_u8 = to_uint8_scale(pred_t, self.input_range)
        target_u8 = to_uint8_scale(target_t, self.input_range)

        correct = (pred_u8 - target_u8).abs() <= self.tolerance + _TOLERANCE_SLACK
        spatial_axes = tuple(range(2, pred_u8.ndim))
        counts = []
        for values in self.classes.values():
            members = torch.tensor(values, dtype=label_t.dtype, device=label_t.device)
            in_class = torch.isin(label_t, members).to(
                pred_u8.device
            )  # (B, 1, *spatial), broadcast over sequences
            hits = (correct & in_class).sum(dim=spatial_axes)
            total = in_class.expand_as(correct).sum(dim=spatial_axes)
            counts.append(torch.stack([hits, total], dim=-1))
        self._counts.extend(torch.stack(counts, dim=2).cpu())

        if not self._ssim:
            self._ssim = [
                SSIMMetric(spatial_dims=len(spatial_axes), data_range=DATA_RANGE, win_size=self.ssim_win_size)
                for _ in self.sequences
            ]
        for channel, (ssim, psnr) in enumerate(zip(self._ssim, self._psnr, strict=True)):
            pred_c = pred_u8[:, channel : channel + 1]
            target_c = target_u8[:, channel : channel + 1]
            ssim(pred_c, target_c)
            psnr(pred_c, target_c)
        self._images += pred_u8.shape[0]

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

    def aggregate(self) -> pd.DataFrame:
        """Table I: rows sequences + "Avg.", columns pixel accuracy (%) per class, SSIM, PSNR (dB).

        A class with no pixel in the whole evaluation gives NaN (not 0) in its column. The average
        row is the mean over sequences. ``df.attrs`` records the settings and notes.
        """
        if self._images == 0:
            raise ValueError("no batch was added; call update() first")
        counts = self._counts.get_buffer().sum(dim=0).to(torch.float64)  # (sequences, classes, 2)
        hits, totals = counts[..., 0], counts[..., 1]
        accuracy = torch.where(
            totals > 0, 100.0 * hits / totals.clamp(min=1), torch.full_like(hits, float("nan"))
        )
        table = pd.DataFrame(
            accuracy.numpy(),
            columns=list(self.classes),
            index=[SEQUENCE_TITLES.get(s, s) for s in self.sequences],
        )
        table["SSIM"] = [float(m.aggregate()) for m in self._ssim]
        table["PSNR"] = [float(m.aggregate()) for m in self._psnr]
        table.loc[AVERAGE_ROW] = table.mean(axis=0, skipna=True)
        table.index.name = "Sequence"
        absent = [name for name, total in zip(self.classes, totals[0].tolist(), strict=True) if total == 0]
        notes = [f"no {name.lower()} pixels in the evaluation: its accuracy is NaN" for name in absent]
        for note in notes:
            logger.warning(note)
        table.attrs.update(
            {
                "tolerance": self.tolerance,
                "scale": "0-255 from (x - low) * 255 / (high - low), clipped",
                "input_range": self.input_range,
                "data_range": DATA_RANGE,
                "images": self._images,
                "notes": notes,
            }
        )
        return table
