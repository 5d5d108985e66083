"""The Dask side: a client for `--scheduler ADDRESS|local[:N]`, and each worker's threads.

Threads. A machine's cores are shared by every task thread of every worker on it, and each
task runs the model with Numba's kernels and NumPy's BLAS: left alone, each task would start
as many threads as there are cores (or BLAS one, as Dask's nanny sets OPENBLAS_NUM_THREADS=1),
oversubscribing or idling the machine. So each task's model gets
    max(1, cores of the machine // task threads of all workers on that machine)
threads, set by a worker plugin: BLAS's process-wide count once, in the plugin's setup on the
worker's main thread, and Numba's (which belongs to each thread) at the start of each task.
The plugin changes only the worker processes that run npconvnext's jobs, which is what
running a job there asks for; `jobs.run(..., threads=None)` leaves workers alone.

`local:N` starts N worker processes sharing the cores in task threads, so that each task's model
has one thread: each image then runs on one core from start to end, as `map_over_batch` runs a
batch in one process, with no hand-overs between cores inside a layer (which cost most when a
machine is busy), and the threads of one process share one model. Those processes are ours,
so their environment is too: they get OMP_WAIT_POLICY=PASSIVE unless the caller's environment
says otherwise, so that a model given several threads (`threads=`) can run the engine's
parallel loops (engine/jit.py reads it and never sets it).
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator
from urllib.parse import urlparse

from distributed import Client, LocalCluster, WorkerPlugin

from ..errors import InputError
from .worker import use_threads

PLUGIN_NAME = "npconvnext-threads"


def available_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def parse_local(scheduler: str) -> int | None:
    """The worker count of "local" (one per core) or "local:N"; None for an address."""
    name, colon, count = scheduler.partition(":")
    if name != "local":
        return None
    if not colon:
        return available_cores()
    if not count.isdigit() or int(count) < 1:
        raise InputError(f"--scheduler {scheduler}: local:N needs a whole number of workers N >= 1")
    return int(count)


def local_cluster(n_workers: int, threads_per_worker: int | None = None, **kwargs) -> LocalCluster:
    """N worker processes on this machine, sharing its cores in task threads (default
    cores // N each, at least one; see the module's docstring)."""
    env = {} if "OMP_WAIT_POLICY" in os.environ else {"OMP_WAIT_POLICY": "PASSIVE"}
    threads = threads_per_worker or max(1, available_cores() // n_workers)
    options = dict(n_workers=n_workers, threads_per_worker=threads, processes=True, dashboard_address=None, env=env)
    return LocalCluster(**(options | kwargs))


@contextlib.contextmanager
def connect(scheduler: str) -> Iterator[Client]:
    """A client of the scheduler at ADDRESS (tcp://host:8786, or a scheduler file's path), or
    of a local cluster started here for "local[:N]" and closed on the way out."""
    n_workers = parse_local(scheduler)
    if n_workers is not None:
        with local_cluster(n_workers) as cluster, Client(cluster) as client:
            yield client
    elif os.path.isfile(scheduler):
        with Client(scheduler_file=scheduler) as client:
            yield client
    else:
        with Client(scheduler) as client:
            yield client


def _host(address: str) -> str:
    return urlparse(address).hostname or address


def prepare_workers(client: Client, threads: int | str | None = "auto") -> None:
    """Install the threads plugin on every worker (and on workers that join later)."""
    if threads is None:
        return
    if threads != "auto" and (not isinstance(threads, int) or threads < 1):
        raise InputError(f"threads must be 'auto', None or a whole number >= 1, not {threads!r}")
    slots = Counter()
    for address, info in client.scheduler_info(n_workers=-1)["workers"].items():
        slots[_host(address)] += info.get("nthreads", 1)
    client.register_plugin(ThreadsPlugin(dict(slots), None if threads == "auto" else threads), name=PLUGIN_NAME)


class ThreadsPlugin(WorkerPlugin):
    """Sets the threads of npconvnext's models in a worker process (see the module's docstring)."""

    def __init__(self, slots_by_host: dict[str, int], threads: int | None = None):
        self.slots_by_host = slots_by_host  # task threads of all workers per host, when registered
        self.threads = threads              # a fixed count instead of the share

    def setup(self, worker) -> None:
        import numba

        from ..engine.threads import set_num_threads

        slots = self.slots_by_host.get(_host(worker.address), worker.state.nthreads)  # joined later: its own
        n = self.threads or max(1, available_cores() // max(1, slots))
        n = min(n, numba.config.NUMBA_NUM_THREADS)
        set_num_threads(n)  # BLAS's process-wide count; here on the worker's main thread
        use_threads(n)  # Numba's count belongs to each thread: each task sets it (jobs.py)
