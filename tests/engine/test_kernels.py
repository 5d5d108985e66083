"""The Numba kernels against their readable twins in layers.py, on seeded random shapes."""

import math
import os
import subprocess
import sys

import numba
import numpy as np
import pytest

from npconvnext import layers
from npconvnext.engine import gemm, kernels
from npconvnext.network import BlockWeights
from npconvnext.network import block as reference_block
from tests.support import DATA, parallel_loops

# float64 kernels sum in another order than NumPy, float32 ones also use float32 erf
TOL = {np.float32: 2e-6, np.float64: 1e-13}
# (N, H, W, C); channel counts that are not multiples of 4 run the kernels' remainder loops
SHAPES = [(1, 7, 7, 8), (2, 13, 9, 24), (1, 1, 1, 16), (3, 3, 20, 40),
          (1, 5, 6, 7), (2, 4, 9, 13), (1, 8, 3, 42), (1, 1, 2, 1)]
# every kernel's parallel loop, by name in kernels.py
PARALLEL_LOOPS = [name for name, f in vars(kernels).items() if getattr(f, "targetoptions", {}).get("parallel")]


def close(actual, expected, dtype):
    assert actual.dtype == expected.dtype == dtype
    scale = max(np.abs(expected).max(), 1.0)
    assert np.abs(actual - expected).max() <= TOL[dtype] * scale


def test_every_kernel_has_a_parallel_loop_to_test():
    assert len(PARALLEL_LOOPS) == 6, PARALLEL_LOOPS


@pytest.fixture(params=[1, 2], ids=["serial", "parallel"])
def kernel_threads(request, monkeypatch):
    """One thread: every wrapper takes its kernel's row body on this thread; two: the
    parallel loops. Yields the names of the parallel loops that ran."""
    with parallel_loops.counted(kernels, PARALLEL_LOOPS, request.param, monkeypatch) as ran:
        yield ran


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_kernels_match_the_reference(shape, dtype, kernel_threads):
    rng = np.random.default_rng(sum(shape))
    n, h, w, c = shape
    r = lambda *s: rng.standard_normal(s).astype(dtype)
    x = r(n, h, w, c)
    conv_w, conv_b, norm_w, norm_b = r(7, 7, c), r(c), r(c), r(c)
    close(kernels.depthwise_conv_layer_norm(x, conv_w, conv_b, norm_w, norm_b, 1e-6),
          layers.layer_norm(layers.depthwise_conv(x, conv_w, conv_b), norm_w, norm_b, 1e-6), dtype)
    close(kernels.layer_norm(x, norm_w, norm_b, 1e-5), layers.layer_norm(x, norm_w, norm_b, 1e-5), dtype)
    fc_w, fc_b = r(c, 4 * c), r(4 * c)
    panels = kernels.linear_gelu_panels(x, fc_w, fc_b)
    close(gemm.from_panels(panels, n * h * w).reshape(n, h, w, 4 * c),
          layers.gelu(layers.linear(x, fc_w, fc_b)), dtype)
    hidden = r(n, h, w, 4 * c)
    grn_w, grn_b = r(4 * c), r(4 * c)
    close(kernels.global_response_norm(hidden, grn_w, grn_b, 1e-6),
          layers.global_response_norm(hidden, grn_w, grn_b, 1e-6), dtype)
    fc2_w, fc2_b, gamma = r(4 * c, c), r(c), r(c)
    hidden_panels = gemm.to_panels(hidden.reshape(-1, 4 * c))
    close(kernels.panels_linear(hidden_panels, fc2_w, fc2_b, gamma, x),
          x + gamma * layers.linear(hidden, fc2_w, fc2_b), dtype)
    close(kernels.panels_linear(hidden_panels, fc2_w, fc2_b, None, x),
          x + layers.linear(hidden, fc2_w, fc2_b), dtype)
    close(kernels.linear(hidden, fc2_w, fc2_b), layers.linear(hidden, fc2_w, fc2_b), dtype)
    for patch in [p for p in (1, 2, 4) if p <= min(h, w)]:
        patch_w, patch_b = r(patch * patch * c, 5), r(5)
        close(kernels.patchify_conv(x, patch_w, patch_b, patch), layers.patchify_conv(x, patch_w, patch_b, patch),
              dtype)
    for grn, ls in ((False, True), (True, False), (False, False)):
        weights = BlockWeights(conv_w, conv_b, norm_w, norm_b, fc_w, fc_b, grn_w if grn else None,
                               grn_b if grn else None, fc2_w, fc2_b, gamma if ls else None)
        close(kernels.convnext_block(x, weights, 1e-6, 1e-6), reference_block(x, weights, 1e-6, 1e-6), dtype)
    # fc1 and fc2 panel by panel, and weight-stationary, whatever the panels' count
    expected = x + gamma * layers.linear(layers.gelu(layers.linear(x, fc_w, fc_b)), fc2_w, fc2_b)
    for panels_per_thread in (0, 1 << 40):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(kernels, "_PANELS_PER_THREAD", panels_per_thread)
            close(kernels.mlp_residual(x, fc_w, fc_b, fc2_w, fc2_b, gamma, x), expected, dtype)
    assert kernel_threads == (set(PARALLEL_LOOPS) if numba.get_num_threads() > 1 else set())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pixels, channels", [(1, 8), (70, 24), (33, 40), (40, 16), (33, 20), (5, 3)])
