"""gemm.py's micro-kernel on bfloat16 pairs: the block's two linears in a bfloat16 model.

The same tile as gemm.py's (MR output channels by NR pixels, sums in float32 registers for the
whole K loop, weights read as stored, the next tile's rows prefetched), on bfloat16 values
kept as their bits (uint16) and taken two channels at a time:

    weights      (N, K) uint16 rows as stored, K even (bfloat16.pair_rows pads an odd K with a
                 zero channel); read as 32-bit words, word k2 = channels 2*k2 (low half) and
                 2*k2 + 1 (high half)
    pair panels  (P, K/2, NR, 2) uint16: panel p, pair k2, pixel j holds channels 2*k2 and
                 2*k2 + 1 of pixel p*NR + j, one 32-bit lane per pixel (bfloat16.py packs them)

    pair panel p:     k2=0   [c0 c1 | c0 c1 | ... ]   NR pixels, a 32-bit lane each
                      k2=1   [c2 c3 | c2 c3 | ... ]
    tile (MR, NR) += for each row r: the broadcast word weight[r, k2] x panel[k2, :]

Three paths, chosen once from the CPU Numba compiles for (`pair_path`):

    amx           where the CPU has AMX-BF16 and Linux lets the process use it: whole tiles
                  (16 rows, K a multiple of 32) as `tdpbf16ps` on tile registers (below); the
                  other tiles on one of the next two
    dot           where it has AVX512_BF16 and runs it at full rate (`dot_product_pays`): a
                  step (one word, one vector of lanes) is one `vdpbf16ps` (LLVM's
                  llvm.x86.avx512bf16.dpbf16ps.512 on <32 x bfloat>)
    widening      elsewhere: each half widened to float32 in registers (the low half shifted up
                  16 bits, the high half masked), then two llvm.fma; the weights' halves split
                  a vector of words at a time onto the stack, the panel's once a pair for all
                  the rows, so that the inner loop is the float32 tile's but for two fmas a word

The last two add the high (odd) channel's product to the running sum first, then the low (even)
channel's, each sum rounded to float32, which is the order the Intel SDM gives for vdpbf16ps
(tests/engine/test_bfloat16.py checks it on the CPU). The products of two bfloat16 values are
exact in float32, so an fma is the same as a rounded add. One difference: vdpbf16ps treats
subnormal inputs and sums as zero (DAZ, FTZ, whatever MXCSR says) and the widening path keeps
them; where values that small (below 2**-126) occur the two differ, a step by at most 2**-126
times the other factor of a subnormal input, or 2**-126 for a subnormal sum.
`pair_product` below is the plain NumPy twin of both (and the kernel's body under
NUMBA_DISABLE_JIT=1, through gemm.tile_product's twin). The vector paths keep the float32
tile's MR rows of sums in registers at a time; the AMX tile has 16.

LLVM's IR builder in llvmlite has no bfloat or x86_amx type: `_BFloat` and `_Tile` print as
LLVM's, enough to declare the intrinsics and bitcast <16 x i32> words to <32 x bfloat>.

Numba's JIT cache keys machine code on the CPU's features, not on Linux's answer to the tile
request: a process refused the tile registers (a seccomp filter) on a machine whose cache holds
AMX code from one that was not would need a NUMBA_CACHE_DIR of its own.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import sys
from collections.abc import Callable
from typing import NamedTuple

import llvmlite.binding
import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils

from ..layers import from_bfloat16
from .llvm import for_pixels_in_use, fused_multiply_add, prefetch, splat, vector_registers


def pair_product(weight, pairs):
    """The plain twin of the pair tile, exactly: weight (N, K) uint16 rows, K even; pairs
    (K/2, NR, 2) uint16 -> (N, NR) float32, sums[n, j] over k2 in order of
    + w[n, 2*k2 + 1] * x[j, 2*k2 + 1], then + w[n, 2*k2] * x[j, 2*k2], each product exact and
    each sum rounded to float32 (subnormals kept, as the widening path keeps them)."""
    n = weight.shape[0]
    w = from_bfloat16(weight).reshape(n, -1, 2)                        # (N, K/2, 2)
    x = from_bfloat16(pairs)                                           # (K/2, NR, 2)
    sums = np.zeros((n, x.shape[1]), np.float32)
    for k2 in range(x.shape[0]):
        sums += w[:, k2, 1, None] * x[None, k2, :, 1]         # (N, NR): exact products, rounded sums
        sums += w[:, k2, 0, None] * x[None, k2, :, 0]
    return sums


def has_dot_product() -> bool:
    """Whether the CPU Numba compiles for has vdpbf16ps (AVX512_BF16 with 64-byte vectors). Read
    from the same features as llvm.vector_registers, which Numba's JIT cache keys its machine
    code on, so a cached kernel never carries the other path."""
    features = numba.config.CPU_FEATURES or llvmlite.binding.get_host_cpu_features().flatten()
    enabled = {f[1:] for f in features.split(",") if f.startswith("+")}
    return "avx512bf16" in enabled and vector_registers()[0] == 64


def has_amx() -> bool:
    """Whether the CPU Numba compiles for has AMX-BF16 (LLVM reports it only where the OS saves
    the tile registers) and this process may use it: Linux asks each process to request the
    tile data state first (arch_prctl ARCH_REQ_XCOMP_PERM), which this does, once."""
    features = numba.config.CPU_FEATURES or llvmlite.binding.get_host_cpu_features().flatten()
    enabled = {f[1:] for f in features.split(",") if f.startswith("+")}
    return {"amx-bf16", "amx-tile"} <= enabled and _tile_data_permitted()


@functools.cache
def _tile_data_permitted() -> bool:
    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        return False
    arch_prctl, request_permission, tile_data = 158, 0x1023, 18  # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XTILEDATA
    try:
        return ctypes.CDLL(None, use_errno=True).syscall(arch_prctl, request_permission, tile_data) == 0
    except (OSError, AttributeError):
        return False


def pair_path() -> str:
    """The pair tile's path on this CPU: "amx", else "dot" (vdpbf16ps) where it pays, else
    "widening"."""
    if has_amx():
        return "amx"
    return "dot" if has_dot_product() and dot_product_pays(_cpu_name()) else "widening"


def dot_product_pays(cpu_name: str) -> bool:
    """Whether vdpbf16ps beats the widening path on this kind of core. AMD's Zen 4 and Zen 5 run
    it at their float32 FMA's rate, each doing twice the multiply-adds; the Intel cores measured
    (Emerald Rapids with AMX hidden by the hypervisor) at half that rate, slower than two float32
    FMAs a pair (benchmarks/results/2026-12-06c-xeon-emr-avx512bf16/). Both paths give the same
    sums, so the choice is speed only."""
    return cpu_name.startswith("znver")


def _cpu_name() -> str:
    # the CPU Numba compiles for, as its JIT cache keys machine code on
    name = numba.config.CPU_NAME
    return llvmlite.binding.get_host_cpu_name() if name in (None, "", "host") else name


class _BFloat(ir.types.Type):
    """LLVM's bfloat, which llvmlite's IR builder lacks; only printed, never computed with here."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")


