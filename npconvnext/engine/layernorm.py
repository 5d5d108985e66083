"""LayerNorm over channels (channels-last), forward and backward: the stem's and the
downsampling layers' norms, and the per-pixel steps depthwise.py fuses after its conv; timm's
other norms, RMS norm and simple norm (convnext_*_rms), forward only (training runs the reference's).

    forward    per pixel, mean and variance summed in float64 in a fixed order (`_lane_sum`:
               sixteen partial sums, in vector registers when compiled), then
               (x - mean) / sqrt(var + eps) * weight + bias; the RMS and simple norms from the
               same sums, x * r * weight with r = 1 / sqrt(mean_c(x^2) + eps), or
               1 / sqrt(var + eps) with var's unbiased divisor C - 1 (`rms_norm`, `simple_norm`)
    backward   per pixel, with g = dout * weight:
               dx = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)); dweight, dbias summed
               over pixels in float64 chunks (jit.py). Either from the input, the statistics
               recomputed (`layer_norm_backward`), or from the xhat and rstd the forward kept
               (`layer_norm_backward_kept`, after depthwise.py's `depthwise_conv_layer_norm_keep`)

Twins: layers.layer_norm, layers.layer_norm_backward, layers.rms_norm, layers.simple_norm.
`pixel_statistics` and `normalize_pixel` are the per-pixel steps depthwise.py calls, so that
training reproduces the forward's normalisation exactly.
"""

from __future__ import annotations

import math

import numba
import numba.extending
import numpy as np
from llvmlite import ir
from numba.core import cgutils

from ..errors import InputError
from .checks import check_arguments, check_in_place, kernel_weights, takes_array
from .jit import CHUNK_PIXELS, INLINE_JIT, JIT, PARALLEL_JIT, chunk_count, rows_or_parallel, sum_chunks
from .llvm import splat


_LANES = 16  # partial sums of a pixel's statistics: a fixed count, so the order is every machine's


def _lane_sum(x, center):
    """sum over i of (x[i] - center)^2 in float64 if center is not None, else of x[i]: x[i] goes
    to partial sum i % 16 (for i below len - len % 16; the rest to one more sum), and the
    sixteen are added in halves, 8 + 8, 4 + 4, 2 + 2, 1 + 1, then the rest. x: (C,).
    Compiled: for a contiguous x, the intrinsic below, the sixteen sums in vector registers
    (LLVM does not split a float sum itself: that would change its rounding)."""
    return _lane_sum_loops(x, center)


@numba.njit(**INLINE_JIT)
def _lane_sum_loops(x, center):
    # _lane_sum, written out: its plain-Python body, and the compiled one for a strided x
    n = x.shape[0]
    whole = n - n % _LANES
    lanes = np.zeros(_LANES)
    rest = 0.0
    for i in range(n):
        v = np.float64(x[i])
        if center is not None:
            v = (v - center) * (v - center)
        if i < whole:
            lanes[i % _LANES] += v
        else:
            rest += v
    width = _LANES
    while width > 1:
        width //= 2
        for lane in range(width):
            lanes[lane] += lanes[lane + width]
    return lanes[0] + rest


