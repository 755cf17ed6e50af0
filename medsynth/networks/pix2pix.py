"""The pix2pix family (Isola et al., CVPR 2017): the U-Net generator with skip connections and the
70x70 PatchGAN, as the SAMR / CG-SAMR papers' paired baseline.

The papers' comparison feeds the baselines the one-hot lesion mask only (no atlas: that is the
papers' point), and every sequence is synthesised jointly as output channels.

:class:`UNetSkipGenerator` follows the public implementation's ``unet_256`` layout (the facts of
the issue): ``num_downs`` levels of 4x4 stride-2 convolutions (LeakyReLU 0.2 before each one but
the first, normalisation after each one but the first and the innermost), up-sampling by 4x4
stride-2 transposed convolutions (ReLU before, normalisation after, dropout 0.5 in the innermost
``num_downs - 5`` levels that are not the innermost), skip connections by concatenation, tanh
out; filters ``ngf, 2 ngf, 4 ngf, 8 ngf, 8 ngf ...``; biases only where no batch norm follows. With
``num_downs = 8`` and ``ngf = 64`` it has 54,413,955 parameters for 3 in and 3 out channels and
54,407,809 for 1 and 1: the public implementation prints 54.414 M and 54.408 M (the latter in its
issue #1152, with a 2,764,609-parameter "2.765 M" PatchGAN, which
:func:`pix2pix_patch_discriminator` matches).
"""

from __future__ import annotations

import torch
from monai.networks.utils import normal_init
from torch import nn

from medsynth.constants import ATLAS_SLICES_PER_SEQUENCE, CLINICAL_SEQUENCES, NUM_LABELS, TISSUE_CLASSES
from medsynth.networks.blocks import ConvEncoder, check_divisible, check_norm
from medsynth.networks.discriminators import PatchGANDiscriminator
from medsynth.networks.parts import ResidualTrunk, StretchOutDecoder

__all__ = ["Pix2PixGenerator", "Pix2PixHDGenerator", "UNetSkipGenerator", "pix2pix_patch_discriminator"]

_NORMS = {"batch": nn.BatchNorm2d, "instance": nn.InstanceNorm2d}


class _SkipLevel(nn.Module):
    """One level: down, the inner levels, up; returns ``cat([x, up(...)])`` except at the outermost."""

    def __init__(self, down: nn.Module, inner: nn.Module | None, up: nn.Module, outermost: bool) -> None:
        super().__init__()
        self.down, self.inner, self.up, self.outermost = down, inner, up, outermost

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(x)
        if self.inner is not None:
            y = self.inner(y)
        y = self.up(y)
        return y if self.outermost else torch.cat([x, y], dim=1)


