"""UCG-SAMR (Guo et al., IEEE TMI 2021, Sec. III-E, eq. 7-10): CG-SAMR trained from unpaired lesion
masks and images, composed of this package's parts.

Domain 1 is a lesion mask with its anatomic prior, ``x = cat(2 * one_hot(mask) - 1, 2 * prior - 1)``
(5 + 3 channels in [-1, 1]; the prior is the WM, GM and CSF probability maps, Sec. IV-A: the
``tissue`` maps of the data layer, in ``TISSUE_CLASSES`` order); domain 2 is the N images.

* ``E1``, ``E2``: one :class:`~medsynth.networks.blocks.ConvEncoder` per domain (7x7 conv, stride-2
  steps) followed by ONE shared :class:`~medsynth.networks.parts.ResidualTrunk`, so both domains
  map into the same latent space (the paper's shared latent codes; the sharing of the encoders'
  last layers follows UNIT, on which the unpaired design builds);
* ``F1``: a :class:`~medsynth.networks.parts.StretchOutDecoder` with one branch back to the 8
  domain-1 channels (tanh);
* ``F2``: CG-SAMR's :class:`~medsynth.networks.parts.ConfidenceGuidedDecoder` (stretch-out, synthesis
  and confidence modules at 0.5 scale), so L_CM applies on the image side.

The latent map has ``2 * base_width * 2 ** num_downsampling`` channels, as CG-SAMR's (its two
encoders side by side), so ``F2`` is CG-SAMR's decoder exactly. ``forward(mask, atlas, tissue)`` is
the mask -> images direction ``F2(E1(x))`` that the harness validates, evaluates and serves;
:meth:`UCGSAMRGenerator.segment` is the images -> mask direction ``F1(E2(y))`` (Table IV).
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.utils import normal_init
from torch import nn

from medsynth.constants import CLINICAL_SEQUENCES, NUM_LABELS, TISSUE_CLASSES
from medsynth.networks.blocks import ConvEncoder, check_divisible, check_norm
from medsynth.networks.parts import ConfidenceGuidedDecoder, ResidualTrunk, StretchOutDecoder

__all__ = ["CycleGANGenerators", "SynSegNetGenerators", "UCGSAMRGenerator", "UNITGenerators", "to_domain1"]


def to_domain1(mask: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """A domain-1 instance in [-1, 1]: the one-hot mask and the prior maps, each ``2 * p - 1``."""
    return torch.cat([2.0 * mask - 1.0, 2.0 * prior - 1.0], dim=1)


class _TwoDomainGenerators(nn.Module):
    """What the unpaired generator pairs share: the domains' channels and the harness's call
    ``forward(mask, atlas, tissue)``, the mask -> images direction on the domain-1 instance of the
    mask and its tissue prior (the atlas is unused); subclasses implement :meth:`synthesise` and
    ``segment`` (the images -> mask direction)."""

    method = "this model"

    def __init__(self, num_sequences: int, mask_channels: int, prior_channels: int) -> None:
        super().__init__()
        self.num_sequences, self.mask_channels, self.prior_channels = (
            num_sequences,
            mask_channels,
            prior_channels,
        )
        self.domain1_channels = mask_channels + prior_channels

    def synthesise(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement synthesise")

    def forward(
        self, mask: torch.Tensor, atlas: torch.Tensor | None = None, tissue: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if tissue is None or tissue.shape[1] != self.prior_channels:
            raise ValueError(
                f"{self.method}'s domain 1 needs the {self.prior_channels} tissue maps {TISSUE_CLASSES} "
                "as its prior"
            )
        return self.synthesise(to_domain1(mask, tissue))


class UCGSAMRGenerator(_TwoDomainGenerators):
    """The four networks of UCG-SAMR: E1, F1 (domain 1), E2, F2 (domain 2) (see the module docstring).

    Args:
        num_sequences: images of domain 2.
        mask_channels: one-hot lesion-mask channels.
        prior_channels: anatomic-prior channels (the three tissue maps).
        base_width: width of each encoder's first convolution; the latent map has
            ``2 * base_width * 2 ** num_downsampling`` channels.
        num_downsampling: stride-2 steps (at least 1: F2 guides at 0.5 scale).
        num_res_blocks: residual blocks of the shared trunk.
        norm: ``"batch"`` or ``"instance"``.
        stretch_out: F2 with one branch per sequence (CG-SAMR's).
    """

    method = "UCG-SAMR"

    def __init__(
        self,
        num_sequences: int = len(CLINICAL_SEQUENCES),
        mask_channels: int = NUM_LABELS,
        prior_channels: int = len(TISSUE_CLASSES),
        base_width: int = 16,
        num_downsampling: int = 2,
        num_res_blocks: int = 9,
        norm: str = "batch",
        stretch_out: bool = True,
    ) -> None:
        super().__init__(num_sequences, mask_channels, prior_channels)
        norm = check_norm(norm)
        if num_downsampling < 1:
            raise ValueError(
                f"UCG-SAMR needs num_downsampling >= 1 (F2 guides at 0.5 scale); got {num_downsampling}"
            )
        domain1 = self.domain1_channels
        self.mask_encoder = ConvEncoder(domain1, 2 * base_width, num_downsampling, norm)  # E1's own layers
        self.image_encoder = ConvEncoder(num_sequences, 2 * base_width, num_downsampling, norm)  # E2's
        latent = self.mask_encoder.out_channels
        self.shared_trunk = ResidualTrunk(latent, num_res_blocks, norm)
        self.mask_decoder = StretchOutDecoder(
            latent, domain1, num_downsampling, norm, stretch_out=False
        )  # F1
        self.image_decoder = ConfidenceGuidedDecoder(
            latent, num_sequences, num_downsampling, base_width, norm, stretch_out
        )
        self.size_multiple = 2**num_downsampling
        self.apply(normal_init)

    def encode_masks(self, x: torch.Tensor) -> torch.Tensor:
        """E1: a domain-1 instance (:func:`to_domain1`) -> the shared latent map."""
        check_divisible(x, self.size_multiple)
        return self.shared_trunk(self.mask_encoder(x))

    def encode_images(self, y: torch.Tensor) -> torch.Tensor:
        """E2: images -> the shared latent map."""
        check_divisible(y, self.size_multiple)
        return self.shared_trunk(self.image_encoder(y))

    def decode_masks(self, z: torch.Tensor) -> torch.Tensor:
        """F1: latent -> a domain-1 instance (mask and prior channels in [-1, 1])."""
        return self.mask_decoder(z)

    def decode_images(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """F2: latent -> ``"images"``, ``"intermediate"`` and ``"confidence"`` (CG-SAMR's decoder)."""
        return self.image_decoder(z)

    def synthesise(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The mask -> images direction ``F2(E1(x))``."""
        return self.decode_images(self.encode_masks(x))

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """The images -> mask direction ``F1(E2(y))``: the mask channels (B, 5, H, W) in [-1, 1]; their
        argmax is the label map."""
        return self.decode_masks(self.encode_images(images))[:, : self.mask_channels]


class CycleGANGenerators(_TwoDomainGenerators):
    """CycleGAN's two generators (Zhu et al., ICCV 2017) between the same domains as UCG-SAMR:
    ``masks_to_images`` (domain 1 -> 2) and ``images_to_masks`` (2 -> 1), each a ResNet translator
    (``resnet_9blocks``: 2 down-samplings, 9 residual blocks, instance norm, reflection padding,
    :class:`medsynth.networks.pix2pix.ResnetTranslator`). No shared latent space, no confidence maps.

    ``forward(mask, atlas, tissue)`` is the mask -> images direction; :meth:`segment` the images ->
    mask direction, as :class:`UCGSAMRGenerator`.

    Args:
        num_sequences, mask_channels, prior_channels: as :class:`UCGSAMRGenerator`.
        ngf, num_downsampling, num_res_blocks, norm: of both translators (CycleGAN: 64, 2, 9, instance).
    """

    method = "CycleGAN"

    def __init__(
        self,
        num_sequences: int = len(CLINICAL_SEQUENCES),
        mask_channels: int = NUM_LABELS,
        prior_channels: int = len(TISSUE_CLASSES),
        ngf: int = 64,
        num_downsampling: int = 2,
        num_res_blocks: int = 9,
        norm: str = "instance",
    ) -> None:
        from medsynth.networks.pix2pix import ResnetTranslator

        super().__init__(num_sequences, mask_channels, prior_channels)
        domain1 = self.domain1_channels
        self.masks_to_images = ResnetTranslator(
            domain1, num_sequences, ngf, num_downsampling, num_res_blocks, norm
        )
        self.images_to_masks = ResnetTranslator(
            num_sequences, domain1, ngf, num_downsampling, num_res_blocks, norm
        )

    def synthesise(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"images": G_A(x)}``."""
        return {"images": self.masks_to_images(x)}

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """``G_B(y)``'s mask channels (B, 5, H, W) in [-1, 1]."""
        return self.images_to_masks(images)[:, : self.mask_channels]


class SynSegNetGenerators(CycleGANGenerators):
    """SynSeg-Net (Huo et al., IEEE TMI 2019): CycleGAN's two generators plus a segmentation network
    ``S`` trained, end to end with them, on the images ``G_A`` synthesises from the masks (whose
    labels it is supervised with). :meth:`segment` is ``S(y)``: the images -> mask direction comes from
    the segmenter, not from ``G_B``. ``S`` is the project's lesion U-Net
    (:func:`medsynth.networks.make_lesion_unet`; SynSeg-Net's own segmenter is a ResNet generator).

    Args:
        unet_channels: feature channels of ``S``'s levels.
        cyclegan: the arguments of :class:`CycleGANGenerators`.
    """

    def __init__(self, unet_channels: tuple[int, ...] = (16, 32, 64, 128, 256), **cyclegan: Any) -> None:
        from medsynth.networks.segmentation import make_lesion_unet

        super().__init__(**cyclegan)
        norm = cyclegan.get("norm", "instance")
        self.segmenter = make_lesion_unet(
            self.num_sequences, self.mask_channels, channels=tuple(unet_channels), norm=norm
        )

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """``S(y)``: lesion logits (B, 5, H, W)."""
        return self.segmenter(images)


class UNITGenerators(_TwoDomainGenerators):
    """UNIT (Liu et al., NeurIPS 2017) between UCG-SAMR's domains: VAE encoders ``E1``, ``E2`` whose last
    residual blocks are shared, generators ``G1``, ``G2`` whose first residual blocks are shared, one
    latent space. The encoders give the mean ``mu`` of a unit-variance Gaussian; training samples
    ``z = mu + N(0, 1)`` (:meth:`sample`), inference uses ``mu``.

    ``forward(mask, atlas, tissue)`` is the mask -> images direction ``G2(E1(x))``; :meth:`segment`
    the images -> mask direction ``G1(E2(y))``.

    Args:
        num_sequences, mask_channels, prior_channels: as :class:`UCGSAMRGenerator`.
        ngf: width after the first convolution (64 in UNIT).
        num_downsampling: stride-2 steps (2).
        num_shared_blocks: residual blocks shared by the encoders, and again by the generators.
        num_res_blocks: residual blocks of each domain's own encoder and generator part.
        norm: ``"instance"`` (UNIT) or ``"batch"``.
    """

    method = "UNIT"

    def __init__(
        self,
        num_sequences: int = len(CLINICAL_SEQUENCES),
        mask_channels: int = NUM_LABELS,
        prior_channels: int = len(TISSUE_CLASSES),
        ngf: int = 64,
        num_downsampling: int = 2,
        num_shared_blocks: int = 1,
        num_res_blocks: int = 3,
        norm: str = "instance",
    ) -> None:
        super().__init__(num_sequences, mask_channels, prior_channels)
        norm = check_norm(norm)
        domain1 = self.domain1_channels

        def encoder(channels: int) -> nn.Module:
            convs = ConvEncoder(channels, ngf, num_downsampling, norm)
            return nn.Sequential(convs, ResidualTrunk(convs.out_channels, num_res_blocks, norm))

        self.mask_encoder, self.image_encoder = encoder(domain1), encoder(num_sequences)
        latent = ngf * 2**num_downsampling
        self.shared_encoder = ResidualTrunk(latent, num_shared_blocks, norm)
        self.shared_generator = ResidualTrunk(latent, num_shared_blocks, norm)

        def generator(channels: int) -> nn.Module:
            return nn.Sequential(
                ResidualTrunk(latent, num_res_blocks, norm),
                StretchOutDecoder(
                    latent, channels, num_downsampling, norm, branch_residual_block=False, stretch_out=False
                ),
            )

        self.mask_generator, self.image_generator = generator(domain1), generator(num_sequences)
        self.size_multiple = 2**num_downsampling
        self.apply(normal_init)

    def encode_masks(self, x: torch.Tensor) -> torch.Tensor:
        """E1: the latent mean of a domain-1 instance."""
        check_divisible(x, self.size_multiple)
        return self.shared_encoder(self.mask_encoder(x))

    def encode_images(self, y: torch.Tensor) -> torch.Tensor:
        """E2: the latent mean of images."""
        check_divisible(y, self.size_multiple)
        return self.shared_encoder(self.image_encoder(y))

    @staticmethod
    def sample(mu: torch.Tensor) -> torch.Tensor:
        """``z = mu + N(0, 1)``: UNIT's unit-variance reparameterisation."""
        return mu + torch.randn_like(mu)

    def decode_masks(self, z: torch.Tensor) -> torch.Tensor:
        """G1: latent -> a domain-1 instance in [-1, 1]."""
        return self.mask_generator(self.shared_generator(z))

    def decode_images(self, z: torch.Tensor) -> torch.Tensor:
        """G2: latent -> images in [-1, 1]."""
        return self.image_generator(self.shared_generator(z))

    def synthesise(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"images": G2(E1(x))}`` from the latent mean."""
        return {"images": self.decode_images(self.encode_masks(x))}

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """``G1(E2(y))``'s mask channels (B, 5, H, W) in [-1, 1]."""
        return self.decode_masks(self.encode_images(images))[:, : self.mask_channels]
