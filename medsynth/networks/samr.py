"""The SAMR family: the SAMR and CG-SAMR generators, composed of the parts of :mod:`.parts`.

Both generators encode the one-hot lesion mask and the atlas (three adjacent atlas slices per
sequence) with a :class:`~medsynth.networks.parts.DualEncoder`, pass the latent map through a
:class:`~medsynth.networks.parts.ResidualTrunk` and decode one image per sequence with a
stretch-out decoder: one branch per sequence, all reading the same latent map. Defaults follow the
authors' implementation (github.com/guopengf/CG-SAMR): base width 16, 2 down-sampling steps,
9 residual blocks, batch norm. Output channels follow the sequence order (the authors' code stacks
them in reverse).

Decoder widths: the latent map has ``2 * base_width * 2 ** num_downsampling`` channels (the two
encoders' outputs side by side) and every up-sampling step halves it, so the last step leaves
``2 * base_width`` channels for the 7x7 output convolution.
"""

from __future__ import annotations

import torch
from monai.networks.utils import normal_init
from torch import nn

from medsynth.constants import ATLAS_SLICES_PER_SEQUENCE, CLINICAL_SEQUENCES, NUM_LABELS
from medsynth.networks.blocks import check_norm
from medsynth.networks.parts import ConfidenceGuidedDecoder, DualEncoder, ResidualTrunk, StretchOutDecoder

__all__ = ["CGSAMRGenerator", "SAMRGenerator"]

# Parameter-name prefixes of medsynth 0.1 (one flat module) and where the parts put them now.
_PREFIXES_BEFORE_PARTS = {
    "mask_encoder.": "encoder.mask_encoder.",
    "atlas_encoder.": "encoder.atlas_encoder.",
    "res_blocks.": "trunk.",
    "branches.": "decoder.branches.",
    "synthesis.": "decoder.synthesis.",
    "confidence.": "decoder.confidence.",
}


def _rename_parameters_of_0_1(state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: checkpoints written before the generators were split into parts load
    unchanged."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        local = key[len(prefix) :]
        for old, new in _PREFIXES_BEFORE_PARTS.items():
            if local.startswith(old):
                state_dict[prefix + new + local[len(old) :]] = state_dict.pop(key)
                break


class _SAMRFamilyGenerator(nn.Module):
    """Encoder and trunk common to SAMR and CG-SAMR; subclasses provide the decoder (:meth:`build_decoder`).

    The weights of every part are initialised once, N(0, 0.02) (MONAI ``normal_init``, as the
    authors' pix2pixHD code), after the decoder is built.

    Args:
        num_sequences: output images, one per sequence (5 clinical, 4 BraTS).
        mask_channels: channels of the one-hot lesion mask.
        atlas_channels: channels of the atlas input; ``None`` means ``3 * num_sequences``.
        base_width: channels after each encoder's first convolution.
        num_downsampling: stride-2 steps in each encoder (inputs must be divisible by ``2 ** steps``).
        num_res_blocks: residual blocks of the trunk.
        norm: ``"batch"`` or ``"instance"``.
        use_atlas: encode the atlas (``False``: the papers' "w/o Atlas" ablation, mask encoder only).
        stretch_out: one decoder branch per sequence (``False``: the "w/o Stretch-out" ablation,
            one shared branch makes all sequences).
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
        use_atlas: bool = True,
        stretch_out: bool = True,
    ) -> None:
        super().__init__()
        check_norm(norm)
        if atlas_channels is None:
            atlas_channels = ATLAS_SLICES_PER_SEQUENCE * num_sequences
        if num_sequences < 1:
            raise ValueError(f"num_sequences must be >= 1; got {num_sequences}")
        self.num_sequences = num_sequences
        self.encoder = DualEncoder(
            mask_channels, atlas_channels, base_width, num_downsampling, norm, use_atlas
        )
        self.trunk = ResidualTrunk(self.encoder.out_channels, num_res_blocks, norm)
        self.decoder = self.build_decoder(
            self.encoder.out_channels, num_sequences, num_downsampling, base_width, norm, stretch_out
        )
        self._register_load_state_dict_pre_hook(_rename_parameters_of_0_1)
        self.apply(normal_init)

    def build_decoder(
        self,
        latent_channels: int,
        num_sequences: int,
        num_upsampling: int,
        base_width: int,
        norm: str,
        stretch_out: bool = True,
    ) -> nn.Module:
        """The decoder from the latent map to the images; subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_decoder")

    @property
    def mask_channels(self) -> int:
        return self.encoder.mask_channels

    @property
    def atlas_channels(self) -> int:
        return self.encoder.atlas_channels

    @property
    def latent_channels(self) -> int:
        return self.encoder.out_channels


class SAMRGenerator(_SAMRFamilyGenerator):
    """SAMR generator (Guo et al., MICCAI 2020): dual encoder, residual trunk, stretch-out decoder.

    Each decoder branch is a residual block, ``num_downsampling`` up-sampling steps and a 7x7
    output convolution with tanh. With the defaults and 5 sequences it has 4,672,037 parameters.

    Args: see :class:`_SAMRFamilyGenerator`.
    """

    def build_decoder(
        self,
        latent_channels: int,
        num_sequences: int,
        num_upsampling: int,
        base_width: int,
        norm: str,
        stretch_out: bool = True,
    ) -> nn.Module:
        return StretchOutDecoder(
            latent_channels, num_sequences, num_upsampling, norm, stretch_out=stretch_out
        )

    def forward(self, mask: torch.Tensor, atlas: torch.Tensor) -> dict[str, torch.Tensor]:
        """Synthesise the images.

        Args:
            mask: one-hot lesion mask, (B, mask_channels, H, W).
            atlas: atlas slices, (B, atlas_channels, H, W).

        Returns:
            ``{"images": (B, num_sequences, H, W)}`` in [-1, 1].
        """
        return {"images": self.decoder(self.trunk(self.encoder(mask, atlas)))}


class CGSAMRGenerator(_SAMRFamilyGenerator):
    """Confidence-guided SAMR generator (Guo et al., IEEE TMI 2021, Sec. III-A and III-B).

    SAMR's encoder and trunk with a :class:`~medsynth.networks.parts.ConfidenceGuidedDecoder`; with
    the defaults (5 mask, 15 atlas channels, 5 sequences) it has the published 3,213,447 parameters.

    Args: see :class:`_SAMRFamilyGenerator`; ``num_downsampling`` must be at least 1.
    """

    def build_decoder(
        self,
        latent_channels: int,
        num_sequences: int,
        num_upsampling: int,
        base_width: int,
        norm: str,
        stretch_out: bool = True,
    ) -> nn.Module:
        if num_upsampling < 1:
            raise ValueError(
                f"CG-SAMR needs num_downsampling >= 1 (it guides at 0.5 scale); got {num_upsampling}"
            )
        return ConfidenceGuidedDecoder(
            latent_channels, num_sequences, num_upsampling, base_width, norm, stretch_out
        )

    def forward(self, mask: torch.Tensor, atlas: torch.Tensor) -> dict[str, torch.Tensor]:
        """Synthesise the images with confidence guidance.

        Args:
            mask: one-hot lesion mask, (B, mask_channels, H, W).
            atlas: atlas slices, (B, atlas_channels, H, W).

        Returns:
            ``"images"`` (B, N, H, W) in [-1, 1], ``"intermediate"`` (B, N, H/2, W/2) in [-1, 1] and
            ``"confidence"`` (B, N, H/2, W/2) in (0, 1), channels in sequence order.
        """
        return self.decoder(self.trunk(self.encoder(mask, atlas)))
