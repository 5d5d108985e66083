"""One model called from several threads at once, and from processes forked after it ran.

Numba's workqueue threading layer aborts the whole process when two threads enter a parallel
loop at once, and GNU OpenMP kills a forked child that starts one: each case runs in its own
process, under a time limit, so that an abort or a hang fails the test instead of pytest.
Tiny models (atto, 32 x 32 inputs) with seeded random weights keep each run to a few seconds.
"""

import os
import signal
import subprocess
import sys

import pytest

OPENMP_MISSING = 77  # exit status of a script that finds no OpenMP layer in this Numba

# Exits early from a script that needs Numba's OpenMP layer where there is none.
_REQUIRE_OPENMP = f"""
import sys
try:
    from numba.np.ufunc import omppool
except ImportError as error:
    print(error, file=sys.stderr)
    sys.exit({OPENMP_MISSING})
"""

# Common to the scripts: the model, its inputs, and their logits from one thread on its own.
_MODEL = """
import sys, warnings
import numpy as np
import numba
import npconvnext

warnings.simplefilter("ignore")  # random weights
model = npconvnext.create_model(sys.argv[1], seed=3)
inputs = [np.random.default_rng(i).standard_normal((1 + i % 2, 3, 32, 32)).astype(np.float32)
          for i in range(6)]  # batches of 1 and 2: the batch split runs too
numba.set_num_threads(1)
alone = [model(x) for x in inputs]  # one thread, nothing shared
numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
assert numba.get_num_threads() >= 2, "the parallel kernels would not run"


def check(outputs, layer):
    assert numba.threading_layer() == layer, numba.threading_layer()
    for got, want in zip(outputs, alone, strict=True):
        error = float(np.abs(got - want).max() / np.abs(want).max())
        assert error < 1e-5, error  # BLAS may sum in another order for other thread counts
    print("ok")
"""

_THREADS = """
import threading

start = threading.Barrier(4)
outputs = [[] for _ in range(4)]
failures = []


def work(mine):
    start.wait()
    try:
        for _ in range(3):
            mine[:] = [model(x) for x in inputs]
    except BaseException as error:
        failures.append(error)


workers = [threading.Thread(target=work, args=(out,)) for out in outputs[1:]]
for worker in workers:
    worker.start()
work(outputs[0])  # the main thread too: it splits its batches of 2 between threads (map_over_batch)
for worker in workers:
    worker.join()
assert not failures, failures
for out in outputs:
    check(out, sys.argv[2])
"""

_FORKED_POOL = """
import multiprocessing


def logits(x):
    return model(x)


model(inputs[0])  # the parallel kernels have run in the parent before it forks
with multiprocessing.get_context("fork").Pool(2) as pool:
    check(pool.map_async(logits, inputs).get(timeout=60), "omp")
"""


def run_script(code: str, args: list[str], env: dict[str, str], timeout: float = 120) -> str:
    """Run code in a fresh Python; its stdout. An abort, an error or a hang fails the test, and
    a hang's whole process group (pool workers too) is killed."""
    process = subprocess.Popen([sys.executable, "-c", code, *args], env=dict(os.environ, **env),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"no answer in {timeout} s (a hang):\n{err[-3000:]}")
    if process.returncode == OPENMP_MISSING:
        pytest.skip(f"Numba has no OpenMP threading layer here: {err.strip()[-500:]}")
    assert process.returncode == 0, f"exit status {process.returncode}:\n{err[-3000:]}"
    return out


@pytest.mark.parametrize("layer", ["workqueue", "omp"])
@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto"])
def test_four_threads_sharing_a_model_get_the_logits_of_one(name, layer):
    # workqueue: the layer Numba falls back to without OpenMP or TBB, and not thread-safe
    require = "" if layer == "workqueue" else _REQUIRE_OPENMP
    out = run_script(require + _MODEL + _THREADS, [name, layer], {"NUMBA_THREADING_LAYER": layer})
    assert out.split() == ["ok"] * 4


@pytest.mark.parametrize("torch_first", [True, False], ids=["torch-imported-first", "no-torch"])
def test_a_fork_pool_after_the_model_ran_gets_the_right_logits(torch_first):
    # torch brings its own OpenMP runtime; with or without it, a child forked from a process
    # whose OpenMP threads have run must not start an OpenMP parallel region
    code = ("import torch\n" if torch_first else "") + _REQUIRE_OPENMP + _MODEL + _FORKED_POOL
    out = run_script(code, ["convnext_atto"], {"NUMBA_THREADING_LAYER": "omp"})
    assert out.split() == ["ok"]
