"""Named generator parts that the synthesis methods compose: encoders, residual trunk, decoders.

A generator of this project is ``decoder(trunk(encoder(...)))``, each part a module of its own:

* :class:`DualEncoder`: the lesion mask and the atlas, each through its own :class:`ConvEncoder`,
  the two latent maps side by side (SAMR, CG-SAMR);
* :class:`ResidualTrunk`: residual blocks at the latent scale;
* :class:`StretchOutDecoder`: one decoder branch per output sequence, all reading the same latent
  map (SAMR's "stretch-out" decoder);
* :class:`ConfidenceGuidedDecoder`: the stretch-out decoder whose branches are guided at 0.5 scale
  by an intermediate image and its confidence map (CG-SAMR).

The parts do not initialise their weights: the generator that composes them applies its
initialisation once, over all parts in registration order, so the same seed gives the same weights
whichever way the parts are assembled.
"""

from __future__ import annotations

import torch
from torch import nn

from medsynth.constants import NUM_LABELS, TISSUE_CLASSES
from medsynth.networks.blocks import (
    ConvEncoder,
    GuidanceModule,
    OutputHead,
    ResidualBlock,
    UpsamplingStep,
    check_divisible,
    check_norm,
)

__all__ = [
    "ConfidenceGuidedDecoder",
    "DualEncoder",
    "ResidualTrunk",
    "StretchOutDecoder",
    "SynthesisInferenceNetwork",
]


