"""LLVM pieces the kernels share: a fused multiply-add, vector splats, prefetches, and the
host's vector registers the tiles are sized to.

Numba has no vector types, and some loops it compiles do not come out as fast as their
arithmetic allows (running sums reloaded every step, overlap checks on every entry). Where that
matters, a kernel is written twice, in one idiom:

    a plain twin      an ordinary Python/NumPy function with the kernel's contract in its
                      docstring; it is what runs under NUMBA_DISABLE_JIT=1, and what the tests
                      compare the compiled kernel with
    an intrinsic      `numba.extending.intrinsic` emitting LLVM IR through llvmlite's builder
                      (generic vectors <VL x float>, llvm.fma), bound to the twin with
                      `numba.extending.overload(twin, inline="always")`, so compiled callers get
                      the IR and plain callers the twin

`fma` below is the smallest case; gemm.py's micro-kernel, depthwise.py's row kernel and
layernorm.py's lane sums are the others. The helpers here are called from their codegen.

The JIT cache: Numba's cache knows a compiled kernel's own source file only, not the files of
what it calls or inlines. After editing an intrinsic's IR (here, gemm.py, depthwise.py,
layernorm.py's lane sums, gemm_bf16.py's pair tile) or a helper other modules' kernels call
(erf.py, linear.py's tiles, layernorm.py's per-pixel steps, bfloat16.py's rounding, jit.py's
settings), clear the __pycache__ of engine/ so that every kernel that uses it is compiled again.
"""

from __future__ import annotations

import llvmlite.binding
import numba
import numba.extending
from llvmlite import ir
from numba.core import cgutils


def fma(a, b, c):
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


@numba.extending.overload(fma, inline="always")
def _fma_compiled(a, b, c):
    if isinstance(a, numba.types.Float) and a == b == c:
        return lambda a, b, c: _llvm_fma(a, b, c)


def vector_registers() -> tuple[int, int]:
    """(bytes per vector register, vector registers) of the CPU Numba compiles for."""
    features = numba.config.CPU_FEATURES or llvmlite.binding.get_host_cpu_features().flatten()
    enabled = {f[1:] for f in features.split(",") if f.startswith("+")}
    if "avx512f" in enabled:
        return 64, 32
    if "avx2" in enabled or "avx" in enabled:
        return 32, 16
    return 16, 16


def fused_multiply_add(builder, a, b, c):
    """a * b + c rounded once (llvm.fma), for float or double scalars or vectors of them"""
    kind = a.type
    element = kind.element if isinstance(kind, ir.VectorType) else kind
    name = ("llvm.fma." + (f"v{kind.count}" if isinstance(kind, ir.VectorType) else "")
            + ("f32" if isinstance(element, ir.FloatType) else "f64"))
    return builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(kind, [kind] * 3), name),
                        [a, b, c])


def prefetch(builder, address):
    """Ask for the cache line at `address` (a pointer) to be brought near for reading, with
    locality 2 (prefetcht1 on x86: into L2): a hint that never faults, even past an array's end"""
    byte_pointer = ir.IntType(8).as_pointer()
    # the intrinsic's name carries its pointer type: "p0" since LLVM 15's opaque pointers
    name = "llvm.prefetch.p0" if llvmlite.binding.llvm_version_info >= (15,) else "llvm.prefetch.p0i8"
    hint = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer] + [ir.IntType(32)] * 3), name)
    read, locality, data = (ir.Constant(ir.IntType(32), v) for v in (0, 2, 1))
    builder.call(hint, [builder.bitcast(address, byte_pointer), read, locality, data])


def splat(builder, value, vector):
    """value in every lane of a vector of type `vector`"""
    first = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(first, ir.Constant(vector, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), vector.count), [0] * vector.count))



def for_pixels_in_use(builder, pixels, lanes, vectors, product, used=1):
    """Emit product(used) for the fewest vectors of `lanes` lanes, up to `vectors`, that hold
    `pixels` (an intp value): a tile's empty vectors (a last panel's) cost nothing."""
    if used == vectors:
        product(used)
        return
    enough_lanes = ir.Constant(pixels.type, used * lanes)
    with builder.if_else(builder.icmp_signed("<=", pixels, enough_lanes)) as (enough, more):
        with enough:
            product(used)
        with more:
            for_pixels_in_use(builder, pixels, lanes, vectors, product, used + 1)
