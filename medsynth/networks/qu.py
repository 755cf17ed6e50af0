"""Qu et al.'s networks (papers 003/004): MRI from random noise through structural feature maps.

Facts from the papers and the authors' public code (facts only, no code taken): the MRI generator is
a U-Net with 3 down-samplings whose bottleneck takes a one-hot modality code; the lesion components
are U-Nets with 5 output classes; the discriminator outputs real/fake and a modality class. The
papers give no layer counts, channels or code sizes; the choices here are small, configurable and
said where they are made.

One U-Net split in two is the building block of every generator here, so that a code can be passed
between networks (the papers' ``EC``/``DC`` and the semantic-consistency losses on codes):

* :class:`UNetEncoder`: ``levels`` conv blocks, 3 stride-2 down-samplings by default; returns every
  level's features (the last is the code, the others are the skips);
* :class:`UNetDecoder`: the code (optionally concatenated with a broadcast one-hot condition),
  up-sampled with the skips, to ``out_channels`` with an output activation.

Stage 1 (structural feature maps, Sec. 2.3): :class:`StructureVAE` (``EC_f`` giving a mean and a
log-variance code, ``DC_f`` decoding a code, no skips: the code is the only path, so a code sampled
from N(0, 1) decodes to a new map), :class:`CodeDiscriminator` (``FD_f``), a PatchGAN ``D_f``
(:class:`medsynth.networks.PatchGANDiscriminator`) and :class:`MaskGenerator` (``MASK``).

Stage 2 (multimodal generation, Sec. 2.4-2.6): :class:`ModalityUNet` (``EC``/``DC`` for real images,
``EC_R`` for fused maps, one decoder conditioned on the modality), :class:`ModalityDiscriminator`
(patch real/fake and modality-class logits) and :class:`LesionSegmenters` in the three schemes of
Sec. 2.7.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from torch import nn

from medsynth.networks.blocks import check_divisible

__all__ = [
    "LESION_SCHEMES",
    "CodeDiscriminator",
    "LesionSegmenters",
    "MaskGenerator",
    "ModalityDiscriminator",
    "ModalityUNet",
    "StructureVAE",
    "UNetDecoder",
    "UNetEncoder",
    "modality_code",
]

LESION_SCHEMES = ("single", "shared_encoder", "per_modality")
_ACT = ("leakyrelu", {"negative_slope": 0.2, "inplace": True})
_OUTPUT_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "none": nn.Identity}


def _block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """Two 3x3 convolutions (the first with ``stride``), instance norm, LeakyReLU(0.2)."""
    return nn.Sequential(
        Convolution(2, in_channels, out_channels, strides=stride, kernel_size=3, norm="instance", act=_ACT),
        Convolution(2, out_channels, out_channels, kernel_size=3, norm="instance", act=_ACT),
    )


def modality_code(index: torch.Tensor | int, num_modalities: int, like: torch.Tensor) -> torch.Tensor:
    """A one-hot modality code broadcast to ``like``'s batch and spatial size: ``(B, M, h, w)``."""
    batch, _, height, width = like.shape
    index = torch.as_tensor(index, device=like.device).long().reshape(-1).expand(batch)
    code = nn.functional.one_hot(index, num_modalities).to(like.dtype)
    return code[:, :, None, None].expand(batch, num_modalities, height, width)


class UNetEncoder(nn.Module):
    """The contracting half of a U-Net.

    Args:
        in_channels: input channels.
        features: channels of each level; ``len(features) - 1`` stride-2 down-samplings (4 levels: 3).
    """

    def __init__(self, in_channels: int, features: Sequence[int] = (32, 64, 128, 256)) -> None:
        super().__init__()
        features = [int(f) for f in features]
        if len(features) < 2 or min(features) < 1:
            raise ValueError(f"features needs >= 2 positive levels, got {features}")
        self.features = features
        self.levels = nn.ModuleList(
            [_block(in_channels, features[0])]
            + [_block(features[i - 1], features[i], stride=2) for i in range(1, len(features))]
        )

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.features) - 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_divisible(x, self.downsampling)
        outputs = []
        for level in self.levels:
            x = level(x)
            outputs.append(x)
        return outputs


