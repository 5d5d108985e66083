"""The engine's forward kernels (every layer module's) against their readable twins in layers.py,
on one thread (the row bodies) and two (the parallel loops), on seeded random shapes."""

import os
import subprocess
import sys

import numba
import numpy as np
import pytest

from npconvnext import layers
from npconvnext.engine import block, depthwise, gemm, grn, layernorm, linear, mlp
from npconvnext.network import BlockWeights
from npconvnext.network import block as reference_block
from tests.engine.conftest import BFLOAT16_LOOPS, FORWARD_LOOPS, PARALLEL_LOOPS, VARIANT_LOOPS

# float64 kernels sum in another order than NumPy, float32 ones also use float32 erf
TOL = {np.float32: 2e-6, np.float64: 1e-13}
# (N, H, W, C); channel counts that are not multiples of 4 run the kernels' remainder loops
SHAPES = [(1, 7, 7, 8), (2, 13, 9, 24), (1, 1, 1, 16), (3, 3, 20, 40),
          (1, 5, 6, 7), (2, 4, 9, 13), (1, 8, 3, 42), (1, 1, 2, 1)]


def close(actual, expected, dtype):
    assert actual.dtype == expected.dtype == dtype
    scale = max(np.abs(expected).max(), 1.0)
    assert np.abs(actual - expected).max() <= TOL[dtype] * scale


def test_every_kernel_has_a_parallel_loop_to_test():
    loops = [name for names in PARALLEL_LOOPS.values() for name in names]
    # six for the forward, two for timm's variants, one bfloat16, thirteen training
    assert len(loops) == len(set(loops)) == 22, loops
    assert FORWARD_LOOPS | VARIANT_LOOPS | BFLOAT16_LOOPS <= set(loops)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_the_kernels_of_timms_variants_match_the_reference(shape, dtype, kernel_threads):
    # the RMS and simple norms (convnext_*_rms) and GELU alone (overlap_act stem, pre-logits
    # head), on inputs off centre so that the simple norm's centring counts; also strided, with
    # a dimension fewer, and with a weight of another dtype (the result keeps x's)
    rng = np.random.default_rng(sum(shape) + 1)
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    weight = rng.standard_normal(shape[-1]).astype(dtype)
    for xs in (x, x[:, ::-1], x[0]):
        close(layernorm.rms_norm(xs, weight, None, 1e-6), layers.rms_norm(xs, weight, None, 1e-6), dtype)
        close(mlp.gelu(xs), layers.gelu(xs), dtype)
        if shape[-1] > 1:
            close(layernorm.simple_norm(xs, weight, None, 1e-6), layers.simple_norm(xs, weight, None, 1e-6), dtype)
    close(mlp.gelu(x[..., 0]), layers.gelu(x[..., 0]), dtype)
    close(layernorm.rms_norm(x, weight.astype(np.float16), None, 1e-6),
          layers.rms_norm(x, weight.astype(np.float16).astype(dtype), None, 1e-6), dtype)
    if shape[-1] == 1:  # one channel: the unbiased variance divides by zero, in both
        with np.errstate(invalid="ignore", divide="ignore"):
            assert np.isnan(layernorm.simple_norm(x, weight, None, 1e-6)).all()
            assert np.isnan(layers.simple_norm(x, weight, None, 1e-6)).all()
    expected = VARIANT_LOOPS if numba.get_num_threads() > 1 else set()
    assert set().union(*kernel_threads) == expected