class DualEncoder(nn.Module):
    """Two :class:`ConvEncoder` of the same form, one for the lesion mask and one for the atlas.

    ``forward(mask, atlas)`` checks the inputs and returns ``cat([E_mask(mask), E_atlas(atlas)])``:
    ``out_channels = 2 * base_width * 2 ** num_downsampling`` channels at ``1 / size_multiple`` of
    the input size. Without the atlas (``use_atlas=False``, the papers' "w/o Atlas" ablation) only
    the mask encoder is built and the atlas input is ignored: half the channels.

    Args:
        mask_channels: channels of the one-hot lesion mask.
        atlas_channels: channels of the atlas input (three slices per sequence in SAMR).
        base_width: channels after each encoder's first convolution.
        num_downsampling: stride-2 steps in each encoder (inputs must be divisible by ``2 ** steps``).
        norm: ``"batch"`` or ``"instance"``.
        use_atlas: encode the atlas.
    """

    def __init__(
        self,
        mask_channels: int = NUM_LABELS,
        atlas_channels: int = 15,
        base_width: int = 16,
        num_downsampling: int = 2,
        norm: str = "batch",
        use_atlas: bool = True,
    ) -> None:
        super().__init__()
        if mask_channels < 1 or atlas_channels < 1:
            raise ValueError(
                f"mask_channels and atlas_channels must be >= 1; got {mask_channels}, {atlas_channels}"
            )
        self.mask_channels = mask_channels
        self.atlas_channels = atlas_channels
        self.use_atlas = bool(use_atlas)
        self.size_multiple = 2**num_downsampling
        self.mask_encoder = ConvEncoder(mask_channels, base_width, num_downsampling, norm)
        self.atlas_encoder = (
            ConvEncoder(atlas_channels, base_width, num_downsampling, norm) if self.use_atlas else None
        )
        self.out_channels = self.mask_encoder.out_channels * (2 if self.use_atlas else 1)

    def forward(self, mask: torch.Tensor, atlas: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing():  # shape checks would be frozen into a trace as constants
            self._check_inputs(mask, atlas)
        if self.atlas_encoder is None:
            return self.mask_encoder(mask)
        return torch.cat([self.mask_encoder(mask), self.atlas_encoder(atlas)], dim=1)

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
        check_divisible(mask, self.size_multiple)


class ResidualTrunk(nn.Sequential):
    """``num_blocks`` :class:`ResidualBlock` of ``channels`` channels (the identity for 0 blocks).

    Args:
        channels: input and output channels.
        num_blocks: number of residual blocks.
        norm: ``"batch"`` or ``"instance"``.
    """

    def __init__(self, channels: int, num_blocks: int = 9, norm: str = "batch") -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0; got {num_blocks}")
        super().__init__(*[ResidualBlock(channels, norm) for _ in range(num_blocks)])


def branch_layout(num_outputs: int, stretch_out: bool) -> list[int]:
    """Images per decoder branch: one branch per image (stretch-out), or one shared branch making
    them all (the papers' "w/o Stretch-out" ablation)."""
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1; got {num_outputs}")
    return [1] * num_outputs if stretch_out else [num_outputs]


class StretchOutDecoder(nn.Module):
    """One decoder branch per output image, all reading the same latent map (SAMR Fig. 1).

    Each branch is an optional residual block, ``num_upsampling`` :class:`UpsamplingStep` halving
    the width each time, and a 7x7 :class:`OutputHead` with tanh. ``forward(latent)`` returns the
    branch outputs stacked as channels ``(B, num_outputs, H, W)``, in branch order. With
    ``stretch_out=False`` one such branch makes all images (the ablation).

    Args:
        in_channels: channels of the latent map.
        num_outputs: number of images (one per sequence).
        num_upsampling: stride-2 up-sampling steps per branch.
        norm: ``"batch"`` or ``"instance"``.
        branch_residual_block: start each branch with a residual block (SAMR's decoder does).
        stretch_out: one branch per image.
    """

    def __init__(
        self,
        in_channels: int,
        num_outputs: int,
        num_upsampling: int = 2,
        norm: str = "batch",
        branch_residual_block: bool = True,
        stretch_out: bool = True,
    ) -> None:
        super().__init__()
        norm = check_norm(norm)
        branches = []
        for images in branch_layout(num_outputs, stretch_out):
            layers: list[nn.Module] = [ResidualBlock(in_channels, norm)] if branch_residual_block else []
            width = in_channels
            for _ in range(num_upsampling):
                layers.append(UpsamplingStep(width, width // 2, norm))
                width //= 2
            layers.append(OutputHead(width, images))
            branches.append(nn.Sequential(*layers))
        self.branches = nn.ModuleList(branches)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(latent) for branch in self.branches], dim=1)


class _GuidedBranch(nn.Module):
    """One confidence-guided branch: up to 0.5 scale, then (features + guided intermediate) to full scale."""

    def __init__(self, in_channels: int, num_upsampling: int, norm: str, num_images: int = 1) -> None:
        super().__init__()
        width = in_channels
        coarse: list[nn.Module] = []
        for _ in range(num_upsampling - 1):
            coarse.append(UpsamplingStep(width, width // 2, norm))
            width //= 2
        self.half_scale_channels = width
        self.num_images = num_images
        self.to_half_scale = nn.Sequential(*coarse)
        # One extra input channel per image: the confidence-masked intermediate images.
        self.to_full_scale = nn.Sequential(
            UpsamplingStep(width + num_images, width // 2, norm), OutputHead(width // 2, num_images)
        )


class ConfidenceGuidedDecoder(nn.Module):
    """CG-SAMR's confidence-guided stretch-out decoder (TMI 2021, Sec. III-A and III-B, Fig. 3).

    Each branch up-samples the latent map to 0.5 scale (features ``f``); the synthesis module
    computes the intermediate image ``y05 = SM(f)`` (tanh) and the confidence map module the
    confidence ``c = CM(f ⊕ y05)`` (sigmoid); ``f ⊕ (y05 * c)`` continues through the last
    up-sampling step and the 7x7 output convolution.

    Exact reading of the authors' code, which the published parameter count confirms: the branches
    have no residual block of their own; ONE synthesis module and ONE confidence module are shared
    by all branches (the paper's text says a module pair is "added to each branch"); SM is a 1x1
    conv to half the 0.5-scale feature channels, two 3x3 convs to ``guidance_width``, a 3x3 conv to
    1, and CM the same from one more input channel (:class:`GuidanceModule`).

    Args:
        in_channels: channels of the latent map.
        num_outputs: number of branches (one per sequence).
        num_upsampling: stride-2 up-sampling steps per branch (at least 1: guidance is at 0.5 scale).
        guidance_width: channels of the guidance modules' 3x3 convolutions (the generator's base width).
        norm: ``"batch"`` or ``"instance"``.
        stretch_out: one branch per sequence; ``False`` (the "w/o Stretch-out" ablation): one
            branch makes all N images, its guidance modules N intermediate images and confidences.
    """

    def __init__(
        self,
        in_channels: int,
        num_outputs: int,
        num_upsampling: int = 2,
        guidance_width: int = 16,
        norm: str = "batch",
        stretch_out: bool = True,
    ) -> None:
        super().__init__()
        norm = check_norm(norm)
        if num_upsampling < 1:
            raise ValueError(
                f"confidence guidance needs num_upsampling >= 1 (it guides at 0.5 scale); got "
                f"{num_upsampling}"
            )
        layout = branch_layout(num_outputs, stretch_out)
        self.branches = nn.ModuleList(
            [_GuidedBranch(in_channels, num_upsampling, norm, images) for images in layout]
        )
        half, images = self.branches[0].half_scale_channels, layout[0]
        self.synthesis = GuidanceModule(half, half // 2, guidance_width, "tanh", images)
        self.confidence = GuidanceModule(half + images, half // 2, guidance_width, "sigmoid", images)

    def forward(self, latent: torch.Tensor) -> dict[str, torch.Tensor]:
        """``"images"`` (B, N, H, W) in [-1, 1], ``"intermediate"`` (B, N, H/2, W/2) in [-1, 1] and
        ``"confidence"`` (B, N, H/2, W/2) in (0, 1), channels in branch order."""
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
    """One tensor in, one tensor out: ``x = cat([mask, atlas(, tissue)], dim=1)`` -> synthesised images.

    For MONAI bundle tools (``verify_net_in_out``, ``ckpt_export``), the inferer and
    TorchScript/tracing, which expect a single input and output. The wrapped generator's
    parameters keep their names under ``generator.``.

    Args:
        generator: ``forward(mask, atlas) -> {"images": ...}`` (e.g. a SAMR or CG-SAMR generator).
        mask_channels: leading channels of ``x`` that hold the lesion mask; the rest is the atlas.
        with_confidence: also return the generator's confidence maps (CG-SAMR), upsampled
            bilinearly to the image size and concatenated after the images: ``(B, 2N, H, W)``. A
            generator without confidence maps returns the images alone. The weights are the same.
        tissue_maps: the last channels of ``x`` are the tissue maps
            (:data:`~medsynth.constants.TISSUE_CLASSES`), passed as the generator's third input (Shin et al.).
    """

    __constants__ = ["tissue_maps", "tissue_channels"]

    def __init__(
        self,
        generator: nn.Module,
        mask_channels: int = NUM_LABELS,
        with_confidence: bool = False,
        tissue_maps: bool = False,
    ) -> None:
        super().__init__()
        self.generator = generator
        self.mask_channels = mask_channels
        self.with_confidence = with_confidence
        self.tissue_maps = bool(tissue_maps)
        self.tissue_channels = len(TISSUE_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The images (B, num_sequences, H, W) for ``x`` (B, mask + atlas [+ tissue] channels, H, W)."""
        mask = x[:, : self.mask_channels]
        if self.tissue_maps:  # a TorchScript constant: the other branch is not compiled
            tissue = self.tissue_channels
            output = self.generator(mask, x[:, self.mask_channels : -tissue], x[:, -tissue:])
        else:
            output = self.generator(mask, x[:, self.mask_channels :])
        images = output["images"]
        if not self.with_confidence or "confidence" not in output:
            return images
        confidence = nn.functional.interpolate(
            output["confidence"].to(images.dtype),
            size=images.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )
        return torch.cat([images, confidence], dim=1)
