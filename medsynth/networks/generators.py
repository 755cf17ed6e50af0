"""SAMR and CG-SAMR generators and their single-input inference wrapper.

Both generators encode the one-hot lesion mask and the atlas (three adjacent atlas slices per
sequence) with two encoders of the same form, concatenate the two latent maps, pass them through
residual blocks and decode one image per sequence with a "stretch-out" decoder: one branch per
sequence, all reading the same latent map. Defaults follow the authors' implementation
(github.com/guopengf/CG-SAMR): base width 16, 2 down-sampling steps, 9 residual blocks, batch norm.

Decoder widths: the latent map has ``2 * base_width * 2 ** num_downsampling`` channels (the two
encoders' outputs side by side) and every up-sampling step halves it, so the last step leaves
``2 * base_width`` channels for the 7x7 output convolution.
"""

from __future__ import annotations

import torch
from monai.networks.utils import normal_init
from torch import nn

from medsynth.constants import CLINICAL_SEQUENCES, NUM_LABELS
from medsynth.networks.blocks import (
    ConvEncoder,
    GuidanceModule,
    OutputHead,
    ResidualBlock,
    UpsamplingStep,
    check_norm,
)

__all__ = ["CGSAMRGenerator", "SAMRGenerator", "SynthesisInferenceNetwork"]

# Slices of the atlas per sequence: the slice of the instance and its two axial neighbours.
ATLAS_SLICES_PER_SEQUENCE = 3


