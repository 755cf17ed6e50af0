"""Least-squares adversarial loss over a list of discriminators (LSGAN, pix2pixHD ``use_lsgan``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses import PatchAdversarialLoss
from torch import nn

__all__ = ["LeastSquaresAdversarialLoss", "predictions_of"]


def predictions_of(
    discriminator_outputs: Sequence[Sequence[torch.Tensor] | torch.Tensor],
) -> list[torch.Tensor]:
    """Patch predictions of several discriminators.

    Args:
        discriminator_outputs: per discriminator, either its list of layer features (the last
            is the prediction, as returned by :class:`medsynth.networks.LabelWiseMultiScaleDiscriminator`)
            or the prediction tensor itself.
    """
    if len(discriminator_outputs) == 0:
        raise ValueError("no discriminator outputs")
    return [out if isinstance(out, torch.Tensor) else out[-1] for out in discriminator_outputs]


class LeastSquaresAdversarialLoss(nn.Module):
    """LSGAN loss (Mao et al. 2017), the ``use_lsgan`` form of pix2pixHD and the authors' code.

    For each discriminator ``k`` with patch prediction ``p_k``: ``mean((p_k - t) ** 2)`` with
    target ``t = 1`` (real) or ``0`` (fake), summed over the discriminators as in the papers'
    ``L_GAN(G, D) = sum_k L_GAN(G, D_k)``. The per-discriminator mean squared error is MONAI's
    ``PatchAdversarialLoss`` with the least-squares criterion and no output activation.

    * :meth:`generator_loss` ``= sum_k mean((p_k(fake) - 1) ** 2)``
    * :meth:`discriminator_loss` ``= 0.5 * sum_k [mean((p_k(real) - 1) ** 2) + mean(p_k(fake) ** 2)]``
      (the 0.5 of pix2pixHD, which halves the discriminator's step relative to the generator's).
    """

    def __init__(self) -> None:
        super().__init__()
        self.criterion = PatchAdversarialLoss(
            reduction="mean", criterion="least_squares", no_activation_leastsq=True
        )

    def forward(
        self, discriminator_outputs: Sequence[Sequence[torch.Tensor] | torch.Tensor], target_is_real: bool
    ) -> torch.Tensor:
        """Sum over discriminators of the mean squared distance of their predictions to the target.

        Args:
            discriminator_outputs: see :func:`predictions_of`.
            target_is_real: target 1 if ``True``, 0 otherwise.
        """
        predictions = predictions_of(discriminator_outputs)
        # MONAI averages over discriminators; the papers sum.
        mean_over_discriminators = self.criterion(
            predictions, target_is_real=target_is_real, for_discriminator=True
        )
        return mean_over_discriminators * len(predictions)

    def generator_loss(self, fake_outputs: Sequence[Sequence[torch.Tensor] | torch.Tensor]) -> torch.Tensor:
        """Generator form: the discriminators' outputs on synthesised images should read real."""
        return self(fake_outputs, target_is_real=True)

    def discriminator_loss(
        self,
        real_outputs: Sequence[Sequence[torch.Tensor] | torch.Tensor],
        fake_outputs: Sequence[Sequence[torch.Tensor] | torch.Tensor],
    ) -> torch.Tensor:
        """Discriminator form: real read as 1, synthesised (computed from detached images) as 0."""
        return 0.5 * (self(real_outputs, target_is_real=True) + self(fake_outputs, target_is_real=False))
