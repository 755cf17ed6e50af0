"""Small, config-instantiable pieces the engines are built from: batch preparation and network calls.

* :class:`PrepareDictBatch` moves the tensors of a dictionary batch to the device (the
  ``prepare_batch`` of MONAI's workflows);
* :class:`BatchCall` calls a network on entries of that batch, optionally with some of them
  replaced (``discriminator(mask, fake, atlas)`` is ``call(discriminator, batch, image=fake)``). The
  engines take one per network, so a method that feeds its networks other keys, or fewer, is a
  configuration rather than a new engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "DISCRIMINATOR_CALL",
    "EVALUATION_BATCH",
    "GENERATOR_CALL",
    "SEGMENTER_CALL",
    "TRAINING_BATCH",
    "BatchCall",
    "PrepareDictBatch",
    "amp_autocast",
]


def amp_autocast(engine: Any) -> contextlib.AbstractContextManager:
    """The Workflow's mixed precision for a forward pass: ``torch.autocast`` on the engine's device type
    with its ``amp_kwargs`` when ``engine.amp`` is set (on CPU as on CUDA), else nothing."""
    if not engine.amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=engine.state.device.type, **engine.amp_kwargs)


class PrepareDictBatch:
    """``prepare_batch`` of a dictionary batch: ``keys`` become plain tensors on the device.

    Tensors of ``integer_keys`` become int64, the other ``keys`` float32 (MetaTensors become plain
    tensors, which keeps the networks' outputs plain as well); ``extra_keys`` that are present are
    passed through unchanged (patient ids, slice indices, windows for the metrics), and
    ``optional_keys`` that are present are prepared like ``keys``.

    Args:
        keys: the tensors every batch must hold.
        integer_keys: those of ``keys`` that hold integer label maps.
        extra_keys: optional entries passed through when present.
        optional_keys: optional tensors moved to the device (float32) when present.
    """

    def __init__(
        self,
        keys: Sequence[str] = ("mask", "atlas", "image", "label"),
        integer_keys: Sequence[str] = ("label",),
        extra_keys: Sequence[str] = (),
        optional_keys: Sequence[str] = (),
    ) -> None:
        self.keys = tuple(keys)
        self.optional_keys = tuple(optional_keys)
        self.integer_keys = frozenset(integer_keys)
        self.extra_keys = tuple(extra_keys)

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: torch.device | str | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        missing = [key for key in self.keys if key not in batchdata]
        if missing:
            raise KeyError(f"a batch needs the keys {list(self.keys)}; missing {missing}")
        out: dict[str, Any] = {}
        for key in (*self.keys, *(k for k in self.optional_keys if k in batchdata)):
            value = torch.as_tensor(batchdata[key])
            if hasattr(value, "as_tensor"):
                value = value.as_tensor()
            dtype = torch.long if key in self.integer_keys else torch.float32
            out[key] = value.to(device=device, dtype=dtype, non_blocking=non_blocking, **kwargs)
        for key in self.extra_keys:
            if key in batchdata:
                out[key] = batchdata[key]
        return out


class BatchCall:
    """Call a network on batch entries: ``network(*(batch[k] for k in keys))``.

    ``call(network, batch, image=fake)`` uses ``fake`` in place of ``batch["image"]``, so one
    description serves the real and the synthesised pass of a discriminator.

    Args:
        keys: the batch entries, in the order of the network's positional arguments.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        if isinstance(keys, str):
            keys = (keys,)
        if not keys:
            raise ValueError("a network call needs at least one batch key")
        self.keys = tuple(keys)

    def __call__(self, network: nn.Module, batch: Mapping[str, Any], **replacements: Any) -> Any:
        unknown = set(replacements) - set(self.keys)
        if unknown:
            raise KeyError(
                f"replacement(s) {sorted(unknown)} are not inputs of this call ({list(self.keys)})"
            )
        return network(*(replacements[key] if key in replacements else batch[key] for key in self.keys))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self.keys)})"


# The defaults of the SAMR-family engines (module-level, so that argument defaults are not calls).
# "tissue": the tissue maps of a dataset made with_tissue (Shin et al.'s input), moved when present.
TRAINING_BATCH = PrepareDictBatch(("mask", "atlas", "image", "label"), optional_keys=("tissue",))
EVALUATION_BATCH = PrepareDictBatch(
    ("mask", "atlas", "image", "label"),
    extra_keys=("window", "patient_id", "slice_index"),
    optional_keys=("brain_mask", "tissue"),
)
GENERATOR_CALL = BatchCall(("mask", "atlas"))
DISCRIMINATOR_CALL = BatchCall(("mask", "image", "atlas"))
SEGMENTER_CALL = BatchCall(("image",))
