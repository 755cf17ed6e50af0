"""The SAMR / CG-SAMR trainer: generator, label-wise discriminators and the lesion U-Net (papers 000
Sec. 2, 001 Sec. III-D), as a short subclass of :class:`~medsynth.engines.adversarial.AdversarialTrainer`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from medsynth.engines.adversarial import AdversarialTrainer, float_features
from medsynth.engines.utils import DISCRIMINATOR_CALL, GENERATOR_CALL, SEGMENTER_CALL

__all__ = ["SynthesisGANTrainer"]


class SynthesisGANTrainer(AdversarialTrainer):
    """Adversarial training of a SAMR or CG-SAMR generator with label-wise discriminators and a U-Net.

    Each iteration makes three alternating updates on one batch (pix2pixHD style), the phases
    ``"generator"``, ``"discriminator"`` and ``"segmenter"``:

    1. generator: ``L_GAN + w_fm * L_FM + w_sc * Dice(s, U(G(x))) [+ w_cm * L_CM]``; the U-Net sees
       ``G(x)`` with gradients flowing back to the generator (not at all with ``w_sc = 0``, the
       "w/o L_SC" ablation, which logs no ``loss_sc``), and the confidence term is used when the
       generator returns ``"confidence"`` and a confidence loss is given (CG-SAMR);
    2. discriminators (all six in one module): LSGAN on real images vs the detached fake;
    3. U-Net: ``Dice(s, U(y)) + Dice(s, U(G(x).detach()))``.

    ``w_fm``, ``w_sc`` and ``w_cm`` are the papers' lambda1, lambda2 and lambda3 (eq. 6 of CG-SAMR);
    the papers' lambda_cm, the regulariser inside L_CM, belongs to the confidence loss. ``L_SC`` of
    the papers is the sum of the two Dice terms (their eq. 4, called GDL there, has no class weights);
    the generator is only affected by the second, the U-Net is trained on both.

    The generator step's passes through the discriminators and the U-Net run under DDP's
    ``no_sync`` (their gradients there are discarded), so the same code serves single-process and
    ``DistributedDataParallel`` training.

    Args:
        device: where the networks run.
        max_epochs: number of epochs.
        train_data_loader: yields dicts with ``mask`` (B,5,H,W one-hot), ``atlas`` (B,3N,H,W),
            ``image`` (B,N,H,W in [-1, 1]) and ``label`` (B,1,H,W int).
        generator: returns ``{"images", ["intermediate", "confidence"]}``.
        discriminator: returns ``list[list[Tensor]]`` (per discriminator its features, the last one
            the prediction).
        segmenter: the U-Net, images (B,N,H,W) -> logits (B,5,H,W).
        g_optimizer, d_optimizer, u_optimizer: optimizers of the three networks.
        adversarial_loss: LSGAN loss with ``generator_loss(fake_outputs)`` and
            ``discriminator_loss(real_outputs, fake_outputs)``
            (:class:`medsynth.losses.LeastSquaresAdversarialLoss`).
        feature_matching_loss: ``(fake_outputs, real_outputs) -> Tensor``
            (:class:`medsynth.losses.FeatureMatchingLoss`).
        shape_consistency_loss: ``(real_logits, fake_logits, label) -> Tensor``, the papers' L_SC
            (:class:`medsynth.losses.ShapeConsistencyLoss`).
        confidence_loss: CG-SAMR's L_CM, ``(intermediate, confidence, real_images) -> Tensor`` with a
            ``regularizer`` property (the papers' lambda_cm) that it switches itself
            (:class:`medsynth.losses.ConfidenceMapLoss`); ``None`` for SAMR.
        weight_feature_matching, weight_shape_consistency, weight_confidence: the papers' lambda1,
            lambda2 and lambda3.
        generator_call: feeds the generator (default ``generator(mask, atlas)``).
        discriminator_call: feeds the discriminator; its ``image_key`` input is replaced by the
            synthesised images for the fake pass (default ``discriminator(mask, image, atlas)``).
        segmenter_call: feeds the U-Net, likewise (default ``segmenter(image)``).
        image_key: the real images in the batch.
        label_key: the integer lesion map in the batch (the shape-consistency target).
        engine_kwargs: the engine's options (``lr_schedule``, ``train_handlers``, ``amp``, ``amp_kwargs``,
            ``epoch_length``, ``prepare_batch``, ...), see
            :class:`~medsynth.engines.adversarial.AdversarialTrainer`.
    """

    phases = ("generator", "discriminator", "segmenter")

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        generator: nn.Module,
        discriminator: nn.Module,
        segmenter: nn.Module,
        g_optimizer: Optimizer,
        d_optimizer: Optimizer,
        u_optimizer: Optimizer,
        adversarial_loss: Any,
        feature_matching_loss: Callable[..., torch.Tensor],
        shape_consistency_loss: Callable[..., torch.Tensor],
        confidence_loss: Any | None = None,
        weight_feature_matching: float = 5.0,
        weight_shape_consistency: float = 1.0,
        weight_confidence: float = 1.0,
        generator_call: Callable = GENERATOR_CALL,
        discriminator_call: Callable = DISCRIMINATOR_CALL,
        segmenter_call: Callable = SEGMENTER_CALL,
        image_key: str = "image",
        label_key: str = "label",
        **engine_kwargs: Any,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            networks={"generator": generator, "discriminator": discriminator, "segmenter": segmenter},
            optimizers={"generator": g_optimizer, "discriminator": d_optimizer, "segmenter": u_optimizer},
            losses={
                "adversarial_loss": adversarial_loss,
                "feature_matching_loss": feature_matching_loss,
                "shape_consistency_loss": shape_consistency_loss,
                "confidence_loss": confidence_loss,
            },
            **engine_kwargs,
        )
        self.weight_feature_matching = float(weight_feature_matching)
        self.weight_shape_consistency = float(weight_shape_consistency)
        self.weight_confidence = float(weight_confidence)
        self.generator_call = generator_call
        self.discriminator_call = discriminator_call
        self.segmenter_call = segmenter_call
        self.image_key = image_key
        self.label_key = label_key

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        generator, discriminator, segmenter = (
            self.networks[k] for k in ("generator", "discriminator", "segmenter")
        )
        adversarial = self.losses["adversarial_loss"]
        shape_consistency = self.losses["shape_consistency_loss"]
        confidence_loss = self.losses.get("confidence_loss")
        real, label = batch[self.image_key], batch[self.label_key]
        with_fake = {self.image_key: None}

        # 1. generator
        with self.autocast():
            outputs = self.generator_call(generator, batch)
            fake = outputs["images"]
            with_fake[self.image_key] = fake
            # Without L_SC (weight 0, the ablation) the U-Net does not see the generator's output here.
            with_sc = self.weight_shape_consistency != 0.0
            with self.no_sync("discriminator", "segmenter"):
                fake_outputs = self.discriminator_call(discriminator, batch, **with_fake)
                fake_logits = self.segmenter_call(segmenter, batch, **with_fake) if with_sc else None
            with torch.no_grad():
                real_outputs = self.discriminator_call(discriminator, batch)
                real_logits = self.segmenter_call(segmenter, batch) if with_sc else None
        fake_outputs, real_outputs = float_features(fake_outputs), float_features(real_outputs)
        loss_g_gan = adversarial.generator_loss(fake_outputs)
        loss_fm = self.losses["feature_matching_loss"](fake_outputs, real_outputs)
        loss_g = loss_g_gan + self.weight_feature_matching * loss_fm
        record: dict[str, float] = {}
        if with_sc:
            # Only the synthesised-image term of L_SC depends on the generator; the real-image term
            # (no gradient here) is included so that the logged value is the papers' L_SC.
            loss_sc = shape_consistency(real_logits.float(), fake_logits.float(), label)
            loss_g = loss_g + self.weight_shape_consistency * loss_sc
            record["loss_sc"] = float(loss_sc.detach())
        if confidence_loss is not None and "confidence" in outputs:
            confidence = outputs["confidence"].float()
            lambda_cm = float(confidence_loss.regularizer)  # the value this step uses
            loss_cm = confidence_loss(outputs["intermediate"].float(), confidence, real)
            loss_g = loss_g + self.weight_confidence * loss_cm
            record.update(
                loss_cm=float(loss_cm.detach()),
                mean_confidence=float(confidence.detach().mean()),
                lambda_cm=lambda_cm,
            )
        self.optimize("generator", loss_g)

        # 2. discriminators: real vs the detached fake of this iteration
        with_fake[self.image_key] = fake.detach()
        with self.autocast():
            real_outputs = self.discriminator_call(discriminator, batch)
            fake_outputs = self.discriminator_call(discriminator, batch, **with_fake)
        loss_d = adversarial.discriminator_loss(float_features(real_outputs), float_features(fake_outputs))
        self.optimize("discriminator", loss_d)

        # 3. U-Net on the real and on the (detached) synthesised images
        with self.autocast():
            real_logits = self.segmenter_call(segmenter, batch)
            fake_logits = self.segmenter_call(segmenter, batch, **with_fake)
        loss_u = shape_consistency(real_logits.float(), fake_logits.float(), label)
        self.optimize("segmenter", loss_u)

        record.update(
            loss_g=float(loss_g.detach()),
            loss_g_gan=float(loss_g_gan.detach()),
            loss_fm=float(loss_fm.detach()),
            loss_d=float(loss_d.detach()),
            loss_u=float(loss_u.detach()),
            lr=float(self.optimizers["generator"].param_groups[0]["lr"]),
        )
        return record