class UNetDecoder(nn.Module):
    """The expanding half of a U-Net, from a code (and, with ``skips``, the encoder's other levels).

    Args:
        features: the encoder's channels per level (the code has ``features[-1]``).
        out_channels: output channels.
        condition_channels: channels of a condition concatenated with the code (the modality code).
        skips: use the encoder's features (a U-Net); ``False`` decodes from the code alone.
        output_activation: ``"sigmoid"``, ``"tanh"`` or ``"none"``.
    """

    def __init__(
        self,
        features: Sequence[int] = (32, 64, 128, 256),
        out_channels: int = 1,
        condition_channels: int = 0,
        skips: bool = True,
        output_activation: str = "tanh",
    ) -> None:
        super().__init__()
        if output_activation not in _OUTPUT_ACTIVATIONS:
            raise ValueError(f"output_activation must be one of {sorted(_OUTPUT_ACTIVATIONS)}")
        features = [int(f) for f in features]
        self.skips, self.condition_channels = skips, int(condition_channels)
        self.bottleneck = _block(features[-1] + self.condition_channels, features[-1])
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for level in range(len(features) - 1, 0, -1):
            self.ups.append(nn.ConvTranspose2d(features[level], features[level - 1], kernel_size=2, stride=2))
            in_channels = features[level - 1] * (2 if skips else 1)
            self.blocks.append(_block(in_channels, features[level - 1]))
        self.head = nn.Sequential(nn.Conv2d(features[0], out_channels, kernel_size=1),
                                  _OUTPUT_ACTIVATIONS[output_activation]())  # fmt: skip

    def forward(self, levels: Sequence[torch.Tensor], condition: torch.Tensor | None = None) -> torch.Tensor:
        """Decode ``levels`` (the encoder's outputs; only the last is needed without skips)."""
        code = levels[-1]
        if self.condition_channels:
            if condition is None or condition.shape[1] != self.condition_channels:
                raise ValueError(f"the decoder needs a {self.condition_channels}-channel condition")
            code = torch.cat([code, condition.to(code.dtype)], dim=1)
        x = self.bottleneck(code)
        for index, (up, block) in enumerate(zip(self.ups, self.blocks, strict=True)):
            x = up(x)
            if self.skips:
                x = torch.cat([x, levels[-2 - index]], dim=1)
            x = block(x)
        return self.head(x)


class StructureVAE(nn.Module):
    """``EC_f`` and ``DC_f``: a variational auto-encoder of structural maps with a spatial code.

    The code is ``code_channels`` maps at ``1 / 2**(len(features) - 1)`` of the input size (the papers
    call it a "normal-distribution matrix"); :meth:`decode` of a code drawn from N(0, 1) is a new map.

    Args:
        features: channels per encoder level (the decoder mirrors them, without skips).
        code_channels: channels of the code.
    """

    def __init__(self, features: Sequence[int] = (16, 32, 64, 128), code_channels: int = 8) -> None:
        super().__init__()
        self.encoder = UNetEncoder(1, features)
        self.to_mean = nn.Conv2d(features[-1], code_channels, kernel_size=1)
        self.to_log_variance = nn.Conv2d(features[-1], code_channels, kernel_size=1)
        self.from_code = nn.Conv2d(code_channels, features[-1], kernel_size=1)
        self.decoder = UNetDecoder(features, 1, skips=False, output_activation="sigmoid")
        self.code_channels = int(code_channels)

    def code_shape(self, height: int, width: int) -> tuple[int, int, int]:
        scale = self.encoder.downsampling
        if height % scale or width % scale:
            raise ValueError(f"the map size must be divisible by {scale}, got {height} x {width}")
        return self.code_channels, height // scale, width // scale

    def encode(self, structure: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, log_variance)`` codes of a map ``(B, 1, H, W)``."""
        top = self.encoder(structure)[-1]
        return self.to_mean(top), self.to_log_variance(top)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """A map in (0, 1) from a code."""
        return self.decoder([self.from_code(code)])

    @staticmethod
    def reparameterize(mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
        return mean + torch.exp(0.5 * log_variance) * torch.randn_like(mean)

    def forward(self, structure: torch.Tensor) -> torch.Tensor:
        """The reconstruction of a map (one tensor in, one out, for ``verify_net_in_out``)."""
        return self.decode(self.reparameterize(*self.encode(structure)))

    def sample(
        self, num: int, height: int, width: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``num`` new maps decoded from codes drawn from N(0, 1)."""
        device = self.from_code.weight.device
        code = torch.randn((num, *self.code_shape(height, width)), generator=generator, device=device)
        return self.decode(code)


class CodeDiscriminator(nn.Sequential):
    """``FD_f``: tells codes drawn from N(0, 1) (real) from the encoder's codes (fake), per position.

    Args:
        code_channels: channels of the code.
        features: hidden channels of its 1x1 and 3x3 layers.
    """

    def __init__(self, code_channels: int = 8, features: int = 64) -> None:
        super().__init__(
            Convolution(2, code_channels, features, kernel_size=3, norm=None, act=_ACT),
            Convolution(2, features, features, kernel_size=3, norm=None, act=_ACT),
            nn.Conv2d(features, 1, kernel_size=1),
        )


