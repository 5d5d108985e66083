"""The matrix product of the block's two linears, on the weights as the model stores them.

A linear over pixels, y = x @ W^T + b with x: (M, K) pixels by channels and W: (N, K) (timm's
(out, in), which is how the model keeps linear weights in memory), is computed transposed:
y^T = W x^T, one tile of MR output channels by NR pixels at a time. The tile's MR x NR sums
stay in vector registers for the whole K loop; each step broadcasts one weight per output
channel and multiplies it into NR pixels loaded as vectors. That is the register-blocked
micro-kernel every fast GEMM is built on (Goto and van de Geijn, "Anatomy of high-performance
matrix multiplication", 2008), here with the roles chosen so that the weights are read in place:

    weights      (N, K) rows, as stored: never copied or packed, a mapped file stays mapped
    activations  "pixel panels": (P, K, NR), panel p holding pixels p*NR .. p*NR+NR-1, a
                 column per pixel; the last panel is padded with zeros. The fc1 input is
                 packed a panel at a time (cheap: K*NR copies against N*K*NR multiply-adds),
                 and fc1 writes its output (the MLP's hidden tensor) as panels, which fc2 reads
                 without packing (linear.py, mlp.py).

Drawn for MR = 6 weight rows and NR = 16 pixels (AVX2, float32):

    weights (N, K), as stored               pixel panels (P, K, NR)
    row c0     [w w w w w ... w]  -+        panel p:  k=0  [x x x ... x]   NR pixels
    row c0+1   [w w w w w ... w]   | MR               k=1  [x x x ... x]   p*NR .. p*NR+NR-1,
    ...                            |  one tile        ...                  one column each
    row c0+5   [w w w w w ... w]  -+                  k=K-1[x x x ... x]
    row c0+6   ...  the next tile's rows, prefetched while this one sums

    tile (MR, NR) += weights[c0 : c0 + MR, k] (one broadcast each) x panel[k, :] (NR / VL vectors)
    for k = 0 .. K-1, in registers; then stored as (MR, NR), or transposed as (NR, MR) when
    the output is pixels by channels (fc2, the classifier).

Numba has no vector types and LLVM does not keep a loop's running sums in registers across
an outer loop on its own, so the micro-kernel (`tile_product`) is LLVM IR written through a
Numba intrinsic: generic LLVM vectors (<VL x float>) and llvm.fma, which LLVM lowers to the
host's widest vectors. Its plain-Python body is the twin under NUMBA_DISABLE_JIT=1; the tests
check the compiled one against `x @ w.T`.

Weights as stored are read straight from memory: at batch 1 a tile meets each weight once or
twice, and the hardware prefetchers do not see MR slow streams (the tile's rows) coming. So
while a tile sums, it asks for the next tile's weight rows (`prefetch`), as many cache lines
of them as it reads of its own, to have them near (in L2 on x86) when the next tile starts.

The tile is sized to the host's vector registers once, at import (`TILES`): 32 registers of
64 bytes with AVX-512, 16 of 32 bytes with AVX2. Another CPU only changes speed, not results:
LLVM splits or joins the vectors as the machine has them, and every output sums its K products
in order, one fused multiply-add each, whatever the tile, the panel or the batch it is in.
"""

from __future__ import annotations

import numba
import numba.extending
import numpy as np
from llvmlite import ir
from numba.core import cgutils

from .gemm_bf16 import AMX_ROWS, pair_path, pair_product, pair_tile_llvm
from .llvm import for_pixels_in_use, fused_multiply_add, prefetch, splat, vector_registers


