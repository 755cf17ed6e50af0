"""The pix2pix trainer (Isola et al. 2017), the papers' paired baseline, as a short subclass of
:class:`~medsynth.engines.adversarial.AdversarialTrainer`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from medsynth.engines.adversarial import AdversarialTrainer, float_features
from medsynth.engines.utils import GENERATOR_CALL, BatchCall

__all__ = ["CONDITIONAL_DISCRIMINATOR_CALL", "Pix2PixTrainer"]

# pix2pix's discriminator sees the condition (the one-hot lesion mask) and the images.
CONDITIONAL_DISCRIMINATOR_CALL = BatchCall(("mask", "image"))


class Pix2PixTrainer(AdversarialTrainer):
    """pix2pix: a conditional GAN plus an L1 reconstruction term, two phases per iteration.

    1. generator: ``L_GAN(D(x, G(x))) + w_l1 * |G(x) - y|_1`` (pix2pix: vanilla GAN, ``w_l1 = 100``);
    2. discriminator: ``0.5 * [L_GAN(D(x, y), real) + L_GAN(D(x, G(x).detach()), fake)]``.

    Args:
        device, max_epochs, train_data_loader: as :class:`~medsynth.engines.AdversarialTrainer`.
        generator: returns ``{"images"}`` (:class:`medsynth.networks.Pix2PixGenerator`).
        discriminator: returns a list of per-discriminator feature lists
            (:class:`medsynth.networks.ConditionalDiscriminator`).
        g_optimizer, d_optimizer: the two optimizers.
        adversarial_loss: with ``generator_loss`` and ``discriminator_loss``
            (:class:`medsynth.losses.VanillaAdversarialLoss`).
        reconstruction_loss: ``(fake, real) -> Tensor`` (default L1).
        weight_reconstruction: pix2pix's lambda (100).
        generator_call, discriminator_call: how the networks are fed from the batch; the
            discriminator call's ``image_key`` input is replaced by the synthesised images.
        image_key: the real images in the batch.
        engine_kwargs: ``lr_schedule``, ``train_handlers``, ``amp``, ... (see the base class).
    """

    phases = ("generator", "discriminator")

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        generator: nn.Module,
        discriminator: nn.Module,
        g_optimizer: Optimizer,
        d_optimizer: Optimizer,
        adversarial_loss: Any,
        reconstruction_loss: Callable[..., torch.Tensor] | None = None,
        weight_reconstruction: float = 100.0,
        generator_call: Callable = GENERATOR_CALL,
        discriminator_call: Callable = CONDITIONAL_DISCRIMINATOR_CALL,
        image_key: str = "image",
        **engine_kwargs: Any,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            networks={"generator": generator, "discriminator": discriminator},
            optimizers={"generator": g_optimizer, "discriminator": d_optimizer},
            losses={
                "adversarial_loss": adversarial_loss,
                "reconstruction_loss": reconstruction_loss or nn.L1Loss(),
            },
            **engine_kwargs,
        )
        self.weight_reconstruction = float(weight_reconstruction)
        self.generator_call, self.discriminator_call = generator_call, discriminator_call
        self.image_key = image_key

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        generator, discriminator = self.networks["generator"], self.networks["discriminator"]
        adversarial = self.losses["adversarial_loss"]
        real = batch[self.image_key]

        with self.autocast():
            fake = self.generator_call(generator, batch)["images"]
            with self.no_sync("discriminator"):
                fake_outputs = self.discriminator_call(discriminator, batch, **{self.image_key: fake})
        loss_g_gan = adversarial.generator_loss(float_features(fake_outputs))
        loss_l1 = self.losses["reconstruction_loss"](fake.float(), real)
        loss_g = loss_g_gan + self.weight_reconstruction * loss_l1
        self.optimize("generator", loss_g)

        with self.autocast():
            real_outputs = self.discriminator_call(discriminator, batch)
            fake_outputs = self.discriminator_call(discriminator, batch, **{self.image_key: fake.detach()})
        loss_d = adversarial.discriminator_loss(float_features(real_outputs), float_features(fake_outputs))
        self.optimize("discriminator", loss_d)
        return {
            "loss_g": float(loss_g.detach()),
            "loss_g_gan": float(loss_g_gan.detach()),
            "loss_l1": float(loss_l1.detach()),
            "loss_d": float(loss_d.detach()),
            "lr": float(self.optimizers["generator"].param_groups[0]["lr"]),
        }
