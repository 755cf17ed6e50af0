"""Evaluation engine of the synthesis models: synthesize each batch and hand it to the metrics."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping, Sequence

import torch
from monai.engines import Evaluator
from monai.engines.utils import IterationEvents
from monai.networks.utils import eval_mode
from torch import nn

from medsynth.engines.trainer import prepare_synthesis_batch

__all__ = ["SynthesisEvaluator", "prepare_evaluation_batch"]


def prepare_evaluation_batch(
    batchdata: Mapping[str, Any], device: torch.device | str | None = None, non_blocking: bool = False, **kwargs: Any
) -> dict[str, Any]:
    """The training batch (:func:`prepare_synthesis_batch`) plus ``window``, ``patient_id`` and ``slice_index``."""
    out: dict[str, Any] = prepare_synthesis_batch(batchdata, device=device, non_blocking=non_blocking, **kwargs)
    for key in ("window", "patient_id", "slice_index"):
        if key in batchdata:
            out[key] = batchdata[key]
    return out


class SynthesisEvaluator(Evaluator):
    """Run the generator on every batch (eval mode, no gradients) and expose prediction and reference.

    ``engine.state.output`` holds ``pred`` (B,N,H,W in [-1, 1]), ``image`` (the real images),
    ``label``, ``mask`` and, for CG-SAMR, ``confidence``; attach
    :class:`~medsynth.engines.handlers.SynthesisQualityMetric` as ``key_val_metric``.

    Args:
        device: where the generator runs.
        val_data_loader: loader of synthesis items (see :func:`prepare_evaluation_batch`).
        generator: ``forward(mask, atlas) -> dict`` with ``"images"``; a DDP-wrapped generator is
            unwrapped (evaluation never needs gradient synchronisation).
        bf16: run under ``torch.autocast(dtype=bfloat16)`` on CUDA.
        Other arguments as in :class:`monai.engines.Evaluator`.
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Any,
        generator: nn.Module,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = prepare_evaluation_batch,
        key_val_metric: dict | None = None,
        additional_metrics: dict | None = None,
        val_handlers: Sequence | None = None,
        bf16: bool = False,
    ) -> None:
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            key_val_metric=key_val_metric,
            additional_metrics=additional_metrics,
            val_handlers=val_handlers,
            decollate=False,
        )
        if isinstance(generator, nn.parallel.DistributedDataParallel):
            generator = generator.module
        self.generator = generator
        self.bf16 = bool(bf16)

    def _iteration(self, engine: SynthesisEvaluator, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        use_bf16 = engine.bf16 and torch.device(engine.state.device).type == "cuda"
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        with eval_mode(engine.generator), autocast:
            outputs = engine.generator(batch["mask"], batch["atlas"])
        output = {"pred": outputs["images"].float(), **batch}
        if "confidence" in outputs:
            output["confidence"] = outputs["confidence"].float()
        engine.state.output = output
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return output
