"""The synthesis inferer: a 2D network applied to whole volumes, slice by slice with atlas neighbours.

The networks are 2D: each axial slice of the one-hot label map, together with the atlas slice and
its axial neighbours per sequence, gives one multi-sequence slice. :class:`SliceStackInferer` is a
MONAI :class:`~monai.inferers.Inferer`, so MONAI's evaluators and MONAI Label's bundle task call it
as ``inferer(inputs, network)`` on the volume that the bundle's ``preprocessing`` built.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.networks.utils import one_hot
from torch import nn

from medsynth.constants import ATLAS_NEIGHBOURS, ATLAS_SLICES_PER_SEQUENCE, NUM_LABELS
from medsynth.inference.accelerate import BACKENDS, PRECISIONS, optimize_for_inference
from medsynth.transforms.slices import neighbour_slices

logger = logging.getLogger(__name__)

__all__ = ["SliceStackInferer", "random_slices"]


def random_slices(num_slices: int, size: int, num_sequences: int, seed: int = 0) -> torch.Tensor:
    """Network inputs ``cat([one-hot mask, atlas])`` of ``num_slices`` random slices:
    (S, 5 + 3N, size, size), the mask in {0, 1}, the atlas in [-1, 1]. For benchmarks and for checking an
    optimized network against the original one."""
    generator = torch.Generator().manual_seed(seed)
    # Blocky label maps (8 x 8 pixel cells) rather than per-pixel noise; speed does not care, the check reads
    # better.
    cells = torch.randint(0, NUM_LABELS, (num_slices, 1, size // 8, size // 8), generator=generator)
    labels = nn.functional.interpolate(cells.float(), size=(size, size), mode="nearest")
    mask = one_hot(labels, NUM_LABELS, dim=1)
    atlas = (
        torch.rand((num_slices, ATLAS_SLICES_PER_SEQUENCE * num_sequences, size, size), generator=generator)
        * 2
        - 1
    )
    return torch.cat([mask, atlas], dim=1)


class SliceStackInferer(Inferer):
    """Synthesise every axial slice of a volume with a one-tensor-in, one-tensor-out 2D network.

    ``inputs`` is ``(B, M + N, H, W, D)``: the one-hot label map (``M`` channels) followed by the
    scaled atlas (one channel per sequence), as the bundles' ``preprocessing`` makes it. For each
    axial slice ``z`` the network sees ``cat([mask[..., z], atlas slices z - r .. z + r])`` (edge
    slices repeat), ``batch_size`` slices per call; the result is ``(B, N, H, W, D)`` in [-1, 1], a
    ``MetaTensor`` carrying the inputs' metadata when the inputs are one (so ``Invertd`` can bring it
    back to the input grid).

    With ``backend`` other than ``"none"`` the network is first replaced by its optimized form
    (:func:`~medsynth.inference.accelerate.optimize_for_inference`, checked against the original on
    random slices), once per network object.

    Args:
        batch_size: slices per forward pass.
        mask_channels: leading channels of ``inputs`` that hold the one-hot label map.
        neighbours: atlas slices on each side of the instance's slice.
        backend: ``"none"`` runs the network as it is; ``"auto"``, ``"eager"``, ``"jit"`` or
            ``"compile"`` optimize it first (on CPU, ``"auto"`` compiles: ~2x faster in float32 for
            whole cohorts, after a one-off compilation of 10-30 s).
        precision: ``"fp32"`` or ``"bf16"`` for an optimized network (bf16: about twice as fast again on
            CPUs with AVX512-BF16, largest error ~0.04 on the [-1, 1] image scale).
        seed: seed of the random slices the optimized network is checked on.
    """

    def __init__(
        self,
        batch_size: int = 8,
        mask_channels: int = NUM_LABELS,
        neighbours: int = ATLAS_NEIGHBOURS,
        backend: str = "none",
        precision: str = "fp32",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if backend != "none" and backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose 'none' or one of {BACKENDS}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
        self.batch_size = int(batch_size)
        self.mask_channels = int(mask_channels)
        self.neighbours = int(neighbours)
        self.backend = backend
        self.precision = precision
        self.seed = seed
        self._optimized: tuple[nn.Module, nn.Module] | None = None  # (source network, its optimized form)

    def _network_for(
        self, network: nn.Module, size: int, num_sequences: int, device: torch.device
    ) -> nn.Module:
        if self.backend == "none":
            return network
        if self._optimized is None or self._optimized[0] is not network:
            example = random_slices(self.batch_size, size, num_sequences, seed=self.seed)
            optimized = optimize_for_inference(
                network, example, device, precision=self.precision, backend=self.backend
            )
            self._optimized = (network, optimized)
        return self._optimized[1]

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Synthesise the volumes of ``inputs`` (see the class docstring); extra arguments are not used."""
        if inputs.dim() != 5:
            raise ValueError(
                f"expected inputs (B, mask + atlas channels, H, W, D), got shape {list(inputs.shape)}"
            )
        num_sequences = inputs.shape[1] - self.mask_channels
        if num_sequences < 1:
            raise ValueError(
                f"inputs have {inputs.shape[1]} channels, no atlas after {self.mask_channels} mask channels"
            )
        device = _device_of(network, inputs.device)
        runner = self._network_for(network, inputs.shape[2], num_sequences, device)
        plain = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        volumes = []
        with torch.inference_mode():
            for volume in plain:
                mask, atlas = volume[: self.mask_channels].float(), volume[self.mask_channels :].float()
                depth = volume.shape[-1]
                slices = []
                for start in range(0, depth, self.batch_size):
                    batch = torch.stack(
                        [
                            torch.cat([mask[..., z], neighbour_slices(atlas, z, self.neighbours)])
                            for z in range(start, min(start + self.batch_size, depth))
                        ]
                    ).to(device)
                    prediction = runner(batch)
                    if isinstance(prediction, dict):
                        prediction = prediction["images"]
                    slices.append(prediction.float().cpu())
                volumes.append(torch.cat(slices).permute(1, 2, 3, 0))  # (D, N, H, W) -> (N, H, W, D)
        output = torch.stack(volumes)
        if isinstance(inputs, MetaTensor):
            return MetaTensor(output, meta=dict(inputs.meta))
        return output


def _device_of(network: nn.Module, default: torch.device) -> torch.device:
    for parameter in network.parameters():
        return parameter.device
    return default