def pair_tile_llvm(context, builder, sig, args, mr, nr, transposed, path, vector_rows):
    """The IR of gemm.tile_product (or tile_product_transposed) for uint16 weights (N, K) and a
    pair panel (K/2, NR, 2); the tile (MR, NR) (or (NR, MR)) is float32. The vector paths sum
    `vector_rows` rows at a time in registers (float32's MR: 12 with AVX-512, 6 with AVX2); the
    AMX path takes the whole tiles and leaves the others to the vector path this CPU runs."""
    lanes = vector_registers()[0] // 4
    values = _pair_tile_values(context, builder, sig, args, mr, lanes)
    vectors = nr // lanes                                  # per tile row
    dot = path == "dot" or (path == "amx" and has_dot_product() and dot_product_pays(_cpu_name()))
    product = _vector_product(builder, values, mr, lanes, vectors, transposed, dot, vector_rows)
    if path != "amx":
        for_pixels_in_use(builder, values.pixels, lanes, vectors, product)
        return
    # AMX: whole tiles only (16 rows, K a multiple of 32); the rest on the vector path
    const, pairs, first, last = values.const, values.pairs, values.first, values.last
    whole_rows = builder.icmp_signed("==", builder.add(builder.sub(last, first), const(1)), const(AMX_ROWS))
    whole_pairs = builder.icmp_signed("==", builder.and_(pairs, const(AMX_PAIRS - 1)), const(0))
    whole = builder.and_(whole_rows, builder.and_(whole_pairs, builder.icmp_signed(">", pairs, const(0))))
    with builder.if_else(whole) as (tiles, vectors_path):
        with tiles:
            row_bytes = builder.extract_value(values.weight.strides, 0)
            _amx_product(builder, values.weight_rows[0], row_bytes, values.panel.data, pairs, values.tile.data, nr,
                         transposed, const)
        with vectors_path:
            for_pixels_in_use(builder, values.pixels, lanes, vectors, product)