@pytest.mark.parametrize("weight_dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_norms_take_their_weights_in_xs_dtype(dtype, weight_dtype):
    # weights of another dtype than x (the model's come in x's): cast to x's, as the result;
    # a float16 one reached Numba as float16, which it cannot compile
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((2, 5, 6, 24)) * 3 + 2).astype(dtype)
    weight, bias = rng.standard_normal((2, 24)).astype(weight_dtype)
    conv_w, conv_b = rng.standard_normal((7, 7, 24)).astype(dtype), rng.standard_normal(24).astype(dtype)
    as_x = weight.astype(dtype), bias.astype(dtype)
    close(layernorm.layer_norm(x, weight, bias, 1e-6), layers.layer_norm(x, *as_x, 1e-6), dtype)
    close(depthwise.depthwise_conv_layer_norm(x, conv_w, conv_b, weight, bias, 1e-6),
          layers.layer_norm(layers.depthwise_conv(x, conv_w, conv_b), *as_x, 1e-6), dtype)
    close(grn.global_response_norm(x, weight, bias, 1e-6), layers.global_response_norm(x, *as_x, 1e-6), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_alone_at_the_ends_of_the_line(dtype):
    # exactly the reference's bits where GELU is -0, x or nan: far out on either side (float32's
    # erf fit ends at 4: its 1 - 2e-8 there made GELU(-1e30) -6e21), the infinities and nan
    x = np.array([-1e30, -1e4, -10.0, 5.7, 10.0, 1e4, 1e30, -np.inf, np.inf, np.nan], dtype)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(mlp.gelu(x), layers.gelu(x))


@pytest.mark.parametrize("wrapper", [layernorm.layer_norm, layernorm.rms_norm, layernorm.simple_norm, mlp.gelu])
@pytest.mark.parametrize("shape", [(0, 4), (3, 0), (2, 0, 5)])
def test_the_norm_and_gelu_kernels_take_empty_arrays(wrapper, shape):
    x = np.zeros(shape, np.float32)
    bias = np.zeros(shape[-1], np.float32) if wrapper is layernorm.layer_norm else None
    args = (x,) if wrapper is mlp.gelu else (x, np.ones(shape[-1], np.float32), bias, 1e-6)
    out = wrapper(*args)
    assert out.shape == shape and out.dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_kernels_match_the_reference(shape, dtype, kernel_threads):
    rng = np.random.default_rng(sum(shape))
    n, h, w, c = shape
    r = lambda *s: rng.standard_normal(s).astype(dtype)
    x = r(n, h, w, c)
    conv_w, conv_b, norm_w, norm_b = r(7, 7, c), r(c), r(c), r(c)
    close(depthwise.depthwise_conv_layer_norm(x, conv_w, conv_b, norm_w, norm_b, 1e-6),
          layers.layer_norm(layers.depthwise_conv(x, conv_w, conv_b), norm_w, norm_b, 1e-6), dtype)
    close(layernorm.layer_norm(x, norm_w, norm_b, 1e-5), layers.layer_norm(x, norm_w, norm_b, 1e-5), dtype)
    fc_w, fc_b = r(c, 4 * c), r(4 * c)
    panels = linear.linear_gelu_panels(x, fc_w, fc_b)
    close(gemm.from_panels(panels, n * h * w).reshape(n, h, w, 4 * c),
          layers.gelu(layers.linear(x, fc_w, fc_b)), dtype)
    hidden = r(n, h, w, 4 * c)
    grn_w, grn_b = r(4 * c), r(4 * c)
    close(grn.global_response_norm(hidden, grn_w, grn_b, 1e-6),
          layers.global_response_norm(hidden, grn_w, grn_b, 1e-6), dtype)
    fc2_w, fc2_b, gamma = r(4 * c, c), r(c), r(c)
    hidden_panels = gemm.to_panels(hidden.reshape(-1, 4 * c))
    close(linear.panels_linear(hidden_panels, fc2_w, fc2_b, gamma, x),
          x + gamma * layers.linear(hidden, fc2_w, fc2_b), dtype)
    close(linear.panels_linear(hidden_panels, fc2_w, fc2_b, None, x),
          x + layers.linear(hidden, fc2_w, fc2_b), dtype)
    close(linear.linear(hidden, fc2_w, fc2_b), layers.linear(hidden, fc2_w, fc2_b), dtype)
    for patch in [p for p in (1, 2, 4) if p <= min(h, w)]:
        patch_w, patch_b = r(patch * patch * c, 5), r(5)
        close(linear.patchify_conv(x, patch_w, patch_b, patch), layers.patchify_conv(x, patch_w, patch_b, patch),
              dtype)
    for with_grn, ls in ((False, True), (True, False), (False, False)):
        weights = BlockWeights(conv_w, conv_b, norm_w, norm_b, fc_w, fc_b, grn_w if with_grn else None,
                               grn_b if with_grn else None, fc2_w, fc2_b, gamma if ls else None)
        close(block.convnext_block(x, weights, 1e-6, 1e-6), reference_block(x, weights, 1e-6, 1e-6), dtype)
    # fc1 and fc2 panel by panel, and weight-stationary, whatever the panels' count
    expected = x + gamma * layers.linear(layers.gelu(layers.linear(x, fc_w, fc_b)), fc2_w, fc2_b)
    for panels_per_thread in (0, 1 << 40):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(mlp, "_PANELS_PER_THREAD", panels_per_thread)
            close(mlp.mlp_residual(x, fc_w, fc_b, fc2_w, fc2_b, gamma, x), expected, dtype)
    assert set().union(*kernel_threads) == (FORWARD_LOOPS if numba.get_num_threads() > 1 else set())


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
            linear._linear_gelu_panels_rows(panels, pixels, fc1, fc1_b, hidden, chunk, groups, 0, groups)
            linear._panels_linear_rows(hidden, fc2, fc2_b, None, shortcut, out, chunk, groups, 0, groups)
        else:
            linear._linear_gelu_panels(panels, pixels, fc1, fc1_b, hidden, chunk, groups)
            linear._panels_linear(hidden, fc2, fc2_b, None, shortcut, out, chunk, groups)
        results.append(out)
    panel_by_panel = np.empty((pixels, 30), dtype)
    mlp._mlp(x, fc1, fc1_b, fc2, fc2_b, None, shortcut, panel_by_panel)
    for out in results[1:] + [panel_by_panel]:
        np.testing.assert_array_equal(out, results[0])


@pytest.mark.parametrize("k", [3, 5])
def test_depthwise_kernels_of_other_sizes_take_the_reference_path(k):
    # only 7x7 (every ConvNeXt) is compiled; other sizes must still give the right answer
    rng = np.random.default_rng(k)
    x, conv_w = rng.standard_normal((1, 9, 11, 8)), rng.standard_normal((k, k, 8))  # (N, H, W, C), (k, k, C)
    conv_b = rng.standard_normal(8)
    ones, zeros = np.ones(8), np.zeros(8)
    close(depthwise.depthwise_conv_layer_norm(x, conv_w, conv_b, ones, zeros, 1e-6),
          layers.layer_norm(layers.depthwise_conv(x, conv_w, conv_b), ones, zeros, 1e-6), np.float64)


def test_gelu_is_exact_erf_not_tanh():
    x = np.array([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0])
    expected = [-0.0040496, -0.15865525, -0.15426877, 0.0, 0.34573123, 0.84134475, 2.9959504]
    np.testing.assert_allclose(layers.gelu(x), expected, atol=1e-7)
    y = x.reshape(1, -1).copy()
    panels = linear.linear_gelu_panels(y, np.eye(7), np.zeros(7))
    np.testing.assert_allclose(gemm.from_panels(panels, 1)[0], expected, atol=1e-7)


def test_kernels_as_plain_python_give_the_same_model():
    """NUMBA_DISABLE_JIT=1 runs the kernel bodies as Python, so coverage sees them."""
    code = ("import warnings, numpy as np, npconvnext; warnings.simplefilter('ignore');"
            "m = npconvnext.create_model('convnextv2_atto', dtype='float64');"
            "x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)); a = m(x);"
            "m.backend = 'numpy'; b = m(x);"
            "assert np.abs(a - b).max() < 1e-12 * np.abs(b).max(), np.abs(a - b).max()")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, NUMBA_DISABLE_JIT="1"))


