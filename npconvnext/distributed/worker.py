"""What a worker process keeps between tasks: the model, built once, and each task's threads.

The thread count is set by the cluster's worker plugin (cluster.py) and read by each task
(jobs.run_partition); it lives here, below both, so that neither imports the other for it.
Nothing here imports Dask.
"""

from __future__ import annotations

import functools
import threading

from ..batch import ModelSpec, load_model

# Threads for each task's model in this process; None leaves Numba's count as it is.
_task_threads: int | None = None
_model_lock = threading.Lock()


def use_threads(n: int | None) -> None:
    """Give each task's model `n` threads from now on in this process (None: leave them)."""
    global _task_threads
    _task_threads = n


def task_threads() -> int | None:
    """The thread count each task's model gets in this process, or None if it is left alone."""
    return _task_threads


@functools.lru_cache(maxsize=1)
def _cached_model(spec: ModelSpec):
    return load_model(spec)


def worker_model(spec: ModelSpec):
    """The model and its preprocessing, built once per process (the last spec's is kept)."""
    with _model_lock:  # several task threads asking at once build it once
        return _cached_model(spec)