class _PairTileValues(NamedTuple):
    """What every path of the pair tile reads, set up in IR before its loops."""

    const: Callable  # a Python int -> an intp constant
    weight: object   # the arrays' structs (shape, strides, data)
    panel: object
    tile: object
    pairs: ir.Value  # K / 2
    first: ir.Value  # the tile's first and last weight rows
    last: ir.Value
    weight_rows: list  # a pointer to each of the MR rows' 32-bit words (past the end: the last row)
    next_rows: ir.Value  # the next tile's rows' first word, to prefetch
    panel_vectors: ir.Value  # the panel as vectors of words, (K/2 * NR / VL,)
    tile_vectors: ir.Value  # the tile as vectors of float32, (MR * NR / VL,)
    pixels: ir.Value  # the pixels in use, intp


def _pair_tile_values(context, builder, sig, args, mr, lanes):
    # the intrinsic's arguments as _PairTileValues, for a tile of MR rows and vectors of `lanes`
    weight_value, first_value, rows_value, panel_value, tile_value, pixels_value = args
    weight_array = context.make_array(sig.args[0])(context, builder, weight_value)
    panel_array = context.make_array(sig.args[3])(context, builder, panel_value)
    tile_array = context.make_array(sig.args[4])(context, builder, tile_value)
    word = ir.IntType(32)
    intp = context.get_value_type(numba.types.intp)

    def const(i):
        return ir.Constant(intp, i)

    pairs = builder.extract_value(panel_array.shape, 0)                               # K / 2
    row_words = builder.sdiv(builder.extract_value(weight_array.strides, 0), const(4))  # words a row
    first = context.cast(builder, first_value, sig.args[1], numba.types.intp)
    last = builder.sub(builder.add(first, context.cast(builder, rows_value, sig.args[2], numba.types.intp)), const(1))
    weight_words = builder.bitcast(weight_array.data, word.as_pointer())
    weight_rows = []
    for r in range(mr):
        row = builder.add(first, const(r))
        row = builder.select(builder.icmp_signed(">", row, last), last, row)
        weight_rows.append(builder.gep(weight_words, [builder.mul(row, row_words)]))
    next_rows = builder.gep(weight_words, [builder.mul(builder.add(first, const(mr)), row_words)])
    panel_vectors = builder.bitcast(panel_array.data, ir.VectorType(word, lanes).as_pointer())
    tile_vectors = builder.bitcast(tile_array.data, ir.VectorType(ir.FloatType(), lanes).as_pointer())
    pixels = context.cast(builder, pixels_value, sig.args[5], numba.types.intp)
    return _PairTileValues(const, weight_array, panel_array, tile_array, pairs, first, last, weight_rows, next_rows,
                           panel_vectors, tile_vectors, pixels)


