"""The numba backend's ConvNeXt block forward, one function for inference and training.

    block(x) = x + gamma * fc2(GRN(GELU(fc1(LayerNorm(dwconv7x7(x))))))    (network.block)

Each step is one layer module's kernel, in the order the block reads:

    step                         inference (nothing kept)          training (keeps the cache)
    dwconv 7x7 + LayerNorm       depthwise_conv_layer_norm          depthwise_conv_layer_norm_keep
    fc1 + GELU (+ fc2 + gamma    mlp_residual, panel by panel       BLAS, then bias_gelu_keep
      + residual, V1)            (or linear_gelu_panels for V2)
    GRN (V2)                     global_response_norm_in_place      the same
    fc2 + layer scale            panels_linear                      BLAS, then bias_scale_residual_keep
      + drop path + residual

Inference runs the linears on gemm.py's tiles and calls no BLAS; its idle kernel workers hand
over to each other (jit.py). Training runs the linears as BLAS products over all pixels, since
the backward needs the whole hidden tensor anyway, and keeps what train/fused.py's
block_backward uses (`BlockCache`); what it keeps and recomputes is in train/backward.py's
docstring. With `training` False nothing is kept and no training step runs.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..network import BlockWeights, Recorder, no_record
from .bfloat16 import to_pair_panels
from .checks import takes_array
from .depthwise import depthwise_conv, depthwise_conv_layer_norm, depthwise_conv_layer_norm_keep
from .gemm import from_panels, to_panels
from .grn import global_response_norm_in_place
from .layernorm import norm_of
from .linear import linear_gelu_panels, pairs_linear, panels_linear
from .mlp import bias_gelu_keep, bias_scale_residual_keep, mlp_residual

matmul = np.matmul  # training's BLAS calls, by one name (benchmarks/bench_train.py --split times them)


class BlockCache(NamedTuple):
    """What the training forward keeps; block_backward uses it up (hidden becomes GELU's slope)."""

    x: np.ndarray            # (N, H, W, C) block input
    xhat: np.ndarray         # (N, H, W, C) conv output normalised, before the LayerNorm's w and b
    rstd: np.ndarray         # (N, H, W) 1 / sqrt(var + eps) of each pixel's conv output
    hidden: np.ndarray       # (M, 4C) fc1 output with its bias, before GELU; M = N * H * W
    branch: np.ndarray       # (N, H, W, C) fc2 output with its bias, before layer scale
    keep: np.ndarray | None  # (N,) drop-path scale per image; None: no drop path


@takes_array("x")
def convnext_block(x: np.ndarray, w: BlockWeights, eps: float, grn_eps: float, record: Recorder = no_record,
                   keep: np.ndarray | None = None, training: bool = False, norm: str = "layernorm"):
    """Twin of network.block with the fused kernels; it records nothing inside the block.
    x: (N, H, W, C) -> (N, H, W, C); with training, (out, BlockCache), keep (N,) being the
    drop-path scale per image (None: no drop path). The RMS and simple norms (`norm`, config.norm)
    are not fused with the conv: the depthwise conv's kernel, then the norm's (inference only;
    training them is train/fused.py's reference fallback)."""
    if training:
        if norm != "layernorm":
            raise ValueError(f"the fused training block has no {norm} kernel")
        normed, xhat, rstd = depthwise_conv_layer_norm_keep(
            x, w.conv_dw_weight, w.conv_dw_bias, w.norm_weight, w.norm_bias, eps)  # (N, H, W, C) x 2, (N, H, W)
    elif norm == "layernorm":
        normed = depthwise_conv_layer_norm(x, w.conv_dw_weight, w.conv_dw_bias, w.norm_weight, w.norm_bias, eps)
    else:  # the RMS and simple norms: the depthwise conv's kernel, then the norm's
        normed = norm_of(norm)(depthwise_conv(x, w.conv_dw_weight, w.conv_dw_bias), w.norm_weight, None, eps)
    if not training and w.grn_weight is None:  # V1: fc1 to the residual in one kernel, the hidden tensor never whole
        return mlp_residual(normed, w.fc1_weight, w.fc1_bias, w.fc2_weight, w.fc2_bias, w.gamma, shortcut=x)
    # fc1 + GELU for all pixels first: GRN sums over each image's pixels, and training keeps them
    n, h, wd, c = x.shape
    if training:
        hidden = matmul(normed.reshape(-1, c), w.fc1_weight)                  # (M, 4C) BLAS
        del normed
        activated = bias_gelu_keep(hidden, w.fc1_bias)                        # (M, 4C); hidden += bias
    else:
        activated = from_panels(linear_gelu_panels(normed, w.fc1_weight, w.fc1_bias), n * h * wd)  # (M, 4C)
    if w.grn_weight is not None:
        global_response_norm_in_place(activated.reshape(n, h * wd, -1), w.grn_weight, w.grn_bias, grn_eps)
    if not training and w.fc2_weight.dtype == np.uint16:  # bfloat16: GRN's output rounded as fc2's pairs
        return pairs_linear(to_pair_panels(activated), w.fc2_weight, w.fc2_bias, w.gamma, shortcut=x)
    if not training:
        return panels_linear(to_panels(activated), w.fc2_weight, w.fc2_bias, w.gamma, shortcut=x)
    branch = matmul(activated, w.fc2_weight).reshape(x.shape)                 # (N, H, W, C) BLAS
    del activated
    out = bias_scale_residual_keep(branch, w.fc2_bias, w.gamma, keep, x)      # branch += bias
    return out, BlockCache(x, xhat, rstd, hidden, branch, keep)
