"""Thread counts, and a batch shared image by image between threads (npconvnext/engine/threads.py)."""

import json
import os
import subprocess
import sys
import threading
import warnings

import numba
import numpy as np
import pytest

import npconvnext
from npconvnext.engine import threads

@pytest.fixture
def two_threads():
    if numba.config.NUMBA_NUM_THREADS < 2:  # conftest.py sets two
        pytest.fail(f"numba has {numba.config.NUMBA_NUM_THREADS} thread(s): the batch split cannot run")
    before = numba.get_num_threads()
    npconvnext.set_num_threads(2)
    yield
    npconvnext.set_num_threads(before)


def blas_threads():
    return [library.get_num_threads() for library in threads._blas_libraries()]


def test_set_num_threads_validates_and_sets_numba_and_blas():
    before = numba.get_num_threads()
    try:
        npconvnext.set_num_threads(1)
        assert numba.get_num_threads() == 1 and set(blas_threads()) <= {1}
        with pytest.raises(npconvnext.errors.InputError, match="threads must be between"):
            npconvnext.set_num_threads(0)
        with pytest.raises(npconvnext.errors.InputError, match="threads must be between"):
            npconvnext.set_num_threads(numba.config.NUMBA_NUM_THREADS + 1)
    finally:
        npconvnext.set_num_threads(before)


def test_numpy_blas_is_under_control():
    # without a controllable BLAS map_over_batch never splits: on our machines there must be one
    assert threads._blas_libraries(), "threadpoolctl finds no BLAS library in this process"


def test_each_worker_runs_its_images_on_one_thread_and_blas_is_restored(two_threads):
    seen = []  # (thread, numba threads, BLAS threads, images) per call

    def fn(x):
        seen.append((threading.get_ident(), numba.get_num_threads(), blas_threads(), len(x)))
        return x * 10

    x = np.arange(5.0).reshape(5, 1)
    blas_before = blas_threads()
    np.testing.assert_array_equal(threads.map_over_batch(fn, x), x * 10)  # order kept
    assert sorted(s[3] for s in seen) == [1, 2, 2]
    split = [s for s in seen if s[3] == 2]
    assert len({s[0] for s in split}) == 2, "the two halves ran on the same thread"
    assert all(s[1] == 1 and set(s[2]) == {1} for s in split)
    left_over = [s for s in seen if s[3] == 1][0]
    assert left_over[0] == threading.get_ident() and left_over[1] == 2  # all threads, as before
    assert blas_threads() == blas_before and numba.get_num_threads() == 2


def test_a_failing_worker_raises_here_and_still_restores_blas(two_threads):
    def fn(x):
        if x[0, 0] == 2:
            raise RuntimeError("image 2 is bad")
        return x

    blas_before = blas_threads()
    with pytest.raises(RuntimeError, match="image 2 is bad"):
        threads.map_over_batch(fn, np.arange(4.0).reshape(4, 1))
    assert blas_threads() == blas_before and numba.get_num_threads() == 2


def test_from_another_thread_the_batch_runs_as_one_call(two_threads):
    # BLAS's thread count is process-wide and OpenBLAS takes it from the main thread only
    sizes = []

    def fn(x):
        sizes.append(len(x))
        return x

    caller = threading.Thread(target=threads.map_over_batch, args=(fn, np.zeros((4, 1))))
    caller.start()
    caller.join()
    assert sizes == [4]
    threads.map_over_batch(fn, np.zeros((4, 1)))  # and from this, the main thread: split
    assert sizes == [4, 2, 2]


def test_a_blas_that_keeps_its_count_gets_the_batch_as_one_call(two_threads, monkeypatch):
    class Stubborn:  # a controller whose library ignores the new count, as OpenBLAS may
        def get_num_threads(self):
            return 2

        def set_num_threads(self, n):
            pass

    monkeypatch.setattr(threads, "_blas_libraries", lambda: (Stubborn(),))
    sizes = []
    threads.map_over_batch(lambda x: sizes.append(len(x)) or x, np.zeros((4, 1)))
    assert sizes == [4]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_split_batch_gives_the_single_thread_results(two_threads, dtype):
    warnings.simplefilter("ignore")
    model = npconvnext.create_model("convnextv2_atto", dtype=dtype)  # V2: GRN on the split path too
    x = np.random.default_rng(3).standard_normal((5, 3, 64, 64)).astype(dtype)
    split = model(x)
    features = model.forward_features(x)
    npconvnext.set_num_threads(1)
    alone = model(x)
    tol = 1e-5 if dtype == "float32" else 1e-12  # BLAS may sum in another order for other row counts
    np.testing.assert_allclose(split, alone, rtol=0, atol=tol * np.abs(alone).max())
    np.testing.assert_allclose(features, model.forward_features(x), rtol=0, atol=tol * np.abs(features).max())


_IMPORT_WITH_WARNINGS = """
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import npconvnext
import numba
from npconvnext.engine import threads
print(json.dumps({"threads": numba.get_num_threads(), "blas": [lib.get_num_threads() for lib in threads._blas_libraries()],
                  "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}))
"""


