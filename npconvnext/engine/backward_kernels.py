"""Numba kernels for training: the backward passes BLAS does not do, and the forward steps
whose intermediate results the backward keeps.

    depthwise 7x7 conv            forward fused with the LayerNorm after it, keeping what the
      + LayerNorm                 LayerNorm's backward needs (xhat and 1 / std per pixel)
    depthwise 7x7 conv backward   input gradient, which is the same conv with the kernel turned
                                  180 degrees, with the block's shortcut gradient added in the
                                  same pass; weight and bias gradients
    LayerNorm backward            per pixel, from the kept xhat and 1 / std, or (stem,
                                  downsampling) with the statistics recomputed from the input
    bias + GELU                   keeping the pre-activation; recomputed in the backward with
                                  GELU's slope, so erf is evaluated once per element there
    GELU backward + fc1 bias      d hidden = d activated * slope, summed over pixels on the way
    layer scale and drop path     forward with the fc2 bias and the residual; backward with the
                                  gamma and fc2-bias gradients
    GRN backward (V2)             two passes over the hidden tensor
    AdamW                         one pass over a parameter and its two moments

Each kernel is a body over a range of rows, run as it is on one thread, and a parallel loop that
shares the rows between threads, chosen by `kernels._rows_or_parallel` as the forward kernels
are. Each has a twin in `npconvnext/layers.py` (or `train/optim.py`), and
`tests/engine/test_backward_kernels.py` checks them against each other.

Gradients of weights are sums over every pixel of the batch. Those sums go into float64 partial
sums, one set per fixed chunk of rows (`_CHUNK_ROWS`, `_CHUNK_PIXELS`), which are added up in
chunk order at the end: each chunk is one job of the parallel loop, so the result is the same,
to the bit, on any number of threads and in the serial body.
The forward's JIT settings (kernels._JIT): of fastmath only "contract", fused multiply-adds,
except in AdamW's update, which gives NumPy's steps to the bit (kernels._EXACT_JIT).
"""

from __future__ import annotations

import math

import numba
import numba.extending
import numpy as np

from .. import layers
from ..errors import InputError
from .checks import check_arguments, takes_array
from .kernels import (_EXACT_JIT, _EXACT_PARALLEL_JIT, _INLINE_JIT, _JIT, _PARALLEL_JIT, _SQRT_HALF, _TAPS,
                      _add_depthwise_taps, _erf_for, _exp_nonpositive, _pixel_statistics, _rows_or_parallel)

# Rows of a conv's input (image rows) and pixels of a per-pixel layer in one chunk of a weight
# gradient's partial sums: enough work to be worth a job, few enough partial sums to add cheaply.
_CHUNK_ROWS = 4
_CHUNK_PIXELS = 128


