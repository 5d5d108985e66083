"""The ConvNeXt block's 7x7 depthwise convolution, with the LayerNorm after it, forward and
backward.

ConvNeXt's token mixer convolves every channel with its own 7x7 kernel (Liu et al., "A ConvNet
for the 2020s", 2022, section 2.5; timm's `conv_dw`).

    inference   conv + bias + LayerNorm in one pass, an output row at a time, on a zero-padded
                copy (`depthwise_row`, below; then layernorm.py's per-pixel step)
    training    conv + LayerNorm keeping xhat and rstd for the backward
                (`depthwise_conv_layer_norm_keep`); the input gradient, which is the same conv
                with the kernel turned 180 degrees, with the block's shortcut gradient added in
                the same pass (`depthwise_conv_backward`); weight and bias gradients summed in
                float64 chunks of image rows (jit.py)

Channels-last, a vector holds neighbouring channels of one pixel, and each output is its bias
plus 49 products, the taps taken row by row (di), then along the row (dj), one fused
multiply-add each (the plain-NumPy twin below sums in the same order but rounds each product
before adding it).

Written as Numba loops, LLVM vectorises the channel loop but reloads and stores the running sums
once per tap row and re-checks, on entering it, that no output overlaps the 17 inputs it
reads, which a row of 96 channels does not amortise. `depthwise_row` is therefore LLVM IR
through a Numba intrinsic (llvm.py explains the idiom), as gemm.py's micro-kernel is: for each
vector of channels, eight (or, at the end of a row, four) neighbouring outputs keep their sums
in registers for all 49 taps; each loaded input serves up to seven of them. Channels past the
last whole vector take the same steps on scalars. Its plain-NumPy body is the twin under
NUMBA_DISABLE_JIT=1 and for arrays the intrinsic does not take (not contiguous, not aligned,
neither float32 nor float64). The training kernels sum their taps in Numba loops
(`_add_depthwise_taps`), on the unpadded input.

Twins: layers.depthwise_conv, layers.depthwise_conv_backward, layers.layer_norm.
"""

from __future__ import annotations

import numba
import numba.extending
import numpy as np
from llvmlite import ir
from numba.core import cgutils

from .. import layers
from .checks import check_arguments, check_in_place, kernel_weights, takes_array
from .jit import CHUNK_ROWS, INLINE_JIT, JIT, PARALLEL_JIT, chunk_count, rows_or_parallel, sum_chunks
from .layernorm import layer_norm, normalize_pixel, pixel_statistics
from .llvm import fused_multiply_add, vector_registers


TAPS = 7  # ConvNeXt's depthwise kernel is 7 x 7 in every timm variant
BLOCK = 4  # a padded row's width is a multiple of this: outputs go eight, then four, at a time
_WIDE_BLOCK = 2 * BLOCK