def test_linears_give_the_same_bits_however_the_work_is_shared(pixels, channels, dtype):
    # every tile sums its products in the same order, whichever thread, share or order runs it
    rng = np.random.default_rng(pixels)
    x, shortcut = rng.standard_normal((pixels, channels)).astype(dtype), rng.standard_normal((pixels, 30)).astype(dtype)
    fc1, fc1_b = rng.standard_normal((30, channels)).astype(dtype), rng.standard_normal(30).astype(dtype)
    fc2, fc2_b = rng.standard_normal((30, 30)).astype(dtype), rng.standard_normal(30).astype(dtype)
    nr = gemm.panel_pixels(dtype)
    panels = gemm.to_panels(x)
    count = panels.shape[0]
    results = []
    for groups, chunk in ((1, count), (2, 1), (3, 2)):
        hidden, out = np.empty((count, 30, nr), dtype), np.empty((pixels, 30), dtype)
        if groups == 1:
            kernels._linear_gelu_panels_rows(panels, pixels, fc1, fc1_b, hidden, chunk, groups, 0, groups)
            kernels._panels_linear_rows(hidden, fc2, fc2_b, None, shortcut, out, chunk, groups, 0, groups)
        else:
            kernels._linear_gelu_panels(panels, pixels, fc1, fc1_b, hidden, chunk, groups)
            kernels._panels_linear(hidden, fc2, fc2_b, None, shortcut, out, chunk, groups)
        results.append(out)
    panel_by_panel = np.empty((pixels, 30), dtype)
    kernels._mlp(x, fc1, fc1_b, fc2, fc2_b, None, shortcut, panel_by_panel)
    for out in results[1:] + [panel_by_panel]:
        np.testing.assert_array_equal(out, results[0])


@pytest.mark.parametrize("k", [3, 5])
def test_depthwise_kernels_of_other_sizes_take_the_reference_path(k):
    # only 7x7 (every ConvNeXt) is compiled; other sizes must still give the right answer
    rng = np.random.default_rng(k)
    x, conv_w = rng.standard_normal((1, 9, 11, 8)), rng.standard_normal((k, k, 8))  # (N, H, W, C), (k, k, C)
    conv_b = rng.standard_normal(8)
    ones, zeros = np.ones(8), np.zeros(8)
    close(kernels.depthwise_conv_layer_norm(x, conv_w, conv_b, ones, zeros, 1e-6),
          layers.layer_norm(layers.depthwise_conv(x, conv_w, conv_b), ones, zeros, 1e-6), np.float64)


def test_gelu_is_exact_erf_not_tanh():
    x = np.array([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0])
    expected = [-0.0040496, -0.15865525, -0.15426877, 0.0, 0.34573123, 0.84134475, 2.9959504]
    np.testing.assert_allclose(layers.gelu(x), expected, atol=1e-7)
    y = x.reshape(1, -1).copy()
    panels = kernels.linear_gelu_panels(y, np.eye(7), np.zeros(7))
    np.testing.assert_allclose(gemm.from_panels(panels, 1)[0], expected, atol=1e-7)


def test_kernels_as_plain_python_give_the_same_model():
    """NUMBA_DISABLE_JIT=1 runs the kernel bodies as Python, so coverage sees them."""
    code = ("import warnings, numpy as np, npconvnext; warnings.simplefilter('ignore');"
            "m = npconvnext.create_model('convnextv2_atto', dtype='float64');"
            "x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)); a = m(x);"
            "m.backend = 'numpy'; b = m(x);"
            "assert np.abs(a - b).max() < 1e-12 * np.abs(b).max(), np.abs(a - b).max()")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, NUMBA_DISABLE_JIT="1"))