class MaskGenerator(nn.Module):
    """``MASK``: the brain-area mask of a structural map, in (0, 1) (1 = brain area).

    Args:
        features: channels per U-Net level.
    """

    def __init__(self, features: Sequence[int] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.encoder = UNetEncoder(1, features)
        self.decoder = UNetDecoder(features, 1, output_activation="sigmoid")

    def forward(self, structure: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(structure))


class ModalityUNet(nn.Module):
    """``EC``, ``EC_R`` and ``DC``: encoders of real images and of fused maps, one conditioned decoder.

    ``encode_image(x)`` and ``encode_fused(fused)`` give the U-Net levels (the last is the code the
    semantic-consistency losses compare); ``decode(levels, i)`` is modality ``i``, the one-hot
    modality code joining the bottleneck.

    Args:
        num_modalities: the sequences generated (4 BraTS or 5 clinical).
        fused_channels: channels of a fused map (the label classes).
        features: channels per level (4 levels: 3 down-samplings, as the authors' generator).
        output_activation: of the decoder (images in [-1, 1]: ``"tanh"``).
        input_dropout: dropout on the encoders' inputs (the papers: 0.1).
    """

    def __init__(
        self,
        num_modalities: int = 5,
        fused_channels: int = 5,
        features: Sequence[int] = (32, 64, 128, 256),
        output_activation: str = "tanh",
        input_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_modalities = int(num_modalities)
        self.input_dropout = nn.Dropout(float(input_dropout))
        self.image_encoder = UNetEncoder(1, features)
        self.fused_encoder = UNetEncoder(fused_channels, features)
        self.decoder = UNetDecoder(features, 1, condition_channels=self.num_modalities,
                                   output_activation=output_activation)  # fmt: skip

    def encode_image(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self.image_encoder(self.input_dropout(image))

    def encode_fused(self, fused: torch.Tensor) -> list[torch.Tensor]:
        return self.fused_encoder(self.input_dropout(fused))

    def decode(self, levels: Sequence[torch.Tensor], modality: int | torch.Tensor) -> torch.Tensor:
        return self.decoder(levels, modality_code(modality, self.num_modalities, levels[-1]))

    def generate(self, fused: torch.Tensor) -> torch.Tensor:
        """Every modality of a fused map, ``(B, M, H, W)``."""
        levels = self.encode_fused(fused)
        return torch.cat([self.decode(levels, i) for i in range(self.num_modalities)], dim=1)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return self.generate(fused)


class ModalityDiscriminator(nn.Module):
    """The MRI discriminator: a patch real/fake map and modality-class logits of one image.

    Args:
        num_modalities: classes of the modality head.
        base_filters: channels of the first layer (doubled per stride-2 layer).
        num_layers: stride-2 layers.
    """

    def __init__(self, num_modalities: int = 5, base_filters: int = 32, num_layers: int = 3) -> None:
        super().__init__()
        layers, channels = [], 1
        for index in range(num_layers):
            out = base_filters * 2**index
            norm = None if index == 0 else "instance"
            layers.append(
                Convolution(2, channels, out, strides=2, kernel_size=4, padding=1, norm=norm, act=_ACT)
            )
            channels = out
        self.trunk = nn.Sequential(*layers)
        self.real_fake = nn.Conv2d(channels, 1, kernel_size=3, padding=1)
        self.modality = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_modalities)
        )

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(image)
        return self.real_fake(features), self.modality(features)


class LesionSegmenters(nn.Module):
    """The lesion-label generation components of Sec. 2.7: label logits of each modality's image.

    Schemes: ``"single"`` (one U-Net for every modality), ``"shared_encoder"`` (one encoder, one
    decoder per modality) and ``"per_modality"`` (one U-Net per modality, the papers' best, "4SEG").

    Args:
        num_modalities: modalities (one decoder or U-Net each where the scheme says).
        num_classes: label classes (5: background, normal brain, edema, cavity, tumour).
        scheme: one of :data:`LESION_SCHEMES`.
        features: channels per U-Net level (3 down-samplings).
        input_dropout: dropout on the inputs (the papers: 0.1).
    """

    def __init__(
        self,
        num_modalities: int = 5,
        num_classes: int = 5,
        scheme: str = "per_modality",
        features: Sequence[int] = (16, 32, 64, 128),
        input_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.input_dropout = nn.Dropout(float(input_dropout))
        if scheme not in LESION_SCHEMES:
            raise ValueError(f"scheme must be one of {LESION_SCHEMES}, got {scheme!r}")
        self.scheme, self.num_modalities = scheme, int(num_modalities)
        encoders = 1 if scheme in ("single", "shared_encoder") else num_modalities
        decoders = 1 if scheme == "single" else num_modalities
        self.encoders = nn.ModuleList([UNetEncoder(1, features) for _ in range(encoders)])
        self.decoders = nn.ModuleList(
            [UNetDecoder(features, num_classes, output_activation="none") for _ in range(decoders)]
        )

    def segment(self, image: torch.Tensor, modality: int) -> torch.Tensor:
        """Label logits ``(B, K, H, W)`` of one modality's images ``(B, 1, H, W)``."""
        encoder = self.encoders[0 if len(self.encoders) == 1 else modality]
        decoder = self.decoders[0 if len(self.decoders) == 1 else modality]
        return decoder(encoder(self.input_dropout(image)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of every modality ``(B, M, K, H, W)`` from images ``(B, M, H, W)``."""
        return torch.stack([self.segment(images[:, i : i + 1], i) for i in range(images.shape[1])], dim=1)
