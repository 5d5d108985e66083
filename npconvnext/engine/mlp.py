"""The block's MLP: fc1 + GELU + fc2 + layer scale + residual, forward and backward.

    inference   panel by panel in one kernel (`mlp_residual`): a panel of pixels through fc1 +
                GELU into the hidden activations, (4C, NR), and at once through fc2 + layer
                scale + residual, so the hidden tensor never leaves the cache (linear.py's
                tiles); with too few panels for the threads, linear.py's weight-stationary
                linears one after the other. A bfloat16 model's (uint16 weights) the same
                way, by the same kernels on pair panels, their layout chosen by the weights'
                type when Numba compiles them (`_panel_scratch`; bfloat16.py, gemm_bf16.py).
                GELU alone (`gelu`) for timm's overlap_act stem and pre-logits head
    training    the linears are BLAS products (block.py); around them, bias + GELU keeping
                the pre-activation (`bias_gelu_keep`), GELU recomputed in the backward with
                its slope, so erf is evaluated once per element there (`gelu_and_slope_in_place`),
                d hidden = d activated * slope with fc1's bias gradient on the way
                (`gelu_backward_with_bias`); fc2's bias + layer scale + drop path + residual
                keeping the branch (`bias_scale_residual_keep`) and its backward with the gamma
                and fc2-bias gradients (`layer_scale_backward`), summed in float64 chunks (jit.py)

Twins: layers.linear, layers.linear_bfloat16, layers.gelu, layers.gelu_backward; network.block's
layer scale.
"""

from __future__ import annotations

import math

import numba
import numba.extending
import numpy as np

from ..errors import InputError
from .bfloat16 import pair_rows
from .checks import check_arguments, check_in_place, kernel_weights, last_dimension, takes_array
from .erf import SQRT_HALF, erf_for, exp_nonpositive, gelu_value
from .gemm import TILES, tile_shape
from .jit import CHUNK_PIXELS, INLINE_JIT, JIT, PARALLEL_JIT, chunk_count, rows_or_parallel, sum_chunks
from .linear import (fc1_gelu_tile, fc2_residual_tile, linear_gelu_pairs, linear_gelu_panels, pack_panel,
                     pairs_linear, panels_linear)


@numba.njit(**JIT)
def _mlp_rows(y, fc1, fc1_bias, fc2, fc2_bias, gamma, shortcut, out, first, last):
    # out (M, C) = shortcut + gamma * (GELU(y @ fc1.T + fc1_bias) @ fc2.T + fc2_bias), panel by
    # panel: panels first..last-1. y, shortcut, out: (M, C); fc1: (4C, C); fc2: (C, 4C).
    # bfloat16: fc1, fc2 uint16 rows (C, 4C even: bfloat16.pair_rows), each panel rounded to
    # bfloat16 pairs once, fc1 + GELU writing fc2's pair panel
    mr, nr = tile_shape(fc1)
    # (C, NR), (4C, NR); bfloat16: (C/2, NR, 2), (2C, NR, 2) pairs
    panel, hidden = _panel_scratch(y.shape[1], fc1.shape[0], nr, y.dtype, fc1.dtype)
    tile = np.empty((mr, nr), dtype=y.dtype)                    # (MR, NR)
    tile_t = np.empty((nr, mr), dtype=y.dtype)                  # (NR, MR)
    for p in range(first, last):
        pack_panel(y, p * nr, panel)
        for c0 in range(0, fc1.shape[0], mr):
            fc1_gelu_tile(panel, min(nr, y.shape[0] - p * nr), fc1, fc1_bias, c0, tile, hidden)
        for c0 in range(0, fc2.shape[0], mr):
            fc2_residual_tile(hidden, fc2, fc2_bias, gamma, shortcut, out, p * nr, c0, tile_t)


