"""The block's 7x7 depthwise convolution, an output row at a time, on a zero-padded copy.

ConvNeXt's token mixer convolves every channel with its own 7x7 kernel (Liu et al., "A ConvNet
for the 2020s", 2022, section 2.5; timm's `conv_dw`). Channels-last, a vector holds neighbouring
channels of one pixel, and each output is its bias plus 49 products, the taps taken row by row
(di), then along the row (dj), one fused multiply-add each (the plain-NumPy twin below sums
in the same order but rounds each product before adding it).

Written as Numba loops, LLVM vectorises the channel loop but reloads and stores the running sums
once per tap row and re-checks, on entering it, that no output overlaps the 17 inputs it
reads, which a row of 96 channels does not amortise. `depthwise_row` is therefore LLVM IR
through a Numba intrinsic, as engine/gemm.py's micro-kernel is: for each vector of channels,
eight (or, at the end of a row, four) neighbouring outputs keep their sums in registers for all
49 taps; each loaded input serves up to seven of them. Channels past the last whole vector take
the same steps on scalars. Its plain-NumPy body is the twin under NUMBA_DISABLE_JIT=1 and for
arrays the intrinsic does not take (not contiguous, not aligned, neither float32 nor float64).

Numba's cache knows a compiled kernel's own source file only: after editing this file (or
gemm.py), clear the __pycache__ of engine/ so that kernels.py's kernels are compiled again.
"""

from __future__ import annotations

import numba
import numba.extending
import numpy as np
from llvmlite import ir
from numba.core import cgutils

from .gemm import fused_multiply_add, vector_registers

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
