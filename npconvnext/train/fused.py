"""The numba backend's training block: `backward.block_forward` and `backward.block_backward`
with the engine's kernels (engine/backward_kernels.py; engine/kernels.py's GRN and, for the
stem and downsampling, its LayerNorm) and BLAS for the six matrix products. What it keeps and
recomputes is in backward.py's docstring.

Each linear is one 2-D product over all pixels, (N * H * W, C_in) @ (C_in, C_out), on
C-contiguous activations; a weight's gradient is computed as dy^T @ x, which comes out in the
weight's own layout ((C_in, C_out) in Fortran order, timm's (C_out, C_in) in C order), so
neither BLAS nor the conversion to timm's layout copies anything. Everything stays in the
model's dtype; only the kernels' sums over pixels run in float64.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..engine import backward_kernels as bk
from ..engine import kernels
from ..network import BlockWeights
from .backward import TrainingOps

_matmul = np.matmul  # the block's BLAS calls, by one name (benchmarks/bench_train.py --split times them)


class FusedBlockCache(NamedTuple):
    """What block_forward keeps; block_backward uses it up (hidden becomes GELU's slope)."""

    x: np.ndarray            # (N, H, W, C) block input
    xhat: np.ndarray         # (N, H, W, C) conv output normalised, before the LayerNorm's w and b
    rstd: np.ndarray         # (N, H, W) 1 / sqrt(var + eps) of each pixel's conv output
    hidden: np.ndarray       # (M, 4C) fc1 output with its bias, before GELU; M = N * H * W
    branch: np.ndarray       # (N, H, W, C) fc2 output with its bias, before layer scale
    keep: np.ndarray | None  # (N,) drop-path scale per image; None: no drop path


def block_forward(x: np.ndarray, w: BlockWeights, eps: float, grn_eps: float,
                  keep: np.ndarray | None) -> tuple[np.ndarray, FusedBlockCache]:
    """backward.block_forward with the kernels. x: (N, H, W, C) -> (N, H, W, C)"""
    n, h, wd, c = x.shape
    normed, xhat, rstd = bk.depthwise_conv_layer_norm_keep(
        x, w.conv_dw_weight, w.conv_dw_bias, w.norm_weight, w.norm_bias, eps)   # (N, H, W, C) x 2, (N, H, W)
    hidden = _matmul(normed.reshape(-1, c), w.fc1_weight)                     # (M, 4C) BLAS
    del normed
    activated = bk.bias_gelu_keep(hidden, w.fc1_bias)                         # (M, 4C); hidden += bias
    if w.grn_weight is not None:
        kernels._global_response_norm_in_place(activated.reshape(n, h * wd, -1), w.grn_weight, w.grn_bias, grn_eps)
    branch = _matmul(activated, w.fc2_weight).reshape(x.shape)                # (N, H, W, C) BLAS
    del activated
    out = bk.bias_scale_residual_keep(branch, w.fc2_bias, w.gamma, keep, x)   # branch += bias
    return out, FusedBlockCache(x, xhat, rstd, hidden, branch, keep)


def block_backward(dout: np.ndarray, w: BlockWeights, cache: FusedBlockCache, eps: float,
                   grn_eps: float) -> tuple[np.ndarray, BlockWeights]:
    """backward.block_backward with the kernels. dout: (N, H, W, C) -> d input, d weights"""
    n, h, wd, c = dout.shape
    d_branch, d_gamma, d_fc2_bias = bk.layer_scale_backward(dout, cache.branch, w.gamma, cache.keep)
    d_branch = d_branch.reshape(-1, c)                                        # (M, C)
    activated = bk.gelu_and_slope_in_place(cache.hidden)                      # (M, 4C)
    slope = cache.hidden                                                      # (M, 4C) GELU's slope now
    d_grn_weight = d_grn_bias = None
    if w.grn_weight is None:
        d_fc2_weight = _matmul(d_branch.T, activated).T                       # (4C, C) BLAS
        # into activated's memory: fc2's weight gradient was its last use
        d_activated = _matmul(d_branch, w.fc2_weight.T, out=activated)        # (M, 4C) BLAS
    else:
        grn_out = kernels.global_response_norm(activated.reshape(n, h, wd, -1), w.grn_weight, w.grn_bias, grn_eps)
        d_fc2_weight = _matmul(d_branch.T, grn_out.reshape(activated.shape)).T  # (4C, C) BLAS
        del grn_out
        d_grn_out = _matmul(d_branch, w.fc2_weight.T)                          # (M, 4C) BLAS
        d_activated, d_grn_weight, d_grn_bias = bk.global_response_norm_backward(
            d_grn_out.reshape(n, h, wd, -1), activated.reshape(n, h, wd, -1), w.grn_weight, grn_eps)
        del d_grn_out, activated
    d_hidden, d_fc1_bias = bk.gelu_backward_with_bias(d_activated, slope)     # (M, 4C), in place
    # fc1's input was xhat * w + b: its weight gradient w * (xhat^T d_hidden) + b (x) d_fc1_bias
    d_fc1_weight = _matmul(d_hidden.T, cache.xhat.reshape(-1, c))             # (4C, C) BLAS
    d_fc1_weight *= w.norm_weight
    d_fc1_weight += np.outer(d_fc1_bias, w.norm_bias)
    d_normed = _matmul(d_hidden, w.fc1_weight.T)                              # (M, C) BLAS
    d_conv, d_norm_weight, d_norm_bias = bk.layer_norm_backward_kept(         # (M, C) over d_normed
        d_normed, cache.xhat, cache.rstd, w.norm_weight, in_place=True)
    d_x, d_conv_weight, d_conv_bias = bk.depthwise_conv_backward(             # dx plus the shortcut's dout,
        d_conv.reshape(dout.shape), cache.x, w.conv_dw_weight, shortcut=dout,  # into d_branch's memory
        out=d_branch.reshape(dout.shape))
    return d_x, BlockWeights(d_conv_weight, d_conv_bias, d_norm_weight, d_norm_bias, d_fc1_weight.T, d_fc1_bias,
                             d_grn_weight, d_grn_bias, d_fc2_weight, d_fc2_bias, d_gamma)


ENGINE = TrainingOps(kernels.layer_norm, bk.layer_norm_backward, block_forward, block_backward)
