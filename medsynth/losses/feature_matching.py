"""Discriminator feature-matching loss (pix2pixHD; SAMR eq. 2, CG-SAMR eq. 3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeatureMatchingLoss"]


class FeatureMatchingLoss(nn.Module):
    """``weight * sum_k sum_i (1 / N_i) * ||D_k^(i)(real) - D_k^(i)(fake)||``, real features detached.

    ``k`` runs over the discriminators and ``i`` over each one's layers except the last (the patch
    prediction, left to the adversarial loss, as in pix2pixHD); ``N_i`` is the number of elements of
    layer ``i``, so each layer contributes the mean of its element-wise distance.

    The distance is the L1 norm by default (``criterion="l1"``): the authors' implementation is built
    on pix2pixHD, whose feature matching is a mean absolute error, and L1 keeps the large feature
    differences of early training from dominating the objective. ``criterion="l2"`` gives the squared
    L2 norm exactly as written in the papers' equation. Unlike pix2pixHD, no ``4 / (layers + 1)`` or
    ``1 / num_D`` factors are applied: the papers' equation sums over layers and discriminators.
    The papers' weight is ``lambda1 = 5``; pass it as ``weight`` or apply it in the caller.

    Args:
        criterion: ``"l1"`` (mean absolute) or ``"l2"`` (mean squared) per layer.
        weight: factor applied to the sum.
    """

    def __init__(self, criterion: str = "l1", weight: float = 1.0) -> None:
        super().__init__()
        distances = {"l1": F.l1_loss, "l2": F.mse_loss}
        if criterion not in distances:
            raise ValueError(f"unknown criterion {criterion!r}; expected one of {sorted(distances)}")
        self.criterion = criterion
        self.distance = distances[criterion]
        self.weight = weight

    def forward(
        self, fake_outputs: Sequence[Sequence[torch.Tensor]], real_outputs: Sequence[Sequence[torch.Tensor]]
    ) -> torch.Tensor:
        """Compare the discriminators' layer features on synthesised and real inputs.

        Args:
            fake_outputs: per discriminator, its layer features on the synthesised images
                (gradients flow through these to the generator).
            real_outputs: the same on the real images (detached here).

        Returns:
            The weighted scalar loss.
        """
        if len(fake_outputs) != len(real_outputs) or len(fake_outputs) == 0:
            raise ValueError(
                f"need the same, non-zero number of discriminators; got {len(fake_outputs)} and "
                f"{len(real_outputs)}"
            )
        terms = []
        for k, (fake_features, real_features) in enumerate(zip(fake_outputs, real_outputs, strict=True)):
            if len(fake_features) != len(real_features) or len(fake_features) < 2:
                raise ValueError(
                    f"discriminator {k}: need the same number (>= 2) of layer outputs; "
                    f"got {len(fake_features)} and {len(real_features)}"
                )
            for fake, real in zip(fake_features[:-1], real_features[:-1], strict=True):
                if fake.shape != real.shape:
                    raise ValueError(
                        f"discriminator {k}: feature shapes differ, {list(fake.shape)} vs {list(real.shape)}"
                    )
                terms.append(self.distance(fake, real.detach()))
        return self.weight * torch.stack(terms).sum()
