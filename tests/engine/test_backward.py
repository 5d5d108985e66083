"""The training kernels (each layer module's backward, and the forward steps that keep what it
needs) against their readable twins in layers.py, on one thread (the row bodies) and two (the
parallel loops), on seeded random shapes."""

import numba
import numpy as np
import pytest

from npconvnext import layers
from npconvnext.errors import InputError
from npconvnext.engine import depthwise, grn, layernorm, mlp
from npconvnext.engine.jit import CHUNK_PIXELS, CHUNK_ROWS
from tests.engine.conftest import BFLOAT16_LOOPS, FORWARD_LOOPS, PARALLEL_LOOPS, VARIANT_LOOPS

# float64 kernels sum in another order than NumPy; float32 ones sum weight gradients in float64
# where NumPy sums in float32, and use the float32 erf
TOL = {np.float32: 2e-6, np.float64: 1e-13}
# (N, H, W, C): odd channel counts and sizes smaller than the 7x7 kernel, more than a chunk of
# rows (CHUNK_ROWS) and of pixels (CHUNK_PIXELS)
SHAPES = [(1, 7, 7, 8), (2, 13, 9, 24), (1, 1, 1, 16), (3, 3, 20, 40),
          (1, 5, 6, 7), (2, 4, 9, 13), (1, 8, 3, 42), (1, 1, 2, 1), (2, 17, 11, 5)]
DEPTHWISE_AND_NORM_LOOPS = {"_depthwise_conv7", "_depthwise_conv7_weight_grad", "_layer_norm_backward",
                            "_depthwise_conv7_layer_norm_keep", "_layer_norm_backward_kept"}
MLP_AND_GRN_LOOPS = {"_bias_gelu_keep", "_gelu_and_slope", "_scale_and_sum", "_bias_scale_residual_keep",
                     "_layer_scale_backward", "_grn_sums", "_grn_input_grad"}


def close(actual, expected, dtype, what=""):
    assert actual.dtype == dtype and actual.shape == expected.shape, (what, actual.dtype, actual.shape)
    scale = max(np.abs(expected).max(), 1.0)
    error = np.abs(actual.astype(np.float64) - expected).max() / scale
    assert error <= TOL[dtype], f"{what}: scaled error {error:.3g}"


def test_the_shapes_span_more_than_a_chunk():
    assert max(n * h for n, h, _, _ in SHAPES) > CHUNK_ROWS and max(n * h * w for n, h, w, _ in SHAPES) > CHUNK_PIXELS


def test_every_parallel_loop_is_tested():
    training = ({name for names in PARALLEL_LOOPS.values() for name in names} - FORWARD_LOOPS - VARIANT_LOOPS
                - BFLOAT16_LOOPS)
    assert len(training) == 13 and training == DEPTHWISE_AND_NORM_LOOPS | MLP_AND_GRN_LOOPS | {"_adamw"}, training


