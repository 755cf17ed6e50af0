"""The one adversarial training engine of the project, on MONAI's :class:`~monai.engines.Trainer`.

:class:`AdversarialTrainer` holds what every GAN here needs, so that a method is a short subclass
that writes its iteration (:meth:`AdversarialTrainer.train_step`) in terms of named parts:

* **registered parts**: networks, their optimizers, learning-rate schedules (one factory applied
  to every optimizer, stepped per epoch by MONAI's ``LrScheduleHandler``) and losses, all by name;
  :attr:`AdversarialTrainer.checkpoint_objects` lists every stateful one (networks unwrapped from
  DDP, optimizers, schedulers, losses with state, the gradient scaler) for MONAI's
  ``CheckpointSaver`` / ``CheckpointLoader``, which is what makes resuming exact;
* **mixed precision** through the Workflow's own ``amp`` / ``amp_kwargs`` (:meth:`autocast`), on
  any device type; float16 gets a gradient scaler, bfloat16 needs none;
* **DDP**: :meth:`no_sync` skips the gradient all-reduce of passes whose gradients are thrown away;
* **events**: each phase fires ``"<phase>_completed"`` after its optimizer step (:meth:`phase_event`),
  then the iteration fires MONAI's ``IterationEvents.MODEL_COMPLETED``;
* **batch keys and network calls** are arguments (:class:`~medsynth.engines.utils.BatchCall`),
  so nothing here knows which tensors a method feeds to which network.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from monai.engines import Trainer
from monai.engines.utils import IterationEvents
from monai.handlers import LrScheduleHandler
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from medsynth.engines.utils import TRAINING_BATCH, amp_autocast
from medsynth.utils.bundles import as_flag

__all__ = ["AdversarialTrainer", "unwrap"]


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (the module itself otherwise)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


class AdversarialTrainer(Trainer):
    """Base class of the adversarial trainers: named networks, optimizers, schedules and losses.

    Subclasses set :attr:`phases` (one name per optimizer step of an iteration, e.g. ``"generator"``,
    ``"discriminator"``; ``optimizers`` is keyed by them) and implement :meth:`train_step`, which
    returns the iteration's record (a flat dict of floats for the stats handlers). Inside it they use
    :meth:`autocast` for forward passes, :meth:`no_sync` for passes whose gradients are discarded and
    :meth:`optimize` for each phase's update.

    Args:
        device: where the networks run.
        max_epochs: number of epochs.
        train_data_loader: yields dict batches.
        networks: name -> network (possibly DDP-wrapped).
        optimizers: phase -> the optimizer of its update; one optimizer may hold the parameters of
            several networks (CycleGAN's two generators).
        losses: name -> loss module or callable; those with a non-empty ``state_dict`` are checkpointed.
        lr_schedule: ``optimizer -> LR scheduler``, applied to every optimizer and stepped after
            every epoch (e.g. :func:`medsynth.engines.linear_decay_schedule`); ``None`` keeps the rates.
        epoch_length: iterations per epoch (default: the loader's length).
        non_blocking: asynchronous host-to-device copies.
        prepare_batch: maps a loader batch to the dict :meth:`train_step` reads.
        train_handlers: handlers attached at construction, after the schedules' handlers.
        amp: mixed precision for the forward passes (``torch.autocast`` on the device's type).
        amp_kwargs: arguments of ``torch.autocast`` (default ``{"dtype": torch.bfloat16}``).
        optim_set_to_none: ``zero_grad(set_to_none=...)``.
        to_kwargs: further arguments of the batch's ``Tensor.to``.
    """

    phases: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        networks: Mapping[str, nn.Module],
        optimizers: Mapping[str, Optimizer],
        losses: Mapping[str, Any] | None = None,
        lr_schedule: Callable[[Optimizer], Any] | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = TRAINING_BATCH,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        amp_kwargs: dict | None = None,
        optim_set_to_none: bool = True,
        to_kwargs: dict | None = None,
    ) -> None:
        missing = [phase for phase in self.phases if phase not in optimizers]
        if missing:
            name = type(self).__name__
            raise ValueError(f"{name}: no optimizer for phase(s) {missing}; got {sorted(optimizers)}")
        amp = as_flag(amp, "amp")
        amp_kwargs = {"dtype": torch.bfloat16} if amp_kwargs is None else dict(amp_kwargs)
        self.networks = dict(networks)
        self.optimizers = dict(optimizers)
        self.losses = {name: loss for name, loss in (losses or {}).items() if loss is not None}
        self.schedulers = (
            {} if lr_schedule is None else {name: lr_schedule(opt) for name, opt in self.optimizers.items()}
        )
        # The schedules step first after each epoch, before validation and checkpointing.
        schedule_handlers = [
            LrScheduleHandler(scheduler, print_lr=index == 0)
            for index, scheduler in enumerate(self.schedulers.values())
        ]
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            handlers=[*schedule_handlers, *(train_handlers or [])],
            amp=amp,
            amp_kwargs=amp_kwargs,
            # The output is a flat dict of floats for the stats handlers: nothing to decollate.
            decollate=False,
            to_kwargs=to_kwargs,
            event_names=[self.phase_event(phase) for phase in self.phases],
        )
        self.optim_set_to_none = optim_set_to_none
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
        uses_float16 = amp and amp_kwargs.get("dtype", torch.float16) == torch.float16
        self.grad_scaler = torch.amp.GradScaler(self.state.device.type) if uses_float16 else None

    @staticmethod
    def phase_event(phase: str) -> str:
        """The event fired after ``phase``'s optimizer step, e.g. ``"discriminator_completed"``."""
        return f"{phase}_completed"

    @property
    def checkpoint_objects(self) -> dict[str, Any]:
        """Everything a checkpoint needs for an exact resume: ``trainer``, the networks (unwrapped
        from DDP, so the keys do not depend on the launch mode), ``<name>_optimizer``,
        ``<name>_scheduler``, the losses with state, and ``grad_scaler`` when float16 is used."""
        objects: dict[str, Any] = {"trainer": self}
        objects.update({name: unwrap(network) for name, network in self.networks.items()})
        objects.update({f"{name}_optimizer": optimizer for name, optimizer in self.optimizers.items()})
        objects.update({f"{name}_scheduler": scheduler for name, scheduler in self.schedulers.items()})
        for name, loss in self.losses.items():
            state_dict = getattr(loss, "state_dict", None)
            if callable(state_dict) and state_dict():
                objects[name] = loss
        if self.grad_scaler is not None:
            objects["grad_scaler"] = self.grad_scaler
        return objects

    def run(self) -> None:  # type: ignore[override]
        # Not Trainer.run: it creates a CUDA-only float16 GradScaler; the scaler here is made in __init__.
        super(Trainer, self).run()

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for forward passes when ``amp`` is set (the Workflow's ``amp_kwargs``)."""
        return amp_autocast(self)

    def no_sync(self, *names: str) -> contextlib.ExitStack:
        """Skip DDP's gradient all-reduce on the named networks for backward passes of forwards run
        inside (their gradients there are discarded; a no-op without DDP)."""
        stack = contextlib.ExitStack()
        for name in names:
            network = self.networks[name]
            if isinstance(network, DistributedDataParallel):
                stack.enter_context(network.no_sync())
        return stack

    def optimize(self, phase: str, loss: torch.Tensor) -> None:
        """One update of ``phase``'s optimizer: zero its gradients, back-propagate ``loss``, step;
        then fire :meth:`phase_event`."""
        optimizer = self.optimizers[phase]
        optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        if self.grad_scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.step(optimizer)
        self.state.phase = phase
        self.fire_event(self.phase_event(phase))

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One iteration on a prepared batch; returns the record of the iteration. Subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement train_step")

    def _iteration(self, engine: AdversarialTrainer, batchdata: Mapping[str, Any]) -> dict[str, float]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        for network in engine.networks.values():
            network.train()
        record = engine.train_step(batch)
        if engine.grad_scaler is not None:
            engine.grad_scaler.update()
        engine.state.output = record
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return record


def float_features(outputs: Sequence[Sequence[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Discriminator outputs (per discriminator, its layer features) in float32: losses are computed
    outside autocast."""
    return [[feature.float() for feature in features] for features in outputs]
