"""depthwise.py's row kernel against the reference convolution, and against its own loops."""

import numba
import numpy as np
import pytest

from npconvnext import layers
from npconvnext.engine import depthwise, llvm

TOL = {np.float32: 1e-5, np.float64: 1e-13}  # relative to the sum of |products|


@numba.njit
def _row(padded, img, row, weight, bias, acc):
    depthwise.depthwise_row(padded, img, row, weight, bias, acc)


@numba.njit
def _row_in_loops(padded, img, row, weight, bias, acc):
    # every output's bias and 49 products in the documented order, one fused multiply-add each
    width, c = acc.shape
    for j in range(width):
        for ch in range(c):
            total = bias[ch]
            for di in range(depthwise.TAPS):
                for dj in range(depthwise.TAPS):
                    total = llvm.fma(padded[img, row + di, j + dj, ch], weight[di, dj, ch], total)
            acc[j, ch] = total


# (N, H, W, C): channels that fill whole vectors, a part of one, fewer than one; widths that
# take the eight-wide blocks, the four-wide one, both
SHAPES = [(1, 7, 7, 48), (2, 5, 9, 13), (1, 3, 16, 40), (1, 4, 4, 1), (2, 6, 12, 24), (1, 2, 20, 17)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_a_row_is_the_reference_convolution_to_the_bit_of_its_loops(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    n, h, w, c = shape
    x = rng.standard_normal(shape).astype(dtype)
    weight, bias = rng.standard_normal((7, 7, c)).astype(dtype), rng.standard_normal(c).astype(dtype)
    padded = depthwise.pad_rows(x)
    assert padded.shape == (n, h + 6, -(-w // depthwise.BLOCK) * depthwise.BLOCK + 6, c)
    expected = layers.depthwise_conv(x.astype(np.float64), weight.astype(np.float64), bias.astype(np.float64))
    scale = layers.depthwise_conv(np.abs(x).astype(np.float64), np.abs(weight).astype(np.float64),
                                  np.abs(bias).astype(np.float64))
    wide = padded.shape[2] - 6
    for img in range(n):
        for row in range(h):
            ours, loops, plain = (np.full((wide, c), np.nan, dtype) for _ in range(3))
            _row(padded, img, row, weight, bias, ours)
            _row_in_loops(padded, img, row, weight, bias, loops)
            depthwise.depthwise_row(padded, img, row, weight, bias, plain)  # the twin NUMBA_DISABLE_JIT runs
            np.testing.assert_array_equal(ours, loops)
            for got in (ours[:w], plain[:w]):
                assert np.all(np.abs(got - expected[img, row]) <= TOL[dtype] * scale[img, row])


def test_arrays_the_intrinsic_does_not_take_go_through_the_numpy_twin():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 5, 8, 6))
    weight, bias = rng.standard_normal((7, 7, 6)), rng.standard_normal(6)
    expected = np.empty((8, 6))
    _row(depthwise.pad_rows(x), 0, 2, weight, bias, expected)
    for other in (np.asfortranarray(weight), weight.astype(np.float32)):  # not C-ordered; another dtype
        assert depthwise._depthwise_row_llvm(None, *(numba.typeof(a) for a in (
            depthwise.pad_rows(x), 0, 2, other, bias, expected))) is None
        ours = np.empty((8, 6))
        _row(depthwise.pad_rows(x), 0, 2, other, bias, ours)
        np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("change", ["width not a multiple of BLOCK", "wider than the padded row", "row past the end",
                                    "other channel count"])
def test_a_row_that_does_not_fit_the_padded_input_is_refused(change):
    rng = np.random.default_rng(0)
    padded = depthwise.pad_rows(rng.standard_normal((1, 5, 8, 6)))  # (1, 11, 14, 6)
    weight, bias, acc, row = rng.standard_normal((7, 7, 6)), rng.standard_normal(6), np.empty((8, 6)), 2
    if change == "width not a multiple of BLOCK":
        acc = np.empty((6, 6))
    elif change == "wider than the padded row":
        acc = np.empty((12, 6))
    elif change == "row past the end":
        row = 5
    else:
        weight, bias, acc = weight[..., :5].copy(), bias[:5].copy(), np.empty((8, 5))
    with pytest.raises(ValueError, match="padded row"):
        _row(padded, 0, row, weight, bias, acc)