def random(rng, dtype, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_depthwise_conv_and_layer_norm_backward_match_the_reference(shape, dtype, kernel_threads):
    rng = np.random.default_rng(sum(shape))
    n, h, w, c = shape
    x, dout, shortcut = (random(rng, dtype, *shape) for _ in range(3))
    weight, bias = random(rng, dtype, 7, 7, c), random(rng, dtype, c)
    close(depthwise.depthwise_conv(x, weight, bias), layers.depthwise_conv(x, weight, bias), dtype, "conv")
    close(depthwise.depthwise_conv(x, weight, bias, shortcut), layers.depthwise_conv(x, weight, bias) + shortcut, dtype,
          "conv + shortcut")
    expected = layers.depthwise_conv_backward(dout, x, weight)
    for plus, got in ((0, depthwise.depthwise_conv_backward(dout, x, weight)),
                      (shortcut, depthwise.depthwise_conv_backward(dout, x, weight, shortcut))):
        for what, a, e in zip(("dx", "dweight", "dbias"), got, expected):
            close(a, e + plus if what == "dx" else e, dtype, f"conv backward {what}")
    norm_w, eps = random(rng, dtype, c), 1e-6
    conv = 3 + 2 * x  # LayerNorm inputs off zero mean and unit variance
    for what, a, e in zip(("dx", "dweight", "dbias"), layernorm.layer_norm_backward(dout, conv, norm_w, eps),
                          layers.layer_norm_backward(dout, conv, norm_w, eps)):
        close(a, e, dtype, f"LayerNorm backward {what}")
    normed, xhat, rstd = depthwise.depthwise_conv_layer_norm_keep(x, weight, bias, norm_w, bias, eps)
    conv = layers.depthwise_conv(x, weight, bias)
    close(normed, layers.layer_norm(conv, norm_w, bias, eps), dtype, "conv + LayerNorm")
    mean = conv.mean(axis=-1, keepdims=True)
    expected_rstd = 1 / np.sqrt(((conv - mean) ** 2).mean(axis=-1, keepdims=True) + eps)
    close(rstd, expected_rstd[..., 0], dtype, "rstd")
    close(xhat, (conv - mean) * expected_rstd, dtype, "xhat")
    expected = layers.layer_norm_backward(dout, conv, norm_w, eps)
    for what, a, e in zip(("dx", "dweight", "dbias"), layernorm.layer_norm_backward_kept(dout, xhat, rstd, norm_w), expected):
        close(a, e, dtype, f"LayerNorm backward from xhat {what}")
    overwritten = dout.copy()
    dx_in_place = layernorm.layer_norm_backward_kept(overwritten, xhat, rstd, norm_w, in_place=True)[0]
    np.testing.assert_array_equal(overwritten, dx_in_place)
    close(dx_in_place, expected[0], dtype, "LayerNorm backward in place")
    into = np.empty_like(x)
    dx_into = depthwise.depthwise_conv_backward(dout, x, weight, shortcut, out=into)[0]
    assert dx_into is into
    close(into, layers.depthwise_conv_backward(dout, x, weight)[0] + shortcut, dtype, "conv backward into out")
    assert set().union(*kernel_threads) == (DEPTHWISE_AND_NORM_LOOPS if numba.get_num_threads() > 1 else set())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_gelu_layer_scale_and_grn_kernels_match_the_reference(shape, dtype, kernel_threads):
    rng = np.random.default_rng(sum(shape) + 1)
    n, h, w, c = shape
    d = 4 * c
    hidden = random(rng, dtype, n * h * w, d, scale=3.0)  # well into both erf branches
    bias, d_act = random(rng, dtype, d), random(rng, dtype, n * h * w, d)
    kept = hidden.copy()
    close(mlp.bias_gelu_keep(kept, bias), layers.gelu(hidden + bias), dtype, "bias + GELU")
    np.testing.assert_array_equal(kept, hidden + bias)
    slope = kept.copy()
    activated = mlp.gelu_and_slope_in_place(slope)
    close(activated, layers.gelu(kept), dtype, "GELU recomputed")
    close(slope, layers.gelu_backward(np.ones_like(kept), kept), dtype, "GELU slope")
    expected = layers.gelu_backward(d_act, kept)
    d_hidden, d_bias = mlp.gelu_backward_with_bias(d_act.copy(), slope)
    close(d_hidden, expected, dtype, "GELU backward")
    close(d_bias, expected.sum(axis=0), dtype, "fc1 bias")

    branch, shortcut, dout = (random(rng, dtype, *shape) for _ in range(3))
    fc2_bias, gamma = random(rng, dtype, c), random(rng, dtype, c)
    keep = np.array([0.0, 2.0, 2.0][:n], dtype)  # drop path: the first image dropped
    for g in (gamma, None):
        for k in (keep, None):
            scale = (1 if g is None else g) * (1 if k is None else k[:, None, None, None])
            kept = branch.copy()
            close(mlp.bias_scale_residual_keep(kept, fc2_bias, g, k, shortcut),
                  shortcut + (branch + fc2_bias) * scale, dtype, "layer scale forward")
            np.testing.assert_array_equal(kept, branch + fc2_bias)
            d_branch, d_gamma, d_fc2_bias = mlp.layer_scale_backward(dout, kept, g, k)
            close(d_branch, dout * scale, dtype, "d branch")
            close(d_fc2_bias, (dout * scale).sum(axis=(0, 1, 2)), dtype, "fc2 bias")
            if g is None:
                assert d_gamma is None
            else:
                d_scaled = dout * (1 if k is None else k[:, None, None, None])
                close(d_gamma, (d_scaled * kept).sum(axis=(0, 1, 2)), dtype, "gamma")

    x, d_grn = random(rng, dtype, n, h, w, d), random(rng, dtype, n, h, w, d)
    x[..., 1] = 0  # a channel with no energy: its gradient through the norm is 0, as torch has it
    grn_w = random(rng, dtype, d)
    for what, a, e in zip(("dx", "dweight", "dbias"), grn.global_response_norm_backward(d_grn, x, grn_w, 1e-6),
                          layers.global_response_norm_backward(d_grn, x, grn_w, 1e-6)):
        close(a, e, dtype, f"GRN backward {what}")
    assert set().union(*kernel_threads) == (MLP_AND_GRN_LOOPS if numba.get_num_threads() > 1 else set())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_results_do_not_depend_on_the_thread_count(dtype):
    """Weight gradients are summed in fixed chunks added in order: the same bits on 1 and 2 threads."""
    rng = np.random.default_rng(3)
    shape = (3, 19, 13, 24)
    x, dout = random(rng, dtype, *shape), random(rng, dtype, *shape)
    weight, norm_w = random(rng, dtype, 7, 7, 24), random(rng, dtype, 24)
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            results.append([*depthwise.depthwise_conv_backward(dout, x, weight), *layernorm.layer_norm_backward(dout, x, norm_w, 1e-6),
                            *grn.global_response_norm_backward(dout, x, norm_w, 1e-6),
                            *mlp.layer_scale_backward(dout, x, norm_w, None)])
    finally:
        numba.set_num_threads(before)
    for serial, parallel in zip(*results):
        np.testing.assert_array_equal(parallel, serial)


def test_the_gelu_slope_underflows_cleanly_far_out():
    # exp(-x^2 / 2) is computed for exponents down to -708 and clamped there: no overflow, no NaN
    h = np.array([[-1e6, -60.0, -38.5, -8.0, 0.0, 8.0, 38.5, 60.0, 1e6]])
    slope = h.copy()
    activated = mlp.gelu_and_slope_in_place(slope)
    np.testing.assert_allclose(slope, layers.gelu_backward(np.ones_like(h), h), rtol=1e-15, atol=1e-300)
    np.testing.assert_array_equal(activated, layers.gelu(h))


def test_in_place_updates_refuse_arrays_they_cannot_update():
    hidden = np.zeros((8, 6), np.float32)
    with pytest.raises(InputError, match="in place"):
        mlp.bias_gelu_keep(hidden[:, :3], np.zeros(3, np.float32))


def test_training_kernels_as_plain_python_give_the_same_gradients():
    """NUMBA_DISABLE_JIT=1 runs the kernel bodies as Python (so coverage sees them): the numba
    backend's gradients must still equal the readable backend's."""
    import os
    import subprocess
    import sys

    code = ("import dataclasses, numpy as np; from npconvnext import train;"
            "from npconvnext.config import ConvNeXtConfig; from npconvnext.model import ConvNeXt;"
            "from npconvnext.params import random_state_dict;"
            "c = ConvNeXtConfig('t', depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), num_classes=3);"
            "x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)); y = np.array([0, 2]);"
            "r = [train.loss_and_grads(ConvNeXt(k, random_state_dict(k, seed=1), dtype='float64', backend=b), x, y,"
            " drop_path_rate=0.3, rng=np.random.default_rng(3))"
            " for k in (c, dataclasses.replace(c, use_grn=True, layer_scale=False)) for b in ('numpy', 'numba')];"
            "assert all(abs(a[0] - b[0]) < 1e-12 for a, b in (r[:2], r[2:]));"
            "assert all(np.abs(a[1][k] - b[1][k]).max() <= 1e-12 * np.abs(a[1][k]).max() for a, b in (r[:2], r[2:])"
            " for k in a[1])")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, NUMBA_DISABLE_JIT="1"), timeout=600)