@numba.extending.intrinsic
def _lane_sum_llvm(typingctx, x, center):
    if not (isinstance(x, numba.types.Array) and x.ndim == 1 and x.layout == "C"
            and isinstance(x.dtype, numba.types.Float)
            and (isinstance(center, numba.types.NoneType) or center == numba.types.float64)):
        return None
    squares = not isinstance(center, numba.types.NoneType)

    def codegen(context, builder, sig, args):
        array = context.make_array(sig.args[0])(context, builder, args[0])
        double = ir.DoubleType()
        lanes = ir.VectorType(double, _LANES)
        loaded = ir.VectorType(context.get_value_type(sig.args[0].dtype), _LANES)
        intp = context.get_value_type(numba.types.intp)
        count = builder.extract_value(array.shape, 0)
        whole = builder.sub(count, builder.srem(count, ir.Constant(intp, _LANES)))
        mid = splat(builder, args[1] if squares else ir.Constant(double, 0.0), lanes)  # center in every lane
        total = cgutils.alloca_once_value(builder, ir.Constant(lanes, [0.0] * _LANES))
        rest = cgutils.alloca_once_value(builder, ir.Constant(double, 0.0))
        element = context.get_abi_sizeof(context.get_value_type(sig.args[0].dtype))

        def term(value):
            if not squares:
                return value
            d = builder.fsub(value, mid if value.type == lanes else args[1])
            return builder.fmul(d, d)

        with cgutils.for_range_slice(builder, ir.Constant(intp, 0), whole, ir.Constant(intp, _LANES)) as (i, _):
            chunk = builder.load(builder.bitcast(builder.gep(array.data, [i]), loaded.as_pointer()), align=element)
            wide = chunk if loaded == lanes else builder.fpext(chunk, lanes)
            builder.store(builder.fadd(builder.load(total), term(wide)), total)
        with cgutils.for_range_slice(builder, whole, count, ir.Constant(intp, 1)) as (i, _):
            value = builder.load(builder.gep(array.data, [i]))
            value = value if value.type == double else builder.fpext(value, double)
            builder.store(builder.fadd(builder.load(rest), term(value)), rest)
        folded, width = builder.load(total), _LANES
        while width > 1:  # halves: lanes [0, w/2) + [w/2, w)
            width //= 2
            low = builder.shuffle_vector(folded, folded, ir.Constant(ir.VectorType(ir.IntType(32), width),
                                                                     list(range(width))))
            high = builder.shuffle_vector(folded, folded, ir.Constant(ir.VectorType(ir.IntType(32), width),
                                                                      list(range(width, 2 * width))))
            folded = builder.fadd(low, high)
        return builder.fadd(builder.extract_element(folded, ir.Constant(ir.IntType(32), 0)), builder.load(rest))

    return numba.types.float64(x, center), codegen


@numba.extending.overload(_lane_sum, inline="always")
def _lane_sum_compiled(x, center):
    if isinstance(x, numba.types.Array) and x.layout == "C":
        return lambda x, center: _lane_sum_llvm(x, center)
    return lambda x, center: _lane_sum_loops(x, center)


@numba.njit(**INLINE_JIT)
def pixel_statistics(x, eps):
    # x: (C,) one pixel's channels -> (mean, 1 / sqrt(var + eps)), the sums in float64 (see
    # _lane_sum for their order). The training kernels reuse it to reproduce the forward's
    # normalisation exactly.
    c = x.shape[0]
    mean = _lane_sum(x, None) / c
    return mean, 1.0 / math.sqrt(_lane_sum(x, mean) / c + eps)


@numba.njit(**INLINE_JIT)
def normalize_pixel(x, weight, bias, eps, out):
    # x, out: (C,) one pixel's channels; LayerNorm with float64 statistics. Inlined: a call a
    # pixel, its arrays passed as structs, costs as much as the normalising
    mean, inv_std = pixel_statistics(x, eps)
    for ch in range(x.shape[0]):
        out[ch] = (x[ch] - mean) * inv_std * weight[ch] + bias[ch]


@numba.njit(**JIT)
def _layer_norm_rows(x, weight, bias, eps, out, first, last):
    # x, out: (M, C) pixels by channels; pixels first..last-1
    for i in range(first, last):
        normalize_pixel(x[i], weight, bias, eps, out[i])


@numba.njit(**PARALLEL_JIT)
def _layer_norm(x, weight, bias, eps, out):
    for i in numba.prange(x.shape[0]):
        _layer_norm_rows(x, weight, bias, eps, out, i, i + 1)


@numba.njit(**JIT)
def _rms_or_simple_norm_rows(x, weight, eps, simple, out, first, last):
    # x, out: (M, C) pixels by channels; pixels first..last-1: out = x * r * weight, r from
    # float64 sums: 1 / sqrt(mean_c(x^2) + eps) (RMS norm), or with `simple`
    # 1 / sqrt(sum_c (x - mean)^2 / (C - 1) + eps) (timm's SimpleNorm2d: not centred after)
    c = x.shape[1]
    for i in range(first, last):
        xi = x[i]
        if simple:
            r = 1.0 / math.sqrt(_lane_sum(xi, _lane_sum(xi, None) / c) / (c - 1) + eps)
        else:
            r = 1.0 / math.sqrt(_lane_sum(xi, 0.0) / c + eps)
        oi = out[i]
        for ch in range(c):
            oi[ch] = xi[ch] * r * weight[ch]


