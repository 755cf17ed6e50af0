"""Confidence-map loss L_CM of CG-SAMR (eq. 1) with its lambda_cm switch (Sec. IV-B)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["ConfidenceMapLoss", "half_scale"]


def half_scale(images: torch.Tensor) -> torch.Tensor:
    """Real images at 0.5 scale: 2x2 average pooling (each output pixel is the mean of its 4 pixels)."""
    if images.dim() != 4 or images.shape[2] % 2 or images.shape[3] % 2:
        raise ValueError(f"expected (B, C, H, W) images with even H and W; got {list(images.shape)}")
    return F.avg_pool2d(images, kernel_size=2)


class ConfidenceMapLoss(nn.Module):
    """``weight * [mean(c * |y05_hat - y05|) - lambda_cm * mean(log c)]``.

    ``y05_hat`` is the generator's intermediate result and ``c`` its confidence map, both at 0.5
    scale; ``y05`` is the real images at 0.5 scale (:func:`half_scale`). Eq. 1 writes a sum over
    pixels of ``log c``; means are used for both terms so that their balance and the loss
    magnitude do not depend on the image size or the batch (the first term of eq. 1 is a mean in
    practice as well). ``log`` is taken of ``c`` clamped to ``eps``, so a saturated sigmoid cannot
    give ``-inf``.

    ``lambda_cm`` starts at ``initial_regularizer`` (0.1) and, once the mean confidence of a
    training batch exceeds ``switch_threshold`` (0.7), becomes ``final_regularizer`` (0.03) for
    all later calls (the switch is one-way). Only calls in training mode (``loss.train()``, the
    default) can trigger it, so validation never changes the schedule. The state is the buffer
    ``switched`` and therefore part of ``state_dict()``: save and restore the loss with the
    trainer's checkpoint to resume with the right ``lambda_cm``. Under ``torch.distributed`` the
    mean confidence is averaged over the processes so that all switch at the same step.
    The papers' weight is ``lambda3 = 1``.

    Args:
        initial_regularizer: ``lambda_cm`` before the switch.
        final_regularizer: ``lambda_cm`` after the switch.
        switch_threshold: mean confidence above which ``lambda_cm`` switches.
        eps: lower clamp of ``c`` inside the logarithm.
        weight: factor applied to the loss.
    """

    def __init__(
        self,
        initial_regularizer: float = 0.1,
        final_regularizer: float = 0.03,
        switch_threshold: float = 0.7,
        eps: float = 1e-6,
        weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.initial_regularizer = initial_regularizer
        self.final_regularizer = final_regularizer
        self.switch_threshold = switch_threshold
        self.eps = eps
        self.weight = weight
        self.register_buffer("switched", torch.tensor(False))

    @property
    def regularizer(self) -> float:
        """The current ``lambda_cm``."""
        return self.final_regularizer if bool(self.switched) else self.initial_regularizer

    def forward(
        self, intermediate: torch.Tensor, confidence: torch.Tensor, real_images: torch.Tensor
    ) -> torch.Tensor:
        """Compute L_CM with the current ``lambda_cm``, then update the switch (training mode only).

        Args:
            intermediate: intermediate results (B, N, h, w).
            confidence: confidence maps (B, N, h, w), values in (0, 1].
            real_images: real images, either (B, N, 2h, 2w) (average-pooled here) or already at
                0.5 scale (B, N, h, w).

        Returns:
            The weighted scalar loss.
        """
        if intermediate.shape != confidence.shape:
            raise ValueError(
                f"intermediate {list(intermediate.shape)} and confidence {list(confidence.shape)} differ"
            )
        target = real_images if real_images.shape == intermediate.shape else half_scale(real_images)
        if target.shape != intermediate.shape:
            raise ValueError(
                f"real images {list(real_images.shape)} are neither at the scale of the intermediate results "
                f"{list(intermediate.shape)} nor twice it"
            )
        weighted_error = (confidence * (intermediate - target).abs()).mean()
        mean_log_confidence = confidence.clamp_min(self.eps).log().mean()
        loss = weighted_error - self.regularizer * mean_log_confidence
        if self.training and not bool(self.switched):
            self._update_switch(confidence.detach())
        return self.weight * loss

    def _update_switch(self, confidence: torch.Tensor) -> None:
        mean_confidence = confidence.float().mean()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(mean_confidence)
            mean_confidence = mean_confidence / dist.get_world_size()
        if mean_confidence.item() > self.switch_threshold:
            self.switched.fill_(True)
