"""Evaluation engine of the synthesis models: synthesize each batch and hand it to the metrics."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.engines import Evaluator
from monai.engines.utils import IterationEvents
from monai.networks.utils import eval_mode
from torch import nn

from medsynth.engines.adversarial import unwrap
from medsynth.engines.utils import EVALUATION_BATCH, GENERATOR_CALL, amp_autocast
from medsynth.utils.bundles import as_flag

__all__ = ["SynthesisEvaluator"]


class SynthesisEvaluator(Evaluator):
    """Run the generator on every batch (eval mode, no gradients) and expose prediction and reference.

    ``engine.state.output`` holds ``pred`` (B,N,H,W in [-1, 1]), the prepared batch (``image``, the
    real images, ``label``, ``mask``, ...) and, for CG-SAMR, ``confidence``; attach
    :class:`~medsynth.engines.handlers.SynthesisQualityMetric` as ``key_val_metric``.

    Args:
        device: where the generator runs.
        val_data_loader: loader of synthesis items.
        generator: returns a dict with ``"images"``; a DDP-wrapped generator is unwrapped
            (evaluation never needs gradient synchronisation).
        generator_call: feeds the generator (default ``generator(mask, atlas)``).
        prepare_batch: default: the training batch plus ``window``, ``patient_id`` and ``slice_index``.
        amp: mixed precision (``torch.autocast`` on the device's type with ``amp_kwargs``, default bfloat16).
        Other arguments as in :class:`monai.engines.Evaluator`.
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Any,
        generator: nn.Module,
        generator_call: Callable = GENERATOR_CALL,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = EVALUATION_BATCH,
        key_val_metric: dict | None = None,
        additional_metrics: dict | None = None,
        val_handlers: Sequence | None = None,
        amp: bool = False,
        amp_kwargs: dict | None = None,
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
            amp=as_flag(amp, "amp"),
            amp_kwargs={"dtype": torch.bfloat16} if amp_kwargs is None else amp_kwargs,
            decollate=False,
        )
        self.generator = unwrap(generator)
        self.generator_call = generator_call

    def _iteration(self, engine: SynthesisEvaluator, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        with eval_mode(engine.generator), amp_autocast(engine):
            outputs = engine.generator_call(engine.generator, batch)
        output = {"pred": outputs["images"].float(), **batch}
        if "confidence" in outputs:
            output["confidence"] = outputs["confidence"].float()
        engine.state.output = output
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return output
