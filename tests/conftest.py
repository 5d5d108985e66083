import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

import numpy as np
import pytest

# The parallel kernels need Numba to have two threads, and Numba reads NUMBA_NUM_THREADS once,
# at import: set it here, before any test imports numba, so one-core CI machines run them too.
# The tests own this process; the library never does this.
if os.environ.get("NUMBA_NUM_THREADS", "").strip() in ("", "0", "1"):
    os.environ["NUMBA_NUM_THREADS"] = "2"

# The kernels start parallel loops only where Numba's OpenMP workers sleep between them
# (engine/jit.py, workers_sleep): ask for that here so the parallel paths are tested;
# tests/engine/test_threads.py checks the default, where they run serially.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import tests.support  # noqa: E402,F401  records the starting environment before any test imports a library


class _NoTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """TensorFlow crashes beside OpenVINO in one process, and Keras 3 imports it whenever it is
    installed (model.save reaches for tf.io.gfile): this process never imports it, so Keras
    takes its paths without it. Tests that need TensorFlow run it in a subprocess
    (tests/support/tf_writer.py). Finding the module still works (torch asks); importing it fails."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "tensorflow":
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        raise ImportError(f"{spec.name} is not imported by the test process: run it in a subprocess")

    def exec_module(self, module):
        raise ImportError(module.__name__)


sys.meta_path.insert(0, _NoTensorFlow())

# OpenVINO's converter sends usage telemetry from a child it forks off a pool thread: traffic a
# test run should not send, and a fork Numba's TBB layer (loaded with OpenVINO's libtbb) warns
# about. Without the package it falls back to its own stub.
sys.modules.setdefault("openvino_telemetry", None)

# Parity tolerances, relative to the reference's largest magnitude (the contract):
# float64 must agree to 1e-10 of the logits' scale, float32 to 1e-4.
TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}


def scaled_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|"""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max())


@pytest.fixture
def assert_matches():
    def check(actual, expected, what=""):
        assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
        error = scaled_error(actual, expected)
        tol = TOLERANCE[expected.dtype]
        assert error <= tol, f"{what}: scaled error {error:.3g} > {tol:g}"
        return error

    return check


@pytest.fixture(autouse=True)
def _the_command_leaves_no_trace():
    """Tests that run the command in this process (cli.main) hand BLAS's thread count over and
    turn on the library's notes, as the program it is may: undo both after each test, so that no
    result depends on the order the tests run in. (The count the command sets, Numba's, is
    BLAS's default count in this process already.)"""
    import logging

    from npconvnext.engine import threads

    logger = logging.getLogger("npconvnext")
    handed_over, level, handlers = threads._blas_handed_over, logger.level, list(logger.handlers)
    yield
    threads._blas_handed_over = handed_over
    logger.setLevel(level)
    logger.handlers[:] = handlers


# ---- workers (pyproject: -n auto --dist loadscope) ------------------------------------------------
# A worker per core, as many as the memory holds: the widest parity tests (one module, so one
# worker, one at a time) take about 12 GB, and a worker of the core suite up to 9 GB (README).
# Each module runs whole in one worker, so that its module-scoped fixtures (the SavedModels
# TensorFlow writes, say) are made once.
WIDEST_GIB, WORKER_GIB = 12, 9


def _memory_gib() -> float:
    """The machine's memory, or the container's limit (cgroup v2) where that is lower."""
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError, ValueError):
        with open("/sys/fs/cgroup/memory.max") as limit:
            memory = min(memory, int(limit.read()))  # "max": no limit, a ValueError
    return memory / (1 << 30)


