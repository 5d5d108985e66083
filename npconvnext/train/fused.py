"""The numba backend's training block: `backward.block_forward` and `backward.block_backward`
with the engine's kernels and BLAS for the six matrix products. The forward is engine/block.py's,
the one the inference uses, with `training=True`; the backward calls each layer module's
backward kernel (engine/mlp.py, grn.py, layernorm.py, depthwise.py). What it keeps and
recomputes is in backward.py's docstring.

Each linear is one 2-D product over all pixels, (N * H * W, C_in) @ (C_in, C_out), on
C-contiguous activations; a weight's gradient is computed as dy^T @ x, which comes out in the
weight's own layout ((C_in, C_out) in Fortran order, timm's (C_out, C_in) in C order), so
neither BLAS nor the conversion to timm's layout copies anything. Everything stays in the
model's dtype; only the kernels' sums over pixels run in float64.
"""

from __future__ import annotations

import numpy as np

from ..engine import block, depthwise, grn, layernorm, mlp
from ..engine.block import BlockCache
from ..network import BlockWeights
from . import backward
from .backward import TrainingOps


def block_forward(x: np.ndarray, w: BlockWeights, eps: float, grn_eps: float,
                  keep: np.ndarray | None, norm: str = "layernorm") -> tuple[np.ndarray, BlockCache]:
    """backward.block_forward with the kernels: engine/block.py's one block forward, keeping
    what block_backward needs. x: (N, H, W, C) -> (N, H, W, C), BlockCache. The RMS and simple
    norms have no training kernels: their blocks train with the reference's forward and backward."""
    if norm != "layernorm":
        return backward.block_forward(x, w, eps, grn_eps, keep, norm=norm)
    return block.convnext_block(x, w, eps, grn_eps, keep=keep, training=True)


def block_backward(dout: np.ndarray, w: BlockWeights, cache: BlockCache, eps: float,
                   grn_eps: float, norm: str = "layernorm") -> tuple[np.ndarray, BlockWeights]:
    """backward.block_backward with the kernels. dout: (N, H, W, C) -> d input, d weights"""
    if norm != "layernorm":
        return backward.block_backward(dout, w, cache, eps, grn_eps, norm=norm)
    n, h, wd, c = dout.shape
    d_branch, d_gamma, d_fc2_bias = mlp.layer_scale_backward(dout, cache.branch, w.gamma, cache.keep)
    d_branch = d_branch.reshape(-1, c)                                        # (M, C)
    activated = mlp.gelu_and_slope_in_place(cache.hidden)                      # (M, 4C)
    slope = cache.hidden                                                      # (M, 4C) GELU's slope now
    d_grn_weight = d_grn_bias = None
    if w.grn_weight is None:
        d_fc2_weight = block.matmul(d_branch.T, activated).T                       # (4C, C) BLAS
        # into activated's memory: fc2's weight gradient was its last use
        d_activated = block.matmul(d_branch, w.fc2_weight.T, out=activated)        # (M, 4C) BLAS
    else:
        grn_out = grn.global_response_norm(activated.reshape(n, h, wd, -1), w.grn_weight, w.grn_bias, grn_eps)
        d_fc2_weight = block.matmul(d_branch.T, grn_out.reshape(activated.shape)).T  # (4C, C) BLAS
        del grn_out
        d_grn_out = block.matmul(d_branch, w.fc2_weight.T)                          # (M, 4C) BLAS
        d_activated, d_grn_weight, d_grn_bias = grn.global_response_norm_backward(
            d_grn_out.reshape(n, h, wd, -1), activated.reshape(n, h, wd, -1), w.grn_weight, grn_eps)
        del d_grn_out, activated
    d_hidden, d_fc1_bias = mlp.gelu_backward_with_bias(d_activated, slope)     # (M, 4C), in place
    # fc1's input was xhat * w + b: its weight gradient w * (xhat^T d_hidden) + b (x) d_fc1_bias
    d_fc1_weight = block.matmul(d_hidden.T, cache.xhat.reshape(-1, c))             # (4C, C) BLAS
    d_fc1_weight *= w.norm_weight
    d_fc1_weight += np.outer(d_fc1_bias, w.norm_bias)
    d_normed = block.matmul(d_hidden, w.fc1_weight.T)                              # (M, C) BLAS
    d_conv, d_norm_weight, d_norm_bias = layernorm.layer_norm_backward_kept(         # (M, C) over d_normed
        d_normed, cache.xhat, cache.rstd, w.norm_weight, in_place=True)
    d_x, d_conv_weight, d_conv_bias = depthwise.depthwise_conv_backward(             # dx plus the shortcut's dout,
        d_conv.reshape(dout.shape), cache.x, w.conv_dw_weight, shortcut=dout,  # into d_branch's memory
        out=d_branch.reshape(dout.shape))
    return d_x, BlockWeights(d_conv_weight, d_conv_bias, d_norm_weight, d_norm_bias, d_fc1_weight.T, d_fc1_bias,
                             d_grn_weight, d_grn_bias, d_fc2_weight, d_fc2_bias, d_gamma)


ENGINE = TrainingOps(layernorm.layer_norm, layernorm.layer_norm_backward, block_forward, block_backward)