def _chunks(count: int, size: int) -> int:
    return -(-count // size)


# ---- depthwise 7x7 conv: forward and input gradient ----------------------------------------------


@numba.njit(**_JIT)
def _depthwise_conv7_rows(x, weight, bias, shortcut, out, first, last):
    # x, out: (N, H, W, C); weight: (7, 7, C); bias: (C,); shortcut: (N, H, W, C) added to out,
    # or None; the output rows first..last-1 of the N * H rows of all images
    n, h, w, c = x.shape
    for job in range(first, last):
        img = job // h
        row = job % h
        acc = out[img, row]                  # (W, C): accumulated where it is stored
        for j in range(w):
            for ch in range(c):
                acc[j, ch] = bias[ch]
        if shortcut is not None:
            for j in range(w):
                for ch in range(c):
                    acc[j, ch] += shortcut[img, row, j, ch]
        _add_depthwise_taps(x, img, row, weight, acc)


@numba.njit(**_PARALLEL_JIT)
def _depthwise_conv7(x, weight, bias, shortcut, out):
    n, h = x.shape[:2]
    for job in numba.prange(n * h):
        _depthwise_conv7_rows(x, weight, bias, shortcut, out, job, job + 1)


# ---- depthwise 7x7 conv: weight and bias gradients -----------------------------------------------


@numba.njit(**_JIT)
def _depthwise_conv7_weight_grad_rows(x, dout, d_weight, d_bias, first, last):
    # x, dout: (N, H, W, C); d_weight: (chunks, 7, 7, C), d_bias: (chunks, C), both float64: the
    # partial sums of chunks first..last-1, chunk k summing image rows k * _CHUNK_ROWS onwards
    #   d_weight[di, dj, ch] += x[row + di - 3, j + dj - 3, ch] * dout[row, j, ch]
    # One row's products are summed in the arrays' dtype first (at most W terms; it keeps the
    # loop in the dtype's SIMD width), then added to the chunk's float64 sums.
    n, h, w, c = x.shape
    pad = _TAPS // 2
    row_sum = np.empty(c, dtype=x.dtype)     # (C,)
    for chunk in range(first, last):
        dw = d_weight[chunk]                 # (7, 7, C)
        db = d_bias[chunk]                   # (C,)
        dw[...] = 0.0
        db[...] = 0.0
        for job in range(chunk * _CHUNK_ROWS, min(n * h, (chunk + 1) * _CHUNK_ROWS)):
            img = job // h
            row = job % h
            d_row = dout[img, row]           # (W, C)
            for j in range(w):
                for ch in range(c):
                    db[ch] += d_row[j, ch]
            for di in range(_TAPS):
                src_row = row + di - pad
                if src_row < 0 or src_row >= h:
                    continue
                x_row = x[img, src_row]      # (W, C)
                for dj in range(_TAPS):
                    row_sum[:] = 0
                    for j in range(max(0, pad - dj), min(w, w + pad - dj)):
                        src = x_row[j + dj - pad]
                        d = d_row[j]
                        for ch in range(c):
                            row_sum[ch] += src[ch] * d[ch]
                    acc = dw[di, dj]         # (C,)
                    for ch in range(c):
                        acc[ch] += row_sum[ch]


@numba.njit(**_PARALLEL_JIT)
def _depthwise_conv7_weight_grad(x, dout, d_weight, d_bias):
    for chunk in numba.prange(d_weight.shape[0]):
        _depthwise_conv7_weight_grad_rows(x, dout, d_weight, d_bias, chunk, chunk + 1)


# ---- LayerNorm backward --------------------------------------------------------------------------


@numba.njit(**_INLINE_JIT)
def _layer_norm_backward_pixel(d, xhat, rstd, weight, out, dw, db):
    # one pixel: d, xhat, out: (C,); rstd: its 1 / std; dw, db: (C,) float64 sums added to.
    # With g = d * weight: out = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat))
    c = xhat.shape[0]
    sum_g = sum_gx = 0.0
    for ch in range(c):
        dc = np.float64(d[ch])
        g = dc * weight[ch]
        sum_g += g
        sum_gx += g * xhat[ch]
        dw[ch] += dc * xhat[ch]
        db[ch] += dc
    mean_g = sum_g / c
    mean_gx = sum_gx / c
    for ch in range(c):
        out[ch] = rstd * ((np.float64(d[ch]) * weight[ch] - mean_g) - xhat[ch] * mean_gx)


@numba.njit(**_JIT)
def _layer_norm_backward_rows(dout, x, weight, eps, dx, d_weight, d_bias, first, last):
    # dout, x, dx: (M, C) pixels by channels; d_weight, d_bias: (chunks, C) float64 partial sums
    # of chunks first..last-1 of _CHUNK_PIXELS pixels; the statistics recomputed from x
    m, c = x.shape
    xhat = np.empty(c, np.float64)  # (C,) one pixel's normalised values
    for chunk in range(first, last):
        dw = d_weight[chunk]
        db = d_bias[chunk]
        dw[...] = 0.0
        db[...] = 0.0
        for i in range(chunk * _CHUNK_PIXELS, min(m, (chunk + 1) * _CHUNK_PIXELS)):
            xi = x[i]
            mean, rstd = _pixel_statistics(xi, eps)
            for ch in range(c):
                xhat[ch] = (xi[ch] - mean) * rstd
            _layer_norm_backward_pixel(dout[i], xhat, rstd, weight, dx[i], dw, db)


@numba.njit(**_PARALLEL_JIT)
def _layer_norm_backward(dout, x, weight, eps, dx, d_weight, d_bias):
    for chunk in numba.prange(d_weight.shape[0]):
        _layer_norm_backward_rows(dout, x, weight, eps, dx, d_weight, d_bias, chunk, chunk + 1)


@numba.njit(**_JIT)
def _depthwise_conv7_layer_norm_keep_rows(x, conv_w, conv_b, norm_w, norm_b, eps, xhat, rstd, normed, first, last):
    # x, xhat, normed: (N, H, W, C); rstd: (N, H, W); output rows first..last-1 of the N * H:
    # the conv into xhat, then per pixel xhat = (conv - mean) * rstd and normed = xhat * w + b,
    # with the forward's statistics (kernels._pixel_statistics)
    n, h, w, c = x.shape
    for job in range(first, last):
        img = job // h
        row = job % h
        _depthwise_conv7_rows(x, conv_w, conv_b, None, xhat, job, job + 1)
        for j in range(w):
            pixel = xhat[img, row, j]        # (C,) the conv output, in cache
            mean, inv_std = _pixel_statistics(pixel, eps)
            rstd[img, row, j] = inv_std
            out = normed[img, row, j]
            for ch in range(c):
                v = (pixel[ch] - mean) * inv_std
                pixel[ch] = v
                out[ch] = v * norm_w[ch] + norm_b[ch]


@numba.njit(**_PARALLEL_JIT)
def _depthwise_conv7_layer_norm_keep(x, conv_w, conv_b, norm_w, norm_b, eps, xhat, rstd, normed):
    n, h = x.shape[:2]
    for job in numba.prange(n * h):
        _depthwise_conv7_layer_norm_keep_rows(x, conv_w, conv_b, norm_w, norm_b, eps, xhat, rstd, normed, job, job + 1)


@numba.njit(**_JIT)
def _layer_norm_backward_kept_rows(dout, xhat, rstd, weight, dx, d_weight, d_bias, first, last):
    # as _layer_norm_backward_rows, from the forward's xhat (M, C) and rstd (M,) instead of x
    m = xhat.shape[0]
    for chunk in range(first, last):
        dw = d_weight[chunk]
        db = d_bias[chunk]
        dw[...] = 0.0
        db[...] = 0.0
        for i in range(chunk * _CHUNK_PIXELS, min(m, (chunk + 1) * _CHUNK_PIXELS)):
            _layer_norm_backward_pixel(dout[i], xhat[i], np.float64(rstd[i]), weight, dx[i], dw, db)


@numba.njit(**_PARALLEL_JIT)
def _layer_norm_backward_kept(dout, xhat, rstd, weight, dx, d_weight, d_bias):
    for chunk in numba.prange(d_weight.shape[0]):
        _layer_norm_backward_kept_rows(dout, xhat, rstd, weight, dx, d_weight, d_bias, chunk, chunk + 1)


# ---- GELU: forward keeping its input, and the slope for the backward --------------------------------


_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_EXP_LOWEST = -708.0  # exp below this is subnormal in float64; x exp(-x^2 / 2) is 0 to the last bit there


@numba.njit(**_JIT)
def _bias_gelu_keep_rows(hidden, bias, activated, first, last):
    # hidden, activated: (M, D); rows first..last-1: hidden += bias in place (kept for the
    # backward), activated = GELU(hidden), computed in float64 and rounded once, as
    # kernels._linear_gelu_panels_rows computes it
    d = hidden.shape[1]
    for i in range(first, last):
        h_row = hidden[i]
        a_row = activated[i]
        for ch in range(d):
            h_row[ch] += bias[ch]
            v = np.float64(h_row[ch])
            a_row[ch] = 0.5 * v * (1.0 + _erf_for(h_row[ch], v * _SQRT_HALF))


@numba.njit(**_PARALLEL_JIT)
def _bias_gelu_keep(hidden, bias, activated):
    for i in numba.prange(hidden.shape[0]):
        _bias_gelu_keep_rows(hidden, bias, activated, i, i + 1)


@numba.njit(**_JIT)
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
            cdf = 1.0 + _erf_for(h_row[ch], v * _SQRT_HALF)
            a_row[ch] = 0.5 * v * cdf
            density = _INV_SQRT_2PI * _exp_nonpositive(max(-0.5 * v * v, _EXP_LOWEST))
            h_row[ch] = 0.5 * cdf + v * density


@numba.njit(**_PARALLEL_JIT)
def _gelu_and_slope(hidden, activated):
    for i in numba.prange(hidden.shape[0]):
        _gelu_and_slope_rows(hidden, activated, i, i + 1)


@numba.njit(**_JIT)
def _scale_and_sum_rows(d, slope, sums, first, last):
    # d, slope: (M, D); sums: (chunks, D) float64; chunks first..last-1 of _CHUNK_PIXELS rows:
    # d *= slope in place, and each chunk's column sums of the product
    m, dim = d.shape
    for chunk in range(first, last):
        total = sums[chunk]
        total[...] = 0.0
        for i in range(chunk * _CHUNK_PIXELS, min(m, (chunk + 1) * _CHUNK_PIXELS)):
            row = d[i]
            s_row = slope[i]
            for ch in range(dim):
                row[ch] *= s_row[ch]
                total[ch] += row[ch]


@numba.njit(**_PARALLEL_JIT)
def _scale_and_sum(d, slope, sums):
    for chunk in numba.prange(sums.shape[0]):
        _scale_and_sum_rows(d, slope, sums, chunk, chunk + 1)


# ---- layer scale, drop path and the residual -----------------------------------------------------


@numba.njit(**_JIT)
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


@numba.njit(**_PARALLEL_JIT)
def _bias_scale_residual_keep(branch, bias, gamma, keep, shortcut, out):
    for img in numba.prange(branch.shape[0]):
        _bias_scale_residual_keep_rows(branch, bias, gamma, keep, shortcut, out, img, img + 1)


@numba.njit(**_JIT)
def _layer_scale_backward_rows(dout, branch, gamma, keep, d_branch, d_gamma, d_bias, first, last):
    # dout, branch, d_branch: (N, P, C); gamma (C,) or None; keep (N,) or None; d_gamma, d_bias:
    # (chunks, C) float64 partial sums, chunk k the _CHUNK_PIXELS pixels from k * _CHUNK_PIXELS of
    # the N * P. With s = dout * keep:  d_branch = s * gamma, d_gamma = sum s * branch,
    # d_bias (of fc2) = sum d_branch
    n, p, c = dout.shape
    for chunk in range(first, last):
        dg = d_gamma[chunk]
        db = d_bias[chunk]
        dg[...] = 0.0
        db[...] = 0.0
        for pixel in range(chunk * _CHUNK_PIXELS, min(n * p, (chunk + 1) * _CHUNK_PIXELS)):
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


@numba.njit(**_PARALLEL_JIT)
def _layer_scale_backward(dout, branch, gamma, keep, d_branch, d_gamma, d_bias):
    for chunk in numba.prange(d_gamma.shape[0]):
        _layer_scale_backward_rows(dout, branch, gamma, keep, d_branch, d_gamma, d_bias, chunk, chunk + 1)


# ---- GRN backward (V2) ---------------------------------------------------------------------------


@numba.njit(**_JIT)
def _grn_sums_rows(dout, x, sums, first, last):
    # dout, x: (N, P, D); sums: (N * chunks, 3, D) float64, chunks of _CHUNK_PIXELS pixels of each
    # image, jobs first..last-1 (job = image * chunks + chunk): sum of x^2, of dout * x, of dout
    n, p, d = x.shape
    per_image = sums.shape[0] // n
    for job in range(first, last):
        img = job // per_image
        chunk = job % per_image
        out = sums[job]
        out[...] = 0.0
        for px in range(chunk * _CHUNK_PIXELS, min(p, (chunk + 1) * _CHUNK_PIXELS)):
            x_row = x[img, px]
            d_row = dout[img, px]
            for ch in range(d):
                v = np.float64(x_row[ch])
                g = np.float64(d_row[ch])
                out[0, ch] += v * v
                out[1, ch] += g * v
                out[2, ch] += g


@numba.njit(**_PARALLEL_JIT)
def _grn_sums(dout, x, sums):
    for job in numba.prange(sums.shape[0]):
        _grn_sums_rows(dout, x, sums, job, job + 1)


@numba.njit(**_JIT)
def _grn_input_grad_rows(dout, x, scale, coef, dx, first, last):
    # dout, x, dx: (N, P, D); scale, coef: (N, D) float64; pixel rows first..last-1 of the N * P:
    #   dx = dout * scale + coef * x
    n, p, d = x.shape
    for pixel in range(first, last):
        img = pixel // p
        px = pixel % p
        x_row = x[img, px]
        d_row = dout[img, px]
        out = dx[img, px]
        s_row = scale[img]
        c_row = coef[img]
        for ch in range(d):
            out[ch] = d_row[ch] * s_row[ch] + c_row[ch] * x_row[ch]


@numba.njit(**_PARALLEL_JIT)
def _grn_input_grad(dout, x, scale, coef, dx):
    for pixel in numba.prange(x.shape[0] * x.shape[1]):
        _grn_input_grad_rows(dout, x, scale, coef, dx, pixel, pixel + 1)


# ---- AdamW ------------------------------------------------------------------------------------------

_CHUNK_ELEMENTS = 1 << 16  # elements of a parameter per job of the AdamW loop


@numba.njit(**_EXACT_JIT)
def _adamw_rows(param, grad, exp_avg, exp_avg_sq, decay, lerp_weight, lerp_rest, beta2, one_minus_beta2,
                step_size, bias_correction2_sqrt, eps, first, last):
    # param, grad, exp_avg, exp_avg_sq: (P,) flat, one dtype, as are the scalars; elements of
    # chunks first..last-1 of _CHUNK_ELEMENTS, each step rounded as train.optim.AdamW's NumPy
    # statements round it (torch's order): decay, lerp of the mean, the squares' average, update
    p = param.shape[0]
    for chunk in range(first, last):
        for i in range(chunk * _CHUNK_ELEMENTS, min(p, (chunk + 1) * _CHUNK_ELEMENTS)):
            g = grad[i]
            m = exp_avg[i]
            if lerp_weight < 0.5:                 # torch's lerp, from whichever end is nearer
                m = m + lerp_weight * (g - m)
            else:
                m = g - (g - m) * lerp_rest    # lerp_rest = 1 - lerp_weight
            v = exp_avg_sq[i] * beta2 + (one_minus_beta2 * g) * g
            denominator = np.sqrt(v) / bias_correction2_sqrt + eps
            param[i] = param[i] * decay - step_size * (m / denominator)
            exp_avg[i] = m
            exp_avg_sq[i] = v


@numba.njit(**_EXACT_PARALLEL_JIT)
def _adamw(param, grad, exp_avg, exp_avg_sq, decay, lerp_weight, lerp_rest, beta2, one_minus_beta2, step_size,
           bias_correction2_sqrt, eps):
    for chunk in numba.prange(_chunks_of(param.shape[0], _CHUNK_ELEMENTS)):
        _adamw_rows(param, grad, exp_avg, exp_avg_sq, decay, lerp_weight, lerp_rest, beta2, one_minus_beta2,
                    step_size, bias_correction2_sqrt, eps, chunk, chunk + 1)


@numba.njit(**_INLINE_JIT)
def _chunks_of(count, size):
    return (count + size - 1) // size


# ---- public wrappers: same signatures and results as their twins in layers.py -------------------


def _sum_chunks(partial: np.ndarray, dtype) -> np.ndarray:
    """Chunks' float64 partial sums (chunks, ...) added in chunk order, in the arrays' dtype."""
    return partial.sum(axis=0).astype(dtype)


@takes_array("x")
def depthwise_conv(x, weight, bias, shortcut=None, out=None):
    """layers.depthwise_conv, plus shortcut if given, into out if given (C-contiguous, neither
    x nor shortcut). x, shortcut: (N, H, W, C) -> (N, H, W, C)"""
    check_arguments("depthwise_conv", "x", x, 4, optional=("shortcut", "out"),
                    weight=(weight, np.shape(weight)[:2] + x.shape[-1:]), bias=(bias, x.shape[-1:]),
                    shortcut=(shortcut, x.shape), out=(out, x.shape))
    if weight.shape[:2] != (_TAPS, _TAPS):  # not a ConvNeXt size: the readable path
        out = layers.depthwise_conv(x, weight, bias)
        return out if shortcut is None else out + shortcut
    x = np.ascontiguousarray(x)
    if shortcut is not None:
        shortcut = np.ascontiguousarray(shortcut, dtype=x.dtype)
    if out is None:
        out = np.empty_like(x)
    else:
        _check_in_place("depthwise_conv", out, 4)
    _rows_or_parallel(_depthwise_conv7_rows, _depthwise_conv7, (x, np.ascontiguousarray(weight, dtype=x.dtype),
                      np.ascontiguousarray(bias, dtype=x.dtype), shortcut, out), x.shape[0] * x.shape[1])
    return out


@takes_array("x")
def depthwise_conv_backward(dout, x, weight, shortcut=None, out=None):
    """layers.depthwise_conv_backward, with shortcut (the gradient reaching the block's input
    the other way) added to dx if given, and dx written into out if given.
    dout, x: (N, H, W, C); weight: (7, 7, C) -> dx (N, H, W, C), dweight (7, 7, C), dbias (C,)"""
    check_arguments("depthwise_conv_backward", "x", x, 4, optional=("shortcut", "out"), dout=(dout, x.shape),
                    weight=(weight, np.shape(weight)[:2] + x.shape[-1:]), shortcut=(shortcut, x.shape),
                    out=(out, x.shape))
    if out is not None:
        _check_in_place("depthwise_conv_backward", out, 4)
    if weight.shape[:2] != (_TAPS, _TAPS):
        dx, dweight, dbias = layers.depthwise_conv_backward(dout, x, weight)
        return (dx if shortcut is None else dx + shortcut), dweight, dbias
    dout = np.ascontiguousarray(dout, dtype=x.dtype)
    x = np.ascontiguousarray(x)
    # dx[u, v] = sum_ij w[i, j] dout[u - i + 3, v - j + 3]: the same conv of dout with w turned 180 degrees
    turned = np.ascontiguousarray(weight[::-1, ::-1], dtype=x.dtype)
    dx = depthwise_conv(dout, turned, np.zeros(x.shape[-1], x.dtype), shortcut, out)
    n, h, w, c = x.shape
    chunks = _chunks(n * h, _CHUNK_ROWS)
    d_weight = np.empty((chunks, _TAPS, _TAPS, c))
    d_bias = np.empty((chunks, c))
    _rows_or_parallel(_depthwise_conv7_weight_grad_rows, _depthwise_conv7_weight_grad,
                      (x, dout, d_weight, d_bias), chunks)
    return dx, _sum_chunks(d_weight, x.dtype), _sum_chunks(d_bias, x.dtype)


@takes_array("x")
def layer_norm_backward(dout, x, weight, eps):
    """layers.layer_norm_backward. dout, x: (..., C) -> dx (..., C), dweight (C,), dbias (C,)"""
    check_arguments("layer_norm_backward", "x", x, None, dout=(dout, x.size), weight=(weight, x.shape[-1:]))
    flat_x = np.ascontiguousarray(x).reshape(-1, x.shape[-1])                 # (M, C)
    flat_d = np.ascontiguousarray(dout, dtype=x.dtype).reshape(flat_x.shape)
    dx = np.empty_like(flat_x)
    chunks = _chunks(flat_x.shape[0], _CHUNK_PIXELS)
    d_weight = np.empty((chunks, flat_x.shape[1]))
    d_bias = np.empty((chunks, flat_x.shape[1]))
    _rows_or_parallel(_layer_norm_backward_rows, _layer_norm_backward,
                      (flat_d, flat_x, np.ascontiguousarray(weight, dtype=x.dtype), eps, dx, d_weight, d_bias), chunks)
    return dx.reshape(x.shape), _sum_chunks(d_weight, x.dtype), _sum_chunks(d_bias, x.dtype)


@takes_array("x")
def depthwise_conv_layer_norm_keep(x, conv_w, conv_b, norm_w, norm_b, eps):
    """layers.layer_norm(layers.depthwise_conv(x, conv_w, conv_b), norm_w, norm_b, eps) in one
    pass, with what the LayerNorm's backward needs: the normalised conv output before the affine
    step, xhat = (conv - mean) * rstd, and rstd = 1 / sqrt(var + eps) per pixel.
    x: (N, H, W, C) -> normed (N, H, W, C), xhat (N, H, W, C), rstd (N, H, W)"""
    c = x.shape[-1]
    check_arguments("depthwise_conv_layer_norm_keep", "x", x, 4, conv_w=(conv_w, np.shape(conv_w)[:2] + (c,)),
                    conv_b=(conv_b, (c,)), norm_w=(norm_w, (c,)), norm_b=(norm_b, (c,)))
    if conv_w.shape[:2] != (_TAPS, _TAPS):  # not a ConvNeXt size: the readable path
        conv = layers.depthwise_conv(x, conv_w, conv_b)
        mean = conv.mean(axis=-1, keepdims=True)
        rstd = 1.0 / np.sqrt(((conv - mean) ** 2).mean(axis=-1, keepdims=True) + eps)
        xhat = (conv - mean) * rstd
        return xhat * norm_w + norm_b, xhat, rstd[..., 0]
    x = np.ascontiguousarray(x)
    xhat, normed = np.empty_like(x), np.empty_like(x)
    rstd = np.empty(x.shape[:3], x.dtype)
    args = (x, *(np.ascontiguousarray(a, dtype=x.dtype) for a in (conv_w, conv_b, norm_w, norm_b)), eps, xhat, rstd,
            normed)
    _rows_or_parallel(_depthwise_conv7_layer_norm_keep_rows, _depthwise_conv7_layer_norm_keep, args,
                      x.shape[0] * x.shape[1])
    return normed, xhat, rstd


@takes_array("xhat")
def layer_norm_backward_kept(dout, xhat, rstd, weight, in_place=False):
    """layers.layer_norm_backward from what depthwise_conv_layer_norm_keep kept; with
    in_place, dx is written over dout (each pixel's dout is read before its dx is written).
    dout, xhat: (..., C); rstd: (...) -> dx (..., C), dweight (C,), dbias (C,)"""
    check_arguments("layer_norm_backward_kept", "xhat", xhat, None, dout=(dout, xhat.size),
                    rstd=(rstd, xhat.size // max(1, xhat.shape[-1])), weight=(weight, xhat.shape[-1:]))
    flat_x = np.ascontiguousarray(xhat).reshape(-1, xhat.shape[-1])         # (M, C)
    if in_place:
        _check_in_place("layer_norm_backward_kept", dout, dout.ndim)
    flat_d = np.ascontiguousarray(dout, dtype=xhat.dtype).reshape(flat_x.shape)
    dx = flat_d if in_place else np.empty_like(flat_x)
    chunks = _chunks(flat_x.shape[0], _CHUNK_PIXELS)
    d_weight, d_bias = np.empty((chunks, flat_x.shape[1])), np.empty((chunks, flat_x.shape[1]))
    _rows_or_parallel(_layer_norm_backward_kept_rows, _layer_norm_backward_kept,
                      (flat_d, flat_x, np.ascontiguousarray(rstd).reshape(-1), np.ascontiguousarray(weight, dtype=xhat.dtype),
                       dx, d_weight, d_bias), chunks)
    return dx.reshape(xhat.shape), _sum_chunks(d_weight, xhat.dtype), _sum_chunks(d_bias, xhat.dtype)


@takes_array("hidden")
def bias_gelu_keep(hidden, bias):
    """layers.gelu(hidden + bias), with hidden += bias done in place (the backward keeps it).
    hidden: (M, D) C-contiguous -> (M, D)"""
    check_arguments("bias_gelu_keep", "hidden", hidden, 2, bias=(bias, hidden.shape[-1:]))
    _check_in_place("bias_gelu_keep", hidden, 2)
    activated = np.empty_like(hidden)
    _rows_or_parallel(_bias_gelu_keep_rows, _bias_gelu_keep, (hidden, np.ascontiguousarray(bias, dtype=hidden.dtype),
                      activated), hidden.shape[0])
    return activated


@takes_array("hidden")
def gelu_and_slope_in_place(hidden):
    """layers.gelu(hidden), and hidden replaced by GELU's slope there, d GELU / d hidden
    (layers.gelu_backward of ones): the backward needs the input no more once it has both.
    hidden: (M, D) C-contiguous -> (M, D)"""
    check_arguments("gelu_and_slope_in_place", "hidden", hidden, 2)
    _check_in_place("gelu_and_slope_in_place", hidden, 2)
    activated = np.empty_like(hidden)
    _rows_or_parallel(_gelu_and_slope_rows, _gelu_and_slope, (hidden, activated), hidden.shape[0])
    return activated


@takes_array("slope")
def gelu_backward_with_bias(d_activated, slope):
    """layers.gelu_backward from the slope, and the gradient of the bias added before the GELU:
    d_activated * slope (in place on d_activated when it is C-contiguous and of slope's dtype), and
    its sum over pixels. d_activated, slope: (..., D) -> (..., D), (D,)"""
    check_arguments("gelu_backward_with_bias", "slope", slope, None, d_activated=(d_activated, slope.size))
    flat_s = np.ascontiguousarray(slope).reshape(-1, slope.shape[-1])                        # (M, D)
    flat_d = np.ascontiguousarray(d_activated, dtype=slope.dtype).reshape(flat_s.shape)
    chunks = _chunks(flat_s.shape[0], _CHUNK_PIXELS)
    sums = np.empty((chunks, flat_s.shape[1]))
    _rows_or_parallel(_scale_and_sum_rows, _scale_and_sum, (flat_d, flat_s, sums), chunks)
    return flat_d.reshape(slope.shape), _sum_chunks(sums, slope.dtype)


@takes_array("branch")
def bias_scale_residual_keep(branch, bias, gamma, keep, shortcut):
    """shortcut + keep * gamma * (branch + bias), with branch += bias done in place (the backward
    keeps it for gamma's gradient). gamma None (V2) means 1; keep (N,) drop-path scales per image,
    None means 1. branch: (N, H, W, C) C-contiguous; shortcut: (N, H, W, C) -> (N, H, W, C)"""
    c = branch.shape[-1]
    check_arguments("bias_scale_residual_keep", "branch", branch, 4, optional=("gamma", "keep"), bias=(bias, (c,)),
                    gamma=(gamma, c), keep=(keep, branch.shape[0]), shortcut=(shortcut, branch.size))
    _check_in_place("bias_scale_residual_keep", branch, 4)
    n = branch.shape[0]
    shortcut = np.ascontiguousarray(shortcut, dtype=branch.dtype)
    out = np.empty_like(branch)
    args = (branch.reshape(n, -1, branch.shape[-1]), np.ascontiguousarray(bias, dtype=branch.dtype),
            _optional(gamma, branch.dtype), _optional(keep, branch.dtype), shortcut.reshape(n, -1, branch.shape[-1]),
            out.reshape(n, -1, branch.shape[-1]))
    _rows_or_parallel(_bias_scale_residual_keep_rows, _bias_scale_residual_keep, args, n)
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
    chunks = _chunks(dout.shape[0] * dout.shape[1], _CHUNK_PIXELS)
    d_gamma, d_bias = np.empty((chunks, c)), np.empty((chunks, c))
    _rows_or_parallel(_layer_scale_backward_rows, _layer_scale_backward,
                      (dout, flat_branch, _optional(gamma, branch.dtype), _optional(keep, branch.dtype), d_branch,
                       d_gamma, d_bias), chunks)
    return (d_branch.reshape(branch.shape), None if gamma is None else _sum_chunks(d_gamma, branch.dtype),
            _sum_chunks(d_bias, branch.dtype))


def _check_in_place(wrapper, array, ndim):
    if array.ndim != ndim or not array.flags.c_contiguous or not array.flags.writeable:
        raise InputError(f"{wrapper}: expected a writeable C-contiguous {ndim}-D array to update in place, got "
                         f"{array.ndim}-D, contiguous {array.flags.c_contiguous}")


def adamw_update(param, grad, exp_avg, exp_avg_sq, decay, lerp_weight, beta2, step_size,
                 bias_correction2_sqrt, eps):
    """One AdamW step in place on param and its moments, all of one dtype and memory layout (C
    or Fortran contiguous), as train.optim.AdamW computes it in NumPy:
        param *= decay;  exp_avg = lerp(exp_avg, grad, lerp_weight)
        exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * grad^2
        param -= step_size * exp_avg / (sqrt(exp_avg_sq) / bias_correction2_sqrt + eps)
    The scalars are rounded to the arrays' dtype first, as NumPy rounds them."""
    arrays = (param, grad, exp_avg, exp_avg_sq)
    if (not all(isinstance(a, np.ndarray) for a in arrays)
            or len({(a.dtype, a.shape, a.strides) for a in arrays}) != 1
            or not all(a.flags.writeable for a in arrays[::2])
            or not (param.flags.c_contiguous or param.flags.f_contiguous)):
        raise InputError("adamw_update: AdamW's arrays must share one dtype, shape and contiguous layout, "
                         "and be writeable")
    flat = [a.reshape(-1) if a.flags.c_contiguous else a.T.reshape(-1) for a in arrays]  # views, memory order
    scalar = param.dtype.type
    args = (*flat, scalar(decay), scalar(lerp_weight), scalar(1.0 - lerp_weight), scalar(beta2), scalar(1.0 - beta2),
            scalar(step_size), scalar(bias_correction2_sqrt), scalar(eps))
    chunks = _chunks(param.size, _CHUNK_ELEMENTS)
    if chunks == 1:  # a bias or norm scale: not worth waking threads
        _adamw_rows(*args, 0, 1)
    else:
        _rows_or_parallel(_adamw_rows, _adamw, args, chunks)


def _optional(array, dtype):
    return None if array is None else np.ascontiguousarray(array, dtype=dtype).reshape(-1)


@takes_array("x")
def global_response_norm_backward(dout, x, weight, eps):
    """layers.global_response_norm_backward. dout, x: (N, H, W, D) -> dx, dweight (D,), dbias (D,)

    Two passes: per-channel sums over each image's pixels (of x^2, dout * x and dout), then
    dx = dout * (1 + weight * n) + (dg / g) * x per pixel, with the per-image coefficients
    worked out in between from the sums, as the twin's docstring derives them."""
    check_arguments("global_response_norm_backward", "x", x, 4, dout=(dout, x.size), weight=(weight, x.shape[-1:]))
    n, h, w, d = x.shape
    x3 = np.ascontiguousarray(x).reshape(n, h * w, d)                        # (N, P, D)
    d3 = np.ascontiguousarray(dout, dtype=x.dtype).reshape(x3.shape)
    per_image = _chunks(h * w, _CHUNK_PIXELS)
    sums = np.empty((n * per_image, 3, d))
    _rows_or_parallel(_grn_sums_rows, _grn_sums, (d3, x3, sums), n * per_image)
    square, d_times_x, d_sum = sums.reshape(n, per_image, 3, d).sum(axis=1).transpose(1, 0, 2)  # 3 x (N, D)
    weight64 = weight.astype(np.float64)
    energy = np.sqrt(square)                                                 # (N, D) g
    denominator = energy.mean(axis=-1, keepdims=True) + eps                  # (N, 1) mean(g) + eps
    relative = energy / denominator                                          # (N, D) n
    d_relative = weight64 * d_times_x                                        # (N, D) dn
    d_energy = d_relative / denominator - (d_relative * energy).sum(axis=-1, keepdims=True) / (d * denominator ** 2)
    coef = np.where(energy > 0, d_energy / np.where(energy > 0, energy, 1.0), 0.0)  # 0 where g = 0, as torch
    scale = 1.0 + weight64 * relative
    dx = np.empty_like(x3)
    _rows_or_parallel(_grn_input_grad_rows, _grn_input_grad, (d3, x3, scale, coef, dx), n * h * w)
    return (dx.reshape(x.shape), (relative * d_times_x).sum(axis=0).astype(x.dtype),
            d_sum.sum(axis=0).astype(x.dtype))
