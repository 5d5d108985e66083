"""bfloat16 in the engine: rounding float32 to bfloat16 in the kernels, the pair panels the
pair tile reads (gemm_bf16.py), and the weights' rows as it reads them.

A bfloat16 model keeps the two linears of every block as bfloat16 bits (uint16, model.py),
everything else in float32. The linears' inputs are rounded to bfloat16 (to nearest, ties to
even) where they are packed: the block's normed input once per pixel panel (`pack_pairs`),
the hidden activations as fc1 + GELU writes them (linear.py's `fc1_gelu_tile` into a pair
panel), so fc2 reads them as they are. The pair layout, two neighbouring channels of a pixel
in one 32-bit lane, is what one vdpbf16ps multiplies with a weight word (channels k, k + 1 of
a row):

    pair panels (P, ceil(K/2), NR, 2) uint16: [p, k2, j, h] = bfloat16(x[p*NR + j, 2*k2 + h]),
    zeros past the last pixel and for the missing channel of an odd K

Twins: `round_to_bfloat16` is layers.to_bfloat16 on one float32; `pair_panels` (NumPy) is the
twin of `to_pair_panels` and `pack_pairs`.
"""

from __future__ import annotations

import numba
import numba.extending
import numpy as np
from llvmlite import ir

from ..layers import to_bfloat16
from .gemm import TILES
from .jit import INLINE_JIT, JIT, PARALLEL_JIT, rows_or_parallel


def float_bits(value):
    """The bits of a float32, as an unsigned 32-bit integer. Compiled: one bitcast."""
    return np.uint32(np.float32(value).view(np.uint32))


@numba.extending.intrinsic
def _float_bits_llvm(typingctx, value):
    if value != numba.types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return numba.types.uint32(value), codegen


@numba.extending.overload(float_bits, inline="always")
def _float_bits_compiled(value):
    if value == numba.types.float32:
        return lambda value: _float_bits_llvm(value)


def round_to_bfloat16(value):
    """float32 -> bfloat16 bits, as layers.to_bfloat16: ties to even, NaN kept quiet. Compiled:
    the same on 32-bit integers, no branch, so that the loops calling it vectorise 16 lanes wide
    (a sum past 2**32 only from a NaN's bits, which the select discards)."""
    bits = np.int64(float_bits(np.float32(value)))
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet = (bits >> 16) | 0x40
    return np.uint16(quiet if (bits & 0x7FFFFFFF) > 0x7F800000 else rounded)


@numba.extending.intrinsic
def _round_to_bfloat16_llvm(typingctx, value):
    if value != numba.types.float32:
        return None

    def codegen(context, builder, signature, args):
        word = ir.IntType(32)
        bits = builder.bitcast(args[0], word)
        top = builder.lshr(bits, ir.Constant(word, 16))
        rounded = builder.lshr(builder.add(builder.add(bits, ir.Constant(word, 0x7FFF)),
                                           builder.and_(top, ir.Constant(word, 1))), ir.Constant(word, 16))
        nan = builder.icmp_unsigned(">", builder.and_(bits, ir.Constant(word, 0x7FFFFFFF)),
                                    ir.Constant(word, 0x7F800000))
        quiet = builder.or_(top, ir.Constant(word, 0x40))
        return builder.trunc(builder.select(nan, quiet, rounded), ir.IntType(16))
    return numba.types.uint16(value), codegen


@numba.extending.overload(round_to_bfloat16, inline="always")
def _round_to_bfloat16_compiled(value):
    if isinstance(value, (numba.types.Float, numba.types.Integer)):
        return lambda value: _round_to_bfloat16_llvm(np.float32(value))


@numba.njit(**INLINE_JIT)
def pair_word(low, high):
    # the 32-bit lane of two channels: low (even channel) in the low half, as the pair tile reads it
    return np.uint32(round_to_bfloat16(low)) | (np.uint32(round_to_bfloat16(high)) << np.uint32(16))


