"""Learning-rate schedules of the SAMR / CG-SAMR papers."""

from __future__ import annotations


class LinearDecay:
    """Multiplicative factor for :class:`torch.optim.lr_scheduler.LambdaLR`: 1, then linearly down to 0.

    The papers train with a constant learning rate for the first half of the epochs and decay it
    linearly to zero over the second half (250 + 250 epochs). The scheduler is stepped once per
    epoch, so ``epoch`` counts completed epochs: after ``decay_start_epoch`` epochs the factor
    starts falling and reaches 0 after ``num_epochs``.

    A callable object rather than a closure, so ``LambdaLR.state_dict()`` stores its settings and a
    resumed run restores them.

    Args:
        num_epochs: total number of epochs.
        decay_start_epoch: number of epochs at the constant rate; ``None`` means half of ``num_epochs``.
    """

    def __init__(self, num_epochs: int, decay_start_epoch: int | None = None):
        if num_epochs < 1:
            raise ValueError(f"num_epochs must be at least 1, got {num_epochs}")
        start = num_epochs // 2 if decay_start_epoch is None else int(decay_start_epoch)
        if not 0 <= start <= num_epochs:
            raise ValueError(f"decay_start_epoch must lie in [0, num_epochs={num_epochs}], got {start}")
        self.num_epochs = int(num_epochs)
        self.decay_start_epoch = start

    def __call__(self, epoch: int) -> float:
        decay_epochs = self.num_epochs - self.decay_start_epoch
        if epoch < self.decay_start_epoch or decay_epochs == 0:
            return 1.0
        return max(0.0, 1.0 - (epoch - self.decay_start_epoch) / decay_epochs)