class UNetSkipGenerator(nn.Module):
    """pix2pix's U-Net generator (see the module docstring); one tensor in, one out.

    Args:
        in_channels: input channels.
        out_channels: output images, in [-1, 1].
        num_downs: down-sampling levels (8 for 256x256 inputs: the bottleneck is 1x1; inputs must be
            divisible by ``2 ** num_downs``).
        ngf: filters of the outermost level.
        norm: ``"batch"`` (pix2pix) or ``"instance"``.
        dropout: dropout probability of the inner decoder levels (0.5 in pix2pix).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_downs: int = 8,
        ngf: int = 64,
        norm: str = "batch",
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        norm_type = _NORMS[check_norm(norm)]
        if num_downs < 5:
            raise ValueError(f"the pix2pix U-Net needs num_downs >= 5; got {num_downs}")
        self.size_multiple = 2**num_downs
        bias = norm_type is nn.InstanceNorm2d  # batch norm carries its own shift
        # Outer to inner: (outer, inner) filters of each level below the outermost.
        widths = [(ngf, ngf * 2), (ngf * 2, ngf * 4), (ngf * 4, ngf * 8)]
        widths += [(ngf * 8, ngf * 8)] * (num_downs - 4)

        def down(source: int, target: int, normalise: bool) -> nn.Sequential:
            layers = [nn.LeakyReLU(0.2), nn.Conv2d(source, target, 4, 2, 1, bias=bias)]
            return nn.Sequential(*layers, *([norm_type(target)] if normalise else []))

        def up(source: int, target: int, drop: bool) -> nn.Sequential:
            layers = [nn.ReLU(), nn.ConvTranspose2d(source, target, 4, 2, 1, bias=bias), norm_type(target)]
            return nn.Sequential(*layers, *([nn.Dropout(dropout)] if drop and dropout > 0 else []))

        inner: nn.Module | None = None
        for depth, (outer_width, inner_width) in reversed(list(enumerate(widths))):
            innermost = depth == len(widths) - 1
            drop = not innermost and depth >= 3  # the ngf*8 levels between the innermost and 4*ngf
            inner = _SkipLevel(
                down(outer_width, inner_width, normalise=not innermost),
                inner,
                up(inner_width if innermost else 2 * inner_width, outer_width, drop),
                outermost=False,
            )
        self.model = _SkipLevel(
            nn.Conv2d(in_channels, ngf, 4, 2, 1, bias=bias),
            inner,
            nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(2 * ngf, out_channels, 4, 2, 1), nn.Tanh()),
            outermost=True,
        )
        self.apply(normal_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_divisible(x, self.size_multiple)
        return self.model(x)


class _MaskConditionedGenerator(nn.Module):
    """A baseline generator of the harness: ``forward(mask, atlas, tissue) -> {"images"}`` from the
    one-hot lesion mask (the papers' baseline input), with ``use_atlas`` the atlas slices as well, and
    with ``tissue_maps`` the CSF, grey- and white-matter maps (Shin et al.); subclasses build
    :attr:`in_channels` -> ``num_sequences`` networks and implement :meth:`synthesise`."""

    def __init__(
        self, num_sequences: int, mask_channels: int, use_atlas: bool, tissue_maps: bool = False
    ) -> None:
        super().__init__()
        self.mask_channels, self.use_atlas, self.tissue_maps = (
            mask_channels,
            bool(use_atlas),
            bool(tissue_maps),
        )
        self.in_channels = (
            mask_channels
            + (ATLAS_SLICES_PER_SEQUENCE * num_sequences if self.use_atlas else 0)
            + (len(TISSUE_CLASSES) if self.tissue_maps else 0)
        )

    def synthesise(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement synthesise")

    def forward(
        self, mask: torch.Tensor, atlas: torch.Tensor | None = None, tissue: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        inputs = [mask]
        if self.use_atlas:
            inputs.append(atlas)
        if self.tissue_maps:
            if tissue is None or tissue.shape[1] != len(TISSUE_CLASSES):
                got = "none" if tissue is None else f"{tissue.shape[1]} channels"
                raise ValueError(
                    f"{type(self).__name__} needs the {len(TISSUE_CLASSES)} tissue maps "
                    f"{TISSUE_CLASSES}; got {got}"
                )
            inputs.append(tissue)
        return {"images": self.synthesise(torch.cat(inputs, dim=1) if len(inputs) > 1 else mask)}


class Pix2PixGenerator(_MaskConditionedGenerator):
    """The pix2pix baseline in the synthesis harness (see :class:`_MaskConditionedGenerator`); every
    sequence is one output channel of the U-Net.

    Args:
        num_sequences: output images (one per sequence).
        mask_channels: channels of the one-hot lesion mask.
        use_atlas: also feed the atlas (``3 * num_sequences`` channels); off in the papers.
        num_downs, ngf, norm, dropout: see :class:`UNetSkipGenerator`.
        tissue_maps: also feed the CSF, grey- and white-matter maps: Shin et al. (2018)'s generator,
            pix2pix conditioned on the lesion label and the brain's tissue maps.
    """

    def __init__(
        self,
        num_sequences: int = len(CLINICAL_SEQUENCES),
        mask_channels: int = NUM_LABELS,
        use_atlas: bool = False,
        num_downs: int = 8,
        ngf: int = 64,
        norm: str = "batch",
        dropout: float = 0.5,
        tissue_maps: bool = False,
    ) -> None:
        super().__init__(num_sequences, mask_channels, use_atlas, tissue_maps)
        self.unet = UNetSkipGenerator(self.in_channels, num_sequences, num_downs, ngf, norm, dropout)

    def synthesise(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x)


def pix2pix_patch_discriminator(
    in_channels: int, base_filters: int = 64, num_layers: int = 3, norm: str = "batch"
) -> PatchGANDiscriminator:
    """pix2pix's PatchGAN (70x70 receptive field with 3 layers): pix2pixHD's layout with padding 1 and
    no bias before batch norm. It discriminates ``cat([condition, images])``."""
    return PatchGANDiscriminator(
        in_channels, base_filters, num_layers, norm=norm, padding=1, bias_with_norm=norm != "batch"
    )


def resnet_translator_layers(
    in_channels: int, out_channels: int, ngf: int, num_downsampling: int, num_res_blocks: int, norm: str
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The ResNet image-to-image generator of pix2pixHD (global) and CycleGAN (``resnet_9blocks``):
    a 7x7 conv to ``ngf`` and stride-2 3x3 convs doubling the width, residual blocks, as many
    transposed convs halving it and a 7x7 conv with tanh (one shared decoder branch); returns the
    encoder, the trunk and the decoder."""
    encoder = ConvEncoder(in_channels, ngf, num_downsampling, norm)
    trunk = ResidualTrunk(encoder.out_channels, num_res_blocks, norm)
    decoder = StretchOutDecoder(
        encoder.out_channels,
        out_channels,
        num_downsampling,
        norm,
        branch_residual_block=False,
        stretch_out=False,
    )
    return encoder, trunk, decoder


class ResnetTranslator(nn.Module):
    """:func:`resnet_translator_layers` as one network ``x -> y`` (CycleGAN's generators).

    Args:
        in_channels, out_channels: channels of the two domains.
        ngf: width after the first convolution (64 in CycleGAN).
        num_downsampling: stride-2 steps (2 in CycleGAN's ``resnet_9blocks``).
        num_res_blocks: residual blocks (9).
        norm: ``"instance"`` (CycleGAN) or ``"batch"``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        ngf: int = 64,
        num_downsampling: int = 2,
        num_res_blocks: int = 9,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        self.encoder, self.trunk, self.decoder = resnet_translator_layers(
            in_channels, out_channels, ngf, num_downsampling, num_res_blocks, norm
        )
        self.size_multiple = 2**num_downsampling
        self.apply(normal_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_divisible(x, self.size_multiple)
        return self.decoder(self.trunk(self.encoder(x)))


class Pix2PixHDGenerator(_MaskConditionedGenerator):
    """pix2pixHD's global generator (Wang et al., CVPR 2018) in the synthesis harness:
    ``forward(mask, atlas) -> {"images"}``, composed of this package's parts.

    A 7x7 convolution to ``ngf`` and ``num_downsampling`` stride-2 3x3 convolutions doubling the
    width (:class:`~medsynth.networks.blocks.ConvEncoder`), ``num_res_blocks`` residual blocks
    (:class:`~medsynth.networks.parts.ResidualTrunk`), as many 3x3 transposed convolutions halving
    it and a 7x7 convolution with tanh to all N sequences (one shared
    :class:`~medsynth.networks.parts.StretchOutDecoder` branch, no residual block of its own);
    instance norm and reflection padding, biases everywhere, as pix2pixHD. The input is the one-hot
    lesion mask (the papers' baseline) or, with ``use_atlas``, the mask and the atlas.

    Args:
        num_sequences: output images.
        mask_channels: channels of the one-hot lesion mask.
        use_atlas: also feed the atlas (not the papers' baseline).
        ngf: width after the first convolution (64 in pix2pixHD).
        num_downsampling: stride-2 steps (4 in pix2pixHD's global generator).
        num_res_blocks: residual blocks (9).
        norm: ``"instance"`` (pix2pixHD) or ``"batch"``.
    """

    def __init__(
        self,
        num_sequences: int = len(CLINICAL_SEQUENCES),
        mask_channels: int = NUM_LABELS,
        use_atlas: bool = False,
        ngf: int = 64,
        num_downsampling: int = 4,
        num_res_blocks: int = 9,
        norm: str = "instance",
    ) -> None:
        super().__init__(num_sequences, mask_channels, use_atlas)
        layers = resnet_translator_layers(
            self.in_channels, num_sequences, ngf, num_downsampling, num_res_blocks, norm
        )
        self.encoder, self.trunk, self.decoder = layers
        self.size_multiple = 2**num_downsampling
        self.apply(normal_init)

    def synthesise(self, x: torch.Tensor) -> torch.Tensor:
        check_divisible(x, self.size_multiple)
        return self.decoder(self.trunk(self.encoder(x)))