def import_with(value: str) -> dict:
    env = dict(os.environ, NPCONVNEXT_NUM_THREADS=value)
    result = subprocess.run([sys.executable, "-c", _IMPORT_WITH_WARNINGS], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"import npconvnext failed with NPCONVNEXT_NUM_THREADS={value!r}:\n{result.stderr}"
    return json.loads(result.stdout)


@pytest.mark.parametrize("value", ["0", "abc", "-2", "1.5", "2 threads"])
def test_a_bad_thread_count_in_the_environment_warns_and_keeps_the_default(value):
    got = import_with(value)
    assert got["threads"] == numba.config.NUMBA_NUM_THREADS  # Numba's default, untouched
    assert len(got["warnings"]) == 1 and f"NPCONVNEXT_NUM_THREADS={value!r}" in got["warnings"][0], got


def test_too_many_threads_in_the_environment_warns_and_uses_the_most_there_are():
    most = numba.config.NUMBA_NUM_THREADS
    got = import_with(str(most + 1))
    assert got["threads"] == most and set(got["blas"]) == {most}
    assert len(got["warnings"]) == 1 and f"NPCONVNEXT_NUM_THREADS='{most + 1}'" in got["warnings"][0], got


@pytest.mark.parametrize("value", ["1", " 2 "])
def test_a_good_thread_count_in_the_environment_is_used_without_a_warning(value):
    got = import_with(value)
    assert got == {"threads": int(value), "blas": [int(value)] * len(got["blas"]), "warnings": []}


def test_import_and_a_forward_pass_leave_the_environment_alone():
    # a library must not set variables it does not own (thread-wait settings, for one)
    code = ("import os, warnings, numpy as np; before = dict(os.environ); import npconvnext;"
            "warnings.simplefilter('ignore'); m = npconvnext.create_model('convnext_atto', seed=1);"
            "m(np.zeros((2, 3, 32, 32), np.float32)); m.backend = 'numpy'; m(np.zeros((1, 3, 32, 32), np.float32));"
            "after = dict(os.environ);"
            "assert after == before, {k: (before.get(k), after.get(k)) for k in before.keys() ^ after.keys() | "
            "{k for k in before.keys() & after.keys() if before[k] != after[k]}}")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("wait_policy, layer_settings, layer, parallel", [
    (None, {}, "omp", False), ("passive", {}, "omp", True), ("ACTIVE", {}, "omp", False),
    (None, {"NUMBA_THREADING_LAYER": "workqueue"}, "workqueue", True),
    # the layer Numba picks, not the one asked for: "default" here, and workqueue picked
    (None, {"NUMBA_THREADING_LAYER_PRIORITY": "workqueue omp tbb"}, "workqueue", True),
], ids=["omp", "omp-passive", "omp-active", "workqueue", "workqueue-by-priority"])
def test_training_kernels_start_parallel_loops_only_where_idle_workers_sleep(wait_policy, layer_settings, layer,
                                                                            parallel):
    # in training, busy-waiting workers take the cores the BLAS calls between the kernels need:
    # there the kernels run serially. Inference calls no BLAS: its kernels share every layer.
    code = ("import warnings, numpy as np, numba, npconvnext; warnings.simplefilter('ignore');"
            "from npconvnext.engine import depthwise, jit;"
            "ran = {'inference': 0, 'training': 0};"
            "loop, kept = depthwise._depthwise_conv7_layer_norm, depthwise._depthwise_conv7_layer_norm_keep;"
            "depthwise._depthwise_conv7_layer_norm = lambda *a: ran.update(inference=1) or loop(*a);"
            "depthwise._depthwise_conv7_layer_norm_keep = lambda *a: ran.update(training=1) or kept(*a);"
            "m = npconvnext.create_model('convnext_atto'); m(np.zeros((1, 3, 64, 64), np.float32));"
            "x, w, v = np.zeros((1, 8, 8, 4), np.float32), np.ones((7, 7, 4), np.float32), np.ones(4, np.float32);"
            "depthwise.depthwise_conv_layer_norm_keep(x, w, v, v, v, 1e-6);"
            "print(numba.config.THREADING_LAYER, numba.threading_layer(), jit.workers_sleep(),"
            "      bool(ran['training']), bool(ran['inference']))")
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY")}
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    env.update(layer_settings, NUMBA_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    requested, used, sleep, training, inference = out.stdout.split()
    assert (used, sleep, training, inference) == (layer, str(parallel), str(parallel), "True"), out.stdout


def test_until_set_num_threads_a_batch_leaves_blas_alone(two_threads, monkeypatch):
    # BLAS's count is the program's until it hands it over by calling set_num_threads
    monkeypatch.setattr(threads, "_blas_handed_over", False)
    seen = []
    blas_before = blas_threads()
    threads.map_over_batch(lambda x: seen.append((len(x), blas_threads())) or x, np.zeros((4, 1)))
    assert seen == [(4, blas_before)]
    npconvnext.set_num_threads(2)
    seen.clear()
    threads.map_over_batch(lambda x: seen.append((len(x), blas_threads())) or x, np.zeros((4, 1)))
    assert [n for n, _ in seen] == [2, 2] and all(set(b) == {1} for _, b in seen)