@numba.njit(**PARALLEL_JIT)
def _rms_or_simple_norm(x, weight, eps, simple, out):
    for i in numba.prange(x.shape[0]):
        _rms_or_simple_norm_rows(x, weight, eps, simple, out, i, i + 1)


# ---- backward -----------------------------------------------------------------------------------


@numba.njit(**INLINE_JIT)
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


@numba.njit(**JIT)
def _layer_norm_backward_rows(dout, x, weight, eps, dx, d_weight, d_bias, first, last):
    # dout, x, dx: (M, C) pixels by channels; d_weight, d_bias: (chunks, C) float64 partial sums
    # of chunks first..last-1 of CHUNK_PIXELS pixels; the statistics recomputed from x
    m, c = x.shape
    xhat = np.empty(c, np.float64)  # (C,) one pixel's normalised values
    for chunk in range(first, last):
        dw = d_weight[chunk]
        db = d_bias[chunk]
        dw[...] = 0.0
        db[...] = 0.0
        for i in range(chunk * CHUNK_PIXELS, min(m, (chunk + 1) * CHUNK_PIXELS)):
            xi = x[i]
            mean, rstd = pixel_statistics(xi, eps)
            for ch in range(c):
                xhat[ch] = (xi[ch] - mean) * rstd
            _layer_norm_backward_pixel(dout[i], xhat, rstd, weight, dx[i], dw, db)


@numba.njit(**PARALLEL_JIT)
def _layer_norm_backward(dout, x, weight, eps, dx, d_weight, d_bias):
    for chunk in numba.prange(d_weight.shape[0]):
        _layer_norm_backward_rows(dout, x, weight, eps, dx, d_weight, d_bias, chunk, chunk + 1)


@numba.njit(**JIT)
def _layer_norm_backward_kept_rows(dout, xhat, rstd, weight, dx, d_weight, d_bias, first, last):
    # as _layer_norm_backward_rows, from the forward's xhat (M, C) and rstd (M,) instead of x
    m = xhat.shape[0]
    for chunk in range(first, last):
        dw = d_weight[chunk]
        db = d_bias[chunk]
        dw[...] = 0.0
        db[...] = 0.0
        for i in range(chunk * CHUNK_PIXELS, min(m, (chunk + 1) * CHUNK_PIXELS)):
            _layer_norm_backward_pixel(dout[i], xhat[i], np.float64(rstd[i]), weight, dx[i], dw, db)


@numba.njit(**PARALLEL_JIT)
def _layer_norm_backward_kept(dout, xhat, rstd, weight, dx, d_weight, d_bias):
    for chunk in numba.prange(d_weight.shape[0]):
        _layer_norm_backward_kept_rows(dout, xhat, rstd, weight, dx, d_weight, d_bias, chunk, chunk + 1)


# ---- public wrappers: same signatures and results as their twins in layers.py ------------------


@takes_array("x")
def layer_norm(x, weight, bias, eps):
    """layers.layer_norm. x: (..., C) -> (..., C)"""
    check_arguments("layer_norm", "x", x, None, weight=(weight, x.shape[-1:]), bias=(bias, x.shape[-1:]))
    if x.size == 0:
        return np.empty_like(x)
    flat = np.ascontiguousarray(x).reshape(-1, x.shape[-1])  # (M, C)
    out = np.empty_like(flat)
    weight, bias = kernel_weights(flat.dtype, weight, bias)  # in x's dtype, as the result
    rows_or_parallel(_layer_norm_rows, _layer_norm, (flat, weight, bias, eps, out), flat.shape[0])
    return out.reshape(x.shape)


@takes_array("x")
def rms_norm(x, weight, bias, eps):
    """layers.rms_norm: x / sqrt(mean_c(x^2) + eps) * weight; bias None. x: (..., C) -> (..., C)"""
    return _run_rms_or_simple_norm("rms_norm", x, weight, bias, eps, simple=False)