def _vector_product(builder, values, mr, lanes, vectors, transposed, dot, vector_rows):
    # product(used): emits the tile's sums over the pairs of its first `used` vectors of pixels,
    # by vdpbf16ps (dot) or the widening path, and stores them
    words, floats = ir.VectorType(ir.IntType(32), lanes), ir.VectorType(ir.FloatType(), lanes)
    const, pairs, panel_vectors = values.const, values.pairs, values.panel_vectors

    def product(used):
        for block in range(0, mr, vector_rows):  # at most vector_rows rows' sums in registers at once
            product_rows(used, range(block, min(mr, block + vector_rows)))

    def prefetch_next(k2, rows):
        # a cache line (16 words) of each of the next tile's MR rows every 16 pairs
        with builder.if_then(builder.icmp_signed("==", builder.and_(k2, const(15)), const(0))):
            block_part = builder.gep(values.next_rows, [builder.mul(k2, const(mr))])
            for i in rows:
                prefetch(builder, builder.gep(block_part, [const(i * 16)]))

    def panel_pairs(k2, used):  # panel[k2, :, :] as `used` vectors of words
        return [builder.load(builder.gep(panel_vectors, [builder.add(builder.mul(k2, const(vectors)), const(v))]),
                             align=4) for v in range(used)]

    def product_rows(used, rows):
        sums = {r: [cgutils.alloca_once_value(builder, ir.Constant(floats, [0.0] * lanes)) for _ in range(used)]
                for r in rows}
        weight_rows = [values.weight_rows[r] for r in rows]
        if not dot:
            _widening_loop(builder, weight_rows, pairs, lambda k2: panel_pairs(k2, used), [sums[r] for r in rows],
                           words, floats, const, lambda k2: prefetch_next(k2, rows))
        else:
            with cgutils.for_range(builder, pairs) as loop:
                prefetch_next(loop.index, rows)
                _dot_step(builder, weight_rows, loop.index, panel_pairs(loop.index, used), [sums[r] for r in rows],
                          words, floats)
        _store_sums(builder, sums, values.tile.data, values.tile_vectors, mr, vectors, lanes, transposed, const)

    return product


# ---- AMX: tdpbf16ps on tiles --------------------------------------------------------------------------
# An AMX tile register holds up to 16 rows of 64 bytes. One tdpbf16ps: C (16 rows x 16 float32)
# += A (16 rows x 32 bfloat16) . B (16 rows of 16 pairs), B in the same pair layout as our
# panels ("VNNI"), so the panels and the weights as stored are loaded as tiles directly:
#     A  16 weight rows, 32 channels each: the weight at row stride, as stored
#     B  16 pairs of a panel (32 channels), 16 of its pixels: the panel at NR * 4 bytes a pair
# A tile of MR = 16 rows by NR = 32 pixels is two C tiles. Its sums are not vdpbf16ps's: AMX
# adds a row's products in its own order and precision (tests hold it to the twin within
# float32's rounding of the sums, not bit for bit).

AMX_ROWS = 16   # rows of a tile register, the MR of the AMX path
AMX_PAIRS = 16  # pairs (32 channels) in one A row of 64 bytes


class _Tile(ir.types.Type):
    """LLVM's x86_amx, a tile register's value, which llvmlite lacks"""

    def _to_string(self):
        return "x86_amx"

    def __eq__(self, other):
        return isinstance(other, _Tile)

    def __hash__(self):
        return hash("x86_amx")