def test_the_kernels_get_read_only_weights_whatever_the_caller_passes(monkeypatch):
    # weights mapped from a file are read-only, random or converted ones are not, and Numba
    # compiles (and loads from its cache) a kernel once per writability: twice, if the wrappers
    # passed the weights on as they came
    passed = []
    for module in (depthwise, grn, layernorm, linear, mlp):  # each calls jit.rows_or_parallel by this name
        monkeypatch.setattr(module, "rows_or_parallel",
                            lambda rows, parallel, args, *rest, _run=module.rows_or_parallel, **kw:
                            passed.append((rows.__name__, args)) or _run(rows, parallel, args, *rest, **kw))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 5, 24)).astype(np.float32)
    weight, bias = rng.standard_normal((24, 96)).astype(np.float32), rng.standard_normal(96).astype(np.float32)
    small = bias[:24].copy()
    hidden = linear.linear_gelu_panels(x, weight, bias)
    linear.panels_linear(hidden, weight.T.copy(), small, small, x, pixels=15)
    grn.global_response_norm(x, small, small, 1e-6)
    layernorm.layer_norm(x, small, small, 1e-6)
    depthwise.depthwise_conv_layer_norm(x, rng.standard_normal((7, 7, 24)).astype(np.float32), small, small, small,
                                        1e-6)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)  # panel by panel, _mlp_rows
    try:
        mlp.mlp_residual(x, weight, bias, weight.T.copy(), small, small, x)
    finally:
        numba.set_num_threads(threads)
    assert weight.flags.writeable and bias.flags.writeable  # the caller's arrays are left as they were
    weights = {"_linear_gelu_panels_rows": (2, 3), "_panels_linear_rows": (1, 2, 3),
               "_global_response_norm_rows": (1, 2), "_layer_norm_rows": (1, 2),
               "_depthwise_conv7_layer_norm_rows": (1, 2, 3, 4), "_mlp_rows": (1, 2, 3, 4, 5)}
    assert {name for name, _ in passed} == set(weights)
    for name, args in passed:
        assert not any(args[i].flags.writeable for i in weights[name]), name
