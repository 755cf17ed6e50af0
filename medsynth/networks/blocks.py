"""Building blocks shared by the SAMR and CG-SAMR generators.

Every block is 2D and built from MONAI's :class:`~monai.networks.blocks.Convolution` (convolution,
normalisation, activation in that order). Reflection padding, which MONAI's block does not offer,
is a separate :class:`torch.nn.ReflectionPad2d` in front of an unpadded convolution, as in
pix2pixHD, the code base of the authors' implementation.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from torch import nn

__all__ = [
    "NORM_TYPES",
    "ConvEncoder",
    "GuidanceModule",
    "OutputHead",
    "ResidualBlock",
    "UpsamplingStep",
    "check_divisible",
    "check_norm",
]

# Normalisation layers the networks accept (MONAI factory names): BatchNorm2d with affine
# parameters, or InstanceNorm2d without them (MONAI's default, as pix2pixHD's "instance").
NORM_TYPES: tuple[str, ...] = ("batch", "instance")

_RELU = "RELU"
_LEAKY_RELU = ("LEAKYRELU", {"negative_slope": 0.2})


def check_divisible(x: torch.Tensor, multiple: int) -> None:
    """Refuse an input whose height or width a network's ``multiple``-fold down-sampling cannot halve
    evenly (skipped while tracing: the check would be frozen into the trace)."""
    if not torch.jit.is_tracing() and (x.shape[-1] % multiple or x.shape[-2] % multiple):
        raise ValueError(f"height and width must be divisible by {multiple}; got {list(x.shape[-2:])}")


def check_norm(norm: str) -> str:
    """Return ``norm`` lower-cased after checking it is one of :data:`NORM_TYPES`; raises ``ValueError``."""
    key = str(norm).lower()
    if key not in NORM_TYPES:
        raise ValueError(f"unknown norm {norm!r}; expected one of {NORM_TYPES}")
    return key


class ConvEncoder(nn.Sequential):
    """Down-sampling encoder: reflection pad 3, 7x7 conv, then one stride-2 3x3 conv per step.

    Every convolution is followed by normalisation and ReLU; each down-sampling step doubles the
    channels, so the output has ``base_width * 2 ** num_downsampling`` channels at
    ``1 / 2 ** num_downsampling`` of the input size. SAMR uses two of these, one for the lesion
    mask and one for the atlas.

    Args:
        in_channels: input channels (5 for the one-hot lesion mask, 3N for the atlas).
        base_width: channels after the 7x7 convolution.
        num_downsampling: number of stride-2 convolutions.
        norm: ``"batch"`` or ``"instance"``.
    """

    def __init__(
        self, in_channels: int, base_width: int = 16, num_downsampling: int = 2, norm: str = "batch"
    ) -> None:
        norm = check_norm(norm)
        if in_channels < 1 or base_width < 1 or num_downsampling < 0:
            raise ValueError(
                f"ConvEncoder needs in_channels >= 1, base_width >= 1, num_downsampling >= 0; got "
                f"{in_channels}, {base_width}, {num_downsampling}"
            )
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            Convolution(2, in_channels, base_width, kernel_size=7, padding=0, norm=norm, act=_RELU),
        ]
        width = base_width
        for _ in range(num_downsampling):
            layers.append(
                Convolution(2, width, width * 2, strides=2, kernel_size=3, padding=1, norm=norm, act=_RELU)
            )
            width *= 2
        super().__init__(*layers)
        self.out_channels = width


class ResidualBlock(nn.Module):
    """Residual block: (reflection pad 1, 3x3 conv, norm, ReLU, reflection pad 1, 3x3 conv, norm) + identity.

    Args:
        channels: input and output channels.
        norm: ``"batch"`` or ``"instance"``.
    """

    def __init__(self, channels: int, norm: str = "batch") -> None:
        super().__init__()
        norm = check_norm(norm)
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1),
            Convolution(2, channels, channels, kernel_size=3, padding=0, norm=norm, act=_RELU),
            nn.ReflectionPad2d(1),
            Convolution(2, channels, channels, kernel_size=3, padding=0, norm=norm, act=None),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class UpsamplingStep(Convolution):
    """One decoder step: 3x3 stride-2 transposed conv (output padding 1, so the size doubles), norm, ReLU.

    Args:
        in_channels: input channels.
        out_channels: output channels (half the decoder width at the input scale).
        norm: ``"batch"`` or ``"instance"``.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch") -> None:
        super().__init__(
            2,
            in_channels,
            out_channels,
            strides=2,
            kernel_size=3,
            padding=1,
            output_padding=1,
            is_transposed=True,
            norm=check_norm(norm),
            act=_RELU,
        )


class OutputHead(nn.Sequential):
    """Image output: reflection pad 3, 7x7 conv (with bias), tanh (images in [-1, 1]).

    Args:
        in_channels: input channels.
        out_channels: output images (1 per stretch-out branch; N for one shared decoder).
    """

    def __init__(self, in_channels: int, out_channels: int = 1) -> None:
        super().__init__(
            nn.ReflectionPad2d(3),
            Convolution(2, in_channels, out_channels, kernel_size=7, padding=0, conv_only=True),
            nn.Tanh(),
        )


class GuidanceModule(nn.Sequential):
    """CG-SAMR synthesis module (SM) or confidence map module (CM), the paper's Fig. 3.

    A 1x1 conv to ``hidden_channels``, two 3x3 convs to ``width`` channels, LeakyReLU(0.2) after each
    of the three, then a 3x3 conv to ``out_channels`` and the output activation: ``"tanh"`` for SM (the
    intermediate image), ``"sigmoid"`` for CM (the confidence map). No normalisation, all convs with
    bias: the paper's Fig. 3 caption speaks of conv + BN + ReLU blocks, but the authors' code (and
    the published parameter count, 3,213,447) has neither BN nor ReLU here.

    Args:
        in_channels: input channels (the 0.5-scale features; one more for CM, which also sees
            the intermediate image).
        hidden_channels: output of the 1x1 conv (half the 0.5-scale feature channels).
        width: channels of the two 3x3 convs.
        activation: ``"tanh"`` or ``"sigmoid"``.
        out_channels: output maps (1 in CG-SAMR; N when one shared decoder makes all sequences).
    """

    def __init__(
        self, in_channels: int, hidden_channels: int, width: int, activation: str, out_channels: int = 1
    ) -> None:
        outputs = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
        if activation not in outputs:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(outputs)}")
        super().__init__(
            Convolution(
                2, in_channels, hidden_channels, kernel_size=1, padding=0, norm=None, act=_LEAKY_RELU
            ),
            Convolution(2, hidden_channels, width, kernel_size=3, padding=1, norm=None, act=_LEAKY_RELU),
            Convolution(2, width, width, kernel_size=3, padding=1, norm=None, act=_LEAKY_RELU),
            Convolution(2, width, out_channels, kernel_size=3, padding=1, conv_only=True),
            outputs[activation](),
        )
