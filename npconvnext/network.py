"""The ConvNeXt network, readable top to bottom: patchify stem, four stages of blocks, head.

Sources: Liu et al., "A ConvNet for the 2020s" (CVPR 2022) and the official code
(facebookresearch/ConvNeXt models/convnext.py); Woo et al., "ConvNeXt V2" (CVPR 2023) for GRN;
timm (timm/models/convnext.py) for the parameter names and the numbers we match.

    input (N, H, W, 3)
      stem        4x4 conv stride 4 -> LayerNorm                      (N, H/4, W/4, C0)
      stage 0     blocks                                              (N, H/4, W/4, C0)
      stage 1..3  LayerNorm -> 2x2 conv stride 2 -> blocks            (N, H/2^(i+2), ..., Ci)
      head        global average pool -> LayerNorm -> Linear          (N, num_classes)

    block(x) = x + gamma * fc2(GRN(GELU(fc1(LayerNorm(dwconv7x7(x))))))
               (GRN only in V2; gamma only in V1)

timm's own variants change three parts (config.py): the stem (two overlapping 3x3 stride-2
convs, "_ols"), the norm everywhere (RMS or simple norm, "_rms") and the head (norm before
the pool, "_hnf"; a pre-logits Linear + GELU, "_mlp").

Arrays are channels-last throughout (see `layers.py` for why). The functions here are written
against `Ops`, the few operations a faster engine may replace; `REFERENCE` is the plain NumPy
set in `layers.py`. `record(name, activation)` sees each step under timm's module name.
The weights come typed per module (`weights.py`), their names and shapes from the one
parameter table in `params.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from . import layers
from .config import ConvNeXtConfig
# the typed weights live beside the parameter table; the engine imports them from here
from .weights import (BlockWeights, DownsampleWeights, HeadWeights, NetworkWeights, NormWeights, OverlapStemWeights,
                      StageWeights, StemWeights)

__all__ = ["BlockWeights", "DownsampleWeights", "HeadWeights", "NetworkWeights", "NormWeights", "OverlapStemWeights",
           "StageWeights", "StemWeights", "Ops", "REFERENCE", "Recorder", "no_record", "block", "forward",
           "forward_features", "forward_head", "norm_op", "stem"]

Recorder = Callable[[str, np.ndarray], None]


def no_record(name: str, activation: np.ndarray) -> None:
    pass


# ---- the network -------------------------------------------------------------------------------


def forward_features(x: np.ndarray, weights: NetworkWeights, config: ConvNeXtConfig,
                     ops: Ops | None = None, record: Recorder = no_record) -> np.ndarray:
    """(N, H, W, 3) normalised images -> (N, H/32, W/32, C_last) last feature map"""
    ops = REFERENCE if ops is None else ops
    eps = config.norm_eps
    norm = norm_op(ops, config.norm)
    x = stem(x, weights.stem, config, ops, record)                   # (N, H/4, W/4, C0)
    for i, stage in enumerate(weights.stages):
        if stage.downsample is not None:  # halve the resolution, double the width
            ds = stage.downsample
            x = norm(x, ds.norm_weight, ds.norm_bias, eps)
            record(f"stages.{i}.downsample.0", x)
            x = ops.patchify_conv(x, ds.conv_weight, ds.conv_bias, 2)  # (N, H/2, W/2, C)
            record(f"stages.{i}.downsample.1", x)
        for j, w in enumerate(stage.blocks):
            name = f"stages.{i}.blocks.{j}"
            x = ops.block(x, w, eps, config.grn_eps, lambda step, a, name=name: record(f"{name}.{step}", a),
                          norm=config.norm)
            record(name, x)
        record(f"stages.{i}", x)
    if weights.norm_pre is not None:  # head_norm_first: norm the map, then pool
        x = norm(x, weights.norm_pre.norm_weight, weights.norm_pre.norm_bias, eps)
        record("norm_pre", x)
    return x


def stem(x: np.ndarray, w: StemWeights | OverlapStemWeights, config: ConvNeXtConfig, ops: Ops,
         record: Recorder = no_record) -> np.ndarray:
    """The stem, by config.stem_type: (N, H, W, 3) -> (N, H/4, W/4, C0), recorded as timm's stem.i

        patch                    4x4 conv stride 4 -> norm
        overlap, overlap_tiered  3x3 conv stride 2 -> 3x3 conv stride 2 -> norm  (tiered: C0/2 between)
        overlap_act              3x3 conv stride 2 -> GELU -> 3x3 conv stride 2 -> norm
    """
    norm = norm_op(ops, config.norm)
    if config.stem_type == "patch":
        x = ops.patchify_conv(x, w.conv_weight, w.conv_bias, config.patch_size)
        conv = 0                                                         # timm's index of the last conv
    else:
        x = ops.strided_conv(x, w.conv1_weight, w.conv1_bias)           # (N, ~H/2, ~W/2, mid)
        record("stem.0", x)
        conv = 1
        if config.stem_type == "overlap_act":
            x = ops.gelu(x)
            record("stem.1", x)
            conv = 2
        x = ops.strided_conv(x, w.conv_weight, w.conv_bias)             # (N, ~H/4, ~W/4, C0)
    record(f"stem.{conv}", x)
    x = norm(x, w.norm_weight, w.norm_bias, config.norm_eps)
    record(f"stem.{conv + 1}", x)
    record("stem", x)
    return x


def forward_head(x: np.ndarray, head: HeadWeights, eps: float, pre_logits: bool = False,
                 ops: Ops | None = None, record: Recorder = no_record, norm: str = "layernorm") -> np.ndarray:
    """(N, h, w, C) -> (N, num_classes) logits, or the pooled and normed (N, C) if pre_logits
    (with a pre-logits fc, its (N, D) output after the GELU; head_norm_first: the pooled map,
    normed before in forward_features)"""
    ops = REFERENCE if ops is None else ops
    x = layers.global_avg_pool(x)                                     # (N, C)
    record("head.global_pool", x)
    if head.norm_weight is not None:
        x = norm_op(ops, norm)(x, head.norm_weight, head.norm_bias, eps)
        record("head.norm", x)
    if head.pre_fc_weight is not None:  # head_hidden_size: Linear + GELU before the classifier
        x = ops.linear(x, head.pre_fc_weight, head.pre_fc_bias)       # (N, D)
        record("head.pre_logits.fc", x)
        x = ops.gelu(x)
        record("head.pre_logits.act", x)
    if pre_logits or head.fc_weight is None:  # num_classes 0: no classifier, as timm's Identity
        return x
    x = ops.linear(x, head.fc_weight, head.fc_bias)                   # (N, num_classes)
    record("head.fc", x)
    return x


def forward(x: np.ndarray, weights: NetworkWeights, config: ConvNeXtConfig,
            ops: Ops | None = None, record: Recorder = no_record) -> np.ndarray:
    """(N, H, W, 3) normalised images -> (N, num_classes) logits"""
    features = forward_features(x, weights, config, ops, record)
    return forward_head(features, weights.head, config.norm_eps, ops=ops, record=record, norm=config.norm)


# ---- the block ----------------------------------------------------------------------------------


def block(x: np.ndarray, w: BlockWeights, eps: float, grn_eps: float, record: Recorder = no_record,
          keep: np.ndarray | None = None, norm: str = "layernorm") -> np.ndarray:
    """One ConvNeXt block. x: (N, H, W, C) -> (N, H, W, C); `norm` is config.norm.

    Training runs this block too (train/backward.py): it passes `keep`, the drop-path scale per
    image (0 or 1 / (1 - p), (N,)), and a `record` that keeps what the backward needs."""
    shortcut = x
    x = layers.depthwise_conv(x, w.conv_dw_weight, w.conv_dw_bias)  # spatial mixing, 7x7
    record("conv_dw", x)
    x = layers.norm_of(norm)(x, w.norm_weight, w.norm_bias, eps)
    record("norm", x)
    # a bfloat16 model's linears: weights as bfloat16 bits, inputs rounded to bfloat16 (layers.py)
    x = layers.linear_for(w.fc1_weight)(x, w.fc1_weight, w.fc1_bias)  # (N, H, W, C) -> (N, H, W, 4C)
    record("mlp.fc1", x)
    x = layers.gelu(x)
    record("mlp.act", x)
    if w.grn_weight is not None:
        x = layers.global_response_norm(x, w.grn_weight, w.grn_bias, grn_eps)
        record("mlp.grn", x)
    x = layers.linear_for(w.fc2_weight)(x, w.fc2_weight, w.fc2_bias)  # (N, H, W, 4C) -> (N, H, W, C)
    record("mlp.fc2", x)
    if w.gamma is not None:
        x = x * w.gamma
    record("layer_scale", x)
    if keep is not None:  # stochastic depth: the branch dropped for a whole image
        x = x * keep[:, None, None, None]
    return shortcut + x


class Ops(NamedTuple):
    """The operations the network is written in, so an engine can swap in faster twins.
    `block` records what it computes inside; a fused block records nothing inside."""

    layer_norm: Callable[[np.ndarray, np.ndarray, np.ndarray, float], np.ndarray]
    block: Callable[..., np.ndarray]   # (x, BlockWeights, eps, grn_eps, record, norm=) -> x
    patchify_conv: Callable[[np.ndarray, np.ndarray, np.ndarray, int], np.ndarray]
    linear: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]   # the head's classifier (and pre-logits)
    # timm's own variants: the overlapping stems' 3x3 stride-2 conv, the other norms (x, weight, None, eps),
    # the GELU outside the blocks (overlap_act stem, pre-logits head)
    strided_conv: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] = layers.strided_conv
    rms_norm: Callable[[np.ndarray, np.ndarray, None, float], np.ndarray] = layers.rms_norm
    simple_norm: Callable[[np.ndarray, np.ndarray, None, float], np.ndarray] = layers.simple_norm
    gelu: Callable[[np.ndarray], np.ndarray] = layers.gelu


def norm_op(ops: Ops, kind: str) -> Callable[[np.ndarray, np.ndarray, np.ndarray | None, float], np.ndarray]:
    """The norm config.norm names, from `ops`: (x, weight, bias, eps) -> x normed."""
    return {"layernorm": ops.layer_norm, "rmsnorm": ops.rms_norm, "simplenorm": ops.simple_norm}[kind]


REFERENCE = Ops(layer_norm=layers.layer_norm, block=block, patchify_conv=layers.patchify_conv, linear=layers.linear)