@takes_array("x")
def simple_norm(x, weight, bias, eps):
    """layers.simple_norm: x / sqrt(var_c(x) + eps) * weight, var's divisor C - 1; bias None.
    x: (..., C) -> (..., C)"""
    return _run_rms_or_simple_norm("simple_norm", x, weight, bias, eps, simple=True)


def _run_rms_or_simple_norm(wrapper, x, weight, bias, eps, simple):
    check_arguments(wrapper, "x", x, None, weight=(weight, x.shape[-1:]))
    if bias is not None:
        raise InputError(f"{wrapper}: this norm has no bias, got one of shape {np.shape(bias)}")
    if x.size == 0:
        return np.empty_like(x)
    flat = np.ascontiguousarray(x).reshape(-1, x.shape[-1])  # (M, C)
    out = np.empty_like(flat)
    (weight,) = kernel_weights(flat.dtype, weight)  # in x's dtype, as the result
    rows_or_parallel(_rms_or_simple_norm_rows, _rms_or_simple_norm, (flat, weight, eps, simple, out), flat.shape[0])
    return out.reshape(x.shape)


def norm_of(kind: str):
    """The kernel of the norm config.norm names, as layers.norm_of gives its twin."""
    return {"layernorm": layer_norm, "rmsnorm": rms_norm, "simplenorm": simple_norm}[kind]


@takes_array("x")
def layer_norm_backward(dout, x, weight, eps):
    """layers.layer_norm_backward. dout, x: (..., C) -> dx (..., C), dweight (C,), dbias (C,)"""
    check_arguments("layer_norm_backward", "x", x, None, dout=(dout, x.size), weight=(weight, x.shape[-1:]))
    flat_x = np.ascontiguousarray(x).reshape(-1, x.shape[-1])                 # (M, C)
    flat_d = np.ascontiguousarray(dout, dtype=x.dtype).reshape(flat_x.shape)
    dx = np.empty_like(flat_x)
    chunks = chunk_count(flat_x.shape[0], CHUNK_PIXELS)
    d_weight = np.empty((chunks, flat_x.shape[1]))
    d_bias = np.empty((chunks, flat_x.shape[1]))
    rows_or_parallel(_layer_norm_backward_rows, _layer_norm_backward,
                      (flat_d, flat_x, np.ascontiguousarray(weight, dtype=x.dtype), eps, dx, d_weight, d_bias), chunks)
    return dx.reshape(x.shape), sum_chunks(d_weight, x.dtype), sum_chunks(d_bias, x.dtype)


@takes_array("xhat")
def layer_norm_backward_kept(dout, xhat, rstd, weight, in_place=False):
    """layers.layer_norm_backward from what depthwise_conv_layer_norm_keep kept; with
    in_place, dx is written over dout (each pixel's dout is read before its dx is written).
    dout, xhat: (..., C); rstd: (...) -> dx (..., C), dweight (C,), dbias (C,)"""
    check_arguments("layer_norm_backward_kept", "xhat", xhat, None, dout=(dout, xhat.size),
                    rstd=(rstd, xhat.size // max(1, xhat.shape[-1])), weight=(weight, xhat.shape[-1:]))
    flat_x = np.ascontiguousarray(xhat).reshape(-1, xhat.shape[-1])         # (M, C)
    if in_place:
        check_in_place("layer_norm_backward_kept", dout, dout.ndim)
    flat_d = np.ascontiguousarray(dout, dtype=xhat.dtype).reshape(flat_x.shape)
    dx = flat_d if in_place else np.empty_like(flat_x)
    chunks = chunk_count(flat_x.shape[0], CHUNK_PIXELS)
    d_weight, d_bias = np.empty((chunks, flat_x.shape[1])), np.empty((chunks, flat_x.shape[1]))
    rows_or_parallel(_layer_norm_backward_kept_rows, _layer_norm_backward_kept,
                      (flat_d, flat_x, np.ascontiguousarray(rstd).reshape(-1), np.ascontiguousarray(weight, dtype=xhat.dtype),
                       dx, d_weight, d_bias), chunks)
    return dx.reshape(xhat.shape), sum_chunks(d_weight, xhat.dtype), sum_chunks(d_bias, xhat.dtype)