def pad_rows(x):
    """x: (N, H, W, C) -> (N, H + 6, W' + 6, C): x zero-padded by 3 on every side and its width
    rounded up to a multiple of BLOCK, as depthwise_row reads it"""
    n, h, w, c = x.shape
    pad = TAPS // 2
    padded = np.zeros((n, h + 2 * pad, -(-w // BLOCK) * BLOCK + 2 * pad, c), dtype=x.dtype)
    padded[:, pad : pad + h, pad : pad + w] = x
    return padded


def depthwise_row(padded, img, row, weight, bias, acc):
    """acc[j, ch] = bias[ch] + sum over di, dj of padded[img, row + di, j + dj, ch] * weight[di, dj, ch]
    for every j < W', summed di by di, dj by dj (see the module docstring).
    padded: (N, H + 6, W' + 6, C) a zero-padded input, W' a multiple of BLOCK; weight: (7, 7, C);
    bias: (C,); acc: (W', C). Compiled: the intrinsic below for contiguous arrays, after checking
    the shapes (a ValueError: it would read and write past them otherwise)."""
    _depthwise_row_numpy(padded, img, row, weight, bias, acc)


def _depthwise_row_numpy(padded, img, row, weight, bias, acc):
    # depthwise_row's twin: NumPy, or Numba's loops for arrays the intrinsic does not take
    width = acc.shape[0]
    acc[:] = bias
    for di in range(TAPS):
        for dj in range(TAPS):
            acc += padded[img, row + di, dj : dj + width] * weight[di, dj]  # (W', C)


def _depthwise_row_llvm(typingctx, padded, img, row, weight, bias, acc):
    arrays = (padded, weight, bias, acc)
    if not (all(isinstance(a, numba.types.Array) and a.layout == "C" and a.aligned for a in arrays)
            and [a.ndim for a in arrays] == [4, 3, 1, 2]
            and acc.dtype in (numba.types.float32, numba.types.float64) and all(a.dtype == acc.dtype for a in arrays)
            and isinstance(img, numba.types.Integer) and isinstance(row, numba.types.Integer)):
        return None
    dtype = acc.dtype
    vector_bytes, _ = vector_registers()
    lanes = vector_bytes // np.dtype(str(dtype)).itemsize
    signature = numba.types.void(padded, img, row, weight, bias, acc)

    def codegen(context, builder, sig, args):
        padded_value, img_value, row_value, weight_value, bias_value, acc_value = args
        padded_array = context.make_array(sig.args[0])(context, builder, padded_value)
        weight_array = context.make_array(sig.args[3])(context, builder, weight_value)
        bias_array = context.make_array(sig.args[4])(context, builder, bias_value)
        acc_array = context.make_array(sig.args[5])(context, builder, acc_value)
        scalar = context.get_value_type(dtype)
        intp = context.get_value_type(numba.types.intp)
        align = context.get_abi_sizeof(scalar)

        def const(i):
            return ir.Constant(intp, i)

        def index(value, position):
            return context.cast(builder, value, sig.args[position], numba.types.intp)

        _, rows, columns, channels = cgutils.unpack_tuple(builder, padded_array.shape, 4)
        width = builder.extract_value(acc_array.shape, 0)                              # W'
        # element offset of padded[img, row, 0, 0]
        start = builder.mul(builder.add(builder.mul(index(img_value, 1), rows), index(row_value, 2)), columns)
        start = builder.mul(start, channels)
        row_step = builder.mul(columns, channels)                                      # a padded row
        whole = builder.sub(channels, builder.srem(channels, const(lanes)))

        def outputs(kind, count, ch, j0):
            # acc[j0 : j0 + count, ch : ch + lanes of kind]: the sums over the 49 taps
            def load(array_data, offset):
                pointer = builder.bitcast(builder.gep(array_data, [offset]), kind.as_pointer())
                return builder.load(pointer, align=align)

            first = load(bias_array.data, ch)
            sums = [first] * count
            for di in range(TAPS):
                tap_row = builder.add(builder.add(start, builder.mul(const(di), row_step)), ch)
                inputs = [load(padded_array.data, builder.add(tap_row, builder.mul(builder.add(j0, const(t)),
                                                                                    channels)))
                          for t in range(count + TAPS - 1)]                               # padded[.., j0 + t, ch]
                for dj in range(TAPS):
                    tap = load(weight_array.data, builder.add(builder.mul(const(di * TAPS + dj), channels), ch))
                    sums = [fused_multiply_add(builder, inputs[b + dj], tap, sums[b]) for b in range(count)]
            for b in range(count):
                pointer = builder.gep(acc_array.data, [builder.add(builder.mul(builder.add(j0, const(b)), channels), ch)])
                builder.store(sums[b], builder.bitcast(pointer, kind.as_pointer()), align=align)

        def row_of(kind, step, first_channel, last_channel):
            # every output of the row, for channels first..last-1 taken `step` at a time
            wide_end = builder.sub(width, builder.srem(width, const(_WIDE_BLOCK)))
            with cgutils.for_range_slice(builder, first_channel, last_channel, const(step)) as (ch, _):
                with cgutils.for_range_slice(builder, const(0), wide_end, const(_WIDE_BLOCK)) as (j0, _):
                    outputs(kind, _WIDE_BLOCK, ch, j0)
                with builder.if_then(builder.icmp_signed("<", wide_end, width)):
                    outputs(kind, BLOCK, ch, wide_end)

        row_of(ir.VectorType(scalar, lanes), lanes, const(0), whole)
        row_of(scalar, 1, whole, channels)
        return context.get_dummy_value()

    return signature, codegen


_depthwise_row_intrinsic = numba.extending.intrinsic(_depthwise_row_llvm)


@numba.extending.overload(depthwise_row, inline="always")
def _depthwise_row_compiled(padded, img, row, weight, bias, acc):
    if _depthwise_row_llvm(None, padded, img, row, weight, bias, acc) is None:
        return _depthwise_row_numpy

    def checked(padded, img, row, weight, bias, acc):
        n, rows, columns, c = padded.shape
        width = acc.shape[0]
        if (width % BLOCK != 0 or width + TAPS - 1 > columns or acc.shape[1] != c or bias.shape[0] != c
                or weight.shape[0] != TAPS or weight.shape[1] != TAPS or weight.shape[2] != c
                or not 0 <= img < n or not 0 <= row <= rows - TAPS):
            raise ValueError("depthwise_row: shapes that do not fit a padded row (see pad_rows)")
        _depthwise_row_intrinsic(padded, img, row, weight, bias, acc)
    return checked


# ---- inference: conv + bias + LayerNorm, a padded row at a time ---------------------------------


@numba.njit(**JIT)
def _depthwise_conv7_layer_norm_rows(padded, conv_w, conv_b, norm_w, norm_b, eps, out, first, last):
    # out: (N, H, W, C) = LayerNorm(7x7 depthwise conv of x + conv_b), given x zero-padded:
    # padded: (N, H + 6, W' + 6, C), x at [3 : 3 + H, 3 : 3 + W], W' = W rounded up to
    # depthwise.BLOCK; conv_w: (7, 7, C); conv_b, norm_w, norm_b: (C,); output rows
    # first..last-1 of the N * H. The padding spares the edges their own loop.
    n, h, w, c = out.shape
    acc = np.empty((padded.shape[2] - (TAPS - 1), c), dtype=out.dtype)  # (W', C) the row being summed
    for job in range(first, last):
        img = job // h
        row = job % h
        depthwise_row(padded, img, row, conv_w, conv_b, acc)
        for j in range(w):
            normalize_pixel(acc[j], norm_w, norm_b, eps, out[img, row, j])


@numba.njit(**PARALLEL_JIT)
def _depthwise_conv7_layer_norm(padded, conv_w, conv_b, norm_w, norm_b, eps, out):
    # all N * H output rows, one per job
    n, h = out.shape[:2]
    for job in numba.prange(n * h):
        _depthwise_conv7_layer_norm_rows(padded, conv_w, conv_b, norm_w, norm_b, eps, out, job, job + 1)


# ---- training: the conv on the unpadded input, and its gradients --------------------------------


@numba.njit(**INLINE_JIT)
def _add_depthwise_taps(x, img, row, weight, acc):
    # acc: (W, C) += output row `row` of image `img` of the 7x7 depthwise conv of x (N, H, W, C)
    # by weight (7, 7, C), zero padding; for the training kernels (inference's
    # _depthwise_conv7_layer_norm_rows reads a padded copy instead)
    h, w, c = x.shape[1:]
    pad = TAPS // 2
    for di in range(TAPS):
        src_row = row + di - pad
        if src_row < 0 or src_row >= h:
            continue
        x_row = x[img, src_row]          # (W, C)
        w_row = weight[di]               # (7, C)
        for j in range(w):
            dst = acc[j]                 # (C,)
            if pad <= j < w - pad:
                # the hot path: all seven taps inside the row, summed in a register per
                # channel (the tap loop is unrolled, the channel loop vectorised), one load
                # and one store of the accumulator instead of seven
                window = x_row[j - pad : j + pad + 1]  # (7, C)
                for ch in range(c):
                    total = dst[ch]
                    for dj in range(TAPS):
                        total += window[dj, ch] * w_row[dj, ch]
                    dst[ch] = total
            else:  # within 3 pixels of the left or right edge: only the taps that land inside
                for dj in range(max(0, pad - j), min(TAPS, w + pad - j)):
                    src = x_row[j + dj - pad]  # (C,)
                    tap = w_row[dj]            # (C,)
                    for ch in range(c):
                        dst[ch] += src[ch] * tap[ch]


@numba.njit(**JIT)
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


@numba.njit(**PARALLEL_JIT)
def _depthwise_conv7(x, weight, bias, shortcut, out):
    n, h = x.shape[:2]
    for job in numba.prange(n * h):
        _depthwise_conv7_rows(x, weight, bias, shortcut, out, job, job + 1)


@numba.njit(**JIT)
def _depthwise_conv7_weight_grad_rows(x, dout, d_weight, d_bias, first, last):
    # x, dout: (N, H, W, C); d_weight: (chunks, 7, 7, C), d_bias: (chunks, C), both float64: the
    # partial sums of chunks first..last-1, chunk k summing image rows k * CHUNK_ROWS onwards
    #   d_weight[di, dj, ch] += x[row + di - 3, j + dj - 3, ch] * dout[row, j, ch]
    # One row's products are summed in the arrays' dtype first (at most W terms; it keeps the
    # loop in the dtype's SIMD width), then added to the chunk's float64 sums.
    n, h, w, c = x.shape
    pad = TAPS // 2
    row_sum = np.empty(c, dtype=x.dtype)     # (C,)
    for chunk in range(first, last):
        dw = d_weight[chunk]                 # (7, 7, C)
        db = d_bias[chunk]                   # (C,)
        dw[...] = 0.0
        db[...] = 0.0
        for job in range(chunk * CHUNK_ROWS, min(n * h, (chunk + 1) * CHUNK_ROWS)):
            img = job // h
            row = job % h
            d_row = dout[img, row]           # (W, C)
            for j in range(w):
                for ch in range(c):
                    db[ch] += d_row[j, ch]
            for di in range(TAPS):
                src_row = row + di - pad
                if src_row < 0 or src_row >= h:
                    continue
                x_row = x[img, src_row]      # (W, C)
                for dj in range(TAPS):
                    row_sum[:] = 0
                    for j in range(max(0, pad - dj), min(w, w + pad - dj)):
                        src = x_row[j + dj - pad]
                        d = d_row[j]
                        for ch in range(c):
                            row_sum[ch] += src[ch] * d[ch]
                    acc = dw[di, dj]         # (C,)
                    for ch in range(c):
                        acc[ch] += row_sum[ch]


@numba.njit(**PARALLEL_JIT)
def _depthwise_conv7_weight_grad(x, dout, d_weight, d_bias):
    for chunk in numba.prange(d_weight.shape[0]):
        _depthwise_conv7_weight_grad_rows(x, dout, d_weight, d_bias, chunk, chunk + 1)


@numba.njit(**JIT)
def _depthwise_conv7_layer_norm_keep_rows(x, conv_w, conv_b, norm_w, norm_b, eps, xhat, rstd, normed, first, last):
    # x, xhat, normed: (N, H, W, C); rstd: (N, H, W); output rows first..last-1 of the N * H:
    # the conv into xhat, then per pixel xhat = (conv - mean) * rstd and normed = xhat * w + b,
    # with the forward's statistics (layernorm.py's pixel_statistics)
    n, h, w, c = x.shape
    for job in range(first, last):
        img = job // h
        row = job % h
        _depthwise_conv7_rows(x, conv_w, conv_b, None, xhat, job, job + 1)
        for j in range(w):
            pixel = xhat[img, row, j]        # (C,) the conv output, in cache
            mean, inv_std = pixel_statistics(pixel, eps)
            rstd[img, row, j] = inv_std
            out = normed[img, row, j]
            for ch in range(c):
                v = (pixel[ch] - mean) * inv_std
                pixel[ch] = v
                out[ch] = v * norm_w[ch] + norm_b[ch]


@numba.njit(**PARALLEL_JIT)
def _depthwise_conv7_layer_norm_keep(x, conv_w, conv_b, norm_w, norm_b, eps, xhat, rstd, normed):
    n, h = x.shape[:2]
    for job in numba.prange(n * h):
        _depthwise_conv7_layer_norm_keep_rows(x, conv_w, conv_b, norm_w, norm_b, eps, xhat, rstd, normed, job, job + 1)


# ---- public wrappers: same signatures and results as their twins in layers.py ------------------


@takes_array("x")
def depthwise_conv_layer_norm(x, conv_w, conv_b, norm_w, norm_b, eps):
    """layers.layer_norm(layers.depthwise_conv(x, conv_w, conv_b), norm_w, norm_b, eps)
    x: (N, H, W, C) -> (N, H, W, C)"""
    c = x.shape[-1]
    check_arguments("depthwise_conv_layer_norm", "x", x, 4, conv_w=(conv_w, np.shape(conv_w)[:2] + (c,)),
                    conv_b=(conv_b, (c,)), norm_w=(norm_w, (c,)), norm_b=(norm_b, (c,)))
    if conv_w.shape[:2] != (TAPS, TAPS):  # not a ConvNeXt size: the readable path, then LN
        return layer_norm(layers.depthwise_conv(x, conv_w, conv_b), norm_w, norm_b, eps)
    n, h, w, c = x.shape
    padded = pad_rows(x)                                       # (N, H+6, W'+6, C)
    conv_w, conv_b = kernel_weights(x.dtype, conv_w, conv_b)
    norm_w, norm_b = kernel_weights(x.dtype, norm_w, norm_b)  # in x's dtype, as the result
    out = np.empty_like(x)
    rows_or_parallel(_depthwise_conv7_layer_norm_rows, _depthwise_conv7_layer_norm,
                      (padded, conv_w, conv_b, norm_w, norm_b, eps, out), n * h, blas_between=False)  # N * H rows
    return out


@takes_array("x")
def depthwise_conv(x, weight, bias, shortcut=None, out=None):
    """layers.depthwise_conv, plus shortcut if given, into out if given (C-contiguous, neither
    x nor shortcut). x, shortcut: (N, H, W, C) -> (N, H, W, C)"""
    check_arguments("depthwise_conv", "x", x, 4, optional=("shortcut", "out"),
                    weight=(weight, np.shape(weight)[:2] + x.shape[-1:]), bias=(bias, x.shape[-1:]),
                    shortcut=(shortcut, x.shape), out=(out, x.shape))
    if weight.shape[:2] != (TAPS, TAPS):  # not a ConvNeXt size: the readable path
        out = layers.depthwise_conv(x, weight, bias)
        return out if shortcut is None else out + shortcut
    x = np.ascontiguousarray(x)
    if shortcut is not None:
        shortcut = np.ascontiguousarray(shortcut, dtype=x.dtype)
    if out is None:
        out = np.empty_like(x)
    else:
        check_in_place("depthwise_conv", out, 4)
    rows_or_parallel(_depthwise_conv7_rows, _depthwise_conv7, (x, np.ascontiguousarray(weight, dtype=x.dtype),
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
        check_in_place("depthwise_conv_backward", out, 4)
    if weight.shape[:2] != (TAPS, TAPS):
        dx, dweight, dbias = layers.depthwise_conv_backward(dout, x, weight)
        return (dx if shortcut is None else dx + shortcut), dweight, dbias
    dout = np.ascontiguousarray(dout, dtype=x.dtype)
    x = np.ascontiguousarray(x)
    # dx[u, v] = sum_ij w[i, j] dout[u - i + 3, v - j + 3]: the same conv of dout with w turned 180 degrees
    turned = np.ascontiguousarray(weight[::-1, ::-1], dtype=x.dtype)
    dx = depthwise_conv(dout, turned, np.zeros(x.shape[-1], x.dtype), shortcut, out)
    n, h, w, c = x.shape
    chunks = chunk_count(n * h, CHUNK_ROWS)
    d_weight = np.empty((chunks, TAPS, TAPS, c))
    d_bias = np.empty((chunks, c))
    rows_or_parallel(_depthwise_conv7_weight_grad_rows, _depthwise_conv7_weight_grad,
                      (x, dout, d_weight, d_bias), chunks)
    return dx, sum_chunks(d_weight, x.dtype), sum_chunks(d_bias, x.dtype)


@takes_array("x")
def depthwise_conv_layer_norm_keep(x, conv_w, conv_b, norm_w, norm_b, eps):
    """layers.layer_norm(layers.depthwise_conv(x, conv_w, conv_b), norm_w, norm_b, eps) in one
    pass, with what the LayerNorm's backward needs: the normalised conv output before the affine
    step, xhat = (conv - mean) * rstd, and rstd = 1 / sqrt(var + eps) per pixel.
    x: (N, H, W, C) -> normed (N, H, W, C), xhat (N, H, W, C), rstd (N, H, W)"""
    c = x.shape[-1]
    check_arguments("depthwise_conv_layer_norm_keep", "x", x, 4, conv_w=(conv_w, np.shape(conv_w)[:2] + (c,)),
                    conv_b=(conv_b, (c,)), norm_w=(norm_w, (c,)), norm_b=(norm_b, (c,)))
    if conv_w.shape[:2] != (TAPS, TAPS):  # not a ConvNeXt size: the readable path
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
    rows_or_parallel(_depthwise_conv7_layer_norm_keep_rows, _depthwise_conv7_layer_norm_keep, args,
                      x.shape[0] * x.shape[1])
    return normed, xhat, rstd
