"""Qu et al.'s two training stages (papers 003/004) on :class:`~medsynth.engines.AdversarialTrainer`.

Images arrive as the project's slice batches (``"image"`` ``(B, M, H, W)`` in [-1, 1], ``"mask"`` the
one-hot label ``(B, 5, H, W)``, ``"label"``); the algorithms see them in [0, 1] (background 0).

**Stage 1**, :class:`StructuralMapTrainer` (Sec. 2.3). Per iteration, from a real slice ``x`` of a
random modality: ``f = Algorithm1(x)``, ``brain = Algorithm2(x, p)``; ``(mu, log_var) = EC_f(f)``,
``f_r = DC_f(mu + sigma * n)``, ``f_g = DC_f(z)`` with ``z ~ N(0, 1)``. Phases:

1. ``discriminator`` (``D_f`` and ``FD_f``): ``||FD(z) - 1||^2 + ||FD(code)||^2`` and
   ``||D(f) - 1||^2 + ||D(f_g)||^2``;
2. ``generator`` (``EC_f``, ``DC_f``): adversarial ``||FD(code) - 1||^2 + ||D(f_g) - 1||^2``,
   ``loss_normal`` (:func:`medsynth.losses.qu.code_distribution_loss`) and the self-supervised
   ``||f - f_r||^2 + ||f_r * (1 - brain)||^2``;
3. ``mask`` (``MASK``): ``||brain - MASK(f)||^2`` plus ``||m * (1 - MASK(m))||^2`` for ``m`` in
   ``f``, ``f_r``, ``f_g`` (no structure outside the predicted brain area; ``MASK(f_g)`` for ``f_g``).

**Stage 2**, :class:`MultimodalGenerationTrainer` (Sec. 2.4-2.6), both branches every iteration,
updated together (the papers: the discriminator alone, every other component with one optimizer):

* *reconstruction and translation of real images* (Sec. 2.4): ``levels_i = EC(x_i)``; ``x_{r,i} =
  DC(levels_i, i)``; translations ``x_{i->j} = DC(levels_i, j)``; cycles ``x_{cr,j,i} = DC(EC(x_{i->j}), i)``;
  losses: reconstruction, cycle, cycle consistency (the cycles of one image agree), semantic
  consistency (``code_i`` vs the code of each translation), lesion supervision (the segmenters on
  real images against the real label), adversarial and category guidance on the translations;
* *generation* (Sec. 2.5-2.6): the structural map of a real slice (its own lesion cleared) fused with
  a lesion label drawn from earlier batches and accepted only inside the map's brain area (else the
  slice's own label); ``x_{g,i} = DC(EC_R(fused), i)``; losses: adversarial and category guidance,
  structural-map consistency (Algorithm 1 of each generated image, the differentiable form, against
  the map, outside the lesion), lesion supervision (the segmenters, frozen here, on the generated
  images against the fused label), registration (``x_{g,i}`` vs its translations from the other
  generated modalities) and semantic consistency (the fused code vs each generated image's code,
  and those codes among themselves).

With a ``code_discriminator`` network (paper 004's ``FD`` of Sec. 2.6, "consistency between the two
processes"), the fused map's code must look like the codes of real images: the discriminator takes
the real images' codes as real and the fused code as fake (paper 004 gives only the fake side; the
real side is this reading), and the generator gets ``||FD(code_g) - 1||^2`` (``code_adversarial``).

The papers give no loss weights; every weight is 1 unless ``loss_weights`` says otherwise.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from medsynth.constants import LESION_LABELS, NORMAL_BRAIN, NUM_LABELS
from medsynth.engines.adversarial import AdversarialTrainer, unwrap
from medsynth.losses.qu import code_distribution_loss, least_squares, modality_class_loss, soft_label_loss
from medsynth.transforms.structure import (
    brain_area_mask,
    fuse_structure_and_label,
    label_inside_brain,
    remove_lesion_structure,
    soft_structural_map,
    structural_feature_map,
)

__all__ = ["LabelBank", "MultimodalGenerationTrainer", "StructuralMapTrainer", "fused_label", "to_unit"]


def to_unit(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images to [0, 1] (background 0, as Algorithms 1 and 2 expect)."""
    return (image.float() + 1.0) / 2.0


