"""The fast engine: the same network (`network.py`) with fused Numba kernels, and a batch shared
between threads image by image. One module per layer family, each with its forward and
backward kernels, their twins' names (in layers.py) and its public wrappers:

    block.py      the block forward, inference and training, calling the layer modules in order
    depthwise.py  7x7 depthwise conv + LayerNorm, and its backward
    layernorm.py  LayerNorm, forward and backward; the RMS and simple norms' forward
    linear.py     the linears on gemm.py's tiles: fc1 + GELU, fc2 + layer scale + residual,
                  the patchify convs and the classifier
    mlp.py        the block's MLP panel by panel, GELU alone, and its training steps (GELU,
                  layer scale)
    grn.py        ConvNeXt V2's GRN, forward and backward
    adamw.py      AdamW's update
    gemm.py       the matrix product's micro-kernel and its pixel panels
    gemm_bf16.py  its bfloat16 pair tile: AMX, vdpbf16ps or widening, and its NumPy twin
    bfloat16.py   rounding to bfloat16 in the kernels, pair panels, the weights' pair rows
    erf.py        the erf and exp the GELU uses
    jit.py        JIT settings, compile notice, the serial or parallel choice, chunked sums
    llvm.py       LLVM helpers; the plain-twin-plus-intrinsic idiom and the JIT-cache rule
    checks.py     the wrappers' argument checks: the kernels index without bounds checks
    threads.py    one thread count for Numba and BLAS; the batch split (`map_over_batch`)
The reference network never imports this package.
"""

from __future__ import annotations

from .. import layers
from ..network import Ops
from . import block, layernorm, linear, mlp
from .threads import map_over_batch, set_num_threads

# BLAS is never called in a block: an idle BLAS thread that busy-waits would take a core from the
# kernels. timm's own variants run on kernels too (their GELU outside the blocks, the RMS and
# simple norms), but for the overlapping stems' two strided convs: once per image, on few input
# channels, the reference's im2col and BLAS product is as fast as the tiles (commit 05abc16).
FUSED = Ops(layer_norm=layernorm.layer_norm, block=block.convnext_block, patchify_conv=linear.patchify_conv,
            linear=linear.linear, strided_conv=layers.strided_conv, rms_norm=layernorm.rms_norm,
            simple_norm=layernorm.simple_norm, gelu=mlp.gelu)

__all__ = ["FUSED", "map_over_batch", "set_num_threads"]
