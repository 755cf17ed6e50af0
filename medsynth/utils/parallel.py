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
    # Spawned workers inherit these: one thread per ITK / BLAS / torch pool, one item per process. This
    # process keeps them too, so work it does itself (a rerun in-process) computes as the workers did:
    # multi-threaded ITK filters such as N4 are not bitwise reproducible across thread counts.
    for variable in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = "1"
    cluster = stack.enter_context(
        LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    )
    return stack.enter_context(Client(cluster))