@pytest.hookimpl(optionalhook=True)  # without pytest-xdist (`-p no:xdist`) there is no such hook
def pytest_xdist_auto_num_workers(config):
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(cores, 1 + int((_memory_gib() - WIDEST_GIB) // WORKER_GIB))
    return workers if workers > 1 else 0  # 0: the tests run in this process, as without xdist


# ---- no stale kernels -----------------------------------------------------------------------------
# Numba's cache checks a kernel's own source file, not the files of the kernels it calls: after an
# edit to engine/linear.py, mlp.py's cached kernels would still run the old code. So the session
# starts by dropping every cached kernel (its index and data files) with a file older than a
# module of the package that imports numba (a few import it for its thread count only: editing
# them costs a recompile, no more). Only the cache beside the package: NUMBA_CACHE_DIR's is the
# user's.
def _imports_numba(path: str) -> bool:
    with open(path, encoding="utf-8") as file:
        return any(line.startswith(("import numba", "from numba")) for line in file)


def _drop_stale_kernels(package: str) -> list[str]:
    folders = list(os.walk(package))  # before anything goes
    newest = max((os.stat(os.path.join(folder, name)).st_mtime for folder, _, names in folders for name in names
                  if name.endswith(".py") and _imports_numba(os.path.join(folder, name))), default=0.0)
    dropped = []
    for folder, _, names in folders:
        for index in (name for name in names if name.endswith(".nbi")):
            stem = index[: -len(".nbi")]
            # a new signature rewrites the index and adds a data file, leaving the older ones
            files = [os.path.join(folder, name) for name in names
                     if name == index or (name.startswith(stem + ".") and name.endswith(".nbc"))]
            if any(os.stat(path).st_mtime < newest for path in files):
                for path in files:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                dropped.append(os.path.join(folder, index))
    return dropped


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):  # once, in the process that starts the workers
        package = importlib.util.find_spec("npconvnext").submodule_search_locations[0]  # not imported yet
        _drop_stale_kernels(package)


# ---- the `heavy` mark -----------------------------------------------------------------------------
# Tests that need what only the `test` extra installs (TensorFlow, Keras, OpenVINO, ONNX, Dask,
# scikit-learn) or take minutes are marked `heavy`: `python -m pytest -m "not heavy"` is the core
# suite, which the `core` extra (torch, timm, transformers) runs in a few minutes. CI runs them all.
# By path (a folder, a file, or file::test): (the packages it needs, why it is heavy).
HEAVY_PATHS = {
    "tests/distributed": (("distributed",), "runs jobs on a real local Dask cluster"),
    "tests/formats/test_keras.py": (("keras",), "writes the Keras files it reads with Keras 3"),
    "tests/formats/test_openvino_ir.py": (("openvino", "onnx"), "exports to ONNX and converts with OpenVINO"),
    "tests/formats/test_openvino_ir_hostile.py": (("openvino", "onnx"), "breaks IRs that OpenVINO writes"),
    "tests/formats/test_fuzz_readers.py": ((), "8000 fuzzed weight files, each in a worker: minutes"),
    "tests/engine/test_isa.py::test_avx2_code_gives_the_hosts_bits": ((), "compiles the kernels again for AVX2: minutes"),
    "tests/train/test_train.py::test_training_on_digits_learns": (("sklearn",), "trains on scikit-learn's digits"),
    **{f"tests/tools/test_explain.py::{name}": (("matplotlib",), "draws figures with matplotlib (the test extra)")
       for name in ("test_explain_command_size_and_target", "test_erf_and_parity_commands",
                    "test_real_weights_get_no_warning", "test_figures_of_a_drift")},
    # timm's float64 model beside its float32 weights, then ours: 0.66-0.85 billion parameters, about 12 GB
    "tests/test_parity.py::test_every_variant_matches_timm[convnext_xxlarge]": ((), "needs about 12 GB of memory"),
    "tests/test_parity.py::test_every_variant_matches_timm[convnextv2_huge]": ((), "needs about 12 GB of memory"),
    # the wider variants differ from tiny only in widths and depths (every row of the table is
    # checked against timm's parameter counts in the core suite); their parity takes minutes
    **{f"tests/test_parity.py::test_every_variant_matches_timm[{name}]": ((), "a wide variant's parity: minutes")
       for name in ("convnext_small", "convnext_base", "convnext_large", "convnext_xlarge",
                    "convnextv2_small", "convnextv2_base", "convnextv2_large")},
}
# By fixture: a test that uses it is heavy.
HEAVY_FIXTURES = {
    "saved_models": "TensorFlow writes the SavedModels (tests/support/tf_writer.py)",
    "keras2_saved_models": "tf-keras on TensorFlow writes the SavedModels",
    "digits_folder": "scikit-learn's digits, fine-tuned for several epochs",
}
_not_collected: list[str] = []  # heavy files whose packages are missing


def _heavy_reason(nodeid: str, fixtures) -> str | None:
    for path, (_, why) in HEAVY_PATHS.items():
        if nodeid == path or nodeid.startswith((path + "/", path + "::", path + "[")):
            return why
    return next((HEAVY_FIXTURES[f] for f in fixtures if f in HEAVY_FIXTURES), None)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _heavy_reason(item.nodeid, getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.heavy)


def pytest_ignore_collect(collection_path, config):
    """A heavy test file that imports a missing package at the top is not collected (an import
    error otherwise, even with -m "not heavy"); the run's summary names it."""
    relative = os.path.relpath(str(collection_path), str(config.rootpath)).replace(os.sep, "/")
    needed = HEAVY_PATHS.get(relative, ((), ""))[0]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        _not_collected.append(f"{relative} (needs {', '.join(missing)}: the `test` extra)")
        return True
    return None


def pytest_terminal_summary(terminalreporter):
    for line in _not_collected:
        terminalreporter.write_line(f"heavy, not collected: {line}")