def _amx_product(builder, weight_row, row_bytes, panel, pairs, tile, nr, transposed, const):
    # tile (16, NR) float32 (or (NR, 16)) = weight rows (16, K) . panel (K/2, NR, 2)
    amx, i16, i64, byte = _Tile(), ir.IntType(16), ir.IntType(64), ir.IntType(8).as_pointer()
    module = builder.module
    load = cgutils.get_or_insert_function(module, ir.FunctionType(amx, [i16, i16, byte, i64]),
                                          "llvm.x86.tileloadd64.internal")
    dot = cgutils.get_or_insert_function(module, ir.FunctionType(amx, [i16, i16, i16, amx, amx, amx]),
                                         "llvm.x86.tdpbf16ps.internal")
    store = cgutils.get_or_insert_function(module, ir.FunctionType(ir.VoidType(), [i16, i16, byte, i64, amx]),
                                           "llvm.x86.tilestored64.internal")
    zero = cgutils.get_or_insert_function(module, ir.FunctionType(amx, [i16, i16]), "llvm.x86.tilezero.internal")
    rows, width = ir.Constant(i16, AMX_ROWS), ir.Constant(i16, 64)       # every tile: 16 rows of 64 bytes
    pair_row = ir.Constant(i64, nr * 4)          # bytes from a panel's pair to the next, and a tile row's
    halves = nr // 16                                                     # C tiles: 16 pixels each
    weight_bytes, panel_bytes = builder.bitcast(weight_row, byte), builder.bitcast(panel, byte)
    chunks = builder.sdiv(pairs, const(AMX_PAIRS))
    start = builder.block
    zeros = [builder.call(zero, [rows, width]) for _ in range(halves)]
    loop_block = builder.append_basic_block("amx.loop")
    done_block = builder.append_basic_block("amx.done")
    builder.branch(loop_block)
    builder.position_at_end(loop_block)
    chunk = builder.phi(chunks.type)
    sums = [builder.phi(amx) for _ in range(halves)]
    a = builder.call(load, [rows, width, builder.gep(weight_bytes, [builder.mul(chunk, const(64))]),
                            builder.sext(row_bytes, i64) if row_bytes.type != i64 else row_bytes])
    panel_chunk = builder.gep(panel_bytes, [builder.mul(chunk, const(AMX_PAIRS * nr * 4))])
    new = [builder.call(dot, [rows, width, width, sums[h], a,
                              builder.call(load, [rows, width, builder.gep(panel_chunk, [const(64 * h)]), pair_row])])
           for h in range(halves)]
    following = builder.add(chunk, const(1))
    chunk.add_incoming(const(0), start)
    chunk.add_incoming(following, builder.block)
    for phi, z, n in zip(sums, zeros, new):
        phi.add_incoming(z, start)
        phi.add_incoming(n, builder.block)
    builder.cbranch(builder.icmp_signed("<", following, chunks), loop_block, done_block)
    builder.position_at_end(done_block)
    tile_bytes = builder.bitcast(tile, byte)
    if not transposed:  # (16, NR): each C tile's 16 pixels of the rows
        for h in range(halves):
            builder.call(store, [rows, width, builder.gep(tile_bytes, [const(64 * h)]), pair_row, new[h]])
        return
    # (NR, 16): through a scratch (16, NR), then transposed element by element
    scratch = cgutils.alloca_once(builder, ir.ArrayType(ir.FloatType(), AMX_ROWS * nr))
    scratch_bytes = builder.bitcast(scratch, byte)
    for h in range(halves):
        builder.call(store, [rows, width, builder.gep(scratch_bytes, [const(64 * h)]), pair_row, new[h]])
    floats = builder.bitcast(scratch, ir.FloatType().as_pointer())
    with cgutils.for_range(builder, const(AMX_ROWS)) as r_loop:
        with cgutils.for_range(builder, const(nr)) as j_loop:
            r, j = r_loop.index, j_loop.index
            value = builder.load(builder.gep(floats, [builder.add(builder.mul(r, const(nr)), j)]))
            builder.store(value, builder.gep(tile, [builder.add(builder.mul(j, const(AMX_ROWS)), r)]))


def _store_sums(builder, sums, tile, tile_vectors, mr, vectors, lanes, transposed, const):
    # the running sums {row: [vector, ...]} into the tile (MR, NR), or (NR, MR) lane by lane
    for r, row_sums in sums.items():
        for v, running in enumerate(row_sums):
            running = builder.load(running)
            if transposed:
                for lane in range(lanes):
                    value = builder.extract_element(running, ir.Constant(ir.IntType(32), lane))
                    builder.store(value, builder.gep(tile, [const((v * lanes + lane) * mr + r)]))
            else:
                builder.store(running, builder.gep(tile_vectors, [const(r * vectors + v)]), align=4)