@numba.njit(**PARALLEL_JIT)
def _mlp(y, fc1, fc1_bias, fc2, fc2_bias, gamma, shortcut, out):
    nr = tile_shape(fc1)[1]
    for p in numba.prange(-(-y.shape[0] // nr)):
        _mlp_rows(y, fc1, fc1_bias, fc2, fc2_bias, gamma, shortcut, out, p, p + 1)


def _panel_scratch(channels, hidden_channels, nr, dtype, weight_dtype):
    """The scratch of one panel of the MLP: the packed input and the hidden activations,
    (channels, NR) and (hidden_channels, NR) of `dtype`; with bfloat16 weights (weight_dtype
    uint16), pair panels (ceil(channels/2), NR, 2) and (ceil(hidden_channels/2), NR, 2) uint16.
    Compiled, the choice is made once per type. Sizes and dtypes, not arrays: an array passed
    to an inlined function is reference-counted again, in the kernel's machine code."""
    if weight_dtype == np.uint16:
        return _pair_scratch(channels, hidden_channels, nr)
    return _float_scratch(channels, hidden_channels, nr, dtype)


@numba.extending.overload(_panel_scratch, inline="always")
def _panel_scratch_compiled(channels, hidden_channels, nr, dtype, weight_dtype):
    if weight_dtype.dtype == numba.types.uint16:
        return lambda channels, hidden_channels, nr, dtype, weight_dtype: _pair_scratch(channels, hidden_channels, nr)
    return (lambda channels, hidden_channels, nr, dtype, weight_dtype:
            _float_scratch(channels, hidden_channels, nr, dtype))


@numba.njit(**INLINE_JIT)
def _float_scratch(channels, hidden_channels, nr, dtype):
    return np.empty((channels, nr), dtype=dtype), np.empty((hidden_channels, nr), dtype=dtype)


@numba.njit(**INLINE_JIT)
def _pair_scratch(channels, hidden_channels, nr):
    panel = np.empty(((channels + 1) // 2, nr, 2), dtype=np.uint16)
    hidden = np.zeros(((hidden_channels + 1) // 2, nr, 2), dtype=np.uint16)  # an odd count's pad is read: 0
    return panel, hidden


# ---- GELU alone: timm's overlap_act stem and pre-logits head (network.Ops.gelu) ------------------


@numba.njit(**JIT)
def _gelu_rows(x, out, first, last):
    # x, out: (M, D); rows first..last-1: out = GELU(x) (erf.gelu_value, as every GELU kernel)
    d = x.shape[1]
    for i in range(first, last):
        x_row = x[i]
        o_row = out[i]
        for ch in range(d):
            o_row[ch] = gelu_value(x_row[ch])


@numba.njit(**PARALLEL_JIT)
def _gelu(x, out):
    for i in numba.prange(x.shape[0]):
        _gelu_rows(x, out, i, i + 1)


# ---- training: GELU keeping its input, and the slope for the backward ---------------------------


_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_EXP_LOWEST = -708.0  # exp below this is subnormal in float64; x exp(-x^2 / 2) is 0 to the last bit there


@numba.njit(**JIT)
def _bias_gelu_keep_rows(hidden, bias, activated, first, last):
    # hidden, activated: (M, D); rows first..last-1: hidden += bias in place (kept for the
    # backward), activated = GELU(hidden) (erf.gelu_value, as every GELU kernel)
    d = hidden.shape[1]
    for i in range(first, last):
        h_row = hidden[i]
        a_row = activated[i]
        for ch in range(d):
            h_row[ch] += bias[ch]
            a_row[ch] = gelu_value(h_row[ch])


@numba.njit(**PARALLEL_JIT)
def _bias_gelu_keep(hidden, bias, activated):
    for i in numba.prange(hidden.shape[0]):
        _bias_gelu_keep_rows(hidden, bias, activated, i, i + 1)


@numba.njit(**JIT)
def _gelu_and_slope_rows(hidden, activated, first, last):
    # hidden, activated: (M, D); rows first..last-1: activated = GELU(hidden) as
    # _bias_gelu_keep_rows gives it, and hidden replaced by GELU's slope there,
    # Phi(h) + h phi(h), from the same erf
    d = hidden.shape[1]
    for i in range(first, last):
        h_row = hidden[i]
        a_row = activated[i]
        for ch in range(d):
            v = np.float64(h_row[ch])
            cdf = 1.0 + erf_for(h_row[ch], v * SQRT_HALF)
            a_row[ch] = 0.5 * v * cdf
            density = _INV_SQRT_2PI * exp_nonpositive(max(-0.5 * v * v, _EXP_LOWEST))
            h_row[ch] = 0.5 * cdf + v * density


@numba.njit(**PARALLEL_JIT)
def _gelu_and_slope(hidden, activated):
    for i in numba.prange(hidden.shape[0]):
        _gelu_and_slope_rows(hidden, activated, i, i + 1)


@numba.njit(**JIT)
def _scale_and_sum_rows(d, slope, sums, first, last):
    # d, slope: (M, D); sums: (chunks, D) float64; chunks first..last-1 of CHUNK_PIXELS rows:
    # d *= slope in place, and each chunk's column sums of the product
    m, dim = d.shape
    for chunk in range(first, last):
        total = sums[chunk]
        total[...] = 0.0
        for i in range(chunk * CHUNK_PIXELS, min(m, (chunk + 1) * CHUNK_PIXELS)):
            row = d[i]
            s_row = slope[i]
            for ch in range(dim):
                row[ch] *= s_row[ch]
                total[ch] += row[ch]


@numba.njit(**PARALLEL_JIT)
def _scale_and_sum(d, slope, sums):
    for chunk in numba.prange(sums.shape[0]):
        _scale_and_sum_rows(d, slope, sums, chunk, chunk + 1)


# ---- training: layer scale, drop path and the residual ------------------------------------------


@numba.njit(**JIT)
def _bias_scale_residual_keep_rows(branch, bias, gamma, keep, shortcut, out, first, last):
    # branch, shortcut, out: (N, P, C); gamma: (C,) or None (1); keep: (N,) drop-path scale per
    # image or None (1); images first..last-1: branch += bias in place (kept for the backward),
    # out = shortcut + (branch * gamma) * keep
    n, p, c = branch.shape
    for img in range(first, last):
        for px in range(p):
            b_row = branch[img, px]
            s_row = shortcut[img, px]
            o_row = out[img, px]
            for ch in range(c):
                b_row[ch] += bias[ch]
                v = b_row[ch]
                if gamma is not None:
                    v = v * gamma[ch]
                if keep is not None:
                    v = v * keep[img]
                o_row[ch] = s_row[ch] + v


@numba.njit(**PARALLEL_JIT)
def _bias_scale_residual_keep(branch, bias, gamma, keep, shortcut, out):
    for img in numba.prange(branch.shape[0]):
        _bias_scale_residual_keep_rows(branch, bias, gamma, keep, shortcut, out, img, img + 1)


@numba.njit(**JIT)
def _layer_scale_backward_rows(dout, branch, gamma, keep, d_branch, d_gamma, d_bias, first, last):
    # dout, branch, d_branch: (N, P, C); gamma (C,) or None; keep (N,) or None; d_gamma, d_bias:
    # (chunks, C) float64 partial sums, chunk k the CHUNK_PIXELS pixels from k * CHUNK_PIXELS of
    # the N * P. With s = dout * keep:  d_branch = s * gamma, d_gamma = sum s * branch,
    # d_bias (of fc2) = sum d_branch
    n, p, c = dout.shape
    for chunk in range(first, last):
        dg = d_gamma[chunk]
        db = d_bias[chunk]
        dg[...] = 0.0
        db[...] = 0.0
        for pixel in range(chunk * CHUNK_PIXELS, min(n * p, (chunk + 1) * CHUNK_PIXELS)):
            img = pixel // p
            px = pixel % p
            d_row = dout[img, px]
            b_row = branch[img, px]
            out = d_branch[img, px]
            for ch in range(c):
                s = d_row[ch]
                if keep is not None:
                    s = s * keep[img]
                v = s
                if gamma is not None:
                    dg[ch] += np.float64(s) * b_row[ch]
                    v = s * gamma[ch]
                out[ch] = v
                db[ch] += v


@numba.njit(**PARALLEL_JIT)
def _layer_scale_backward(dout, branch, gamma, keep, d_branch, d_gamma, d_bias):
    for chunk in numba.prange(d_gamma.shape[0]):
        _layer_scale_backward_rows(dout, branch, gamma, keep, d_branch, d_gamma, d_bias, chunk, chunk + 1)


# ---- public wrappers: same signatures and results as their twins in layers.py ------------------


# Panel by panel, each thread takes whole panels: only with at least this many a thread (the
# last share may be smaller by one panel); fewer, and the threads share out the channels instead.
_PANELS_PER_THREAD = 4


@takes_array("y")
def mlp_residual(y, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, shortcut):
    """shortcut + gamma * layers.linear(layers.gelu(layers.linear(y, fc1_weight, fc1_bias)),
    fc2_weight, fc2_bias); gamma None means 1. Panel by panel in one kernel where there are
    panels enough for every thread (on one thread, always: the hidden activations never leave
    the cache); else fc1 and fc2 one after the other, weight-stationary, the channels shared
    out. y, shortcut: (..., C) -> (..., C)"""
    c, d = y.shape[-1], last_dimension(fc1_weight)
    check_arguments("mlp_residual", "y", y, None, optional=("gamma",), fc1_weight=(fc1_weight, (c, d)),
                    fc1_bias=(fc1_bias, (d,)), fc2_weight=(fc2_weight, (d, c)), fc2_bias=(fc2_bias, (c,)),
                    gamma=(gamma, (c,)), shortcut=(shortcut, y.shape))
    bfloat16 = fc1_weight.dtype == np.uint16  # the linears as bfloat16 bits: pair panels (bfloat16.py)
    if bfloat16 != (fc2_weight.dtype == np.uint16):
        raise InputError(f"mlp_residual: fc1_weight is {fc1_weight.dtype} and fc2_weight {fc2_weight.dtype}: both "
                         "bfloat16 bits (uint16) or neither")
    flat = np.ascontiguousarray(y, np.float32 if bfloat16 else None).reshape(-1, y.shape[-1])  # (M, C)
    panels = -(-flat.shape[0] // TILES[flat.dtype][1])
    threads = numba.get_num_threads()
    if threads > 1 and panels < _PANELS_PER_THREAD * threads:
        if bfloat16:
            return pairs_linear(linear_gelu_pairs(flat, fc1_weight, fc1_bias), fc2_weight, fc2_bias, gamma, shortcut)
        hidden = linear_gelu_panels(flat, fc1_weight, fc1_bias)              # (P, 4C, NR)
        return panels_linear(hidden, fc2_weight, fc2_bias, gamma, shortcut)
    residual = np.ascontiguousarray(shortcut, flat.dtype).reshape(flat.shape)  # (M, C)
    out = np.empty_like(residual)
    if bfloat16:
        fc1, fc2 = pair_rows(fc1_weight), pair_rows(fc2_weight)              # (4C, C), (C, 4C): the bits in place
        fc1_bias, fc2_bias, gamma = kernel_weights(np.float32, fc1_bias, fc2_bias, gamma)
    else:
        fc1, fc1_bias, fc2, fc2_bias, gamma = kernel_weights(y.dtype, fc1_weight.T, fc1_bias, fc2_weight.T, fc2_bias,
                                                              gamma)  # fc1 (4C, C), fc2 (C, 4C): views of the weights
    rows_or_parallel(_mlp_rows, _mlp, (flat, fc1, fc1_bias, fc2, fc2_bias, gamma, residual, out), panels,
                      blas_between=False)
    return out.reshape(shortcut.shape)


@takes_array("x")
def gelu(x):
    """layers.gelu. x: (..., D) -> (..., D)"""
    check_arguments("gelu", "x", x, None)
    if x.size == 0:
        return np.empty_like(x)
    flat = np.ascontiguousarray(x).reshape(-1, x.shape[-1])  # (M, D)
    out = np.empty_like(flat)
    rows_or_parallel(_gelu_rows, _gelu, (flat, out), flat.shape[0])
    return out.reshape(x.shape)


@takes_array("hidden")
def bias_gelu_keep(hidden, bias):
    """layers.gelu(hidden + bias), with hidden += bias done in place (the backward keeps it).
    hidden: (M, D) C-contiguous -> (M, D)"""
    check_arguments("bias_gelu_keep", "hidden", hidden, 2, bias=(bias, hidden.shape[-1:]))
    check_in_place("bias_gelu_keep", hidden, 2)
    activated = np.empty_like(hidden)
    rows_or_parallel(_bias_gelu_keep_rows, _bias_gelu_keep, (hidden, np.ascontiguousarray(bias, dtype=hidden.dtype),
                      activated), hidden.shape[0])
    return activated


@takes_array("hidden")
def gelu_and_slope_in_place(hidden):
    """layers.gelu(hidden), and hidden replaced by GELU's slope there, d GELU / d hidden
    (layers.gelu_backward of ones): the backward needs the input no more once it has both.
    hidden: (M, D) C-contiguous -> (M, D)"""
    check_arguments("gelu_and_slope_in_place", "hidden", hidden, 2)
    check_in_place("gelu_and_slope_in_place", hidden, 2)
    activated = np.empty_like(hidden)
    rows_or_parallel(_gelu_and_slope_rows, _gelu_and_slope, (hidden, activated), hidden.shape[0])
    return activated


@takes_array("slope")
def gelu_backward_with_bias(d_activated, slope):
    """layers.gelu_backward from the slope, and the gradient of the bias added before the GELU:
    d_activated * slope (in place on d_activated when it is C-contiguous and of slope's dtype), and
    its sum over pixels. d_activated, slope: (..., D) -> (..., D), (D,)"""
    check_arguments("gelu_backward_with_bias", "slope", slope, None, d_activated=(d_activated, slope.size))
    flat_s = np.ascontiguousarray(slope).reshape(-1, slope.shape[-1])                        # (M, D)
    flat_d = np.ascontiguousarray(d_activated, dtype=slope.dtype).reshape(flat_s.shape)
    chunks = chunk_count(flat_s.shape[0], CHUNK_PIXELS)
    sums = np.empty((chunks, flat_s.shape[1]))
    rows_or_parallel(_scale_and_sum_rows, _scale_and_sum, (flat_d, flat_s, sums), chunks)
    return flat_d.reshape(slope.shape), sum_chunks(sums, slope.dtype)


@takes_array("branch")
def bias_scale_residual_keep(branch, bias, gamma, keep, shortcut):
    """shortcut + keep * gamma * (branch + bias), with branch += bias done in place (the backward
    keeps it for gamma's gradient). gamma None (V2) means 1; keep (N,) drop-path scales per image,
    None means 1. branch: (N, H, W, C) C-contiguous; shortcut: (N, H, W, C) -> (N, H, W, C)"""
    c = branch.shape[-1]
    check_arguments("bias_scale_residual_keep", "branch", branch, 4, optional=("gamma", "keep"), bias=(bias, (c,)),
                    gamma=(gamma, c), keep=(keep, branch.shape[0]), shortcut=(shortcut, branch.size))
    check_in_place("bias_scale_residual_keep", branch, 4)
    n = branch.shape[0]
    shortcut = np.ascontiguousarray(shortcut, dtype=branch.dtype)
    out = np.empty_like(branch)
    args = (branch.reshape(n, -1, branch.shape[-1]), np.ascontiguousarray(bias, dtype=branch.dtype),
            _optional(gamma, branch.dtype), _optional(keep, branch.dtype), shortcut.reshape(n, -1, branch.shape[-1]),
            out.reshape(n, -1, branch.shape[-1]))
    rows_or_parallel(_bias_scale_residual_keep_rows, _bias_scale_residual_keep, args, n)
    return out


@takes_array("branch")
def layer_scale_backward(dout, branch, gamma, keep):
    """Gradients of out = shortcut + keep * gamma * branch, apart from the shortcut's:
    dout, branch: (N, H, W, C); gamma (C,) or None; keep (N,) or None
    -> d branch (N, H, W, C), d gamma (C,) or None, and the sum of d branch over pixels (C,)"""
    check_arguments("layer_scale_backward", "branch", branch, 4, optional=("gamma", "keep"), dout=(dout, branch.size),
                    gamma=(gamma, branch.shape[-1]), keep=(keep, branch.shape[0]))
    n, c = branch.shape[0], branch.shape[-1]
    dout = np.ascontiguousarray(dout, dtype=branch.dtype).reshape(n, -1, c)     # (N, P, C)
    flat_branch = np.ascontiguousarray(branch).reshape(dout.shape)
    d_branch = np.empty_like(dout)
    chunks = chunk_count(dout.shape[0] * dout.shape[1], CHUNK_PIXELS)
    d_gamma, d_bias = np.empty((chunks, c)), np.empty((chunks, c))
    rows_or_parallel(_layer_scale_backward_rows, _layer_scale_backward,
                      (dout, flat_branch, _optional(gamma, branch.dtype), _optional(keep, branch.dtype), d_branch,
                       d_gamma, d_bias), chunks)
    return (d_branch.reshape(branch.shape), None if gamma is None else sum_chunks(d_gamma, branch.dtype),
            sum_chunks(d_bias, branch.dtype))


def _optional(array, dtype):
    return None if array is None else np.ascontiguousarray(array, dtype=dtype).reshape(-1)