def fused_label(label: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
    """The one-hot label of a generated case: the lesion of ``label``, normal brain elsewhere in the
    map's brain area, background outside (``label`` ``(B, 1, H, W)``, ``brain`` ``(B, 1, H, W)``)."""
    lesion = torch.isin(label.long(), torch.as_tensor(LESION_LABELS, device=label.device))
    values = torch.where(lesion, label.long(), torch.where(brain > 0.5, NORMAL_BRAIN, 0))
    return F.one_hot(values[:, 0], NUM_LABELS).permute(0, 3, 1, 2).float()


class LabelBank:
    """Recent real lesion labels to draw from (labels of other slices and patients, Sec. 2.6).

    Args:
        size: labels kept.
        tries: draws before falling back to the slice's own label.
        seed: of the draws.
    """

    def __init__(self, size: int = 64, tries: int = 8, seed: int = 0) -> None:
        self.labels: deque[torch.Tensor] = deque(maxlen=int(size))
        self.tries = int(tries)
        self.random = random.Random(seed)
        self.accepted = self.fallbacks = 0

    def add(self, labels: torch.Tensor) -> None:
        for label in labels.detach().cpu():
            if torch.isin(label, torch.as_tensor(LESION_LABELS)).any():
                self.labels.append(label)

    def draw(self, own: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
        """A label per batch item whose lesion lies inside ``brain`` (the own label if none is found)."""
        chosen = []
        for index in range(own.shape[0]):
            pick = own[index]
            for _ in range(self.tries if self.labels else 0):
                candidate = self.random.choice(self.labels).to(own.device)
                if (
                    candidate.shape == pick.shape
                    and label_inside_brain(candidate[None], brain[index : index + 1], LESION_LABELS).item()
                ):
                    pick = candidate
                    self.accepted += 1
                    break
            else:
                self.fallbacks += 1
            chosen.append(pick)
        return torch.stack(chosen)


def _weights(defaults: tuple[str, ...], given: Mapping[str, float] | None) -> dict[str, float]:
    weights = {name: 1.0 for name in defaults}
    unknown = set(given or {}) - set(weights)
    if unknown:
        raise ValueError(f"unknown loss weight(s) {sorted(unknown)}; known: {sorted(weights)}")
    weights.update({k: float(v) for k, v in (given or {}).items()})
    return weights


class StructuralMapTrainer(AdversarialTrainer):
    """Stage 1: the structural-map VAE-GAN and the MASK generator (see the module docstring).

    Args:
        networks: ``vae`` (:class:`~medsynth.networks.qu.StructureVAE`), ``map_discriminator``
            (a PatchGAN on 1 channel), ``code_discriminator`` and ``mask_generator``.
        optimizers: ``discriminator`` (both discriminators), ``generator`` (the VAE), ``mask``.
        beta: Algorithm 1's threshold (images in [0, 1]).
        enlarge_pixels: Algorithm 2's ``p``.
        loss_weights: of ``adversarial``, ``normal``, ``self_supervised``, ``mask``.
        other arguments: :class:`~medsynth.engines.AdversarialTrainer`.
    """

    phases: ClassVar[tuple[str, ...]] = ("discriminator", "generator", "mask")
    WEIGHTS: ClassVar[tuple[str, ...]] = ("adversarial", "normal", "self_supervised", "mask")

    def __init__(
        self,
        *args: Any,
        beta: float = 0.1,
        enlarge_pixels: int = 4,
        loss_weights: Mapping[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.beta, self.enlarge_pixels = float(beta), int(enlarge_pixels)
        self.weights = _weights(self.WEIGHTS, loss_weights)

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        vae, d_map = self.networks["vae"], self.networks["map_discriminator"]
        d_code, mask_net = self.networks["code_discriminator"], self.networks["mask_generator"]
        images = to_unit(batch["image"])
        modality = int(torch.randint(images.shape[1], ()).item())
        x = images[:, modality : modality + 1]
        structure = structural_feature_map(x, self.beta)
        brain = brain_area_mask(x, self.enlarge_pixels)
        with self.autocast():
            mean, log_variance = unwrap(vae).encode(structure)
            code = unwrap(vae).reparameterize(mean, log_variance)
            reconstructed = unwrap(vae).decode(code)
            prior = torch.randn_like(code)
            generated = unwrap(vae).decode(prior)
        # 1. discriminators
        with self.autocast():
            loss_code_d = least_squares(d_code(prior), 1.0) + least_squares(d_code(code.detach()), 0.0)
            loss_map_d = least_squares(d_map(structure)[-1], 1.0) + least_squares(
                d_map(generated.detach())[-1], 0.0
            )
        self.optimize("discriminator", loss_code_d + loss_map_d)
        # 2. encoder and decoder
        with self.autocast():
            adversarial = least_squares(d_code(code), 1.0) + least_squares(d_map(generated)[-1], 1.0)
        normal = code_distribution_loss(mean, log_variance)
        reconstructed = reconstructed.float()
        self_supervised = F.mse_loss(reconstructed, structure) + torch.mean(
            (reconstructed * (1 - brain)) ** 2
        )
        w = self.weights
        self.optimize("generator", w["adversarial"] * adversarial + w["normal"] * normal
                      + w["self_supervised"] * self_supervised)  # fmt: skip
        # 3. the MASK generator
        with self.autocast():
            mask_real = mask_net(structure).float()
            mask_generated = mask_net(generated.detach()).float()
        outside = [
            torch.mean((m * (1 - mask)) ** 2)
            for m, mask in (
                (structure, mask_real),
                (reconstructed.detach(), mask_real),
                (generated.detach().float(), mask_generated),
            )  # fmt: skip
        ]
        mask_loss = F.mse_loss(mask_real, brain) + sum(outside)
        self.optimize("mask", w["mask"] * mask_loss)
        return {
            "loss_code_discriminator": float(loss_code_d.detach()),
            "loss_map_discriminator": float(loss_map_d.detach()),
            "loss_adversarial": float(adversarial.detach()),
            "loss_normal": float(normal.detach()),
            "loss_self_supervised": float(self_supervised.detach()),
            "loss_mask": float(mask_loss.detach()),
        }


class MultimodalGenerationTrainer(AdversarialTrainer):
    """Stage 2: multimodal generation from fused maps with the real-image training (module docstring).

    Args:
        networks: ``generator`` (:class:`~medsynth.networks.qu.ModalityUNet`), ``discriminator``
            (:class:`~medsynth.networks.qu.ModalityDiscriminator`), ``segmenters``
            (:class:`~medsynth.networks.qu.LesionSegmenters`) and optionally ``code_discriminator``
            (:class:`~medsynth.networks.qu.CodeDiscriminator` on the generator's bottleneck codes; its
            parameters belong to the ``discriminator`` optimizer).
        optimizers: ``discriminator``; ``generator`` (the generator and the segmenters).
        beta: Algorithm 1's threshold.
        enlarge_pixels: Algorithm 2's ``p``.
        structure_modality: the channel whose structural map is fused (default the first).
        label_weight: of the fusion (:func:`medsynth.transforms.structure.fuse_structure_and_label`).
        label_bank: where drawn labels come from (default :class:`LabelBank()`).
        structure_sharpness: of the differentiable Algorithm 1 in the structural-map loss.
        loss_weights: of the terms named in :attr:`WEIGHTS`.
        other arguments: :class:`~medsynth.engines.AdversarialTrainer`.
    """

    phases: ClassVar[tuple[str, ...]] = ("discriminator", "generator")
    WEIGHTS: ClassVar[tuple[str, ...]] = (
        "adversarial", "category", "reconstruction", "cycle", "cycle_consistency", "code_consistency",
        "lesion", "structure", "registration", "code_adversarial",
    )  # fmt: skip

    def __init__(
        self,
        *args: Any,
        beta: float = 0.1,
        enlarge_pixels: int = 4,
        structure_modality: int = 0,
        label_weight: float = 0.5,
        label_bank: LabelBank | None = None,
        structure_sharpness: float = 50.0,
        loss_weights: Mapping[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.beta, self.enlarge_pixels = float(beta), int(enlarge_pixels)
        self.structure_modality, self.label_weight = int(structure_modality), float(label_weight)
        self.label_bank = label_bank or LabelBank()
        self.structure_sharpness = float(structure_sharpness)
        self.weights = _weights(self.WEIGHTS, loss_weights)

    def fuse(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(fused map, its one-hot label, the cleared structural map)`` of a batch (Sec. 2.5)."""
        x = to_unit(batch["image"])[:, self.structure_modality : self.structure_modality + 1]
        brain = brain_area_mask(x, self.enlarge_pixels)
        structure = remove_lesion_structure(
            structural_feature_map(x, self.beta), batch["label"], LESION_LABELS
        )
        label = self.label_bank.draw(batch["label"], brain)
        onehot = fused_label(label, brain)
        return fuse_structure_and_label(structure, onehot, self.label_weight), onehot, structure

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        net, disc = unwrap(self.networks["generator"]), self.networks["discriminator"]
        segmenters = unwrap(self.networks["segmenters"])
        images, onehot_real = batch["image"].float(), batch["mask"].float()
        modalities = range(images.shape[1])
        pairs = [(i, j) for i, j in itertools.permutations(modalities, 2)]
        fused, onehot_fused, structure = self.fuse(batch)
        self.label_bank.add(batch["label"])
        with self.autocast():
            # Real images: reconstruction, translation, cycle.
            levels = {i: net.encode_image(images[:, i : i + 1]) for i in modalities}
            recon = {i: net.decode(levels[i], i) for i in modalities}
            trans = {(i, j): net.decode(levels[i], j) for i, j in pairs}
            trans_levels = {p: net.encode_image(trans[p]) for p in pairs}
            cycle = {(i, j): net.decode(trans_levels[(i, j)], i) for i, j in pairs}
            real_logits = {i: segmenters.segment(images[:, i : i + 1], i) for i in modalities}
            # Generation from the fused map.
            fused_levels = net.encode_fused(fused)
            generated = {i: net.decode(fused_levels, i) for i in modalities}
            gen_levels = {i: net.encode_image(generated[i]) for i in modalities}
            gen_trans = {(j, i): net.decode(gen_levels[j], i) for j, i in pairs}
        # 1. discriminator: real as real of their modality; translations and generated as fake (of theirs).
        with self.autocast():
            loss_d = images.new_zeros(())
            for i in modalities:
                for image, real in ((images[:, i : i + 1], 1.0), (generated[i].detach(), 0.0)):
                    d, c = disc(image)
                    loss_d = loss_d + least_squares(d, real) + modality_class_loss(c, i)
            for i, j in pairs:
                d, c = disc(trans[(i, j)].detach())
                loss_d = loss_d + least_squares(d, 0.0) + modality_class_loss(c, j)
            code_disc = self.networks.get("code_discriminator")
            if code_disc is not None:
                real_codes = torch.cat([levels[i][-1].detach() for i in modalities])
                loss_d = loss_d + least_squares(code_disc(real_codes), 1.0)
                loss_d = loss_d + least_squares(code_disc(fused_levels[-1].detach()), 0.0)
        self.optimize("discriminator", loss_d)
        # 2. generator and segmenters
        terms = dict.fromkeys(self.WEIGHTS, images.new_zeros(()))
        with self.autocast():
            for target, image in [*((j, trans[(i, j)]) for i, j in pairs), *generated.items()]:
                d, c = disc(image)
                terms["adversarial"] = terms["adversarial"] + least_squares(d, 1.0)
                terms["category"] = terms["category"] + modality_class_loss(c, target)
            if code_disc is not None:
                terms["code_adversarial"] = least_squares(code_disc(fused_levels[-1]), 1.0)
            for parameter in segmenters.parameters():  # the segmenters only judge generated images
                parameter.requires_grad_(False)
            gen_logits = {i: segmenters.segment(generated[i], i) for i in modalities}
            for parameter in segmenters.parameters():
                parameter.requires_grad_(True)
        outside_lesion = 1.0 - onehot_fused[:, list(LESION_LABELS)].sum(1, keepdim=True)
        for i in modalities:
            x_i = images[:, i : i + 1]
            terms["reconstruction"] = terms["reconstruction"] + F.mse_loss(recon[i].float(), x_i)
            terms["lesion"] = terms["lesion"] + soft_label_loss(real_logits[i], onehot_real)
            terms["lesion"] = terms["lesion"] + soft_label_loss(gen_logits[i], onehot_fused)
            generated_structure = soft_structural_map(
                to_unit(generated[i]), self.beta, self.structure_sharpness
            )
            terms["structure"] = terms["structure"] + torch.mean(
                ((generated_structure - structure) * outside_lesion) ** 2
            )
            terms["code_consistency"] = terms["code_consistency"] + F.mse_loss(
                gen_levels[i][-1].float(), fused_levels[-1].float()
            )
        for i, j in pairs:
            terms["cycle"] = terms["cycle"] + F.mse_loss(cycle[(i, j)].float(), images[:, i : i + 1])
            terms["code_consistency"] = terms["code_consistency"] + F.mse_loss(
                trans_levels[(i, j)][-1].float(), levels[i][-1].float()
            )
            terms["code_consistency"] = terms["code_consistency"] + F.mse_loss(
                gen_levels[i][-1].float(), gen_levels[j][-1].float()
            )
            terms["registration"] = terms["registration"] + F.mse_loss(
                gen_trans[(i, j)].float(), generated[j].float()
            )
            for k in modalities:
                if k not in (i, j):
                    terms["cycle_consistency"] = terms["cycle_consistency"] + F.mse_loss(
                        cycle[(i, j)].float(), cycle[(i, k)].float()
                    )
        total = sum(self.weights[name] * value for name, value in terms.items())
        self.optimize("generator", total)
        record = {f"loss_{name}": float(value.detach()) for name, value in terms.items()}
        record["loss_discriminator"] = float(loss_d.detach())
        record["drawn_label_share"] = self.label_bank.accepted / max(
            1, self.label_bank.accepted + self.label_bank.fallbacks
        )
        return record
