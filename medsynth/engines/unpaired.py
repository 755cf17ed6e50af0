"""The unpaired trainers: UCG-SAMR (TMI 2021, Sec. III-E, eq. 7-10) and the papers' unpaired comparison
systems CycleGAN and SynSeg-Net (one trainer) and UNIT, as short subclasses of one two-domain base.

Every batch holds a domain-1 instance ``x`` (the one-hot mask and its tissue prior,
:func:`medsynth.networks.to_domain1`) and unpaired images ``y``
(:class:`medsynth.data.unpaired.UnpairedSliceDataset`). :class:`TwoDomainTrainer` owns what they
share: the networks (a generator module with both directions; D1 and D2 in one ``ModuleDict``), the
discriminators' update on real versus synthesised instances of each domain, and the record.

UCG-SAMR's iteration (:class:`UnpairedGANTrainer`):

1. generator (E1, F1, E2, F2 together), ``L_domain1 + L_domain2`` of eq. 10:
   * reconstruction (eq. 7): ``|x - F1(E1(x))|_1`` and ``|y - F2(E2(y))|_1 + L_CM(F2's guidance | y)``;
   * cross-domain (eq. 8): ``x^{2->1} = F1(E2(y))`` judged by D1, ``y^{1->2} = F2(E1(x))`` by D2; the
     paper writes the log (vanilla) form, the project's adversarial loss is LSGAN as in every other
     method here (``adversarial_loss`` may be :class:`medsynth.losses.VanillaAdversarialLoss`);
   * cycle (eq. 9): ``|x - F1(E2(y^{1->2}))|_1`` and ``|y - F2(E1(x^{2->1}))|_1 + L_CM(... | y)``;
2. discriminators: D1 real ``x`` vs ``x^{2->1}``, D2 real ``y`` vs ``y^{1->2}`` (detached).

Eq. 10 weighs every term 1; ``weight_reconstruction`` and ``weight_cycle`` keep them configurable.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer

from medsynth.engines.adversarial import AdversarialTrainer, float_features, unwrap
from medsynth.engines.utils import PrepareDictBatch
from medsynth.networks.unpaired import to_domain1

__all__ = [
    "UNPAIRED_BATCH",
    "CycleGANTrainer",
    "ImagePool",
    "MaskFromImagesTableWriter",
    "TwoDomainTrainer",
    "UNITTrainer",
    "UnpairedGANTrainer",
]

logger = logging.getLogger(__name__)

UNPAIRED_BATCH = PrepareDictBatch(("mask", "tissue", "image"), extra_keys=("mask_patient", "image_patient"))


class TwoDomainTrainer(AdversarialTrainer):
    """Base of the unpaired trainers: a generator module with both directions and the discriminators
    D1 (domain 1) and D2 (domain 2); subclasses implement :meth:`train_step` from :meth:`domains`,
    :meth:`judge`, :meth:`update_discriminators` and :meth:`record`.

    Args:
        device, max_epochs, train_data_loader: as :class:`~medsynth.engines.AdversarialTrainer`;
            the loader yields :class:`medsynth.data.unpaired.UnpairedSliceDataset` batches.
        generator: the two directions (e.g. :class:`medsynth.networks.UCGSAMRGenerator`).
        discriminator: ``nn.ModuleDict`` with ``"domain1"`` (D1, on the 5 + 3 domain-1 channels) and
            ``"domain2"`` (D2, on the N images), each returning a list of feature lists.
        g_optimizer, d_optimizer: the two optimizers.
        adversarial_loss: ``generator_loss`` / ``discriminator_loss`` (LSGAN in the bundles).
        losses: the subclass's further losses, by name (``None`` values are left out).
        engine_kwargs: ``lr_schedule``, ``train_handlers``, ``amp``, ... (see the base class).
    """

    phases = ("generator", "discriminator")

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        generator: nn.Module,
        discriminator: nn.ModuleDict,
        g_optimizer: Optimizer,
        d_optimizer: Optimizer,
        adversarial_loss: Any,
        losses: dict[str, Any] | None = None,
        prepare_batch: Any = UNPAIRED_BATCH,
        **engine_kwargs: Any,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            networks={"generator": generator, "discriminator": discriminator},
            optimizers={"generator": g_optimizer, "discriminator": d_optimizer},
            losses={"adversarial_loss": adversarial_loss, **(losses or {})},
            prepare_batch=prepare_batch,
            **engine_kwargs,
        )

    @staticmethod
    def domains(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``: the batch's domain-1 instances and its (unpaired) images."""
        return to_domain1(batch["mask"], batch["tissue"]), batch["image"]

    def judge(self, fake1: torch.Tensor, fake2: torch.Tensor) -> torch.Tensor:
        """The generators' adversarial loss: D1 on synthesised domain-1 instances, D2 on synthesised
        images (inside the generators' autocast; the discriminators' gradients are discarded)."""
        discriminators, adversarial = unwrap(self.networks["discriminator"]), self.losses["adversarial_loss"]
        with self.no_sync("discriminator"):
            judged1 = float_features(discriminators["domain1"](fake1))
            judged2 = float_features(discriminators["domain2"](fake2))
        return adversarial.generator_loss(judged1), adversarial.generator_loss(judged2)

    def update_discriminators(
        self, x: torch.Tensor, fake1: torch.Tensor, y: torch.Tensor, fake2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One update of D1 (real ``x`` vs ``fake1``) and D2 (real ``y`` vs ``fake2``); the fakes are
        detached here. Each loss is the adversarial loss's ``discriminator_loss`` (0.5 * (real + fake))."""
        discriminators, adversarial = unwrap(self.networks["discriminator"]), self.losses["adversarial_loss"]
        with self.autocast():
            real1, judged1 = discriminators["domain1"](x), discriminators["domain1"](fake1.detach())
            real2, judged2 = discriminators["domain2"](y), discriminators["domain2"](fake2.detach())
        loss_d1 = adversarial.discriminator_loss(float_features(real1), float_features(judged1))
        loss_d2 = adversarial.discriminator_loss(float_features(real2), float_features(judged2))
        self.optimize("discriminator", loss_d1 + loss_d2)
        return loss_d1, loss_d2

    def record(
        self,
        terms: dict[str, torch.Tensor],
        loss_g: torch.Tensor,
        loss_d1: torch.Tensor,
        loss_d2: torch.Tensor,
    ) -> dict[str, float]:
        """The iteration's record: every generator term, the totals and the learning rate."""
        record = {name: float(value.detach()) for name, value in terms.items()}
        record.update(
            loss_g=float(loss_g.detach()),
            loss_d1=float(loss_d1.detach()),
            loss_d2=float(loss_d2.detach()),
            lr=float(self.optimizers["generator"].param_groups[0]["lr"]),
        )
        return record


class UnpairedGANTrainer(TwoDomainTrainer):
    """UCG-SAMR's two GANs (see the module docstring).

    Args:
        generator: :class:`medsynth.networks.UCGSAMRGenerator` (E1, F1, E2, F2).
        confidence_loss: L_CM (:class:`medsynth.losses.ConfidenceMapLoss`); ``None`` leaves it out.
        weight_reconstruction, weight_cycle: weights of the reconstruction and cycle terms (1 in eq. 10).
        args, kwargs: those of :class:`TwoDomainTrainer` (networks, optimizers, adversarial loss, engine).
    """

    def __init__(
        self,
        *args: Any,
        confidence_loss: nn.Module | None = None,
        weight_reconstruction: float = 1.0,
        weight_cycle: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, losses={"confidence_loss": confidence_loss}, **kwargs)
        self.weights = {"reconstruction": float(weight_reconstruction), "cycle": float(weight_cycle)}

    def _image_side(
        self, decoded: dict[str, torch.Tensor], real: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """L1 of decoded images against ``real``, and L_CM of their guidance (when configured)."""
        l1 = F.l1_loss(decoded["images"].float(), real)
        if "confidence_loss" not in self.losses:
            return l1, None
        cm = self.losses["confidence_loss"](
            decoded["intermediate"].float(), decoded["confidence"].float(), real
        )
        return l1, cm

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        generator = unwrap(self.networks["generator"])
        x, y = self.domains(batch)
        with self.autocast():
            z1, z2 = generator.encode_masks(x), generator.encode_images(y)
            x11, y22 = generator.decode_masks(z1), generator.decode_images(z2)
            x21, y12 = generator.decode_masks(z2), generator.decode_images(z1)
            x121 = generator.decode_masks(generator.encode_images(y12["images"]))
            y212 = generator.decode_images(generator.encode_masks(x21))
            gan1, gan2 = self.judge(x21, y12["images"])
        terms = {
            "loss_recon1": F.l1_loss(x11.float(), x),
            "loss_gan1": gan1,
            "loss_cyc1": F.l1_loss(x121.float(), x),
            "loss_gan2": gan2,
        }
        terms["loss_recon2"], recon_cm = self._image_side(y22, y)
        terms["loss_cyc2"], cycle_cm = self._image_side(y212, y)
        if recon_cm is not None:
            terms["loss_cm_recon2"], terms["loss_cm_cyc2"] = recon_cm, cycle_cm
        weight = {"loss_recon1": "reconstruction", "loss_recon2": "reconstruction",
                  "loss_cm_recon2": "reconstruction", "loss_cyc1": "cycle", "loss_cyc2": "cycle",
                  "loss_cm_cyc2": "cycle"}  # fmt: skip
        loss_g = sum(
            self.weights[weight[name]] * value if name in weight else value for name, value in terms.items()
        )
        self.optimize("generator", loss_g)
        loss_d1, loss_d2 = self.update_discriminators(x, x21, y, y12["images"])
        return self.record(terms, loss_g, loss_d1, loss_d2)


class MaskFromImagesTableWriter:
    """Table IV of CG-SAMR's paper: the images -> mask direction of an unpaired model (``F1(E2(y))``,
    :meth:`medsynth.networks.UCGSAMRGenerator.segment`) scored against the true label maps, per patient
    on the stacked slices of ``dataset`` (Dice, HD95, sensitivity, specificity per lesion class,
    :class:`medsynth.metrics.SegmentationMetrics`); written when the evaluator completes.

    Args:
        generator: the unpaired generator (with ``segment``).
        dataset: slice items with ``image``, ``label``, ``patient_id``, ``slice_index``.
        output_dir: where ``<table_name>.csv`` / ``.md`` go.
        table_name: file stem (e.g. ``table4_test``).
        device: where the generator runs.
        batch_size: slices per forward pass.
    """

    def __init__(self, generator: nn.Module, dataset: Any, output_dir: str, table_name: str = "table4_test",
                 device: str | torch.device = "cpu", batch_size: int = 8) -> None:  # fmt: skip
        self.generator, self.dataset = generator, dataset
        self.output_dir, self.table_name = output_dir, table_name
        self.device, self.batch_size = torch.device(device), int(batch_size)
        self.table = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, lambda _: self.write())

    def write(self):
        """Segment every slice, score per patient, write the table; returns it."""
        from collections import defaultdict

        from medsynth.metrics.segmentation import SegmentationMetrics
        from medsynth.metrics.tables import write_table

        generator = unwrap(self.generator)
        was_training = generator.training
        generator.eval()
        predicted, truth = defaultdict(dict), defaultdict(dict)
        with torch.no_grad():
            for start in range(0, len(self.dataset), self.batch_size):
                items = [
                    self.dataset[i] for i in range(start, min(start + self.batch_size, len(self.dataset)))
                ]
                images = (
                    torch.stack([torch.as_tensor(item["image"]) for item in items]).float().to(self.device)
                )
                labels = generator.segment(images).argmax(dim=1).cpu()
                for item, label in zip(items, labels, strict=True):
                    predicted[item["patient_id"]][int(item["slice_index"])] = label
                    truth[item["patient_id"]][int(item["slice_index"])] = torch.as_tensor(item["label"])[0]
        generator.train(was_training)
        metrics = SegmentationMetrics()
        for patient in sorted(predicted):
            order = sorted(predicted[patient])
            pred = torch.stack([predicted[patient][z] for z in order], dim=-1)[None, None]
            true = torch.stack([truth[patient][z] for z in order], dim=-1)[None, None]
            metrics.update(pred, true)
        self.table = metrics.aggregate()
        caption = f"Table IV layout: lesion masks from images (F1(E2(y))), {len(predicted)} patient(s)"
        write_table(self.table, self.output_dir, self.table_name, caption=caption)
        return self.table


class ImagePool:
    """CycleGAN's history of generated images (Shrivastava et al.): the discriminator sees, for each
    new fake, with probability 1/2 an older one from the pool instead (which then takes its place),
    once the pool holds ``size`` images. Seeded, so training stays deterministic.

    Args:
        size: images kept (50 in CycleGAN; 0 passes the fakes through).
        seed: seeds the choices.
    """

    def __init__(self, size: int = 50, seed: int = 0) -> None:
        self.size, self.images = int(size), []
        self.generator = torch.Generator().manual_seed(int(seed))

    def query(self, fakes: torch.Tensor) -> torch.Tensor:
        if self.size <= 0:
            return fakes
        chosen = []
        for image in fakes.detach():
            if len(self.images) < self.size:
                self.images.append(image.clone())
                chosen.append(image)
            elif float(torch.rand((), generator=self.generator)) < 0.5:
                index = int(torch.randint(len(self.images), (), generator=self.generator))
                chosen.append(self.images[index].clone())
                self.images[index] = image.clone()
            else:
                chosen.append(image)
        return torch.stack(chosen)


class CycleGANTrainer(TwoDomainTrainer):
    """CycleGAN (Zhu et al., ICCV 2017), and SynSeg-Net (Huo et al., TMI 2019) with ``segmentation_loss``:

    1. generators ``G_A`` (masks -> images), ``G_B`` (images -> masks) together:
       ``L_GAN(D_2(G_A(x))) + L_GAN(D_1(G_B(y))) + lambda_cyc * (|G_B(G_A(x)) - x|_1 + |G_A(G_B(y)) - y|_1)``
       ``[+ w_seg * L_seg(S(G_A(x)), labels of x)]``; CycleGAN's identity term (weight 0.5) needs both
       domains to have the same channels, which a mask with its prior (8) and the images (N) do not:
       it is left out, and the log says so;
    2. discriminators on real instances versus pooled fakes (image pools of 50).

    Args:
        generator: :class:`medsynth.networks.CycleGANGenerators` (SynSeg-Net: its subclass with ``S``).
        weight_cycle: ``lambda_cyc`` (10).
        pool_size: image-pool size (50).
        seed: seeds the pools.
        segmentation_loss: SynSeg-Net's term: ``loss(S(G_A(x)) logits, mask labels)``, with ``S`` the
            generator's ``segment`` (:class:`medsynth.networks.SynSegNetGenerators`); ``None``: CycleGAN.
        weight_segmentation: its weight.
        args, kwargs: those of :class:`TwoDomainTrainer` (networks, optimizers, adversarial loss, engine).
    """

    def __init__(
        self,
        *args: Any,
        weight_cycle: float = 10.0,
        pool_size: int = 50,
        seed: int = 0,
        segmentation_loss: Any = None,
        weight_segmentation: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, losses={"segmentation_loss": segmentation_loss}, **kwargs)
        self.weight_cycle, self.weight_segmentation = float(weight_cycle), float(weight_segmentation)
        self.pools = {"domain1": ImagePool(pool_size, seed), "domain2": ImagePool(pool_size, seed + 1)}
        logger.info(
            "CycleGAN: identity loss off (a mask with its prior and the images have different channels)"
        )

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        generators = unwrap(self.networks["generator"])
        x, y = self.domains(batch)
        with self.autocast():
            fake_y, fake_x = generators.masks_to_images(x), generators.images_to_masks(y)
            cycled_x, cycled_y = generators.images_to_masks(fake_y), generators.masks_to_images(fake_x)
            gan_b, gan_a = self.judge(fake_x, fake_y)
        terms = {
            "loss_gan_a": gan_a,
            "loss_gan_b": gan_b,
            "loss_cyc_a": F.l1_loss(cycled_x.float(), x),
            "loss_cyc_b": F.l1_loss(cycled_y.float(), y),
        }
        loss_g = gan_a + gan_b + self.weight_cycle * (terms["loss_cyc_a"] + terms["loss_cyc_b"])
        if "segmentation_loss" in self.losses:  # SynSeg-Net: S learns the masks' labels on G_A's images
            with self.autocast():
                logits = generators.segment(fake_y)
            labels = batch["mask"].argmax(dim=1, keepdim=True)
            terms["loss_seg"] = self.losses["segmentation_loss"](logits.float(), labels)
            loss_g = loss_g + self.weight_segmentation * terms["loss_seg"]
        self.optimize("generator", loss_g)
        pooled_x, pooled_y = (
            self.pools["domain1"].query(fake_x.float()),
            self.pools["domain2"].query(fake_y.float()),
        )
        loss_d1, loss_d2 = self.update_discriminators(x, pooled_x, y, pooled_y)
        return self.record(terms, loss_g, loss_d1, loss_d2)


class UNITTrainer(TwoDomainTrainer):
    """UNIT (Liu et al., NeurIPS 2017): with ``z ~ N(E(.), I)``,

    * generators: ``L_GAN(D1(G1(z2))) + L_GAN(D2(G2(z1)))``
      ``+ w_rec * (|G1(z1) - x|_1 + |G2(z2) - y|_1) + w_kl * (KL(E1(x)) + KL(E2(y)))``
      ``+ w_cyc * (|G1(E2(G2(z1))) - x|_1 + |G2(E1(G1(z2))) - y|_1) + w_cyc_kl * (KL of the cycle codes)``,
      with ``KL(mu) = mean(mu^2)`` for a unit-variance Gaussian (up to constants); weights 10, 0.01, 10,
      0.01 as UNIT's; LSGAN as in UNIT's public configuration (the paper writes the log form);
    * discriminators: D1 real ``x`` vs ``G1(z2)``, D2 real ``y`` vs ``G2(z1)``.

    Args:
        generator: :class:`medsynth.networks.UNITGenerators`.
        weight_reconstruction, weight_kl, weight_cycle, weight_cycle_kl: UNIT's lambdas.
        args, kwargs: those of :class:`TwoDomainTrainer` (networks, optimizers, adversarial loss, engine).
    """

    def __init__(
        self,
        *args: Any,
        weight_reconstruction: float = 10.0,
        weight_kl: float = 0.01,
        weight_cycle: float = 10.0,
        weight_cycle_kl: float = 0.01,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.weights = {"loss_rec": weight_reconstruction, "loss_kl": weight_kl, "loss_cyc": weight_cycle,
                        "loss_cyc_kl": weight_cycle_kl, "loss_gan": 1.0}  # fmt: skip

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        unit = unwrap(self.networks["generator"])
        x, y = self.domains(batch)

        def kl(mu: torch.Tensor) -> torch.Tensor:
            return mu.float().pow(2).mean()

        with self.autocast():
            mu1, mu2 = unit.encode_masks(x), unit.encode_images(y)
            z1, z2 = unit.sample(mu1), unit.sample(mu2)
            x11, y22 = unit.decode_masks(z1), unit.decode_images(z2)
            x21, y12 = unit.decode_masks(z2), unit.decode_images(z1)
            mu12, mu21 = unit.encode_images(y12), unit.encode_masks(x21)
            x121, y212 = unit.decode_masks(unit.sample(mu12)), unit.decode_images(unit.sample(mu21))
            gan1, gan2 = self.judge(x21, y12)
        terms = {
            "loss_gan": gan1 + gan2,
            "loss_rec": F.l1_loss(x11.float(), x) + F.l1_loss(y22.float(), y),
            "loss_kl": kl(mu1) + kl(mu2),
            "loss_cyc": F.l1_loss(x121.float(), x) + F.l1_loss(y212.float(), y),
            "loss_cyc_kl": kl(mu12) + kl(mu21),
        }
        loss_g = sum(self.weights[name] * value for name, value in terms.items())
        self.optimize("generator", loss_g)
        loss_d1, loss_d2 = self.update_discriminators(x, x21, y, y12)
        return self.record(terms, loss_g, loss_d1, loss_d2)