# Run in a fresh process against a copy of the package (argv[1]): the model once, then how many
# kernel signatures Numba compiled and how many it loaded from its cache, as JSON.
_CACHE_RUN = """
import json, os, sys, warnings
import numba, numpy as np
import npconvnext
from npconvnext.engine import gemm, kernels
assert npconvnext.__file__.startswith(sys.argv[1]), npconvnext.__file__
try:  # this process must not be able to write into the package, as users of an installed one
    open(os.path.join(os.path.dirname(kernels.__file__), "probe"), "w")
    sys.exit("the package copy is writable")
except PermissionError:
    pass
warnings.simplefilter("ignore")
npconvnext.create_model("convnextv2_atto")(np.zeros((1, 3, 32, 32), np.float32))
stats = [f.stats for f in vars(kernels).values() if isinstance(f, numba.core.dispatcher.Dispatcher)]
print(json.dumps({"compiled": sum(sum(s.cache_misses.values()) for s in stats),
                  "loaded": sum(sum(s.cache_hits.values()) for s in stats)}))
"""


def _without_root_write_override():
    # For root, read-only modes do not hold (CAP_DAC_OVERRIDE): drop that capability from the
    # bounding set (prctl PR_CAPBSET_DROP) so the process exec'd next meets them as a user does.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(24, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE)")


def test_jit_cache_works_from_a_read_only_package(tmp_path):
    """Installed read-only, the package's kernels are compiled once into Numba's per-user cache
    directory, and a second process loads them from there instead of compiling."""
    import json
    import shutil

    import npconvnext

    site = tmp_path / "site"
    package = site / "npconvnext"
    shutil.copytree(os.path.dirname(npconvnext.__file__), package, ignore=shutil.ignore_patterns("__pycache__"))
    for path in [package, *package.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)  # read-only, as a system-wide install
    before = sorted((str(p), p.stat().st_mtime_ns) for p in package.rglob("*"))
    user_cache = tmp_path / "user-cache"  # where Numba falls back to: $XDG_CACHE_HOME/numba
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(user_cache), PYTHONPATH=str(site))
    probe = package / "probe"
    try:
        probe.touch()
        probe.unlink()
        preexec = _without_root_write_override  # we are root: the modes alone do not hold
    except PermissionError:
        preexec = None

    def run():
        result = subprocess.run([sys.executable, "-c", _CACHE_RUN, str(site)], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=300, preexec_fn=preexec)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.splitlines()[-1])

    try:
        first = run()
        assert first["compiled"] > 0 and first["loaded"] == 0, first
        assert any(user_cache.rglob("*.nbc")) and any(user_cache.rglob("*.nbi")), "nothing cached"
        second = run()
        assert second["compiled"] == 0 and second["loaded"] > 0, second
        assert sorted((str(p), p.stat().st_mtime_ns) for p in package.rglob("*")) == before
    finally:
        for path in [package, *package.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)  # so that pytest can remove it


def test_float64_erf_is_within_one_ulp_of_the_exact_erf():
    import mpmath

    mpmath.mp.dps = 30
    x = np.linspace(-7, 7, 20_001)
    x = np.concatenate([x, np.logspace(-300, 0.8, 1000), -np.logspace(-300, 0.8, 1000), [0.0, np.inf, -np.inf]])
    ours = np.array([kernels._erf64(float(v)) for v in x])
    exact = [mpmath.erf(mpmath.mpf(float(v))) for v in x]
    ulp = np.spacing(np.abs(np.array([float(e) for e in exact])))
    ulp_error = np.array([float(abs(mpmath.mpf(float(o)) - e)) for o, e in zip(ours, exact)]) / ulp
    assert ulp_error.max() <= 1.0, (ulp_error.max(), x[ulp_error.argmax()])


def test_float32_erf_is_within_one_ulp_of_the_exact_erf():
    import math

    x = np.linspace(-6, 6, 400_001).astype(np.float32)
    x = np.concatenate([x, np.logspace(-30, 0, 2000, dtype=np.float32), -np.logspace(-30, 0, 2000, dtype=np.float32)])
    exact = np.array([math.erf(v) for v in x.astype(np.float64)])
    ours = np.array([kernels._erf32(float(v)) for v in x.astype(np.float64)]).astype(np.float32)
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    assert (np.abs(ours - exact) / ulp).max() <= 1.0


_LIBRARY_RUN = """
import json, logging, sys, warnings
import numpy as np
import npconvnext
from npconvnext.engine import gemm, kernels

records = []
handler = logging.Handler()
handler.emit = records.append
logging.getLogger().addHandler(handler)  # collects, prints nothing
logging.getLogger().setLevel(logging.INFO)
warnings.simplefilter("ignore")
npconvnext.create_model("convnext_atto", weights=sys.argv[1])(np.zeros((2, 3, 32, 32), np.float32))
print(json.dumps([[r.name, r.levelname, r.getMessage()] for r in records]))
"""


