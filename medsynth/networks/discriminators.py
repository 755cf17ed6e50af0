"""Multi-scale label-wise PatchGAN discriminators of SAMR / CG-SAMR (CG-SAMR paper, Sec. III-C, Fig. 4).

Three regions of interest (background, normal brain, lesion = edema + cavity + tumour, see
:data:`medsynth.constants.ROI_LABELS`) times two scales give six PatchGAN discriminators. Each sees
``cat([mask, images, atlas])`` multiplied by its ROI mask, at the original scale or average-pooled
to 0.5 scale, and returns its intermediate features for the feature-matching loss.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from monai.networks.utils import normal_init
from torch import nn

from medsynth.constants import NUM_LABELS, ROI_LABELS
from medsynth.networks.blocks import check_norm

__all__ = ["LabelWiseMultiScaleDiscriminator", "PatchGANDiscriminator", "roi_masks"]

_LEAKY_RELU = ("LEAKYRELU", {"negative_slope": 0.2})


def roi_masks(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """ROI masks of a one-hot lesion mask, one per :data:`~medsynth.constants.ROI_LABELS` entry.

    Args:
        mask: one-hot lesion mask (B, NUM_LABELS, H, W); channel ``k`` holds label ``k``.

    Returns:
        ``{roi: (B, 1, H, W)}``, the sum of the ROI's label channels (a new tensor; ``mask`` is
        not modified).
    """
    if mask.dim() != 4 or mask.shape[1] != NUM_LABELS:
        raise ValueError(f"expected a one-hot lesion mask (B, {NUM_LABELS}, H, W); got {list(mask.shape)}")
    return {roi: mask[:, list(labels)].sum(dim=1, keepdim=True) for roi, labels in ROI_LABELS.items()}


class PatchGANDiscriminator(nn.Sequential):
    """pix2pixHD PatchGAN returning the output of every layer.

    ``num_layers`` stride-2 4x4 convs (the first without normalisation), then a stride-1 4x4
    conv with normalisation and a stride-1 4x4 conv to one channel; filters start at
    ``base_filters`` and double per layer up to ``max_filters``; LeakyReLU(0.2); padding 2 and
    bias everywhere, as in pix2pixHD. MONAI's ``PatchDiscriminator`` has the same layout, but no
    cap on the filters, so the layers are assembled here from MONAI ``Convolution`` blocks.
    With 25 input channels and the defaults it has 2,789,057 parameters.

    Args:
        in_channels: input channels.
        base_filters: filters of the first convolution.
        num_layers: number of stride-2 convolutions.
        max_filters: upper bound on the filters of any layer.
        norm: ``"batch"`` or ``"instance"``.
    """

    def __init__(
        self,
        in_channels: int,
        base_filters: int = 64,
        num_layers: int = 3,
        max_filters: int = 512,
        norm: str = "batch",
    ) -> None:
        norm = check_norm(norm)
        if in_channels < 1 or base_filters < 1 or num_layers < 1 or max_filters < 1:
            raise ValueError(
                "in_channels, base_filters, num_layers and max_filters must be >= 1; got "
                f"{in_channels}, {base_filters}, {num_layers}, {max_filters}"
            )
        filters = min(base_filters, max_filters)
        layers: list[nn.Module] = [
            Convolution(
                2, in_channels, filters, strides=2, kernel_size=4, padding=2, norm=None, act=_LEAKY_RELU
            )
        ]
        for index in range(1, num_layers + 1):
            previous, filters = filters, min(filters * 2, max_filters)
            stride = 2 if index < num_layers else 1
            layers.append(
                Convolution(
                    2, previous, filters, strides=stride, kernel_size=4, padding=2, norm=norm, act=_LEAKY_RELU
                )
            )
        layers.append(Convolution(2, filters, 1, strides=1, kernel_size=4, padding=2, conv_only=True))
        super().__init__(*layers)
        self.apply(normal_init)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the features of every layer; the last is the patch prediction (no activation)."""
        features = []
        for layer in self:
            x = layer(x)
            features.append(x)
        return features


class LabelWiseMultiScaleDiscriminator(nn.Module):
    """Six PatchGANs: three ROIs (background, normal brain, lesion) times ``num_scales`` scales.

    The discriminators live in one ``nn.ModuleDict`` (keys ``"<roi>_s<scale>"``, e.g.
    ``"background_s0"``, ``"lesion_s1"``) so that one DDP wrapper covers them all. The input of
    each is ``cat([mask, images, atlas]) * roi_mask``; scale ``s`` applies ``s`` times a 3x3
    average pooling with stride 2, padding 1 and ``count_include_pad=False`` (pix2pixHD) to the
    masked input.

    Args:
        in_channels: channels of ``cat([mask, images, atlas])``: ``5 + N + 3N`` (25 for 5 sequences).
        base_filters: filters of each PatchGAN's first convolution.
        num_layers: stride-2 convolutions per PatchGAN.
        max_filters: upper bound on the filters.
        norm: ``"batch"`` or ``"instance"``.
        num_scales: scales per ROI (2 in the papers).
    """

    def __init__(
        self,
        in_channels: int,
        base_filters: int = 64,
        num_layers: int = 3,
        max_filters: int = 512,
        norm: str = "batch",
        num_scales: int = 2,
    ) -> None:
        super().__init__()
        if num_scales < 1:
            raise ValueError(f"num_scales must be >= 1; got {num_scales}")
        self.in_channels = in_channels
        self.num_scales = num_scales
        self.discriminators = nn.ModuleDict(
            {
                self.key(roi, scale): PatchGANDiscriminator(
                    in_channels, base_filters, num_layers, max_filters, norm
                )
                for roi in ROI_LABELS
                for scale in range(num_scales)
            }
        )
        self.downsample = nn.AvgPool2d(kernel_size=3, stride=2, padding=1, count_include_pad=False)

    @staticmethod
    def key(roi: str, scale: int) -> str:
        """Name of the discriminator of ``roi`` at ``scale`` in :attr:`discriminators`."""
        return f"{roi}_s{scale}"

    def forward(
        self, mask: torch.Tensor, images: torch.Tensor, atlas: torch.Tensor
    ) -> list[list[torch.Tensor]]:
        """Discriminate ``images`` given the lesion mask and the atlas.

        Args:
            mask: one-hot lesion mask (B, 5, H, W).
            images: real or synthesised images (B, N, H, W).
            atlas: atlas slices (B, 3N, H, W).

        Returns:
            One list per discriminator, in the order background s0, s1, normal brain s0, s1,
            lesion s0, s1 (the papers' D1..D6): its layer features, the last being the patch
            prediction. None of the inputs is modified.
        """
        x = torch.cat([mask, images, atlas], dim=1)
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"mask + images + atlas have {mask.shape[1]} + {images.shape[1]} + {atlas.shape[1]} = "
                f"{x.shape[1]} channels; this discriminator expects {self.in_channels}"
            )
        outputs: list[list[torch.Tensor]] = []
        for roi, roi_mask in roi_masks(mask).items():
            masked = x * roi_mask
            for scale in range(self.num_scales):
                if scale > 0:
                    masked = self.downsample(masked)
                outputs.append(self.discriminators[self.key(roi, scale)](masked))
        return outputs
