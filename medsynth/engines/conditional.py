"""The conditional-GAN trainer of the papers' paired baselines, pix2pix (Isola et al. 2017) and
pix2pixHD (Wang et al. 2018), as a short subclass of
:class:`~medsynth.engines.adversarial.AdversarialTrainer`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from medsynth.engines.adversarial import AdversarialTrainer, float_features
from medsynth.engines.utils import GENERATOR_CALL, BatchCall

__all__ = ["CONDITIONAL_DISCRIMINATOR_CALL", "ConditionalGANTrainer"]

# The baselines' discriminators see the condition (the one-hot lesion mask) and the images.
CONDITIONAL_DISCRIMINATOR_CALL = BatchCall(("mask", "image"))


class ConditionalGANTrainer(AdversarialTrainer):
    """A conditional GAN with optional reconstruction, feature-matching and perceptual terms; two
    phases per iteration.

    1. generator: ``L_GAN(D(x, G(x))) [+ w_rec * rec(G(x), y)] [+ w_fm * L_FM] [+ w_vgg * L_VGG]``;
       pix2pix: vanilla GAN + 100 L1; pix2pixHD: LSGAN + 10 feature matching + 10 VGG;
    2. discriminator: ``0.5 * [L_GAN(D(x, y), real) + L_GAN(D(x, G(x).detach()), fake)]``.

    A term whose loss is ``None`` is neither computed nor logged.

    Args:
        device, max_epochs, train_data_loader: as :class:`~medsynth.engines.AdversarialTrainer`.
        generator: returns ``{"images"}`` (e.g. :class:`medsynth.networks.Pix2PixGenerator`).
        discriminator: returns a list of per-discriminator feature lists
            (:class:`medsynth.networks.ConditionalDiscriminator`).
        g_optimizer, d_optimizer: the two optimizers.
        adversarial_loss: with ``generator_loss`` and ``discriminator_loss``
            (:class:`medsynth.losses.VanillaAdversarialLoss`,
            :class:`~medsynth.losses.LeastSquaresAdversarialLoss`).
        reconstruction_loss: ``(fake, real) -> Tensor`` (pix2pix: ``torch.nn.L1Loss``).
        feature_matching_loss: ``(fake_outputs, real_outputs) -> Tensor``
            (:class:`medsynth.losses.FeatureMatchingLoss`).
        perceptual_loss: ``(fake, real) -> Tensor`` (:class:`medsynth.losses.VGGPerceptualLoss`).
        weight_reconstruction, weight_feature_matching, weight_perceptual: the terms' weights.
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
        feature_matching_loss: Callable[..., torch.Tensor] | None = None,
        perceptual_loss: Callable[..., torch.Tensor] | None = None,
        weight_reconstruction: float = 100.0,
        weight_feature_matching: float = 10.0,
        weight_perceptual: float = 10.0,
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
                "reconstruction_loss": reconstruction_loss,
                "feature_matching_loss": feature_matching_loss,
                "perceptual_loss": perceptual_loss,
            },
            **engine_kwargs,
        )
        self.weights = {
            "reconstruction_loss": float(weight_reconstruction),
            "feature_matching_loss": float(weight_feature_matching),
            "perceptual_loss": float(weight_perceptual),
        }
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
            real_outputs = None
            if "feature_matching_loss" in self.losses:
                with torch.no_grad():
                    real_outputs = self.discriminator_call(discriminator, batch)
        fake_outputs = float_features(fake_outputs)
        loss_g_gan = adversarial.generator_loss(fake_outputs)
        loss_g = loss_g_gan
        record = {"loss_g_gan": float(loss_g_gan.detach())}
        terms = {
            "reconstruction_loss": ("loss_l1", lambda loss: loss(fake.float(), real)),
            "feature_matching_loss": (
                "loss_fm",
                lambda loss: loss(fake_outputs, float_features(real_outputs)),
            ),
            "perceptual_loss": ("loss_vgg", lambda loss: loss(fake.float(), real)),
        }
        for name, (log_name, compute) in terms.items():
            if name in self.losses:
                value = compute(self.losses[name])
                loss_g = loss_g + self.weights[name] * value
                record[log_name] = float(value.detach())
        self.optimize("generator", loss_g)

        with self.autocast():
            real_outputs = self.discriminator_call(discriminator, batch)
            fake_outputs = self.discriminator_call(discriminator, batch, **{self.image_key: fake.detach()})
        loss_d = adversarial.discriminator_loss(float_features(real_outputs), float_features(fake_outputs))
        self.optimize("discriminator", loss_d)
        record.update(
            loss_g=float(loss_g.detach()),
            loss_d=float(loss_d.detach()),
            lr=float(self.optimizers["generator"].param_groups[0]["lr"]),
        )
        return record
