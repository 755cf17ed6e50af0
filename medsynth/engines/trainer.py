"""The SAMR / CG-SAMR training engine: one MONAI trainer for the generator, the label-wise
discriminators and the lesion-segmentation U-Net (papers 000 Sec. 2, 001 Sec. III-D).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Mapping, Sequence

import torch
from monai.engines import Trainer
from monai.engines.utils import IterationEvents
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

logger = logging.getLogger(__name__)

__all__ = ["SynthesisGANTrainer", "prepare_synthesis_batch"]


def prepare_synthesis_batch(
    batchdata: Mapping[str, Any], device: torch.device | str | None = None, non_blocking: bool = False, **kwargs: Any
) -> dict[str, torch.Tensor]:
    """Move the tensors a synthesis iteration needs (``mask``, ``atlas``, ``image``, ``label``) to ``device``.

    ``mask`` and ``atlas`` are the generator's inputs, ``image`` the real sequences, ``label`` the
    integer lesion map (the shape-consistency target). MetaTensors become plain tensors, which
    keeps the networks' outputs plain as well.
    """
    missing = [key for key in ("mask", "atlas", "image", "label") if key not in batchdata]
    if missing:
        raise KeyError(f"a synthesis batch needs the keys mask, atlas, image and label; missing {missing}")
    out = {}
    for key in ("mask", "atlas", "image", "label"):
        value = torch.as_tensor(batchdata[key])
        if hasattr(value, "as_tensor"):
            value = value.as_tensor()
        dtype = torch.long if key == "label" else torch.float32
        out[key] = value.to(device=device, dtype=dtype, non_blocking=non_blocking, **kwargs)
    return out


def _no_sync(module: nn.Module):
    """Skip DDP's gradient all-reduce for a backward whose gradients on ``module`` are thrown away."""
    return module.no_sync() if isinstance(module, DistributedDataParallel) else contextlib.nullcontext()


