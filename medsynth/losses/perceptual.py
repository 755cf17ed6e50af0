"""pix2pixHD's VGG19 perceptual loss, with weights the user supplies (nothing is downloaded).

``L_VGG = sum_i w_i * |phi_i(G(x)) - phi_i(y)|_1`` over the VGG19 activations relu1_1, relu2_1,
relu3_1, relu4_1 and relu5_1, with ``w = (1/32, 1/16, 1/8, 1/4, 1)``, as pix2pixHD. Each MR sequence
is a grey image: it is repeated over the three input channels, and the sequences are scored as
separate images. :class:`VGG19Features` lays its layers out as torchvision's ``vgg19().features``,
so a torchvision ImageNet state dict (``vgg19-*.pth``) loads as it is.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VGG19Features", "VGGPerceptualLoss", "vgg_perceptual_loss"]

logger = logging.getLogger(__name__)

# torchvision's VGG19 ("E") feature layers up to relu5_1: channels of each conv, "M" a max pool.
_VGG19_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512)
# Feature indices after which pix2pixHD reads an activation (relu1_1 ... relu5_1), and their weights.
_TAPS = (1, 6, 11, 20, 29)
_TAP_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)


class VGG19Features(nn.Module):
    """VGG19's convolutional layers up to relu5_1, indexed as torchvision's ``features``; returns the
    five activations pix2pixHD compares."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in _VGG19_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                channels = int(item)
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps, out = [], x
        for index, layer in enumerate(self.features):
            out = layer(out)
            if index in _TAPS:
                taps.append(out)
        return taps


class VGGPerceptualLoss(nn.Module):
    """pix2pixHD's VGG loss on multi-sequence images ``(B, N, H, W)`` (see the module docstring).

    Args:
        weights_path: a torchvision VGG19 state dict (its ``features.*`` entries are used).
    """

    def __init__(self, weights_path: str | os.PathLike) -> None:
        super().__init__()
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"VGG19 weights not found: {path} (a torchvision vgg19 state dict)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        vgg = VGG19Features()
        wanted = vgg.state_dict()
        missing = sorted(set(wanted) - set(state))
        if missing:
            raise ValueError(f"{path} is not a torchvision VGG19 state dict: it lacks {missing[:4]} ...")
        vgg.load_state_dict({key: state[key] for key in wanted})
        # Kept out of the module registry: fixed weights from the user's file are not checkpointed,
        # trained or switched to training mode; forward moves them to the images' device.
        self._vgg = [vgg.eval().requires_grad_(False)]

    @property
    def vgg(self) -> VGG19Features:
        return self._vgg[0]

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        if next(self.vgg.parameters()).device != fake.device:
            self._vgg[0] = self.vgg.to(fake.device)
        as_grey = lambda images: images.flatten(0, 1)[:, None].expand(-1, 3, -1, -1)  # noqa: E731
        fake_taps, real_taps = self.vgg(as_grey(fake.float())), self.vgg(as_grey(real.float()))
        return sum(
            weight * F.l1_loss(f, r.detach())
            for weight, f, r in zip(_TAP_WEIGHTS, fake_taps, real_taps, strict=True)
        )


def vgg_perceptual_loss(weights_path: str | os.PathLike | None) -> VGGPerceptualLoss | None:
    """The VGG term when ``weights_path`` names a file; ``None`` (the term off, said once in the log)
    when it is empty: nothing is downloaded at run time."""
    if not weights_path:
        logger.warning(
            "pix2pixHD's VGG perceptual term is off: no VGG19 weights given (set vgg_weights to a "
            "torchvision vgg19 state dict file to turn it on)"
        )
        return None
    return VGGPerceptualLoss(weights_path)
