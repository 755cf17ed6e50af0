"""PatchGAN discriminators: the pix2pixHD PatchGAN, its multi-scale form, and label-wise ROI masking.

* :class:`PatchGANDiscriminator` returns every layer's features (for feature matching);
* :class:`MultiScalePatchDiscriminator` runs one PatchGAN per scale on the average-pooled input
  (pix2pixHD);
* :class:`LabelWiseDiscriminator` wraps one discriminator per region of interest, each seeing only
  its region; :class:`LabelWiseMultiScaleDiscriminator` is the SAMR / CG-SAMR form (CG-SAMR paper,
  Sec. III-C, Fig. 4): three regions (background, normal brain, lesion = edema + cavity + tumour,
  :data:`medsynth.constants.ROI_LABELS`) times two scales give six PatchGANs.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from monai.networks.utils import normal_init
from torch import nn

from medsynth.constants import NUM_LABELS, ROI_LABELS
from medsynth.networks.blocks import check_norm

# The "w/o Label-wise D" ablation: one region, every label (the discriminator sees the whole image).
WHOLE_IMAGE_ROI: dict[str, tuple[int, ...]] = {"image": tuple(range(NUM_LABELS))}

__all__ = [
    "ConditionalDiscriminator",
    "LabelWiseDiscriminator",
    "LabelWiseMultiScaleDiscriminator",
    "MultiScalePatchDiscriminator",
    "PatchGANDiscriminator",
    "roi_masks",
]

_LEAKY_RELU = ("LEAKYRELU", {"negative_slope": 0.2})


def roi_masks(mask: torch.Tensor, rois: dict[str, tuple[int, ...]] = ROI_LABELS) -> dict[str, torch.Tensor]:
    """ROI masks of a one-hot lesion mask, one per ``rois`` entry (:data:`~medsynth.constants.ROI_LABELS`).

    Args:
        mask: one-hot lesion mask (B, NUM_LABELS, H, W); channel ``k`` holds label ``k``.
        rois: region name -> label values.

    Returns:
        ``{roi: (B, 1, H, W)}``, the sum of the ROI's label channels (a new tensor; ``mask`` is
        not modified).
    """
    if mask.dim() != 4 or mask.shape[1] != NUM_LABELS:
        raise ValueError(f"expected a one-hot lesion mask (B, {NUM_LABELS}, H, W); got {list(mask.shape)}")
    return {roi: mask[:, list(labels)].sum(dim=1, keepdim=True) for roi, labels in rois.items()}


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
        padding: of every 4x4 convolution (2 in pix2pixHD, 1 in pix2pix).
        bias_with_norm: convolutions followed by normalisation have a bias (pix2pixHD; pix2pix
            drops it before batch norm).
    """

    def __init__(
        self,
        in_channels: int,
        base_filters: int = 64,
        num_layers: int = 3,
        max_filters: int = 512,
        norm: str = "batch",
        padding: int = 2,
        bias_with_norm: bool = True,
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
                2, in_channels, filters, strides=2, kernel_size=4, padding=padding, norm=None, act=_LEAKY_RELU
            )
        ]
        for index in range(1, num_layers + 1):
            previous, filters = filters, min(filters * 2, max_filters)
            stride = 2 if index < num_layers else 1
            layers.append(
                Convolution(
                    2,
                    previous,
                    filters,
                    strides=stride,
                    kernel_size=4,
                    padding=padding,
                    norm=norm,
                    act=_LEAKY_RELU,
                    bias=bias_with_norm,
                )
            )
        layers.append(Convolution(2, filters, 1, strides=1, kernel_size=4, padding=padding, conv_only=True))
        super().__init__(*layers)
        self.apply(normal_init)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the features of every layer; the last is the patch prediction (no activation)."""
        features = []
        for layer in self:
            x = layer(x)
            features.append(x)
        return features


class MultiScalePatchDiscriminator(nn.Module):
    """pix2pixHD's multi-scale discriminator: ``num_scales`` :class:`PatchGANDiscriminator` of the same
    form, the one of scale ``s`` seeing the input average-pooled ``s`` times (3x3, stride 2, padding 1,
    ``count_include_pad=False``).

    Args:
        in_channels: input channels.
        num_scales: number of scales (2 in the SAMR papers).
        base_filters, num_layers, max_filters, norm: as in :class:`PatchGANDiscriminator`.
    """

    def __init__(
        self,
        in_channels: int,
        num_scales: int = 2,
        base_filters: int = 64,
        num_layers: int = 3,
        max_filters: int = 512,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if num_scales < 1:
            raise ValueError(f"num_scales must be >= 1; got {num_scales}")
        self.in_channels = in_channels
        self.discriminators = nn.ModuleList(
            [
                PatchGANDiscriminator(in_channels, base_filters, num_layers, max_filters, norm)
                for _ in range(num_scales)
            ]
        )
        self.downsample = nn.AvgPool2d(kernel_size=3, stride=2, padding=1, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per scale, the layer features of its discriminator (the last one is the patch prediction)."""
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"the input has {x.shape[1]} channels; this discriminator expects {self.in_channels}"
            )
        outputs: list[list[torch.Tensor]] = []
        for scale, discriminator in enumerate(self.discriminators):
            if scale > 0:
                x = self.downsample(x)
            outputs.append(discriminator(x))
        return outputs