def _dot_step(builder, weight_rows, k2, pixels, sums, words, floats):
    # sums[r][v] = vdpbf16ps(sums[r][v], panel vector v, weight word of row r broadcast)
    pairs = ir.VectorType(_BFloat(), 2 * words.count)
    dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(floats, [floats, pairs, pairs]),
                                         "llvm.x86.avx512bf16.dpbf16ps.512")
    pixel_pairs = [builder.bitcast(p, pairs) for p in pixels]
    for r, row in enumerate(weight_rows):
        weight_pair = builder.bitcast(splat(builder, builder.load(builder.gep(row, [k2])), words), pairs)
        for v, p in enumerate(pixel_pairs):
            builder.store(builder.call(dot, [builder.load(sums[r][v]), p, weight_pair]), sums[r][v])


def _widening_loop(builder, weight_rows, pairs, panel_pairs, sums, words, floats, const, prefetch_next):
    # the pairs a chunk of `lanes` at a time: each row's words of the chunk split once into their
    # high (odd) and low (even) halves as float32, kept on the stack (rows, 2, lanes), so that a
    # step reads each half as a broadcast load (on AVX-512 folded into the fma) instead of
    # splitting a broadcast word once per row and pair (two more vector operations a row)
    lanes, single = words.count, floats.element
    split = builder.bitcast(cgutils.alloca_once(builder, ir.ArrayType(single, 2 * lanes * len(weight_rows))),
                            single.as_pointer())

    def half_at(r, half, j):  # where row r's half (0 odd, 1 even) of the chunk's pair j is
        return builder.gep(split, [builder.add(const((2 * r + half) * lanes), j)])

    chunks = builder.sdiv(builder.add(pairs, const(lanes - 1)), const(lanes))
    with cgutils.for_range(builder, chunks) as chunk_loop:
        start = builder.mul(chunk_loop.index, const(lanes))
        count = builder.sub(pairs, start)
        count = builder.select(builder.icmp_signed("<", count, const(lanes)), count, const(lanes))
        prefetch_next(start)
        with builder.if_else(builder.icmp_signed("==", count, const(lanes))) as (whole, part):
            with whole:  # a vector of words a row
                for r, row in enumerate(weight_rows):
                    w = builder.load(builder.bitcast(builder.gep(row, [start]), words.as_pointer()), align=4)
                    for half, value in enumerate(_halves(builder, w, floats)):
                        builder.store(value, builder.bitcast(half_at(r, half, const(0)), floats.as_pointer()), align=4)
            with part:  # the last few pairs word by word
                with cgutils.for_range(builder, count) as word_loop:
                    for r, row in enumerate(weight_rows):
                        w = builder.load(builder.gep(row, [builder.add(start, word_loop.index)]))
                        for half, value in enumerate(_halves(builder, w, single)):
                            builder.store(value, half_at(r, half, word_loop.index))
        with cgutils.for_range(builder, count) as step_loop:
            j = step_loop.index
            widened = [_halves(builder, p, floats) for p in panel_pairs(builder.add(start, j))]  # (odd, even) each
            for r, row_sums in enumerate(sums):
                w_odd, w_even = (splat(builder, builder.load(half_at(r, half, j)), floats) for half in (0, 1))
                # the high half's product added first, then the low half's, as vdpbf16ps does
                for running, (p_odd, p_even) in zip(row_sums, widened):
                    first = fused_multiply_add(builder, w_odd, p_odd, builder.load(running))
                    builder.store(fused_multiply_add(builder, w_even, p_even, first), running)


def _halves(builder, w, floats):
    # a 32-bit word (or vector of them) of two bfloat16 -> (high, low) as float32: masked, shifted
    ones = [0xFFFF0000] * floats.count if isinstance(floats, ir.VectorType) else 0xFFFF0000
    sixteen = [16] * floats.count if isinstance(floats, ir.VectorType) else 16
    return (builder.bitcast(builder.and_(w, ir.Constant(w.type, ones)), floats),
            builder.bitcast(builder.shl(w, ir.Constant(w.type, sixteen)), floats))