class _StretchOutGenerator(nn.Module):
    """Encoders and residual blocks common to SAMR and CG-SAMR; subclasses add the decoder branches.

    Args:
        num_sequences: output images, one per sequence (5 clinical, 4 BraTS).
        mask_channels: channels of the one-hot lesion mask.
        atlas_channels: channels of the atlas input; ``None`` means ``3 * num_sequences``.
        base_width: channels after each encoder's first convolution.
        num_downsampling: stride-2 steps in each encoder (inputs must be divisible by ``2 ** steps``).
        num_res_blocks: residual blocks after the concatenated encoders.
        norm: ``"batch"`` or ``"instance"``.
    """

    def __init__(
        self,
        num_sequences: int = len(CLINICAL_SEQUENCES),
        mask_channels: int = NUM_LABELS,
        atlas_channels: int | None = None,
        base_width: int = 16,
        num_downsampling: int = 2,
        num_res_blocks: int = 9,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        norm = check_norm(norm)
        if atlas_channels is None:
            atlas_channels = ATLAS_SLICES_PER_SEQUENCE * num_sequences
        if num_sequences < 1 or mask_channels < 1 or atlas_channels < 1 or num_res_blocks < 0:
            raise ValueError(
                "num_sequences, mask_channels and atlas_channels must be >= 1 and num_res_blocks >= 0; got "
                f"{num_sequences}, {mask_channels}, {atlas_channels}, {num_res_blocks}"
            )
        self.num_sequences = num_sequences
        self.mask_channels = mask_channels
        self.atlas_channels = atlas_channels
        self.size_multiple = 2**num_downsampling
        self.mask_encoder = ConvEncoder(mask_channels, base_width, num_downsampling, norm)
        self.atlas_encoder = ConvEncoder(atlas_channels, base_width, num_downsampling, norm)
        self.latent_channels = self.mask_encoder.out_channels + self.atlas_encoder.out_channels
        self.res_blocks = nn.Sequential(
            *[ResidualBlock(self.latent_channels, norm) for _ in range(num_res_blocks)]
        )

    def encode(self, mask: torch.Tensor, atlas: torch.Tensor) -> torch.Tensor:
        """Check the inputs and return the latent map (after the residual blocks)."""
        if not torch.jit.is_tracing():  # shape checks would be frozen into a trace as constants
            self._check_inputs(mask, atlas)
        latent = torch.cat([self.mask_encoder(mask), self.atlas_encoder(atlas)], dim=1)
        return self.res_blocks(latent)

    def _check_inputs(self, mask: torch.Tensor, atlas: torch.Tensor) -> None:
        if mask.dim() != 4 or atlas.dim() != 4:
            raise ValueError(
                f"mask and atlas must be (B, C, H, W); got {list(mask.shape)} and {list(atlas.shape)}"
            )
        if mask.shape[1] != self.mask_channels or atlas.shape[1] != self.atlas_channels:
            raise ValueError(
                f"expected {self.mask_channels} mask channels and {self.atlas_channels} atlas channels; "
                f"got {mask.shape[1]} and {atlas.shape[1]}"
            )
        if mask.shape[0] != atlas.shape[0] or mask.shape[2:] != atlas.shape[2:]:
            raise ValueError(f"mask {list(mask.shape)} and atlas {list(atlas.shape)} differ in batch or size")
        if mask.shape[2] % self.size_multiple != 0 or mask.shape[3] % self.size_multiple != 0:
            raise ValueError(
                f"height and width must be divisible by {self.size_multiple}; got {list(mask.shape[2:])}"
            )


class SAMRGenerator(_StretchOutGenerator):
    """SAMR generator (Guo et al., MICCAI 2020): encoders, residual blocks, stretch-out decoder.

    Each decoder branch is a residual block, ``num_downsampling`` up-sampling steps and a 7x7
    output convolution with tanh. With the defaults and 5 sequences it has 4,672,037 parameters.
    Output channels follow the sequence order (the authors' code stacks them in reverse).

    Args: see :class:`_StretchOutGenerator`.
    """

    def __init__(
        self,
        num_sequences: int = len(CLINICAL_SEQUENCES),
        mask_channels: int = NUM_LABELS,
        atlas_channels: int | None = None,
        base_width: int = 16,
        num_downsampling: int = 2,
        num_res_blocks: int = 9,
        norm: str = "batch",
    ) -> None:
        super().__init__(
            num_sequences, mask_channels, atlas_channels, base_width, num_downsampling, num_res_blocks, norm
        )
        norm = check_norm(norm)
        branches = []
        for _ in range(num_sequences):
            layers: list[nn.Module] = [ResidualBlock(self.latent_channels, norm)]
            width = self.latent_channels
            for _ in range(num_downsampling):
                layers.append(UpsamplingStep(width, width // 2, norm))
                width //= 2
            layers.append(OutputHead(width))
            branches.append(nn.Sequential(*layers))
        self.branches = nn.ModuleList(branches)
        self.apply(normal_init)

    def forward(self, mask: torch.Tensor, atlas: torch.Tensor) -> dict[str, torch.Tensor]:
        """Synthesise the images.

        Args:
            mask: one-hot lesion mask, (B, mask_channels, H, W).
            atlas: atlas slices, (B, atlas_channels, H, W).

        Returns:
            ``{"images": (B, num_sequences, H, W)}`` in [-1, 1].
        """
        latent = self.encode(mask, atlas)
        images = [branch(latent) for branch in self.branches]
        return {"images": torch.cat(images, dim=1)}


class _GuidedBranch(nn.Module):
    """One CG-SAMR decoder branch: up to 0.5 scale, then (features + guided intermediate) to full scale."""

    def __init__(self, latent_channels: int, num_downsampling: int, norm: str) -> None:
        super().__init__()
        width = latent_channels
        coarse: list[nn.Module] = []
        for _ in range(num_downsampling - 1):
            coarse.append(UpsamplingStep(width, width // 2, norm))
            width //= 2
        self.half_scale_channels = width
        self.to_half_scale = nn.Sequential(*coarse)
        # One extra input channel: the confidence-masked intermediate image.
        self.to_full_scale = nn.Sequential(
            UpsamplingStep(width + 1, width // 2, norm), OutputHead(width // 2)
        )


class CGSAMRGenerator(_StretchOutGenerator):
    """Confidence-guided SAMR generator (Guo et al., IEEE TMI 2021, Sec. III-A and III-B).

    Each branch up-samples the latent map to 0.5 scale (features ``f``); the synthesis module
    computes the intermediate image ``y05 = SM(f)`` (tanh) and the confidence map module the
    confidence ``c = CM(f ⊕ y05)`` (sigmoid); ``f ⊕ (y05 * c)`` continues through the last
    up-sampling step and the 7x7 output convolution.

    Exact reading of the authors' code, which the published parameter count (3,213,447 for 5
    mask, 15 atlas channels, 5 sequences) confirms:

    * the branches have no residual block of their own (unlike SAMR);
    * ONE synthesis module and ONE confidence module are shared by all branches (the paper's
      text says a module pair is "added to each branch"; five pairs would give 3,286,927);
    * SM: 1x1 conv to half the 0.5-scale feature channels (64 -> 32), two 3x3 convs to
      ``base_width`` (16), a 3x3 conv to 1; CM the same from 64 + 1 channels; LeakyReLU(0.2),
      bias, no normalisation;
    * the last transposed conv reads ``64 + 1`` channels and, like every up-sampling step, has
      bias, batch norm and output padding 1.

    Args: see :class:`_StretchOutGenerator`; ``num_downsampling`` must be at least 1.
    """

    def __init__(
        self,
        num_sequences: int = len(CLINICAL_SEQUENCES),
        mask_channels: int = NUM_LABELS,
        atlas_channels: int | None = None,
        base_width: int = 16,
        num_downsampling: int = 2,
        num_res_blocks: int = 9,
        norm: str = "batch",
    ) -> None:
        if num_downsampling < 1:
            raise ValueError(
                f"CG-SAMR needs num_downsampling >= 1 (it guides at 0.5 scale); got {num_downsampling}"
            )
        super().__init__(
            num_sequences, mask_channels, atlas_channels, base_width, num_downsampling, num_res_blocks, norm
        )
        norm = check_norm(norm)
        self.branches = nn.ModuleList(
            [_GuidedBranch(self.latent_channels, num_downsampling, norm) for _ in range(num_sequences)]
        )
        half = self.branches[0].half_scale_channels
        self.synthesis = GuidanceModule(half, half // 2, base_width, "tanh")
        self.confidence = GuidanceModule(half + 1, half // 2, base_width, "sigmoid")
        self.apply(normal_init)

    def forward(self, mask: torch.Tensor, atlas: torch.Tensor) -> dict[str, torch.Tensor]:
        """Synthesise the images with confidence guidance.

        Args:
            mask: one-hot lesion mask, (B, mask_channels, H, W).
            atlas: atlas slices, (B, atlas_channels, H, W).

        Returns:
            ``"images"`` (B, N, H, W) in [-1, 1], ``"intermediate"`` (B, N, H/2, W/2) in [-1, 1] and
            ``"confidence"`` (B, N, H/2, W/2) in (0, 1), channels in sequence order.
        """
        latent = self.encode(mask, atlas)
        images: list[torch.Tensor] = []
        intermediates: list[torch.Tensor] = []
        confidences: list[torch.Tensor] = []
        for branch in self.branches:
            features = branch.to_half_scale(latent)
            intermediate = self.synthesis(features)
            confidence = self.confidence(torch.cat([features, intermediate], dim=1))
            images.append(branch.to_full_scale(torch.cat([features, intermediate * confidence], dim=1)))
            intermediates.append(intermediate)
            confidences.append(confidence)
        return {
            "images": torch.cat(images, dim=1),
            "intermediate": torch.cat(intermediates, dim=1),
            "confidence": torch.cat(confidences, dim=1),
        }


class SynthesisInferenceNetwork(nn.Module):
    """One tensor in, one tensor out: ``x = cat([mask, atlas], dim=1)`` -> synthesised images.

    For MONAI bundle tools (``verify_net_in_out``, ``ckpt_export``) and TorchScript/tracing, which
    expect a single input and output. The wrapped generator's parameters keep their names under
    ``generator.``.

    Args:
        generator: a :class:`SAMRGenerator` or :class:`CGSAMRGenerator`.
        mask_channels: leading channels of ``x`` that hold the lesion mask; the rest is the atlas.
    """

    def __init__(self, generator: nn.Module, mask_channels: int = NUM_LABELS) -> None:
        super().__init__()
        self.generator = generator
        self.mask_channels = mask_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the images (B, num_sequences, H, W) for ``x`` (B, mask + atlas channels, H, W)."""
        return self.generator(x[:, : self.mask_channels], x[:, self.mask_channels :])["images"]