class LabelWiseDiscriminator(nn.Module):
    """Label-wise ROI masking on top of one discriminator per region (CG-SAMR Sec. III-C).

    The input of every region's discriminator is ``cat([mask, images, atlas]) * roi_mask``, the ROI
    masks coming from the one-hot lesion mask (:func:`roi_masks`); the discriminators live in one
    ``nn.ModuleDict`` keyed by region, so that one DDP wrapper covers them all.

    Args:
        discriminators: one module per region of ``rois``, in their order, each mapping the masked
            input to a list of per-scale feature lists (e.g. :class:`MultiScalePatchDiscriminator`).
        rois: region name -> label values (default :data:`~medsynth.constants.ROI_LABELS`).
        use_atlas: condition on the atlas as well (``False`` for generators without one).
    """

    def __init__(
        self,
        discriminators: dict[str, nn.Module],
        rois: dict[str, tuple[int, ...]] = ROI_LABELS,
        use_atlas: bool = True,
    ) -> None:
        super().__init__()
        if list(discriminators) != list(rois):
            raise ValueError(f"need one discriminator per region {list(rois)}; got {list(discriminators)}")
        self.rois = dict(rois)
        self.use_atlas = bool(use_atlas)
        self.discriminators = nn.ModuleDict(discriminators)

    def forward(
        self, mask: torch.Tensor, images: torch.Tensor, atlas: torch.Tensor
    ) -> list[list[torch.Tensor]]:
        """Discriminate ``images`` given the lesion mask and the atlas.

        Args:
            mask: one-hot lesion mask (B, 5, H, W).
            images: real or synthesised images (B, N, H, W).
            atlas: atlas slices (B, 3N, H, W).

        Returns:
            One feature list per discriminator, regions in order and each region's scales in order
            (background s0, s1, normal brain s0, s1, lesion s0, s1: the papers' D1..D6), the last
            feature being the patch prediction. None of the inputs is modified.
        """
        x = torch.cat([mask, images, atlas] if self.use_atlas else [mask, images], dim=1)
        outputs: list[list[torch.Tensor]] = []
        for roi, roi_mask in roi_masks(mask, self.rois).items():
            outputs.extend(self.discriminators[roi](x * roi_mask))
        return outputs


def _rename_discriminators_of_0_1(state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: ``discriminators.<roi>_s<k>.`` of medsynth 0.1 (one flat ModuleDict)
    is ``discriminators.<roi>.discriminators.<k>.`` now."""
    for key in [k for k in state_dict if k.startswith(prefix + "discriminators.")]:
        head, _, rest = key[len(prefix + "discriminators.") :].partition(".")
        roi, separator, scale = head.rpartition("_s")
        if separator and scale.isdigit() and roi in ROI_LABELS:
            state_dict[f"{prefix}discriminators.{roi}.discriminators.{scale}.{rest}"] = state_dict.pop(key)


class LabelWiseMultiScaleDiscriminator(LabelWiseDiscriminator):
    """The SAMR / CG-SAMR discriminator: three regions (background, normal brain, lesion), each with a
    two-scale :class:`MultiScalePatchDiscriminator`, i.e. six PatchGANs (the papers' D1..D6).
    ``label_wise=False`` (the papers' "w/o Label-wise D" ablation) keeps one two-scale
    discriminator on the whole image.

    Args:
        in_channels: channels of ``cat([mask, images, atlas])``: ``5 + N + 3N`` (25 for 5 sequences);
            ``5 + N`` without the atlas.
        base_filters: filters of each PatchGAN's first convolution.
        num_layers: stride-2 convolutions per PatchGAN.
        max_filters: upper bound on the filters.
        norm: ``"batch"`` or ``"instance"``.
        num_scales: scales per region (2 in the papers).
        label_wise: one discriminator per region; otherwise one for the whole image.
        use_atlas: condition on the atlas (see :class:`LabelWiseDiscriminator`).
    """

    def __init__(
        self,
        in_channels: int,
        base_filters: int = 64,
        num_layers: int = 3,
        max_filters: int = 512,
        norm: str = "batch",
        num_scales: int = 2,
        label_wise: bool = True,
        use_atlas: bool = True,
    ) -> None:
        rois = ROI_LABELS if label_wise else WHOLE_IMAGE_ROI
        super().__init__(
            {
                roi: MultiScalePatchDiscriminator(
                    in_channels, num_scales, base_filters, num_layers, max_filters, norm
                )
                for roi in rois
            },
            rois,
            use_atlas,
        )
        self.in_channels = in_channels
        self._register_load_state_dict_pre_hook(_rename_discriminators_of_0_1)


class ConditionalDiscriminator(nn.Module):
    """A conditional GAN's discriminator: ``discriminator(cat(inputs))`` for ``forward(*inputs)``
    (e.g. the lesion mask and the images, pix2pix), as a one-entry list of feature lists, the form
    the adversarial losses take from several discriminators.

    Args:
        discriminator: maps the concatenated input to its layer features (a
            :class:`PatchGANDiscriminator`), or to a list of them (a :class:`MultiScalePatchDiscriminator`).
    """

    def __init__(self, discriminator: nn.Module) -> None:
        super().__init__()
        self.discriminator = discriminator

    def forward(self, *inputs: torch.Tensor) -> list[list[torch.Tensor]]:
        outputs = self.discriminator(torch.cat(inputs, dim=1))
        return outputs if outputs and isinstance(outputs[0], (list, tuple)) else [outputs]
