"""Running the kernels' wrappers serially or in parallel, and seeing which parallel loops ran."""

import contextlib

import numba
import pytest


@contextlib.contextmanager
def counted(module, loop_names, threads, monkeypatch):
    """This thread's Numba count set to `threads` (one: every wrapper runs its kernel's row body
    on this thread; two: the parallel loops; the count is per calling thread, so only the
    test's thread changes). Yields the names of `module`'s parallel loops that ran, filled in
    as they run."""
    if threads > numba.config.NUMBA_NUM_THREADS:  # conftest.py sets two
        pytest.fail(f"numba has {numba.config.NUMBA_NUM_THREADS} thread(s): the parallel kernels cannot run")
    ran = set()

    def counting(name, loop):
        def run(*args):
            ran.add(name)
            return loop(*args)
        return run

    for name in loop_names:
        monkeypatch.setattr(module, name, counting(name, getattr(module, name)))
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        yield ran
    finally:
        numba.set_num_threads(before)
