"""U-Net lesion-segmentation module U of the shape-consistency loss (SAMR Fig. 1c, CG-SAMR Fig. 2)."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import UNet

from medsynth.constants import NUM_LABELS
from medsynth.networks.blocks import check_norm

__all__ = ["make_lesion_unet"]


def make_lesion_unet(
    num_sequences: int,
    num_classes: int = NUM_LABELS,
    channels: Sequence[int] = (16, 32, 64, 128, 256),
    strides: Sequence[int] = (2, 2, 2, 2),
    num_res_units: int = 2,
    norm: str = "batch",
    dropout: float = 0.0,
) -> UNet:
    """Build the 2D MONAI U-Net that segments the lesion labels from the (real or synthesised) images.

    The network returns logits; :class:`medsynth.losses.ShapeConsistencyLoss` applies the softmax
    (the authors' U-Net ends with a softmax layer instead). Inputs must be divisible by
    ``prod(strides)`` (16 with the defaults).

    Args:
        num_sequences: input channels, one per MR sequence.
        num_classes: output classes (background, normal brain, edema, cavity, tumour).
        channels: feature channels per level of MONAI's ``UNet``.
        strides: down-sampling strides between levels (``len(channels) - 1`` values).
        num_res_units: residual units per level.
        norm: ``"batch"`` or ``"instance"``.
        dropout: dropout probability.

    Returns:
        ``monai.networks.nets.UNet`` with ``spatial_dims=2``.
    """
    if num_sequences < 1 or num_classes < 2:
        raise ValueError(f"need num_sequences >= 1 and num_classes >= 2; got {num_sequences}, {num_classes}")
    return UNet(
        spatial_dims=2,
        in_channels=num_sequences,
        out_channels=num_classes,
        channels=tuple(channels),
        strides=tuple(strides),
        num_res_units=num_res_units,
        norm=check_norm(norm),
        dropout=dropout,
    )
