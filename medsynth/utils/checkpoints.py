"""Weights files checked before they are loaded: an empty, truncated or foreign file, or the weights
of another network, is refused in one sentence that names the file, what it holds and the bundle
that fits it (instead of PyTorch's list of state-dict keys).

:class:`CheckedCheckpointLoader` is the handler the bundles' ``evaluate`` and ``inference``
configs use in place of MONAI's ``CheckpointLoader`` for a network's weights.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn

from medsynth.utils.errors import reports_input_problems

__all__ = ["CheckedCheckpointLoader", "load_checked_weights", "read_weights", "weights_family"]

logger = logging.getLogger(__name__)

# Network family -> the bundle that trains it.
FAMILY_BUNDLES: dict[str, str] = {
    "a CG-SAMR generator": "bundles/cg_samr",
    "a SAMR generator": "bundles/samr",
    "a pix2pix generator": "bundles/pix2pix",
    "a pix2pixHD generator": "bundles/pix2pixhd",
    "a lesion-segmentation U-Net": "bundles/lesion_seg",
}


def weights_family(keys: Any) -> str:
    """What a state dict's parameter names say it is (one of :data:`FAMILY_BUNDLES`, or "the weights
    of an unknown network")."""
    names = [str(key) for key in keys]
    if any(".decoder.confidence." in f".{k}" for k in names):
        return "a CG-SAMR generator"
    if any(".unet.model." in f".{k}" for k in names):
        return "a pix2pix generator"
    if any(".encoder.mask_encoder." in f".{k}" for k in names):
        return "a SAMR generator"
    if any(".decoder.branches." in f".{k}" for k in names):
        return "a pix2pixHD generator"
    if any(k.startswith("model.0.conv.unit") for k in names):
        return "a lesion-segmentation U-Net"
    return "the weights of an unknown network"


def read_weights(path: str | os.PathLike, role: str = "model") -> Mapping[str, torch.Tensor]:
    """The state dict in ``path``; a missing, empty, truncated or non-PyTorch file is refused by name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{role} weights not found: {path} (train the bundle first, or check the path)"
        )
    if path.stat().st_size == 0:
        raise ValueError(f"{role} weights {path} is an empty file (an interrupted copy or save?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a damaged or foreign file
        raise ValueError(
            f"{role} weights {path} is not a readable PyTorch checkpoint (truncated, or another kind of "
            f"file?): {type(error).__name__}"
        ) from error
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"{role} weights {path} holds no network state dict (a training checkpoint? use models/model.pt)"
        )
    return state


@reports_input_problems
def load_checked_weights(network: nn.Module, path: str | os.PathLike, role: str = "model") -> nn.Module:
    """Load ``path`` into ``network`` after :func:`read_weights`; weights of another network, or of
    the same one built with other settings, are refused with what they are and what would fit."""
    state = read_weights(path, role)
    target = network.module if hasattr(network, "module") else network
    try:  # first as PyTorch would (the networks' load hooks rename the keys of older releases)
        target.load_state_dict(state)
        return network
    except RuntimeError:
        pass
    wanted = target.state_dict()
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(wanted))
    reshaped = [k for k in set(wanted) & set(state) if wanted[k].shape != state[k].shape]
    if missing or unexpected or reshaped:
        held, expected = weights_family(state), weights_family(wanted)
        if held != expected:
            fit = FAMILY_BUNDLES.get(held)
            hint = f" (use {fit})" if fit else ""
            raise ValueError(f"{role} weights {path} hold {held}; this bundle builds {expected}{hint}")
        if reshaped:
            key = reshaped[0]
            example = f"e.g. {key}: {list(state[key].shape)} in the file, {list(wanted[key].shape)} here"
        elif missing:
            example = f"e.g. {missing[0]} missing from the file"
        else:
            example = f"e.g. {unexpected[0]} not in this network"
        raise ValueError(
            f"{role} weights {path} hold {held} built with other settings ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(reshaped)} reshaped parameters; {example}): pass the "
            "settings it was trained with (sizes such as base_width or num_res_blocks, an ablation's "
            "switches)"
        )
    raise ValueError(f"{role} weights {path} do not fit {weights_family(wanted)}")  # no difference found


class CheckedCheckpointLoader:
    """Load a network's weights when the engine starts, checked by :func:`load_checked_weights`.

    Args:
        load_path: the weights file (``models/model.pt``).
        network: the network to fill.
        map_location: accepted for MONAI ``CheckpointLoader`` compatibility; the weights are copied
            into the network's own device.
        role: what the weights are, for messages.
    """

    def __init__(
        self, load_path: str | os.PathLike, network: nn.Module, map_location: Any = None, role: str = "model"
    ) -> None:
        self.load_path, self.network, self.map_location, self.role = load_path, network, map_location, role

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        load_checked_weights(self.network, self.load_path, self.role)
        logger.info("loaded %s weights from %s", self.role, self.load_path)