def _tile_shapes() -> dict[np.dtype, tuple[int, int]]:
    """(MR output channels, NR pixels) of a tile per dtype: NR two vectors wide, and MR as many
    rows as leave one register for the broadcast weight and two for the loaded pixels."""
    vector_bytes, registers = vector_registers()
    shapes = {}
    for dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        lanes = vector_bytes // dtype.itemsize
        rows = min(12, (registers - 3) // 2)
        shapes[dtype] = (rows, 2 * lanes)
    # bfloat16 pairs (gemm_bf16.py), keyed by their bits' dtype: a 32-bit lane a pixel, as float32,
    # and as many rows as the CPU's path takes (16 for an AMX tile)
    shapes[np.dtype(np.uint16)] = (AMX_ROWS if pair_path() == "amx" else shapes[np.dtype(np.float32)][0],
                                   shapes[np.dtype(np.float32)][1])
    return shapes


TILES = _tile_shapes()


def panel_pixels(dtype) -> int:
    """NR: pixels per panel for this dtype."""
    return TILES[np.dtype(dtype)][1]


def to_panels(x: np.ndarray) -> np.ndarray:
    """(M, K) pixels by channels -> (P, K, NR) pixel panels, the last padded with zeros"""
    m, k = x.shape
    nr = panel_pixels(x.dtype)
    full, rest = divmod(m, nr)
    panels = np.empty((full + (rest > 0), k, nr), x.dtype)
    columns = panels.transpose(0, 2, 1)  # (P, NR, K): a view, written in one pass
    columns[:full] = x[: full * nr].reshape(full, nr, k)
    if rest:
        columns[full, :rest] = x[full * nr :]
        columns[full, rest:] = 0
    return panels


def from_panels(panels: np.ndarray, m: int) -> np.ndarray:
    """(P, K, NR) pixel panels -> (M, K) pixels by channels"""
    p, k, nr = panels.shape
    return np.ascontiguousarray(panels.transpose(0, 2, 1).reshape(p * nr, k)[:m])

# ---- the micro-kernel ---------------------------------------------------------------------------


def tile_product(weight, first_row, rows, panel, tile, pixels):
    """tile[r, j] = sum over k of weight[first_row + r, k] * panel[k, j], for r < MR and
    j < pixels; rows past `rows` (the end of the weight) repeat its last row, and columns past
    `pixels` are left undefined: both are the caller's to ignore. Only the panel's vectors that
    hold the pixels are read (a last panel's empty half costs nothing).
    weight: (N, K); panel: (K, NR); tile: (MR, NR). Compiled: the intrinsic below.
    bfloat16 (gemm_bf16.py): weight (N, K) uint16, K even; panel (K/2, NR, 2) uint16 pairs;
    tile float32, summed as gemm_bf16.pair_product says."""
    mr = tile.shape[0]
    picked = np.minimum(np.arange(first_row, first_row + mr), first_row + rows - 1)
    tile[:] = pair_product(weight[picked], panel) if weight.dtype == np.uint16 else weight[picked] @ panel


def tile_product_transposed(weight, first_row, rows, panel, tile, pixels):
    """tile_product with the tile stored transposed, pixels by channels: tile: (NR, MR)."""
    tile_product(weight, first_row, rows, panel, tile.T, pixels)


def _tile_product_llvm(typingctx, weight, first_row, rows, panel, tile, pixels, transposed, path=None):
    dtype = weight.dtype
    if dtype == numba.types.uint16:
        return _pair_tile_product_llvm(weight, first_row, rows, panel, tile, pixels, transposed, path)
    if not (isinstance(weight, numba.types.Array) and weight.ndim == 2 and weight.layout == "C"
            and isinstance(panel, numba.types.Array) and panel.layout == "C" and panel.dtype == dtype
            and isinstance(tile, numba.types.Array) and tile.layout == "C" and tile.dtype == dtype):
        return None
    mr, nr = TILES[np.dtype(str(dtype))]
    vector_bytes, _ = vector_registers()
    lanes = vector_bytes // np.dtype(str(dtype)).itemsize
    vectors = nr // lanes  # per tile row
    signature = numba.types.void(weight, first_row, rows, panel, tile, pixels)

    def codegen(context, builder, sig, args):
        _tile_product_ir(context, builder, sig, args, dtype, mr, lanes, vectors, transposed)
        return context.get_dummy_value()

    return signature, codegen


def _pair_tile_product_llvm(weight, first_row, rows, panel, tile, pixels, transposed, path):
    # the bfloat16 pair tile (gemm_bf16.py); path None: the CPU's (gemm_bf16.pair_path)
    if not (isinstance(weight, numba.types.Array) and weight.ndim == 2 and weight.layout == "C"
            and isinstance(panel, numba.types.Array) and panel.ndim == 3 and panel.layout == "C"
            and panel.dtype == numba.types.uint16 and isinstance(tile, numba.types.Array) and tile.layout == "C"
            and tile.dtype == numba.types.float32):
        return None
    mr, nr = TILES[np.dtype(np.uint16)]
    chosen = pair_path() if path is None else path
    vector_rows = TILES[np.dtype(np.float32)][0]  # the vector paths: as many rows at once as float32's tile

    def codegen(context, builder, sig, args):
        pair_tile_llvm(context, builder, sig, args, mr, nr, transposed, chosen, vector_rows)
        return context.get_dummy_value()

    return numba.types.void(weight, first_row, rows, panel, tile, pixels), codegen


def _tile_product_ir(context, builder, sig, args, dtype, mr, lanes, vectors, transposed):
    # the intrinsic's IR for a tile of MR rows by `vectors` vectors of `lanes` elements
    weight_value, first_value, rows_value, panel_value, tile_value, pixels_value = args
    weight_array = context.make_array(sig.args[0])(context, builder, weight_value)
    panel_array = context.make_array(sig.args[3])(context, builder, panel_value)
    tile_array = context.make_array(sig.args[4])(context, builder, tile_value)
    scalar = context.get_value_type(dtype)
    vector = ir.VectorType(scalar, lanes)
    intp = context.get_value_type(numba.types.intp)
    align = context.get_abi_sizeof(scalar)

    def const(i):
        return ir.Constant(intp, i)

    depth = builder.extract_value(weight_array.shape, 1)                               # K
    row_stride = builder.extract_value(weight_array.strides, 0)                        # bytes
    row_stride = builder.sdiv(row_stride, const(context.get_abi_sizeof(scalar)))
    first = context.cast(builder, first_value, sig.args[1], numba.types.intp)
    last = builder.sub(builder.add(first, context.cast(builder, rows_value, sig.args[2], numba.types.intp)),
                       const(1))
    weight_rows = []  # a pointer to each of the MR weight rows (past the end: the last row)
    for r in range(mr):
        row = builder.add(first, const(r))
        row = builder.select(builder.icmp_signed(">", row, last), last, row)
        weight_rows.append(builder.gep(weight_array.data, [builder.mul(row, row_stride)]))
    # the next tile's MR weight rows: one block of MR * K elements after this tile's rows
    next_rows = builder.gep(weight_array.data, [builder.mul(builder.add(first, const(mr)), row_stride)])
    line = 64 // np.dtype(str(dtype)).itemsize  # elements in a cache line (64 bytes)
    panel_vectors = builder.bitcast(panel_array.data, vector.as_pointer())            # (K * NR / VL,)
    tile_vectors = builder.bitcast(tile_array.data, vector.as_pointer())              # (MR * NR / VL,)

    def product(used):
        # the sums over K of the first `used` vectors of each tile row
        # the MR x used running sums: allocas that LLVM promotes to registers
        sums = [[cgutils.alloca_once_value(builder, ir.Constant(vector, [0.0] * lanes)) for _ in range(used)]
                for _ in range(mr)]
        with cgutils.for_range(builder, depth) as loop:
            k = loop.index
            # every `line` steps of k (as many as a cache line holds), MR lines of the next
            # tile's block of rows, from element k * MR on: the whole block by k = K
            with builder.if_then(builder.icmp_signed("==", builder.and_(k, const(line - 1)), const(0))):
                block_part = builder.gep(next_rows, [builder.mul(k, const(mr))])
                for i in range(mr):
                    prefetch(builder, builder.gep(block_part, [const(i * line)]))
            pixels = [builder.load(builder.gep(panel_vectors, [builder.add(builder.mul(k, const(vectors)),
                                                                           const(v))]), align=align)
                      for v in range(used)]                                            # panel[k, :]
            for r in range(mr):
                w = builder.load(builder.gep(weight_rows[r], [k]))                     # weight[row r, k]
                broadcast = splat(builder, w, vector)
                for v in range(used):
                    builder.store(fused_multiply_add(builder, broadcast, pixels[v], builder.load(sums[r][v])),
                                  sums[r][v])
        for r in range(mr):
            for v in range(used):
                running = builder.load(sums[r][v])
                if transposed:  # tile (NR, MR): lane by lane, a scalar store each
                    for lane in range(lanes):
                        value = builder.extract_element(running, ir.Constant(ir.IntType(32), lane))
                        builder.store(value, builder.gep(tile_array.data, [const((v * lanes + lane) * mr + r)]))
                else:
                    builder.store(running, builder.gep(tile_vectors, [const(r * vectors + v)]), align=align)

    for_pixels_in_use(builder, context.cast(builder, pixels_value, sig.args[5], numba.types.intp), lanes, vectors,
                      product)


_tile_product_rows = numba.extending.intrinsic(
    lambda typingctx, weight, first_row, rows, panel, tile, pixels:
        _tile_product_llvm(typingctx, weight, first_row, rows, panel, tile, pixels, transposed=False))
_tile_product_columns = numba.extending.intrinsic(
    lambda typingctx, weight, first_row, rows, panel, tile, pixels:
        _tile_product_llvm(typingctx, weight, first_row, rows, panel, tile, pixels, transposed=True))


def tile_product_widening(weight, first_row, rows, panel, tile, pixels):
    """tile_product on bfloat16 pairs by the widening path on any CPU (the tests' handle on it)."""
    tile_product(weight, first_row, rows, panel, tile, pixels)


def tile_product_dot(weight, first_row, rows, panel, tile, pixels):
    """tile_product on bfloat16 pairs by vdpbf16ps (only where the CPU has AVX512_BF16)."""
    tile_product(weight, first_row, rows, panel, tile, pixels)


def tile_product_amx(weight, first_row, rows, panel, tile, pixels):
    """tile_product on bfloat16 pairs by AMX where the tile is whole (only where the CPU has AMX)."""
    tile_product(weight, first_row, rows, panel, tile, pixels)


# each path its own intrinsic and overload: Numba keys what it inlines on the code, so one
# factory's closures would all compile to the first path
@numba.extending.intrinsic
def _pair_tile_widening(typingctx, weight, first_row, rows, panel, tile, pixels):
    return _tile_product_llvm(typingctx, weight, first_row, rows, panel, tile, pixels, False, "widening")


@numba.extending.intrinsic
def _pair_tile_dot(typingctx, weight, first_row, rows, panel, tile, pixels):
    return _tile_product_llvm(typingctx, weight, first_row, rows, panel, tile, pixels, False, "dot")


@numba.extending.intrinsic
def _pair_tile_amx(typingctx, weight, first_row, rows, panel, tile, pixels):
    return _tile_product_llvm(typingctx, weight, first_row, rows, panel, tile, pixels, False, "amx")


@numba.extending.overload(tile_product_widening, inline="always")
def _tile_product_widening_compiled(weight, first_row, rows, panel, tile, pixels):
    return lambda weight, first_row, rows, panel, tile, pixels: _pair_tile_widening(weight, first_row, rows, panel,
                                                                                   tile, pixels)


@numba.extending.overload(tile_product_dot, inline="always")
def _tile_product_dot_compiled(weight, first_row, rows, panel, tile, pixels):
    return lambda weight, first_row, rows, panel, tile, pixels: _pair_tile_dot(weight, first_row, rows, panel,
                                                                              tile, pixels)


@numba.extending.overload(tile_product_amx, inline="always")
def _tile_product_amx_compiled(weight, first_row, rows, panel, tile, pixels):
    return lambda weight, first_row, rows, panel, tile, pixels: _pair_tile_amx(weight, first_row, rows, panel,
                                                                              tile, pixels)


@numba.extending.overload(tile_product, inline="always")
def _tile_product_compiled(weight, first_row, rows, panel, tile, pixels):
    return lambda weight, first_row, rows, panel, tile, pixels: _tile_product_rows(weight, first_row, rows, panel,
                                                                                  tile, pixels)


@numba.extending.overload(tile_product_transposed, inline="always")
def _tile_product_transposed_compiled(weight, first_row, rows, panel, tile, pixels):
    return lambda weight, first_row, rows, panel, tile, pixels: _tile_product_columns(weight, first_row, rows, panel,
                                                                                     tile, pixels)


def tile_shape(sample):
    """(MR, NR) for sample's dtype; compiled, a constant."""
    return TILES[sample.dtype]


@numba.extending.overload(tile_shape, inline="always")
def _tile_shape_compiled(sample):
    shape = TILES[np.dtype(str(sample.dtype))]
    return lambda sample: shape
