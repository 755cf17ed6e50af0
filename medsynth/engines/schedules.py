"""Learning-rate schedules of the papers, built from torch's schedulers."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ConstantLR, LinearLR, LRScheduler, SequentialLR

__all__ = ["linear_decay_schedule"]


def linear_decay_schedule(
    optimizer: Optimizer, num_epochs: int, decay_start_epoch: int | None = None
) -> LRScheduler:
    """The papers' schedule: a constant learning rate, then a linear decay to 0 after ``num_epochs``.

    SAMR / CG-SAMR train 250 epochs at the initial rate and 250 decaying to zero; the U-Net of the
    augmentation study 100 + 100. Stepped once per epoch: after ``decay_start_epoch`` completed
    epochs the factor starts falling by ``1 / (num_epochs - decay_start_epoch)`` per epoch and reaches
    0 after ``num_epochs``. torch's ``ConstantLR`` then ``LinearLR`` in a ``SequentialLR``, so the
    state (``state_dict``) resumes exactly.

    Args:
        optimizer: the optimizer whose rates are scheduled.
        num_epochs: total number of epochs.
        decay_start_epoch: epochs at the constant rate; ``None`` means half of ``num_epochs``.
    """
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be at least 1, got {num_epochs}")
    start = num_epochs // 2 if decay_start_epoch is None else int(decay_start_epoch)
    if not 0 <= start <= num_epochs:
        raise ValueError(f"decay_start_epoch must lie in [0, num_epochs={num_epochs}], got {start}")
    if start == num_epochs:
        return ConstantLR(optimizer, factor=1.0, total_iters=num_epochs)
    decay = LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=num_epochs - start)
    if start == 0:
        return decay
    constant = ConstantLR(optimizer, factor=1.0, total_iters=start)
    return SequentialLR(optimizer, [constant, decay], milestones=[start])
