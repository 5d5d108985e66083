"""The engine's JIT settings, its compile notice, and when a kernel runs in parallel.

Every kernel in this package is a body over a range of rows (`*_rows`), run as it is on one
thread, and a parallel loop that shares the rows between threads; `rows_or_parallel` picks
which runs. Each has a twin in `npconvnext/layers.py` (or `train/optim.py`), the readable
reference the tests check it against, and `NUMBA_DISABLEJIT=1` runs the bodies as plain Python.
The `_`-prefixed `@njit` functions never validate and allocate only scratch space: each module's
public wrappers validate (checks.py) and allocate the outputs.

Of fastmath's flags only "contract": a multiply and an add may become one fused multiply-add,
rounded once, as BLAS and the peers' kernels do (the erf polynomials and the training kernels'
7x7 taps are chains of them; gemm.py and depthwise.py call llvm.fma themselves); not in the
kernels that promise NumPy's result to the bit (`EXACT_JIT`, AdamW's update). The other flags
would reassociate sums and swap in approximate erf/sqrt.

Gradients of weights are sums over every pixel of the batch. Those sums go into float64 partial
sums, one set per fixed chunk of rows (`CHUNK_ROWS`, `CHUNK_PIXELS`), which are added up in
chunk order at the end (`sum_chunks`): each chunk is one job of the parallel loop, so the result
is the same, to the bit, on any number of threads and in the serial body.
"""

from __future__ import annotations

import functools
import logging
import os
import threading

import numba
import numba.core.event
import numpy as np

# One place for the JIT settings. cache=True: a second process loads machine code from disk
# instead of compiling (numba falls back to a per-user cache directory when the package is
# read-only, and honours NUMBA_CACHE_DIR).
JIT = dict(cache=True, nogil=True, error_model="numpy",  # IEEE division: no zero check blocking SIMD
           fastmath={"contract"})  # fused multiply-adds only (see above)
PARALLEL_JIT = dict(JIT, parallel=True)
# For kernels that promise NumPy's result to the bit (AdamW's update, adamw.py): no fusing
EXACT_JIT = dict(JIT, fastmath=False)
EXACT_PARALLEL_JIT = dict(EXACT_JIT, parallel=True)
INLINE_JIT = dict(JIT, inline="always")  # small helpers: inlined by Numba, or LLVM may leave a call

# A kernel not in Numba's cache (the first run after installing or upgrading, or a new dtype) is
# compiled before it runs, which takes seconds: say so, once per process, as the compile starts.
# A library does not print: this is an INFO record on the "npconvnext" logger, which the
# command line shows on stderr (`logging.basicConfig(level=logging.INFO)` shows it elsewhere).
_log = logging.getLogger("npconvnext")
COMPILE_NOTICE = ("compiling the Numba kernels for this machine; this happens once, later runs load them "
                  "from Numba's cache")


class _CompileNotice(numba.core.event.Listener):
    """Numba announces a compile ("numba:compile") only after its cache had no machine code for
    the kernel: an exact and free test of a cold cache."""

    def __init__(self):
        self.told = False

    def on_start(self, event):
        dispatcher = event.data.get("dispatcher") if isinstance(event.data, dict) else None
        module = getattr(getattr(dispatcher, "py_func", None), "__module__", None) or ""
        if not self.told and module.startswith("npconvnext."):  # any of ours: inference, training, readers
            self.told = True
            _log.info(COMPILE_NOTICE)

    def on_end(self, event):
        pass


numba.core.event.register("numba:compile", _CompileNotice())


# ---- the serial or parallel choice -------------------------------------------------------------
# Each kernel runs as its parallel loop, or as its row body on the calling thread. The row body
# runs when this thread's Numba count is one (`threads.map_over_batch` workers,
# set_num_threads(1)); when Numba's workers would busy-wait (`workers_sleep`); when another
# thread of this process is inside a parallel loop (Numba's workqueue layer aborts the process
# if two threads enter one at once, and the others would only oversubscribe the cores); and in
# a process forked from this one (GNU OpenMP kills a forked child that starts a parallel
# region, and the parent's worker threads do not exist there).

# OpenMP's workers busy-wait after each parallel loop unless the user exported
# OMP_WAIT_POLICY=PASSIVE (GNU's and LLVM's runtimes both read it when they load); between a
# kernel and the next BLAS call they take the cores BLAS needs. Then the kernels run serially
# and BLAS keeps the threads. The variable is read, never set.
SLEEPING_LAYERS = ("workqueue", "tbb")  # their idle workers wait on a condition or yield


@functools.cache
def workers_sleep() -> bool:
    """Whether the threading layer in use parks its idle workers: the layer Numba picked, not
    the one requested."""
    numba.get_num_threads()  # launches Numba's threading layer, if nothing has yet
    layer = numba.threading_layer()
    return layer in SLEEPING_LAYERS or os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


# Held while a parallel loop runs; taken without waiting: whoever does not get it runs serially.
_parallel_region = threading.Lock()
_forked_child = False


def _serial_after_fork() -> None:
    global _forked_child
    _forked_child = True


os.register_at_fork(after_in_child=_serial_after_fork)


def rows_or_parallel(rows, parallel, args, count, blas_between=True):
    """parallel(*args) when this thread may start a parallel loop now (see above), else
    rows(*args, 0, count) on this thread. `blas_between`: BLAS calls come between this kernel
    and the next (in training), so idle workers that busy-wait would take BLAS's cores; in
    inference the kernels follow one another without BLAS, and their workers' waiting is the
    cheapest hand-over there is."""
    if (numba.get_num_threads() > 1 and not _forked_child and (not blas_between or workers_sleep())
            and _parallel_region.acquire(blocking=False)):
        try:
            parallel(*args)
        finally:
            _parallel_region.release()
    else:
        rows(*args, 0, count)


# ---- chunked sums over pixels, the same bits on any thread count -------------------------------

# Rows of a conv's input (image rows) and pixels of a per-pixel layer in one chunk of a weight
# gradient's partial sums: enough work to be worth a job, few enough partial sums to add cheaply.
CHUNK_ROWS = 4
CHUNK_PIXELS = 128


def chunk_count(count: int, size: int) -> int:
    return -(-count // size)


def sum_chunks(partial: np.ndarray, dtype) -> np.ndarray:
    """Chunks' float64 partial sums (chunks, ...) added in chunk order, in the arrays' dtype."""
    return partial.sum(axis=0).astype(dtype)