def test_a_cold_jit_cache_is_told_once_by_the_cli_and_logged_by_the_library(tmp_path):
    """Compiling the kernels takes seconds: the first run on a cold cache says so (the CLI on
    stderr; the library as an INFO record, never printed), and a warm run says nothing."""
    import json

    from safetensors.numpy import save_file

    import npconvnext
    from npconvnext.engine.kernels import COMPILE_NOTICE
    from npconvnext.params import random_state_dict

    weights = tmp_path / "atto.safetensors"
    save_file(random_state_dict(npconvnext.get_config("convnext_atto")), weights)
    image = os.path.join(DATA, "chelsea.png")

    def run(args, cache):
        env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / cache))
        result = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    cold = run(["-m", "npconvnext", "classify", image, "--weights", str(weights)], "cli-cache")
    assert cold.stderr.count(f"npconvnext: {COMPILE_NOTICE}") == 1, cold.stderr
    warm = run(["-m", "npconvnext", "classify", image, "--weights", str(weights)], "cli-cache")
    assert COMPILE_NOTICE not in warm.stderr and warm.stdout == cold.stdout
    library = run(["-c", _LIBRARY_RUN, str(weights)], "library-cache")
    assert json.loads(library.stdout) == [["npconvnext", "INFO", COMPILE_NOTICE]]
    assert COMPILE_NOTICE not in library.stderr


@numba.njit
def _lane_sums(x, center):
    return kernels._lane_sum(x, None), kernels._lane_sum(x, center), kernels._lane_sum(x[::2], center)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 96, 100, 3072])
def test_a_pixels_sums_take_one_order_compiled_or_not(n, dtype):
    # the vector sums (contiguous), the loops (strided) and the plain-Python body: the same bits
    x = np.random.default_rng(n).standard_normal(n).astype(dtype) + 3
    center = float(x.mean())
    compiled = _lane_sums(x, center)
    plain = (kernels._lane_sum(x, None), kernels._lane_sum(x, center), kernels._lane_sum(x[::2], center))
    assert compiled == plain
    assert abs(compiled[0] - math.fsum(x.astype(np.float64))) <= 1e-13 * n * 4
    assert abs(compiled[1] - math.fsum((x.astype(np.float64) - center) ** 2)) <= 1e-13 * n * 10


def test_the_kernels_get_read_only_weights_whatever_the_caller_passes(monkeypatch):
    # weights mapped from a file are read-only, random or converted ones are not, and Numba
    # compiles (and loads from its cache) a kernel once per writability: twice, if the wrappers
    # passed the weights on as they came
    passed = []
    run = kernels._rows_or_parallel
    monkeypatch.setattr(kernels, "_rows_or_parallel",
                        lambda rows, parallel, args, *rest, **kw: passed.append((rows.__name__, args))
                        or run(rows, parallel, args, *rest, **kw))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 5, 24)).astype(np.float32)
    weight, bias = rng.standard_normal((24, 96)).astype(np.float32), rng.standard_normal(96).astype(np.float32)
    small = bias[:24].copy()
    hidden = kernels.linear_gelu_panels(x, weight, bias)
    kernels.panels_linear(hidden, weight.T.copy(), small, small, x, pixels=15)
    kernels.global_response_norm(x, small, small, 1e-6)
    kernels.layer_norm(x, small, small, 1e-6)
    kernels.depthwise_conv_layer_norm(x, rng.standard_normal((7, 7, 24)).astype(np.float32), small, small, small,
                                      1e-6)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)  # panel by panel, _mlp_rows
    try:
        kernels.mlp_residual(x, weight, bias, weight.T.copy(), small, small, x)
    finally:
        numba.set_num_threads(threads)
    assert weight.flags.writeable and bias.flags.writeable  # the caller's arrays are left as they were
    weights = {"_linear_gelu_panels_rows": (2, 3), "_panels_linear_rows": (1, 2, 3),
               "_global_response_norm_rows": (1, 2), "_layer_norm_rows": (1, 2),
               "_depthwise_conv7_layer_norm_rows": (1, 2, 3, 4), "_mlp_rows": (1, 2, 3, 4, 5)}
    assert {name for name, _ in passed} == set(weights)
    for name, args in passed:
        assert not any(args[i].flags.writeable for i in weights[name]), name
