"""Adversarial losses over a list of discriminators: least squares (LSGAN, pix2pixHD ``use_lsgan``,
SAMR / CG-SAMR) and the vanilla cross-entropy GAN loss (pix2pix)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses import PatchAdversarialLoss
from torch import nn

__all__ = ["AdversarialLoss", "LeastSquaresAdversarialLoss", "VanillaAdversarialLoss", "predictions_of"]


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


class AdversarialLoss(nn.Module):
    """A GAN loss summed over discriminators, the papers' ``L_GAN(G, D) = sum_k L_GAN(G, D_k)``.

    For each discriminator ``k`` with patch prediction ``p_k`` and target ``t = 1`` (real) or ``0``
    (fake), MONAI's ``PatchAdversarialLoss`` with ``criterion``: ``"least_squares"`` gives
    ``mean((p_k - t) ** 2)``, ``"bce"`` the binary cross-entropy of ``sigmoid(p_k)``.

    * :meth:`generator_loss` ``= sum_k loss(p_k(fake), 1)``
    * :meth:`discriminator_loss` ``= 0.5 * sum_k [loss(p_k(real), 1) + loss(p_k(fake), 0)]``
      (the 0.5 of pix2pix and pix2pixHD, which halves the discriminator's step relative to the
      generator's).

    Args:
        criterion: ``"least_squares"`` or ``"bce"``.
    """

    def __init__(self, criterion: str = "least_squares") -> None:
        super().__init__()
        self.criterion = PatchAdversarialLoss(
            reduction="mean", criterion=criterion, no_activation_leastsq=True
        )

    def forward(
        self, discriminator_outputs: Sequence[Sequence[torch.Tensor] | torch.Tensor], target_is_real: bool
    ) -> torch.Tensor:
        """Sum over discriminators of the criterion between their predictions and the target.

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


class LeastSquaresAdversarialLoss(AdversarialLoss):
    """LSGAN loss (Mao et al. 2017), the ``use_lsgan`` form of pix2pixHD and the SAMR authors' code."""

    def __init__(self) -> None:
        super().__init__("least_squares")


class VanillaAdversarialLoss(AdversarialLoss):
    """The cross-entropy GAN loss of pix2pix (``gan_mode vanilla``): sigmoid of the patch logits."""

    def __init__(self) -> None:
        super().__init__("bce")
