"""Threads: one count for the Numba kernels and NumPy's BLAS, and how a batch shares them.

Within one image the cores share every layer: each kernel's parallel loop and each BLAS call
splits its rows between the threads, about a hundred hand-overs per forward pass, and every
hand-over wakes a parked core. With several images there is a split that needs none: each
thread runs whole images on its own, kernels and BLAS single-threaded, and the threads meet
once, at the end (`map_over_batch`).

BLAS libraries have one process-wide thread count (OpenBLAS's "thread-local" setter is global
too, and OpenBLAS may ignore a count set from another thread once the main thread has set one),
so that split needs the count set to one while it runs, for the whole process. That count is
the program's: npconvnext changes it only after the program handed it over, by calling
`set_num_threads` (or exporting NPCONVNEXT_NUM_THREADS), whose docstring says so. Until then a
batch runs with every layer shared, and BLAS's count is only read. The split runs from the main
thread only, and puts the count back afterwards; it is read and written through threadpoolctl.

Idle threads of Numba's OpenMP layer and of OpenBLAS spin for a while before they park, on the
cores the other library (or another process) needs next. Inference calls no BLAS (the engine's
own tiles do the matrix products), so its kernels hand over only to each other and share every
layer whatever the wait policy; training alternates kernels with BLAS calls, and its kernels
share the layers only where idle workers sleep (engine/jit.py, `rows_or_parallel`). OpenBLAS
keeps spinning for about a tenth of a second after a call of the program's own: a forward pass
started within that time shares its cores. Both runtimes read how long from the environment
once, when they load, and the environment belongs to the program, not to npconvnext: to make
idle threads park at once, export OMP_WAIT_POLICY=PASSIVE and OPENBLAS_THREAD_TIMEOUT=4 before
Python starts (`benchmarks/bench_threads.py --wait-settings` measures both ways).
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numba
import numpy as np

from ..errors import InputError


@functools.cache
def _blas_libraries():
    """threadpoolctl's controllers of the BLAS libraries loaded in this process (maybe none)."""
    from threadpoolctl import ThreadpoolController

    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)


def set_num_threads(n: int) -> None:
    """Threads for the Numba kernels and NumPy's BLAS, and leave BLAS's count to npconvnext.

    Kernels and BLAS calls run one after the other, never nested, so giving both the same
    count uses the cores without oversubscribing them. Numba's count belongs to the calling
    thread (new threads start at NUMBA_NUM_THREADS); BLAS's is process-wide (set it from
    the main thread: OpenBLAS may ignore other threads). After this call a batch of several
    images is shared between the threads image by image (`map_over_batch`), which sets BLAS's
    count to one, process-wide, while the batch runs, and puts it back afterwards: a matmul of
    another thread meanwhile runs on one thread.
    NPCONVNEXT_NUM_THREADS sets the count at import (see `_threads_from_environment`).
    """
    n = int(n)
    if not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise InputError(f"threads must be between 1 and {numba.config.NUMBA_NUM_THREADS}, not {n}")
    numba.set_num_threads(n)
    _set_blas_threads([n] * len(_blas_libraries()))
    global _blas_handed_over
    _blas_handed_over = True


_blas_handed_over = False  # set_num_threads was called: BLAS's count is npconvnext's to change


def _set_blas_threads(counts: list[int]) -> bool:
    """Set each BLAS library's thread count; False if any did not take it."""
    for library, count in zip(_blas_libraries(), counts):
        library.set_num_threads(count)
    return all(library.get_num_threads() == count for library, count in zip(_blas_libraries(), counts))


def _single_threaded(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    before = numba.get_num_threads()
    numba.set_num_threads(1)  # this thread's count only: its kernels take their serial bodies
    try:
        return fn(x)
    finally:
        numba.set_num_threads(before)


def map_over_batch(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """fn(x) for a function that treats images independently, x: (N, ...) -> (N, ...).

    With T threads (this thread's Numba count) and N >= 2 images, T workers (this thread and
    T - 1 others) each run N // T images on one thread; the N % T left over then run on all T
    threads. Only after `set_num_threads` handed BLAS's count over, from the main thread, and
    with a BLAS library whose thread count threadpoolctl can set: otherwise fn(x) as it is.
    """
    n = x.shape[0]
    workers = min(numba.get_num_threads(), n)
    if (workers < 2 or not _blas_handed_over or threading.current_thread() is not threading.main_thread()
            or not _blas_libraries()):
        return fn(x)
    saved = [library.get_num_threads() for library in _blas_libraries()]
    if not _set_blas_threads([1] * len(saved)):
        _set_blas_threads(saved)
        return fn(x)
    try:
        per_worker = n // workers
        chunks = [x[i * per_worker:(i + 1) * per_worker] for i in range(workers)]  # (N // T, ...) each
        with ThreadPoolExecutor(workers - 1, thread_name_prefix="npconvnext") as pool:
            others = [pool.submit(_single_threaded, fn, chunk) for chunk in chunks[1:]]
            outputs = [_single_threaded(fn, chunks[0])] + [future.result() for future in others]
    finally:
        _set_blas_threads(saved)
    if workers * per_worker < n:
        outputs.append(fn(x[workers * per_worker:]))
    return np.concatenate(outputs)


def _threads_from_environment(value: str | None) -> int | None:
    """The count NPCONVNEXT_NUM_THREADS asks for, or None to keep the default. A bad value must
    not make `import npconvnext` fail: it is reported in a warning and ignored, and a count past
    Numba's maximum is cut down to it."""
    if value is None or not value.strip():
        return None
    maximum = numba.config.NUMBA_NUM_THREADS
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        warnings.warn(f"NPCONVNEXT_NUM_THREADS={value!r} is not a whole number of threads from 1 to "
                      f"{maximum}; using the default ({numba.get_num_threads()})", RuntimeWarning, stacklevel=2)
        return None
    if n > maximum:
        warnings.warn(f"NPCONVNEXT_NUM_THREADS={value!r} is more than the {maximum} threads Numba has "
                      f"(NUMBA_NUM_THREADS); using {maximum}", RuntimeWarning, stacklevel=2)
        return maximum
    return n


_from_environment = _threads_from_environment(os.environ.get("NPCONVNEXT_NUM_THREADS"))
if _from_environment is not None:
    set_num_threads(_from_environment)
