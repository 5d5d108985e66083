"""The fast engine: the same network (`network.py`) with fused Numba kernels, and a batch shared
between threads image by image.

    kernels.py   Numba kernels for what BLAS does not do, each checked against its twin in layers.py
    backward_kernels.py   the same for training (the backward passes, AdamW), used by train/fused.py
    threads.py   one thread count for Numba and BLAS; the batch split (`map_over_batch`)
The reference network never imports this package.
"""

from __future__ import annotations

from ..network import Ops
from . import kernels
from .threads import map_over_batch, set_num_threads

FUSED = Ops(layer_norm=kernels.layer_norm, block=kernels.convnext_block)

__all__ = ["FUSED", "map_over_batch", "set_num_threads"]
