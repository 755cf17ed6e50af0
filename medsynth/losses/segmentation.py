"""The lesion-segmentation loss with per-voxel weights (the study's confidence-weighted arm).

MONAI's :class:`~monai.engines.SupervisedTrainer` hands the loss only ``(prediction, target)``, so
the weights travel as the target's second channel (:class:`medsynth.engines.segmentation.
PrepareBatchWithWeights` puts them there). A one-channel target is plain MONAI ``DiceCELoss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

__all__ = ["VoxelWeightedDiceCELoss"]


class VoxelWeightedDiceCELoss(nn.Module):
    """Soft Dice + cross-entropy on softmax class scores, each voxel counted with its weight.

    With weights ``w``, per sample and class ``c``: ``Dice = 1 - (2 sum(w p y) + nr) / (sum(w p) +
    sum(w y) + dr)`` (averaged over samples and classes, background included) and ``CE = mean(w *
    ce)``; all weights 1 give exactly MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)``.
    A sample's Dice is a ratio, so a weight uniform over the sample cancels in it: the weights decide
    which voxels of a slice count in its Dice, and the cross-entropy carries their overall level.

    Args:
        lambda_dice: weight of the Dice term.
        lambda_ce: weight of the cross-entropy term.
        smooth_nr: added to the Dice numerator.
        smooth_dr: added to the Dice denominator.
    """

    def __init__(
        self,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
    ) -> None:
        super().__init__()
        self.lambda_dice, self.lambda_ce = float(lambda_dice), float(lambda_ce)
        self.smooth_nr, self.smooth_dr = float(smooth_nr), float(smooth_dr)
        self.unweighted = DiceCELoss(
            to_onehot_y=True,
            softmax=True,
            lambda_dice=lambda_dice,
            lambda_ce=lambda_ce,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
        )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``input`` ``(B, C, ...)`` class scores; ``target`` ``(B, 1, ...)`` labels, or ``(B, 2, ...)``
        labels then voxel weights."""
        if target.shape[1] == 1:
            return self.unweighted(input, target)
        if target.shape[1] != 2:
            raise ValueError(
                f"target must have 1 (labels) or 2 (labels, weights) channels, got {target.shape[1]}"
            )
        labels, weights = target[:, 0].long(), target[:, 1:].float()
        scores = input.float()
        probabilities = torch.softmax(scores, dim=1)
        one_hot = F.one_hot(labels, scores.shape[1]).movedim(-1, 1).float()
        spatial = tuple(range(2, scores.ndim))
        intersection = (weights * probabilities * one_hot).sum(spatial)
        denominator = (weights * probabilities).sum(spatial) + (weights * one_hot).sum(spatial)
        dice = (1.0 - (2.0 * intersection + self.smooth_nr) / (denominator + self.smooth_dr)).mean()
        cross_entropy = (F.cross_entropy(scores, labels, reduction="none") * weights[:, 0]).mean()
        return self.lambda_dice * dice + self.lambda_ce * cross_entropy
