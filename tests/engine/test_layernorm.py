"""layernorm.py's per-pixel sums: one summation order, compiled or not."""

import math

import numba
import numpy as np
import pytest

from npconvnext.engine import layernorm


@numba.njit
def _lane_sums(x, center):
    return layernorm._lane_sum(x, None), layernorm._lane_sum(x, center), layernorm._lane_sum(x[::2], center)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 96, 100, 3072])
def test_a_pixels_sums_take_one_order_compiled_or_not(n, dtype):
    # the vector sums (contiguous), the loops (strided) and the plain-Python body: the same bits
    x = np.random.default_rng(n).standard_normal(n).astype(dtype) + 3
    center = float(x.mean())
    compiled = _lane_sums(x, center)
    plain = (layernorm._lane_sum(x, None), layernorm._lane_sum(x, center), layernorm._lane_sum(x[::2], center))
    assert compiled == plain
    assert abs(compiled[0] - math.fsum(x.astype(np.float64))) <= 1e-13 * n * 4
    assert abs(compiled[1] - math.fsum((x.astype(np.float64) - center) ** 2)) <= 1e-13 * n * 10
