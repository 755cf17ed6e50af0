"""Lesion shape-consistency loss (SAMR eq. 3-4, CG-SAMR eq. 4-5)."""

from __future__ import annotations

import torch
from monai.losses import DiceLoss, GeneralizedDiceLoss
from monai.networks.utils import one_hot
from torch import nn

__all__ = ["ShapeConsistencyLoss"]


class ShapeConsistencyLoss(nn.Module):
    """``weight * (Dice(s, U(y)) + Dice(s, U(G(x))))``: the lesion U-Net must find the input mask ``s``
    in the real images ``y`` and in the synthesised images ``G(x)``.

    The papers' eq. 4, which they call the generalized Dice loss (GDL), is the plain Dice loss
    ``1 - 2 sum_i r_i s_i / (sum_i r_i + sum_i s_i)`` over the pixels ``i``, with ``r`` the one-hot
    ground truth and ``s`` the predicted probabilities: it has no class weights. It is computed by
    MONAI's ``DiceLoss`` with a softmax over the U-Net logits, the background included, per class
    over all pixels of the batch (``batch=True``, as the authors' ``DiceLoss`` sums over dims 0, 2,
    3) and averaged over the classes. ``generalized=True`` switches to MONAI's ``GeneralizedDiceLoss``
    (Sudre et al.'s class-weighted generalized Dice, ``1 / (sum r)^2`` weights) instead. ``smooth_nr`` /
    ``smooth_dr`` are added to the numerator / denominator
    (set both to 0 for eq. 4 verbatim; the small defaults keep classes absent from a batch from
    yielding 0 / 0). The papers' weight is ``lambda2 = 1``.

    Args:
        generalized: use Sudre's class-weighted generalized Dice instead of eq. 4's plain Dice.
        smooth_nr: added to the Dice numerator.
        smooth_dr: added to the Dice denominator.
        weight: factor applied to the sum of the two terms.
    """

    def __init__(
        self, generalized: bool = False, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, weight: float = 1.0
    ) -> None:
        super().__init__()
        options = {
            "include_background": True,
            "softmax": True,
            "batch": True,
            "smooth_nr": smooth_nr,
            "smooth_dr": smooth_dr,
        }
        self.dice: nn.Module = GeneralizedDiceLoss(**options) if generalized else DiceLoss(**options)
        self.weight = weight

    def forward(
        self, real_logits: torch.Tensor, fake_logits: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        """Sum of the Dice losses of the U-Net on the real and on the synthesised images.

        Args:
            real_logits: U-Net logits on the real images, (B, C, H, W).
            fake_logits: U-Net logits on the synthesised images, (B, C, H, W).
            target: the generator's input mask, one-hot (B, C, H, W) or a label map (B, 1, H, W).

        Returns:
            The weighted scalar loss.
        """
        if real_logits.shape != fake_logits.shape:
            raise ValueError(f"logit shapes differ: {list(real_logits.shape)} vs {list(fake_logits.shape)}")
        num_classes = real_logits.shape[1]
        if target.dim() == 4 and target.shape[1] == 1 and num_classes > 1:
            target = one_hot(target, num_classes=num_classes, dim=1)
        if target.shape != real_logits.shape:
            raise ValueError(
                f"target {list(target.shape)} must be one-hot like the logits {list(real_logits.shape)} "
                "or a (B, 1, H, W) label map"
            )
        target = target.to(real_logits.dtype)
        return self.weight * (self.dice(real_logits, target) + self.dice(fake_logits, target))