class SynthesisGANTrainer(Trainer):
    """Adversarial training of a SAMR or CG-SAMR generator with label-wise discriminators and a U-Net.

    Each iteration makes three alternating updates on one batch (pix2pixHD style):

    1. generator: ``L_GAN + lambda_fm * L_FM + lambda_sc * GDL(s, U(G(x))) [+ lambda_cm * L_CM]``;
       the U-Net sees ``G(x)`` with gradients flowing back to the generator, and the confidence
       term is used when the generator returns ``"confidence"`` (CG-SAMR);
    2. discriminators (all six in one module): LSGAN on real images vs the detached fake;
    3. U-Net: ``GDL(s, U(y)) + GDL(s, U(G(x).detach()))``.

    ``L_SC`` of the papers is the sum of the two GDL terms; the generator is only affected by the
    second, the U-Net is trained on both.

    The generator step's passes through the discriminators and the U-Net run under DDP's
    ``no_sync`` (their gradients there are discarded), so the same code serves single-process and
    :class:`~torch.nn.parallel.DistributedDataParallel` training.

    Args:
        device: where the networks run.
        max_epochs: number of epochs.
        train_data_loader: yields dicts with ``mask`` (B,5,H,W one-hot), ``atlas`` (B,3N,H,W),
            ``image`` (B,N,H,W in [-1, 1]) and ``label`` (B,1,H,W int).
        generator: ``forward(mask, atlas) -> {"images", ["intermediate", "confidence"]}``.
        discriminator: ``forward(mask, images, atlas) -> list[list[Tensor]]`` (per discriminator its
            features, the last one the prediction).
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
            ``regularizer`` property (lambda_cm) that it switches itself
            (:class:`medsynth.losses.ConfidenceMapLoss`); ``None`` for SAMR.
        lambda_fm, lambda_sc, lambda_cm: weights lambda1, lambda2, lambda3 of the papers.
        bf16: run the forward passes under ``torch.autocast(dtype=bfloat16)`` on CUDA.
        epoch_length: iterations per epoch (default: the loader's length).
        non_blocking: asynchronous host-to-device copies.
        prepare_batch: maps a loader batch to the tensors of :func:`prepare_synthesis_batch`.
        train_handlers: handlers attached at construction (stats, schedulers, validation ...).
        optim_set_to_none: ``zero_grad(set_to_none=...)``.
    """

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
        lambda_fm: float = 5.0,
        lambda_sc: float = 1.0,
        lambda_cm: float = 1.0,
        bf16: bool = False,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = prepare_synthesis_batch,
        train_handlers: Sequence | None = None,
        optim_set_to_none: bool = True,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            handlers=train_handlers,
            # The output is a flat dict of floats for the stats handlers: nothing to decollate.
            decollate=False,
        )
        self.generator = generator
        self.discriminator = discriminator
        self.segmenter = segmenter
        self.g_optimizer = g_optimizer
        self.d_optimizer = d_optimizer
        self.u_optimizer = u_optimizer
        self.adversarial_loss = adversarial_loss
        self.feature_matching_loss = feature_matching_loss
        self.shape_consistency_loss = shape_consistency_loss
        self.confidence_loss = confidence_loss
        self.lambda_fm = float(lambda_fm)
        self.lambda_sc = float(lambda_sc)
        self.lambda_cm = float(lambda_cm)
        self.bf16 = bool(bf16)
        self.optim_set_to_none = optim_set_to_none

    def _autocast(self):
        device = torch.device(self.state.device)
        if self.bf16 and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _iteration(self, engine: SynthesisGANTrainer, batchdata: Mapping[str, Any]) -> dict[str, float]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        mask, atlas, real, label = batch["mask"], batch["atlas"], batch["image"], batch["label"]
        for module in (engine.generator, engine.discriminator, engine.segmenter):
            module.train()

        # 1. generator
        with engine._autocast():
            outputs = engine.generator(mask, atlas)
            fake = outputs["images"]
            with _no_sync(engine.discriminator):
                fake_outputs = engine.discriminator(mask, fake, atlas)
            with _no_sync(engine.segmenter):
                fake_logits = engine.segmenter(fake)
            with torch.no_grad():
                real_outputs = engine.discriminator(mask, real, atlas)
                real_logits = engine.segmenter(real)
        fake_outputs, real_outputs = _float(fake_outputs), _float(real_outputs)
        loss_g_gan = engine.adversarial_loss.generator_loss(fake_outputs)
        loss_fm = engine.feature_matching_loss(fake_outputs, real_outputs)
        # Only the synthesized-image term of L_SC depends on the generator; the real-image term
        # (no gradient here) is included so that the logged value is the papers' L_SC.
        loss_sc = engine.shape_consistency_loss(real_logits.float(), fake_logits.float(), label)
        loss_g = loss_g_gan + engine.lambda_fm * loss_fm + engine.lambda_sc * loss_sc
        record: dict[str, float] = {}
        if engine.confidence_loss is not None and "confidence" in outputs:
            confidence = outputs["confidence"].float()
            lambda_cm = float(engine.confidence_loss.regularizer)  # the value this step uses
            loss_cm = engine.confidence_loss(outputs["intermediate"].float(), confidence, real)
            loss_g = loss_g + engine.lambda_cm * loss_cm
            record.update(
                loss_cm=float(loss_cm.detach()), mean_confidence=float(confidence.detach().mean()), lambda_cm=lambda_cm
            )
        engine.g_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        loss_g.backward()
        engine.g_optimizer.step()

        # 2. discriminators: real vs the detached fake of this iteration
        fake = fake.detach()
        engine.d_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with engine._autocast():
            real_outputs = engine.discriminator(mask, real, atlas)
            fake_outputs = engine.discriminator(mask, fake, atlas)
        loss_d = engine.adversarial_loss.discriminator_loss(_float(real_outputs), _float(fake_outputs))
        loss_d.backward()
        engine.d_optimizer.step()

        # 3. U-Net on the real and on the (detached) synthesized images
        engine.u_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with engine._autocast():
            real_logits = engine.segmenter(real)
            fake_logits = engine.segmenter(fake)
        loss_u = engine.shape_consistency_loss(real_logits.float(), fake_logits.float(), label)
        loss_u.backward()
        engine.u_optimizer.step()

        record.update(
            loss_g=float(loss_g.detach()),
            loss_g_gan=float(loss_g_gan.detach()),
            loss_fm=float(loss_fm.detach()),
            loss_sc=float(loss_sc.detach()),
            loss_d=float(loss_d.detach()),
            loss_u=float(loss_u.detach()),
            lr=float(engine.g_optimizer.param_groups[0]["lr"]),
        )
        engine.state.output = record
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return record


def _float(outputs: Sequence[Sequence[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Discriminator outputs in float32 (losses are computed outside autocast)."""
    return [[feature.float() for feature in features] for features in outputs]