@numba.njit(**JIT)
def pack_pairs(x, first_pixel, pairs):
    # pairs (K2, NR, 2) <- x[first_pixel : first_pixel + NR] rounded to bfloat16, zeros past x's
    # last pixel and in an odd K's missing channel; x: (M, K) float32. A pixel's channels are
    # rounded along its row (a loop that vectorises), then its words stored one a pair
    k = x.shape[1]
    nr = pairs.shape[1]
    words = pairs.view(np.uint32)                                    # (K2, NR, 1): one word a pair
    count = min(nr, x.shape[0] - first_pixel)
    rounded = np.zeros(2 * words.shape[0], dtype=np.uint16)          # (2 K2,): an odd K's pad stays 0
    rounded_words = rounded.view(np.uint32)                          # (K2,): channels 2 k2, 2 k2 + 1
    for j in range(count):
        channels = x[first_pixel + j]                                # (K,)
        for c in range(k):
            rounded[c] = round_to_bfloat16(channels[c])
        for k2 in range(words.shape[0]):
            words[k2, j, 0] = rounded_words[k2]
    for k2 in range(words.shape[0]):
        for j in range(count, nr):
            words[k2, j, 0] = 0


@numba.njit(**JIT)
def _to_pair_panels_rows(x, panels, first, last):
    nr = panels.shape[2]
    for p in range(first, last):
        pack_pairs(x, p * nr, panels[p])


@numba.njit(**PARALLEL_JIT)
def _to_pair_panels(x, panels):
    for p in numba.prange(panels.shape[0]):
        _to_pair_panels_rows(x, panels, p, p + 1)


def pair_count(channels: int) -> int:
    """K2: the pairs of `channels` channels, an odd one padded with a zero"""
    return -(-channels // 2)


def to_pair_panels(x: np.ndarray, parallel: bool = True) -> np.ndarray:
    """(M, K) float32 pixels by channels -> (P, K2, NR, 2) uint16 pair panels, rounded to
    bfloat16 (the module docstring's layout). `parallel` False: on this thread, for the few
    panels of a weight-stationary linear, where a parallel loop's hand-over costs more"""
    nr = TILES[np.dtype(np.uint16)][1]
    x = np.ascontiguousarray(x, np.float32)
    panels = np.empty((-(-x.shape[0] // nr), pair_count(x.shape[1]), nr, 2), np.uint16)
    if parallel:
        rows_or_parallel(_to_pair_panels_rows, _to_pair_panels, (x, panels), panels.shape[0], blas_between=False)
    else:
        _to_pair_panels_rows(x, panels, 0, panels.shape[0])
    return panels


def pair_panels(x: np.ndarray, nr: int) -> np.ndarray:
    """Twin of to_pair_panels in NumPy: round, pad (pixels to a multiple of NR, channels to
    even), and lay out. (M, K) -> (P, K2, NR, 2)"""
    m, k = x.shape
    p = -(-m // nr)
    bits = np.zeros((p * nr, 2 * pair_count(k)), np.uint16)
    bits[:m, :k] = to_bfloat16(x)
    return np.ascontiguousarray(bits.reshape(p, nr, -1, 2).transpose(0, 2, 1, 3))  # (P, NR, K2, 2) -> (P, K2, NR, 2)


def pair_rows(weight: np.ndarray) -> np.ndarray:
    """A linear's bfloat16 weight, (in, out) uint16 as the model keeps it, as the pair tile
    reads it: (out, in) rows, C-contiguous, read-only, `in` even. A view (the model's bits used
    in place) unless `in` is odd: then a copy with a zero channel added, as the panels have."""
    rows = weight.T                                                       # (out, in)
    if rows.shape[1] % 2:
        rows = np.concatenate([rows, np.zeros((rows.shape[0], 1), np.uint16)], axis=1)
    rows = np.ascontiguousarray(rows)
    if rows.flags.writeable:
        rows = rows.view()
        rows.flags.writeable = False
    return rows
