"""The fast engine: the same network (`network.py`) with fused Numba kernels, and a batch shared
between threads image by image.

    gemm.py      the matrix product's micro-kernel, on the weights as stored (a tile in registers)
    kernels.py   Numba kernels for the block, fused around gemm.py's tiles, each checked against
                 its twin in layers.py
    backward_kernels.py   the same for training (the backward passes, AdamW), used by train/fused.py
    checks.py    the wrappers' argument checks: the kernels index without bounds checks
    threads.py   one thread count for Numba and BLAS; the batch split (`map_over_batch`)
The reference network never imports this package.
"""

from __future__ import annotations

from ..network import Ops
from . import kernels
from .threads import map_over_batch, set_num_threads

# BLAS is never called: an idle BLAS thread that busy-waits would take a core from the kernels
FUSED = Ops(layer_norm=kernels.layer_norm, block=kernels.convnext_block, patchify_conv=kernels.patchify_conv,
            linear=kernels.linear)

__all__ = ["FUSED", "map_over_batch", "set_num_threads"]
