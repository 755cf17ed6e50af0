"""UCG-SAMR's unpaired training (TMI 2021, Sec. III-E, eq. 7-10) as a short subclass of
:class:`~medsynth.engines.adversarial.AdversarialTrainer`.

Per iteration, with ``x`` a domain-1 instance (mask and prior) and ``y`` unpaired images:

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
    "UNITTrainer",
    "UnpairedGANTrainer",
]

UNPAIRED_BATCH = PrepareDictBatch(("mask", "tissue", "image"), extra_keys=("mask_patient", "image_patient"))


class UnpairedGANTrainer(AdversarialTrainer):
    """UCG-SAMR's two GANs on unpaired batches (see the module docstring).

    Args:
        device, max_epochs, train_data_loader: as :class:`~medsynth.engines.AdversarialTrainer`;
            the loader yields :class:`medsynth.data.unpaired.UnpairedSliceDataset` batches.
        generator: :class:`medsynth.networks.UCGSAMRGenerator` (E1, F1, E2, F2).
        discriminator: ``nn.ModuleDict`` with ``"domain1"`` (D1, on the 5 + 3 domain-1 channels) and
            ``"domain2"`` (D2, on the N images), each returning a list of feature lists.
        g_optimizer, d_optimizer: the two optimizers.
        adversarial_loss: ``generator_loss`` / ``discriminator_loss`` (LSGAN by default in the bundle).
        confidence_loss: L_CM (:class:`medsynth.losses.ConfidenceMapLoss`); ``None`` leaves it out.
        weight_reconstruction, weight_cycle: weights of the reconstruction and cycle terms (1 in eq. 10).
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
        confidence_loss: nn.Module | None = None,
        weight_reconstruction: float = 1.0,
        weight_cycle: float = 1.0,
        prepare_batch: Any = UNPAIRED_BATCH,
        **engine_kwargs: Any,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            networks={"generator": generator, "discriminator": discriminator},
            optimizers={"generator": g_optimizer, "discriminator": d_optimizer},
            losses={"adversarial_loss": adversarial_loss, "confidence_loss": confidence_loss},
            prepare_batch=prepare_batch,
            **engine_kwargs,
        )
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
        discriminators = unwrap(self.networks["discriminator"])  # the ModuleDict of D1 and D2
        adversarial = self.losses["adversarial_loss"]
        x, y = to_domain1(batch["mask"], batch["tissue"]), batch["image"]

        with self.autocast():
            z1, z2 = generator.encode_masks(x), generator.encode_images(y)
            x11, y22 = generator.decode_masks(z1), generator.decode_images(z2)
            x21, y12 = generator.decode_masks(z2), generator.decode_images(z1)
            x121 = generator.decode_masks(generator.encode_images(y12["images"]))
            y212 = generator.decode_images(generator.encode_masks(x21))
            with self.no_sync("discriminator"):
                fake1 = float_features(discriminators["domain1"](x21))
                fake2 = float_features(discriminators["domain2"](y12["images"]))
        record: dict[str, float] = {}
        terms = {
            "loss_recon1": F.l1_loss(x11.float(), x),
            "loss_gan1": adversarial.generator_loss(fake1),
            "loss_cyc1": F.l1_loss(x121.float(), x),
            "loss_gan2": adversarial.generator_loss(fake2),
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
        record.update({name: float(value.detach()) for name, value in terms.items()})
        self.optimize("generator", loss_g)

        with self.autocast():
            real1, fake1 = discriminators["domain1"](x), discriminators["domain1"](x21.detach())
            real2, fake2 = discriminators["domain2"](y), discriminators["domain2"](y12["images"].detach())
        loss_d1 = adversarial.discriminator_loss(float_features(real1), float_features(fake1))
        loss_d2 = adversarial.discriminator_loss(float_features(real2), float_features(fake2))
        self.optimize("discriminator", loss_d1 + loss_d2)
        record.update(
            loss_g=float(loss_g.detach()),
            loss_d1=float(loss_d1.detach()),
            loss_d2=float(loss_d2.detach()),
            lr=float(self.optimizers["generator"].param_groups[0]["lr"]),
        )
        return record


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


class CycleGANTrainer(AdversarialTrainer):
    """CycleGAN (Zhu et al., ICCV 2017) on unpaired batches of the two domains:

    1. generators ``G_A`` (masks -> images), ``G_B`` (images -> masks) together:
       ``L_GAN(D_2(G_A(x))) + L_GAN(D_1(G_B(y))) + lambda_cyc * (|G_B(G_A(x)) - x|_1 + |G_A(G_B(y)) - y|_1)``;
       CycleGAN's identity term (weight 0.5) needs both domains to have the same channels, which a
       mask with its prior (8) and the images (N) do not: it is left out, and the log says so;
    2. discriminators, each ``0.5 * [L(D(real), real) + L(D(pooled fake), fake)]`` (image pools of 50;
       the halving is the adversarial loss's ``discriminator_loss``).

    Args:
        device, max_epochs, train_data_loader: as :class:`UnpairedGANTrainer`.
        generator: :class:`medsynth.networks.CycleGANGenerators`.
        discriminator: ``nn.ModuleDict`` with ``"domain1"`` and ``"domain2"``.
        g_optimizer, d_optimizer: the two optimizers.
        adversarial_loss: LSGAN (:class:`medsynth.losses.LeastSquaresAdversarialLoss`) in CycleGAN.
        weight_cycle: ``lambda_cyc`` (10).
        pool_size: image-pool size (50).
        seed: seeds the pools.
        segmentation_loss: SynSeg-Net's term: ``loss(S(G_A(x)) logits, mask labels)``, with ``S`` the
            generator's ``segment`` (:class:`medsynth.networks.SynSegNetGenerators`); ``None``: CycleGAN.
        weight_segmentation: its weight.
        engine_kwargs: see the base class.
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
        weight_cycle: float = 10.0,
        pool_size: int = 50,
        seed: int = 0,
        segmentation_loss: Any = None,
        weight_segmentation: float = 1.0,
        prepare_batch: Any = UNPAIRED_BATCH,
        **engine_kwargs: Any,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            networks={"generator": generator, "discriminator": discriminator},
            optimizers={"generator": g_optimizer, "discriminator": d_optimizer},
            losses={"adversarial_loss": adversarial_loss, "segmentation_loss": segmentation_loss},
            prepare_batch=prepare_batch,
            **engine_kwargs,
        )
        self.weight_cycle, self.weight_segmentation = float(weight_cycle), float(weight_segmentation)
        self.pools = {"domain1": ImagePool(pool_size, seed), "domain2": ImagePool(pool_size, seed + 1)}
        import logging

        logging.getLogger(__name__).info(
            "CycleGAN: identity loss off (a mask with its prior and the images have different channels)"
        )

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        generators = unwrap(self.networks["generator"])
        discriminators = unwrap(self.networks["discriminator"])
        adversarial = self.losses["adversarial_loss"]
        x, y = to_domain1(batch["mask"], batch["tissue"]), batch["image"]
        with self.autocast():
            fake_y, fake_x = generators.masks_to_images(x), generators.images_to_masks(y)
            cycled_x, cycled_y = generators.images_to_masks(fake_y), generators.masks_to_images(fake_x)
            with self.no_sync("discriminator"):
                judged_y = float_features(discriminators["domain2"](fake_y))
                judged_x = float_features(discriminators["domain1"](fake_x))
        terms = {
            "loss_gan_a": adversarial.generator_loss(judged_y),
            "loss_gan_b": adversarial.generator_loss(judged_x),
            "loss_cyc_a": F.l1_loss(cycled_x.float(), x),
            "loss_cyc_b": F.l1_loss(cycled_y.float(), y),
        }
        loss_g = (
            terms["loss_gan_a"]
            + terms["loss_gan_b"]
            + self.weight_cycle * (terms["loss_cyc_a"] + terms["loss_cyc_b"])
        )
        if "segmentation_loss" in self.losses:  # SynSeg-Net: S learns the masks' labels on G_A's images
            with self.autocast():
                logits = generators.segment(fake_y)
            labels = batch["mask"].argmax(dim=1, keepdim=True)
            terms["loss_seg"] = self.losses["segmentation_loss"](logits.float(), labels)
            loss_g = loss_g + self.weight_segmentation * terms["loss_seg"]
        self.optimize("generator", loss_g)
        pooled_y, pooled_x = (
            self.pools["domain2"].query(fake_y.float()),
            self.pools["domain1"].query(fake_x.float()),
        )
        with self.autocast():
            loss_d2 = adversarial.discriminator_loss(
                float_features(discriminators["domain2"](y)),
                float_features(discriminators["domain2"](pooled_y)),
            )
            loss_d1 = adversarial.discriminator_loss(
                float_features(discriminators["domain1"](x)),
                float_features(discriminators["domain1"](pooled_x)),
            )
        self.optimize("discriminator", loss_d1 + loss_d2)  # each already 0.5 * (real + fake)
        record = {name: float(value.detach()) for name, value in terms.items()}
        record.update(
            loss_g=float(loss_g.detach()),
            loss_d1=float(loss_d1.detach()),
            loss_d2=float(loss_d2.detach()),
            lr=float(self.optimizers["generator"].param_groups[0]["lr"]),
        )
        return record


class UNITTrainer(AdversarialTrainer):
    """UNIT (Liu et al., NeurIPS 2017) on unpaired batches: with ``z ~ N(E(.), I)``,

    * generators: ``L_GAN(D1(G1(z2))) + L_GAN(D2(G2(z1)))``
      ``+ w_rec * (|G1(z1) - x|_1 + |G2(z2) - y|_1) + w_kl * (KL(E1(x)) + KL(E2(y)))``
      ``+ w_cyc * (|G1(E2(G2(z1))) - x|_1 + |G2(E1(G1(z2))) - y|_1) + w_cyc_kl * (KL of the cycle codes)``,
      with ``KL(mu) = mean(mu^2)`` for a unit-variance Gaussian (up to constants); weights 10, 0.01, 10,
      0.01 as UNIT's; LSGAN as in UNIT's public configuration (the paper writes the log form);
    * discriminators: D1 real ``x`` vs ``G1(z2)``, D2 real ``y`` vs ``G2(z1)``.

    Args:
        device, max_epochs, train_data_loader: as :class:`UnpairedGANTrainer`.
        generator: :class:`medsynth.networks.UNITGenerators`.
        discriminator: ``nn.ModuleDict`` with ``"domain1"`` and ``"domain2"``.
        g_optimizer, d_optimizer, adversarial_loss: as :class:`CycleGANTrainer`.
        weight_reconstruction, weight_kl, weight_cycle, weight_cycle_kl: UNIT's lambdas.
        engine_kwargs: see the base class.
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
        weight_reconstruction: float = 10.0,
        weight_kl: float = 0.01,
        weight_cycle: float = 10.0,
        weight_cycle_kl: float = 0.01,
        prepare_batch: Any = UNPAIRED_BATCH,
        **engine_kwargs: Any,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            networks={"generator": generator, "discriminator": discriminator},
            optimizers={"generator": g_optimizer, "discriminator": d_optimizer},
            losses={"adversarial_loss": adversarial_loss},
            prepare_batch=prepare_batch,
            **engine_kwargs,
        )
        self.weights = {"loss_rec": weight_reconstruction, "loss_kl": weight_kl, "loss_cyc": weight_cycle,
                        "loss_cyc_kl": weight_cycle_kl, "loss_gan": 1.0}  # fmt: skip

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        unit = unwrap(self.networks["generator"])
        discriminators = unwrap(self.networks["discriminator"])
        adversarial = self.losses["adversarial_loss"]
        x, y = to_domain1(batch["mask"], batch["tissue"]), batch["image"]

        def kl(mu: torch.Tensor) -> torch.Tensor:
            return mu.float().pow(2).mean()

        with self.autocast():
            mu1, mu2 = unit.encode_masks(x), unit.encode_images(y)
            z1, z2 = unit.sample(mu1), unit.sample(mu2)
            x11, y22 = unit.decode_masks(z1), unit.decode_images(z2)
            x21, y12 = unit.decode_masks(z2), unit.decode_images(z1)
            mu12, mu21 = unit.encode_images(y12), unit.encode_masks(x21)
            x121, y212 = unit.decode_masks(unit.sample(mu12)), unit.decode_images(unit.sample(mu21))
            with self.no_sync("discriminator"):
                judged1 = float_features(discriminators["domain1"](x21))
                judged2 = float_features(discriminators["domain2"](y12))
        terms = {
            "loss_gan": adversarial.generator_loss(judged1) + adversarial.generator_loss(judged2),
            "loss_rec": F.l1_loss(x11.float(), x) + F.l1_loss(y22.float(), y),
            "loss_kl": kl(mu1) + kl(mu2),
            "loss_cyc": F.l1_loss(x121.float(), x) + F.l1_loss(y212.float(), y),
            "loss_cyc_kl": kl(mu12) + kl(mu21),
        }
        loss_g = sum(self.weights[name] * value for name, value in terms.items())
        self.optimize("generator", loss_g)
        with self.autocast():
            real1, fake1 = discriminators["domain1"](x), discriminators["domain1"](x21.detach())
            real2, fake2 = discriminators["domain2"](y), discriminators["domain2"](y12.detach())
        loss_d1 = adversarial.discriminator_loss(float_features(real1), float_features(fake1))
        loss_d2 = adversarial.discriminator_loss(float_features(real2), float_features(fake2))
        self.optimize("discriminator", loss_d1 + loss_d2)
        record = {name: float(value.detach()) for name, value in terms.items()}
        record.update(
            loss_g=float(loss_g.detach()),
            loss_d1=float(loss_d1.detach()),
            loss_d2=float(loss_d2.detach()),
            lr=float(self.optimizers["generator"].param_groups[0]["lr"]),
        )
        return record
