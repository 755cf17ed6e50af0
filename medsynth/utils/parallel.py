"""Dask for long per-item jobs (the preprocessing runner, synthetic cohorts): a client or none."""

from __future__ import annotations

import os
from contextlib import ExitStack

__all__ = ["start_client"]


def start_client(stack: ExitStack, workers: int = 1, scheduler: str | None = None):
    """A Dask client entered on ``stack``: of an existing ``scheduler``, or of a ``LocalCluster`` of
    ``workers`` single-thread processes; ``None`` (run in this process) for one worker and no scheduler."""
    if scheduler is None and workers <= 1:
        return None
    from distributed import Client, LocalCluster

    if scheduler is not None:
        return stack.enter_context(Client(scheduler))
    # Spawned workers inherit these: one thread per ITK / BLAS / torch pool, one item per process. They
    # are set only while the workers start, so this process keeps its own thread settings.
    variables = ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {variable: os.environ.get(variable) for variable in variables}
    os.environ.update(dict.fromkeys(variables, "1"))
    try:
        cluster = stack.enter_context(
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        )
    finally:
        for variable, value in saved.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value
    return stack.enter_context(Client(cluster))
