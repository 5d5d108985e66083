"""Numba kernels for a ConvNeXt block, fused around the matrix products of gemm.py.

The two pointwise linears are most of ConvNeXt's FLOPs; they run on gemm.py's tiles, and what
comes after each product is done on the tile while it is in cache. The rest is cheap in
arithmetic but costs passes over memory, so neighbours are fused:

    depthwise 7x7 conv + bias + LayerNorm   one pass, a row of pixels at a time (depthwise.py:
                                            eight outputs of a vector of channels summed in
                                            registers through all 49 taps)
    fc1 + bias + GELU                       on each tile, with an erf made of arithmetic only
                                            (within 1 float32 ulp, or 1 float64 ulp): a libm
                                            call per element would keep the loop scalar; the
                                            output is left as pixel panels, fc2's input
    GRN (V2)                                two passes over the hidden tensor
    fc2 + bias + layer scale + residual     on each tile, written back channels-last
    patchify convs, the classifier          gemm.py's tiles with a bias

No BLAS call is made on the way: BLAS's idle threads busy-wait after a call, on the cores the
kernels need next.

Each kernel is a body over a range of rows (`*_rows`), run as it is on one thread, and a
parallel loop that shares the rows between threads (see `_rows_or_parallel` for which runs).
Each has a twin in `npconvnext/layers.py` (the readable reference); `tests/engine/test_kernels.py`
checks them against each other, and `NUMBA_DISABLE_JIT=1` runs these bodies as plain Python.
The `_`-prefixed `@njit` functions never validate and allocate only scratch space: the public
wrappers below validate and allocate the outputs.

Of fastmath's flags only "contract": a multiply and an add may become one fused multiply-add,
rounded once, as BLAS and the peers' kernels do (the erf polynomials and the training kernels'
7x7 taps are chains of them; gemm.py and depthwise.py call llvm.fma themselves); not in the
kernels that promise NumPy's result to the bit (`_EXACT_JIT`). The other flags would
reassociate sums and swap in approximate erf/sqrt.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading

import numba
import numba.core.event
import numba.extending
import numpy as np
from llvmlite import ir
from numba.core import cgutils

from .. import layers
from ..errors import InputError
from .checks import check_arguments, last_dimension, takes_array
from .depthwise import depthwise_row, pad_rows
from .depthwise import TAPS as _TAPS  # a constant lets LLVM unroll the training kernels' tap loops
from .gemm import TILES, _tile_product, _tile_product_transposed, _tile_shape, from_panels, splat, to_panels
from ..network import BlockWeights, Recorder, no_record

# One place for the JIT settings. cache=True: a second process loads machine code from disk
# instead of compiling (numba falls back to a per-user cache directory when the package is
# read-only, and honours NUMBA_CACHE_DIR).
_JIT = dict(cache=True, nogil=True, error_model="numpy",  # IEEE division: no zero check blocking SIMD
            fastmath={"contract"})  # fused multiply-adds only (see above)
_PARALLEL_JIT = dict(_JIT, parallel=True)
# For kernels that promise NumPy's result to the bit (AdamW's update, backward_kernels.py): no fusing
_EXACT_JIT = dict(_JIT, fastmath=False)
_EXACT_PARALLEL_JIT = dict(_EXACT_JIT, parallel=True)
_INLINE_JIT = dict(_JIT, inline="always")  # small helpers: inlined by Numba, or LLVM may leave a call


def _fma(a, b, c):
    """a * b + c. Compiled: one fused multiply-add, rounded once, where the formula needs one
    (with "contract" LLVM may fuse, but need not). This plain-Python body (NUMBA_DISABLE_JIT=1)
    rounds twice."""
    return a * b + c


@numba.extending.intrinsic
def _llvm_fma(typingctx, a, b, c):
    if not (isinstance(a, numba.types.Float) and a == b == c):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)
    return a(a, b, c), codegen


@numba.extending.overload(_fma, inline="always")
def _fma_compiled(a, b, c):
    if isinstance(a, numba.types.Float) and a == b == c:
        return lambda a, b, c: _llvm_fma(a, b, c)


# A kernel not in Numba's cache (the first run after installing or upgrading, or a new dtype) is
# compiled before it runs, which takes seconds: say so, once per process, as the compile starts.
# A library does not print: this is an INFO record on the "npconvnext" logger, which the
# command line shows on stderr (`logging.basicConfig(level=logging.INFO)` shows it elsewhere).
_log = logging.getLogger("npconvnext")
COMPILE_NOTICE = ("compiling the Numba kernels for this machine; this happens once, later runs load them "
                  "from Numba's cache")


class _CompileNotice(numba.core.event.Listener):
    """Numba announces a compile ("numba:compile") only after its cache had no machine code for
    the kernel: an exact and free test of a cold cache."""

    def __init__(self):
        self.told = False

    def on_start(self, event):
        dispatcher = event.data.get("dispatcher") if isinstance(event.data, dict) else None
        module = getattr(getattr(dispatcher, "py_func", None), "__module__", None) or ""
        if not self.told and module.startswith("npconvnext."):  # any of ours: inference, training, readers
            self.told = True
            _log.info(COMPILE_NOTICE)

    def on_end(self, event):
        pass


numba.core.event.register("numba:compile", _CompileNotice())


@numba.njit(**_INLINE_JIT)
def _add_depthwise_taps(x, img, row, weight, acc):
    # acc: (W, C) += output row `row` of image `img` of the 7x7 depthwise conv of x (N, H, W, C)
    # by weight (7, 7, C), zero padding; for the training kernels (inference's
    # _depthwise_conv7_layer_norm_rows reads a padded copy instead)
    h, w, c = x.shape[1:]
    pad = _TAPS // 2
    for di in range(_TAPS):
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
                    for dj in range(_TAPS):
                        total += window[dj, ch] * w_row[dj, ch]
                    dst[ch] = total
            else:  # within 3 pixels of the left or right edge: only the taps that land inside
                for dj in range(max(0, pad - j), min(_TAPS, w + pad - j)):
                    src = x_row[j + dj - pad]  # (C,)
                    tap = w_row[dj]            # (C,)
                    for ch in range(c):
                        dst[ch] += src[ch] * tap[ch]


@numba.njit(**_JIT)
def _depthwise_conv7_layer_norm_rows(padded, conv_w, conv_b, norm_w, norm_b, eps, out, first, last):
    # out: (N, H, W, C) = LayerNorm(7x7 depthwise conv of x + conv_b), given x zero-padded:
    # padded: (N, H + 6, W' + 6, C), x at [3 : 3 + H, 3 : 3 + W], W' = W rounded up to
    # depthwise.BLOCK; conv_w: (7, 7, C); conv_b, norm_w, norm_b: (C,); output rows
    # first..last-1 of the N * H. The padding spares the edges their own loop.
    n, h, w, c = out.shape
    acc = np.empty((padded.shape[2] - (_TAPS - 1), c), dtype=out.dtype)  # (W', C) the row being summed
    for job in range(first, last):
        img = job // h
        row = job % h
        depthwise_row(padded, img, row, conv_w, conv_b, acc)
        for j in range(w):
            _normalize_pixel(acc[j], norm_w, norm_b, eps, out[img, row, j])


@numba.njit(**_PARALLEL_JIT)
def _depthwise_conv7_layer_norm(padded, conv_w, conv_b, norm_w, norm_b, eps, out):
    # all N * H output rows, one per job
    n, h = out.shape[:2]
    for job in numba.prange(n * h):
        _depthwise_conv7_layer_norm_rows(padded, conv_w, conv_b, norm_w, norm_b, eps, out, job, job + 1)


_LANES = 16  # partial sums of a pixel's statistics: a fixed count, so the order is every machine's


def _lane_sum(x, center):
    """sum over i of (x[i] - center)^2 in float64 if center is not None, else of x[i]: x[i] goes
    to partial sum i % 16 (for i below len - len % 16; the rest to one more sum), and the
    sixteen are added in halves, 8 + 8, 4 + 4, 2 + 2, 1 + 1, then the rest. x: (C,).
    Compiled: for a contiguous x, the intrinsic below, the sixteen sums in vector registers
    (LLVM does not split a float sum itself: that would change its rounding)."""
    return _lane_sum_loops(x, center)


@numba.njit(**_INLINE_JIT)
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


@numba.njit(**_INLINE_JIT)
def _pixel_statistics(x, eps):
    # x: (C,) one pixel's channels -> (mean, 1 / sqrt(var + eps)), the sums in float64 (see
    # _lane_sum for their order). The training kernels reuse it to reproduce the forward's
    # normalisation exactly.
    c = x.shape[0]
    mean = _lane_sum(x, None) / c
    return mean, 1.0 / math.sqrt(_lane_sum(x, mean) / c + eps)


@numba.njit(**_INLINE_JIT)
def _normalize_pixel(x, weight, bias, eps, out):
    # x, out: (C,) one pixel's channels; LayerNorm with float64 statistics. Inlined: a call a
    # pixel, its arrays passed as structs, costs as much as the normalising
    mean, inv_std = _pixel_statistics(x, eps)
    for ch in range(x.shape[0]):
        out[ch] = (x[ch] - mean) * inv_std * weight[ch] + bias[ch]


@numba.njit(**_JIT)
def _layer_norm_rows(x, weight, bias, eps, out, first, last):
    # x, out: (M, C) pixels by channels; pixels first..last-1
    for i in range(first, last):
        _normalize_pixel(x[i], weight, bias, eps, out[i])


@numba.njit(**_PARALLEL_JIT)
def _layer_norm(x, weight, bias, eps, out):
    for i in numba.prange(x.shape[0]):
        _layer_norm_rows(x, weight, bias, eps, out, i, i + 1)


# erf(x) ~ x * P(x^2) / Q(x^2) for |x| <= 4, fitted by scripts/fit_erf32.py. Evaluated in float64
# it is within 1 float32 ulp of the exact erf (tested), and unlike a libm call it vectorises: the
# float32 GELU costs a few multiply-adds an element instead of a function call.
_ERF32_P = (1.1283791828557568, 0.18464218086117465, 0.05432957883500719, 0.003837558269364263,
            0.000382898632632459, 4.787317654138257e-06, -1.3695023282078722e-08)
_ERF32_Q = (1.0, 0.49696842670177166, 0.11380346548497325, 0.015450254739050696,
            0.0013094628387245167, 6.407477200176016e-05)
_SQRT_HALF = math.sqrt(0.5)


@numba.njit(**_JIT)
def _erf32(x):
    # x: float64; result within 1 float32 ulp of erf(x) once rounded to float32
    x = min(max(x, -4.0), 4.0)  # float32 erf is +-1 beyond
    t = x * x
    t2 = t * t
    t4 = t2 * t2
    p0, p1, p2, p3, p4, p5, p6 = _ERF32_P
    q0, q1, q2, q3, q4, q5 = _ERF32_Q
    # Estrin's scheme, not Horner's: three dependent multiply-adds instead of six, for the GELU
    # loop waits on that chain
    num = (p0 + t * p1) + t2 * (p2 + t * p3) + t4 * ((p4 + t * p5) + t2 * p6)
    den = (q0 + t * q1) + t2 * (q2 + t * q3) + t4 * (q4 + t * q5)
    return x * num / den


# float64 erf from arithmetic alone, fitted by scripts/fit_erf64.py (see there), so that the GELU
# loop vectorises. Its polynomials are evaluated with fused multiply-adds, which keeps it within
# 1 ulp of the exact erf (tested) and shortens the loop's dependency chains.
_ERF64_SMALL_P = (0.1283791670955126, -0.3170140210501066, -0.04831000610875467, -0.008812639421024768,
                  -0.0004951455370909747, -2.071155112422161e-05)
_ERF64_SMALL_Q = (1.0, 0.4604514059337391, 0.09378470115183579, 0.010687519279199436,
                  0.0006919395167024753, 2.0785316787251384e-05)
_ERF64_LARGE_P = (0.9999999999361617, 1.6845880528558341, 1.4190212383455725, 0.7382370063756867,
                  0.25276035845715616, 0.05670040573398806, 0.0077420879304875385, 0.0005025011218855426,
                  1.5052902626585605e-11)
_ERF64_LARGE_Q = (1.0, 2.8129672190991575, 3.5931148515729627, 2.731918486266149, 1.358347885468797,
                  0.45486135069858546, 0.10094470290438697, 0.013722460657207166, 0.0008906613942539173)
_LN2_HI, _LN2_LO = 0.6931471803691238, 1.9082149292705877e-10  # ln 2 = hi + lo, k * hi exact
_EXP_TAYLOR = tuple(1.0 / math.factorial(n) for n in range(14))  # |r| <= ln2/2: error < 2**-57
_ROUND = 1.5 * 2.0**52  # (y + _ROUND) - _ROUND rounds y to an integer, in float arithmetic
_INV_LN2 = 1.0 / math.log(2.0)


@numba.njit(**_INLINE_JIT)
def _polynomial(coefficients, x):
    # coefficients lowest degree first; Horner's rule with fused multiply-adds, unrolled while
    # compiling so that the loops around it still vectorise
    result = 0.0
    for c in numba.literal_unroll(coefficients[::-1]):
        result = _fma(result, x, c)
    return result


@numba.njit(**_INLINE_JIT)
def _exp_nonpositive(y):
    # exp(y) for -37 <= y <= 0: exp(r) * 2**k with y = k ln2 + r, |r| <= ln2/2, within an ulp
    k = (y * _INV_LN2 + _ROUND) - _ROUND
    r = (y - k * _LN2_HI) - k * _LN2_LO
    two_to_k = np.int64((np.int64(k) + 1023) << 52).view(np.float64)  # the float64 bits of 2**k
    return _polynomial(_EXP_TAYLOR, r) * two_to_k


@numba.njit(**_INLINE_JIT)
def _erf64(x):
    # x: float64; within 1 ulp of erf(x)
    a = min(abs(x), 6.0)  # erf(6) rounds to 1 in float64
    t = x * x
    small = x + x * (_polynomial(_ERF64_SMALL_P, t) / _polynomial(_ERF64_SMALL_Q, t))
    large = 1.0 - _exp_nonpositive(-a * a) * (_polynomial(_ERF64_LARGE_P, a) / _polynomial(_ERF64_LARGE_Q, a))
    return small if a < 1.0 else math.copysign(large, x)  # both computed: a select, not a branch


def _erf_for(sample, v):
    """erf(v) for v: float64, accurate to the precision of sample's type: _erf32 for float32,
    _erf64 for float64. Compiled, the choice is made once per type."""
    return _erf32(v) if isinstance(sample, np.float32) else _erf64(v)


@numba.extending.overload(_erf_for, inline="always")
def _erf_for_compiled(sample, v):
    if sample == numba.types.float32:
        return lambda sample, v: _erf32(v)
    return lambda sample, v: _erf64(v)


@numba.njit(**_JIT)
def _response_energy(image, eps):
    # image: (P, D) one image's pixels by hidden channels -> (D,) each channel's L2 norm over
    # the pixels divided by the mean of those norms; see layers.global_response_norm
    p, d = image.shape
    energy = np.zeros(d)  # float64 sums of squares per channel
    for px in range(p):
        for ch in range(d):
            v = image[px, ch]
            energy[ch] += v * v
    for ch in range(d):
        energy[ch] = math.sqrt(energy[ch])
    return (energy / (energy.mean() + eps)).astype(image.dtype)


@numba.njit(**_JIT)
def _apply_response_norm_rows(image, weight, bias, relative, first, last):
    # image: (P, D), pixels first..last-1 in place
    d = image.shape[1]
    for px in range(first, last):
        for ch in range(d):
            v = image[px, ch]
            image[px, ch] = v + (bias[ch] + weight[ch] * (v * relative[ch]))


@numba.njit(**_JIT)
def _global_response_norm_rows(x, weight, bias, eps, first, last):
    # x: (N, P, D) pixels by hidden channels, images first..last-1 in place
    for img in range(first, last):
        _apply_response_norm_rows(x[img], weight, bias, _response_energy(x[img], eps), 0, x.shape[1])


@numba.njit(**_PARALLEL_JIT)
def _global_response_norm_(x, weight, bias, eps):
    # x: (N, P, D) pixels by hidden channels, in place
    for img in range(x.shape[0]):
        relative = _response_energy(x[img], eps)
        for px in numba.prange(x.shape[1]):
            _apply_response_norm_rows(x[img], weight, bias, relative, px, px + 1)


# ---- the block's linears and the patchify convs: gemm.py's tiles, with what follows fused -------
# Two ways to go through a linear's tiles. Panel by panel (`_mlp`, fc1 and fc2 together): one
# panel's hidden activations, (4C, NR), are made and used up while in cache; the work items are
# panels. Weight-stationary (`_linear_gelu_panels`, `_panels_linear`): one tile's MR weight rows
# against every panel of a chunk of panels that stays in cache; the work items are shares of
# the output channels, for when the panels are too few to share between the threads. Each tile
# sums in the same order either way: the results are the same bits.


_PACK_CHANNELS = 8  # channels _pack_panel copies from a pixel at a time: 32 bytes of float32, 64 of float64


@numba.njit(**_JIT)
def _pack_panel(x, first_pixel, panel):
    # panel: (K, NR) <- x[first_pixel : first_pixel + NR] transposed, zeros past x's last pixel;
    # x: (M, K)
    k = x.shape[1]
    nr = panel.shape[1]
    count = min(nr, x.shape[0] - first_pixel)
    # eight neighbouring channels of a pixel at a time, written down eight panel rows: a channel at
    # a time, each pixel's read would be a row of x (often a cache line or more) from the last
    whole = k - k % _PACK_CHANNELS
    for ch0 in range(0, whole, _PACK_CHANNELS):
        for j in range(count):
            channels = x[first_pixel + j, ch0 : ch0 + _PACK_CHANNELS]  # (8,): one vector load, not eight
            for c in range(_PACK_CHANNELS):
                panel[ch0 + c, j] = channels[c]
    for ch in range(whole, k):
        for j in range(count):
            panel[ch, j] = x[first_pixel + j, ch]
    for ch in range(k):
        for j in range(count, nr):
            panel[ch, j] = 0.0


@numba.njit(**_INLINE_JIT)
def _channel_blocks(n, mr, groups, group):
    # the tiles' first output channels in this group's share of n channels
    blocks = -(-n // mr)
    return range(group * blocks // groups * mr, (group + 1) * blocks // groups * mr, mr)


@numba.njit(**_INLINE_JIT)
def _fc1_gelu_tile(panel, pixels, weight, bias, c0, tile, hidden_panel):
    # hidden_panel[c0 : c0 + MR, :pixels] = GELU(weight[c0 : c0 + MR] @ panel + bias[c0 : c0 + MR]);
    # panel: (K, NR) pixels as columns, the first `pixels` of them in use; weight: (D, K);
    # hidden_panel: (D, NR); tile: (MR, NR) scratch. GELU in float64, rounded once.
    rows = min(tile.shape[0], weight.shape[0] - c0)
    _tile_product(weight, c0, rows, panel, tile, pixels)
    for r in range(rows):
        b = bias[c0 + r]
        src = tile[r]                  # (NR,)
        dst = hidden_panel[c0 + r]     # (NR,)
        for j in range(pixels):
            v = np.float64(src[j] + b)
            dst[j] = 0.5 * v * (1.0 + _erf_for(src[j], v * _SQRT_HALF))


@numba.njit(**_INLINE_JIT)
def _fc2_residual_tile(hidden_panel, weight, bias, gamma, shortcut, out, first_pixel, c0, tile):
    # out[first_pixel : first_pixel + NR, c0 : c0 + MR] = shortcut + gamma * (hidden_panel^T @
    # weight[c0 : c0 + MR]^T + bias), the same part of each; gamma None means 1, shortcut None
    # means 0 (Numba compiles each case without the test). hidden_panel: (D, NR); weight: (C, D);
    # out, shortcut: (M, C); tile: (NR, MR) scratch, pixels by channels as out has them.
    channels = min(tile.shape[1], weight.shape[0] - c0)
    pixels = min(tile.shape[0], out.shape[0] - first_pixel)
    _tile_product_transposed(weight, c0, channels, hidden_panel, tile, pixels)
    b = bias[c0 : c0 + channels]
    g = b if gamma is None else gamma[c0 : c0 + channels]
    for j in range(pixels):
        t = tile[j]                                                   # (MR,)
        o = out[first_pixel + j, c0 : c0 + channels]                  # (MR,)
        if shortcut is None:
            for r in range(channels):
                o[r] = t[r] + b[r]
        else:
            s = shortcut[first_pixel + j, c0 : c0 + channels]         # (MR,)
            if gamma is None:
                for r in range(channels):
                    o[r] = s[r] + (t[r] + b[r])
            else:
                for r in range(channels):
                    o[r] = s[r] + g[r] * (t[r] + b[r])


_CACHED_PANEL_BYTES = 1 << 19  # about half a core's L2: the panels a weight-stationary pass keeps


def _panels_in_cache(panels: np.ndarray) -> int:
    """How many of these (P, K, NR) panels a weight-stationary pass goes through at a time:
    every tile's weight rows meet a chunk of panels that stays in cache, then the next chunk."""
    return max(1, _CACHED_PANEL_BYTES // (panels[0].nbytes or 1))


@numba.njit(**_JIT)
def _linear_gelu_panels_rows(x, pixels, weight, bias, hidden, chunk, groups, first, last):
    # hidden (P, D, NR) = GELU(x @ weight.T + bias) as pixel panels; x: (P, K, NR) pixel panels
    # of `pixels` pixels; weight: (D, K); bias: (D,); the output channels of groups
    # first..last-1 (of `groups` shares), `chunk` panels at a time
    mr, nr = _tile_shape(weight)
    tile = np.empty((mr, nr), dtype=weight.dtype)  # (MR, NR)
    for group in range(first, last):
        for start in range(0, x.shape[0], chunk):
            for c0 in _channel_blocks(weight.shape[0], mr, groups, group):
                for p in range(start, min(start + chunk, x.shape[0])):
                    _fc1_gelu_tile(x[p], min(nr, pixels - p * nr), weight, bias, c0, tile, hidden[p])


@numba.njit(**_PARALLEL_JIT)
def _linear_gelu_panels(x, pixels, weight, bias, hidden, chunk, groups):
    for group in numba.prange(groups):
        _linear_gelu_panels_rows(x, pixels, weight, bias, hidden, chunk, groups, group, group + 1)


@numba.njit(**_JIT)
def _panels_linear_rows(hidden, weight, bias, gamma, shortcut, out, chunk, groups, first, last):
    # out (M, C) = shortcut + gamma * (hidden @ weight.T + bias), hidden as pixel panels
    # (P, D, NR); weight: (C, D); gamma None means 1; shortcut None means 0; the output channels
    # of groups first..last-1 (of `groups` shares), `chunk` panels at a time
    mr, nr = _tile_shape(weight)
    tile = np.empty((nr, mr), dtype=weight.dtype)  # (NR, MR)
    for group in range(first, last):
        for start in range(0, hidden.shape[0], chunk):
            for c0 in _channel_blocks(weight.shape[0], mr, groups, group):
                for p in range(start, min(start + chunk, hidden.shape[0])):
                    _fc2_residual_tile(hidden[p], weight, bias, gamma, shortcut, out, p * nr, c0, tile)


@numba.njit(**_PARALLEL_JIT)
def _panels_linear(hidden, weight, bias, gamma, shortcut, out, chunk, groups):
    for group in numba.prange(groups):
        _panels_linear_rows(hidden, weight, bias, gamma, shortcut, out, chunk, groups, group, group + 1)


@numba.njit(**_JIT)
def _mlp_rows(y, fc1, fc1_bias, fc2, fc2_bias, gamma, shortcut, out, first, last):
    # out (M, C) = shortcut + gamma * (GELU(y @ fc1.T + fc1_bias) @ fc2.T + fc2_bias), panel by
    # panel: panels first..last-1. y, shortcut, out: (M, C); fc1: (4C, C); fc2: (C, 4C)
    mr, nr = _tile_shape(y)
    panel = np.empty((y.shape[1], nr), dtype=y.dtype)           # (C, NR)
    hidden = np.empty((fc1.shape[0], nr), dtype=y.dtype)        # (4C, NR)
    tile = np.empty((mr, nr), dtype=y.dtype)                    # (MR, NR)
    tile_t = np.empty((nr, mr), dtype=y.dtype)                  # (NR, MR)
    for p in range(first, last):
        _pack_panel(y, p * nr, panel)
        for c0 in range(0, fc1.shape[0], mr):
            _fc1_gelu_tile(panel, min(nr, y.shape[0] - p * nr), fc1, fc1_bias, c0, tile, hidden)
        for c0 in range(0, fc2.shape[0], mr):
            _fc2_residual_tile(hidden, fc2, fc2_bias, gamma, shortcut, out, p * nr, c0, tile_t)


@numba.njit(**_PARALLEL_JIT)
def _mlp(y, fc1, fc1_bias, fc2, fc2_bias, gamma, shortcut, out):
    nr = _tile_shape(y)[1]
    for p in numba.prange(-(-y.shape[0] // nr)):
        _mlp_rows(y, fc1, fc1_bias, fc2, fc2_bias, gamma, shortcut, out, p, p + 1)


# ---- public wrappers: same signatures and results as their twins in layers.py -----------------
# Each kernel runs as its parallel loop, or as its row body on the calling thread. The row body
# runs when this thread's Numba count is one (`threads.map_over_batch` workers,
# set_num_threads(1)); when Numba's workers would busy-wait (`_workers_sleep`); when another
# thread of this process is inside a parallel loop (Numba's workqueue layer aborts the process
# if two threads enter one at once, and the others would only oversubscribe the cores); and in
# a process forked from this one (GNU OpenMP kills a forked child that starts a parallel
# region, and the parent's worker threads do not exist there).

# OpenMP's workers busy-wait after each parallel loop unless the user exported
# OMP_WAIT_POLICY=PASSIVE (GNU's and LLVM's runtimes both read it when they load); between a
# kernel and the next BLAS call they take the cores BLAS needs. Then the kernels run serially
# and BLAS keeps the threads. The variable is read, never set.
_SLEEPING_LAYERS = ("workqueue", "tbb")  # their idle workers wait on a condition or yield


@functools.cache
def _workers_sleep() -> bool:
    """Whether the threading layer in use parks its idle workers: the layer Numba picked, not
    the one requested."""
    numba.get_num_threads()  # launches Numba's threading layer, if nothing has yet
    layer = numba.threading_layer()
    return layer in _SLEEPING_LAYERS or os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


# Held while a parallel loop runs; taken without waiting: whoever does not get it runs serially.
_parallel_region = threading.Lock()
_forked_child = False


def _serial_after_fork() -> None:
    global _forked_child
    _forked_child = True


os.register_at_fork(after_in_child=_serial_after_fork)


def _rows_or_parallel(rows, parallel, args, count, blas_between=True):
    """parallel(*args) when this thread may start a parallel loop now (see above), else
    rows(*args, 0, count) on this thread. `blas_between`: BLAS calls come between this kernel
    and the next (in training), so idle workers that busy-wait would take BLAS's cores; in
    inference the kernels follow one another without BLAS, and their workers' waiting is the
    cheapest hand-over there is."""
    if (numba.get_num_threads() > 1 and not _forked_child and (not blas_between or _workers_sleep())
            and _parallel_region.acquire(blocking=False)):
        try:
            parallel(*args)
        finally:
            _parallel_region.release()
    else:
        rows(*args, 0, count)


@takes_array("x")
def depthwise_conv_layer_norm(x, conv_w, conv_b, norm_w, norm_b, eps):
    """layers.layer_norm(layers.depthwise_conv(x, conv_w, conv_b), norm_w, norm_b, eps)
    x: (N, H, W, C) -> (N, H, W, C)"""
    c = x.shape[-1]
    check_arguments("depthwise_conv_layer_norm", "x", x, 4, conv_w=(conv_w, np.shape(conv_w)[:2] + (c,)),
                    conv_b=(conv_b, (c,)), norm_w=(norm_w, (c,)), norm_b=(norm_b, (c,)))
    if conv_w.shape[:2] != (_TAPS, _TAPS):  # not a ConvNeXt size: the readable path, then LN
        return layer_norm(layers.depthwise_conv(x, conv_w, conv_b), norm_w, norm_b, eps)
    n, h, w, c = x.shape
    padded = pad_rows(x)                                       # (N, H+6, W'+6, C)
    conv_w, conv_b = _kernel_weights(x.dtype, conv_w, conv_b)
    norm_w, norm_b = _kernel_weights(None, norm_w, norm_b)
    out = np.empty_like(x)
    _rows_or_parallel(_depthwise_conv7_layer_norm_rows, _depthwise_conv7_layer_norm,
                      (padded, conv_w, conv_b, norm_w, norm_b, eps, out), n * h, blas_between=False)  # N * H rows
    return out


@takes_array("x")
def layer_norm(x, weight, bias, eps):
    """layers.layer_norm. x: (..., C) -> (..., C)"""
    check_arguments("layer_norm", "x", x, None, weight=(weight, x.shape[-1:]), bias=(bias, x.shape[-1:]))
    flat = np.ascontiguousarray(x).reshape(-1, x.shape[-1])  # (M, C)
    out = np.empty_like(flat)
    weight, bias = _kernel_weights(None, weight, bias)
    _rows_or_parallel(_layer_norm_rows, _layer_norm, (flat, weight, bias, eps, out), flat.shape[0])
    return out.reshape(x.shape)


def _global_response_norm_in_place(x, weight, bias, eps):
    # x: (N, P, D) pixels by hidden channels
    check_arguments("global_response_norm", "x", x, 3, weight=(weight, x.shape[-1:]), bias=(bias, x.shape[-1:]))
    weight, bias = _kernel_weights(None, weight, bias)
    _rows_or_parallel(_global_response_norm_rows, _global_response_norm_, (x, weight, bias, eps), x.shape[0])


@takes_array("x")
def global_response_norm(x, weight, bias, eps):
    """layers.global_response_norm. x: (N, H, W, D) -> (N, H, W, D)"""
    check_arguments("global_response_norm", "x", x, 4)
    out = x.copy()
    n, h, w, d = x.shape
    _global_response_norm_in_place(out.reshape(n, h * w, d), weight, bias, eps)
    return out


def _channel_groups(tiles: int) -> int:
    """Shares of a linear's output channels (`tiles` tiles of them) for the threads: several a
    thread, so that one late thread delays little."""
    threads = numba.get_num_threads()
    return 1 if threads == 1 else min(tiles, 4 * threads)


def _kernel_weights(dtype, *arrays):
    """The arrays as the kernels take their weights: C-contiguous, in dtype (None: their own),
    read-only; None stays None. A copy is made only for another dtype or layout. Numba compiles
    a kernel once per argument type, and writability is part of it: weights mapped from a file
    are read-only, others are not. The kernels never write their weights, so taking every weight
    read-only compiles (and loads from the JIT cache) one version of each kernel, not two."""
    weights = []
    for a in arrays:
        if a is not None:
            a = np.ascontiguousarray(a, dtype)
            if a.flags.writeable:  # a view, so the caller's array keeps its flags
                a = a.view()
                a.flags.writeable = False
        weights.append(a)
    return weights


@takes_array("x")
def linear_gelu_panels(x, weight, bias):
    """layers.gelu(layers.linear(x, weight, bias)) as pixel panels (gemm.py), weight-stationary.
    x: (..., K); weight: (K, D) -> (P, D, NR), the M pixels of x in P = ceil(M / NR) panels"""
    d = last_dimension(weight)
    check_arguments("linear_gelu_panels", "x", x, None, weight=(weight, (x.shape[-1], d)), bias=(bias, (d,)))
    flat = np.ascontiguousarray(x).reshape(-1, x.shape[-1])   # (M, K)
    rows, bias = _kernel_weights(flat.dtype, weight.T, bias)  # rows (D, K): a view of the weights
    mr, nr = TILES[flat.dtype]
    panels = to_panels(flat)                                  # (P, K, NR)
    hidden = np.empty((panels.shape[0], rows.shape[0], nr), dtype=flat.dtype)
    groups = _channel_groups(-(-rows.shape[0] // mr))
    _rows_or_parallel(_linear_gelu_panels_rows, _linear_gelu_panels,
                      (panels, flat.shape[0], rows, bias, hidden, _panels_in_cache(panels), groups), groups,
                      blas_between=False)
    return hidden


@takes_array("hidden")
def panels_linear(hidden, weight, bias, gamma=None, shortcut=None, pixels=None):
    """shortcut + gamma * layers.linear(x, weight, bias), x given as pixel panels, weight-
    stationary; gamma None means 1, shortcut None means 0. hidden: (P, D, NR); weight: (D, C);
    shortcut: (..., C), or the pixel count M when there is none -> like shortcut, or (M, C)"""
    c = last_dimension(weight)
    check_arguments("panels_linear", "hidden", hidden, 3, optional=("gamma",),
                    weight=(weight, hidden.shape[1:2] + (c,)), bias=(bias, (c,)), gamma=(gamma, (c,)))
    nr = TILES[hidden.dtype][1]
    m = pixels if shortcut is None else shortcut.size // max(1, shortcut.shape[-1])
    fits = (hidden.shape[2] == nr and m is not None and 0 <= m <= hidden.shape[0] * nr
            and (shortcut is None or shortcut.shape[-1] == c))
    if not fits:
        raise InputError(f"panels_linear: hidden panels of shape {hidden.shape} (panels of {nr} pixels) do not fit "
                         f"a shortcut of shape {np.shape(shortcut)} with {c} channels, or pixels={pixels} without one")
    hidden = np.ascontiguousarray(hidden)
    rows, bias, gamma = _kernel_weights(hidden.dtype, weight.T, bias, gamma)  # rows (C, D): a view of the weights
    out = np.empty((m, rows.shape[0]), dtype=hidden.dtype)
    residual = None if shortcut is None else np.ascontiguousarray(shortcut).reshape(m, -1)  # (M, C)
    groups = _channel_groups(-(-rows.shape[0] // TILES[hidden.dtype][0]))
    _rows_or_parallel(_panels_linear_rows, _panels_linear,
                      (hidden, rows, bias, gamma, residual, out, _panels_in_cache(hidden), groups), groups,
                      blas_between=False)
    return out if shortcut is None else out.reshape(shortcut.shape)


@takes_array("x")
def linear(x, weight, bias):
    """layers.linear on gemm.py's tiles. x: (..., K); weight: (K, D) -> (..., D)"""
    d = last_dimension(weight)
    check_arguments("linear", "x", x, None, weight=(weight, (x.shape[-1], d)), bias=(bias, (d,)))
    flat = np.ascontiguousarray(x).reshape(-1, x.shape[-1])                 # (M, K)
    out = panels_linear(to_panels(flat), weight, bias, pixels=flat.shape[0])  # (M, D)
    return out.reshape(*x.shape[:-1], weight.shape[1])


@takes_array("x")
def patchify_conv(x, weight, bias, patch):
    """layers.patchify_conv on gemm.py's tiles. x: (N, H, W, Cin) -> (N, H//p, W//p, Cout)"""
    d = last_dimension(weight)
    check_arguments("patchify_conv", "x", x, 4, weight=(weight, (patch * patch * x.shape[-1], d)), bias=(bias, (d,)))
    n, h, w, _ = x.shape
    patches = layers._patches(x, patch)                                       # (M, p * p * Cin)
    out = panels_linear(to_panels(patches), weight, bias, pixels=patches.shape[0])  # (M, Cout)
    return out.reshape(n, h // patch, w // patch, weight.shape[1])


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
    flat = np.ascontiguousarray(y).reshape(-1, y.shape[-1])                 # (M, C)
    panels = -(-flat.shape[0] // TILES[flat.dtype][1])
    threads = numba.get_num_threads()
    if threads > 1 and panels < _PANELS_PER_THREAD * threads:
        hidden = linear_gelu_panels(flat, fc1_weight, fc1_bias)              # (P, 4C, NR)
        return panels_linear(hidden, fc2_weight, fc2_bias, gamma, shortcut)
    residual = np.ascontiguousarray(shortcut).reshape(flat.shape)           # (M, C)
    out = np.empty_like(residual)
    fc1, fc1_bias, fc2, fc2_bias, gamma = _kernel_weights(y.dtype, fc1_weight.T, fc1_bias, fc2_weight.T, fc2_bias,
                                                          gamma)  # fc1 (4C, C), fc2 (C, 4C): views of the weights
    _rows_or_parallel(_mlp_rows, _mlp, (flat, fc1, fc1_bias, fc2, fc2_bias, gamma, residual, out), panels,
                      blas_between=False)
    return out.reshape(shortcut.shape)


@takes_array("x")
def convnext_block(x: np.ndarray, w: BlockWeights, eps: float, grn_eps: float,
                   record: Recorder = no_record) -> np.ndarray:
    """Twin of network.block with the fused kernels; it records nothing inside the block.
    x: (N, H, W, C) -> (N, H, W, C)"""
    y = depthwise_conv_layer_norm(x, w.conv_dw_weight, w.conv_dw_bias, w.norm_weight, w.norm_bias, eps)
    if w.grn_weight is None:
        return mlp_residual(y, w.fc1_weight, w.fc1_bias, w.fc2_weight, w.fc2_bias, w.gamma, shortcut=x)
    # V2: GRN sums over each image's pixels, so fc1 is done for all of them first
    hidden = linear_gelu_panels(y, w.fc1_weight, w.fc1_bias)                  # (P, 4C, NR) pixel panels
    n, h, wd, _ = x.shape
    flat = from_panels(hidden, n * h * wd)                                     # (M, 4C)
    _global_response_norm_in_place(flat.reshape(n, h * wd, -1), w.grn_weight, w.grn_bias, grn_eps)
    return panels_linear(to_panels(flat), w.fc2_weight, w.fc2_bias, w.gamma, shortcut=x)
