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

Arrays are channels-last throughout (see `layers.py` for why). The functions here are written
against `Ops`, the few operations a faster engine may replace; `REFERENCE` is the plain NumPy
set in `layers.py`. `record(name, activation)` sees each step under timm's module name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np

from . import layers
from .config import ConvNeXtConfig

Recorder = Callable[[str, np.ndarray], None]


def no_record(name: str, activation: np.ndarray) -> None:
    pass


# ---- weights, in compute layout (see params.py); C = width, 4C = MLP hidden width -------------


class StemWeights(NamedTuple):
    conv_weight: np.ndarray   # (4 * 4 * 3, C0) patchify kernel
    conv_bias: np.ndarray     # (C0,)
    norm_weight: np.ndarray   # (C0,)
    norm_bias: np.ndarray     # (C0,)


class DownsampleWeights(NamedTuple):
    norm_weight: np.ndarray   # (C_prev,)
    norm_bias: np.ndarray     # (C_prev,)
    conv_weight: np.ndarray   # (2 * 2 * C_prev, C) patchify kernel
    conv_bias: np.ndarray     # (C,)


class BlockWeights(NamedTuple):
    conv_dw_weight: np.ndarray      # (7, 7, C)
    conv_dw_bias: np.ndarray        # (C,)
    norm_weight: np.ndarray         # (C,)
    norm_bias: np.ndarray           # (C,)
    fc1_weight: np.ndarray          # (C, 4C)
    fc1_bias: np.ndarray            # (4C,)
    grn_weight: np.ndarray | None   # (4C,) V2 only
    grn_bias: np.ndarray | None     # (4C,) V2 only
    fc2_weight: np.ndarray          # (4C, C)
    fc2_bias: np.ndarray            # (C,)
    gamma: np.ndarray | None        # (C,) V1 only: layer scale


class StageWeights(NamedTuple):
    downsample: DownsampleWeights | None   # None in stage 0: the stem already downsampled
    blocks: tuple[BlockWeights, ...]


class HeadWeights(NamedTuple):
    norm_weight: np.ndarray   # (C_last,)
    norm_bias: np.ndarray     # (C_last,)
    fc_weight: np.ndarray     # (C_last, num_classes)
    fc_bias: np.ndarray       # (num_classes,)


class NetworkWeights(NamedTuple):
    stem: StemWeights
    stages: tuple[StageWeights, ...]
    head: HeadWeights

    @classmethod
    def from_params(cls, p: Mapping[str, np.ndarray], config: ConvNeXtConfig) -> NetworkWeights:
        """The typed weights from compute-layout arrays under timm's names."""
        def typed(kind, prefix):  # KeyError for a missing weight; only V1's gamma and V2's GRN may be absent
            return kind(**{field: p.get(prefix + name) if field in _OPTIONAL else p[prefix + name]
                           for field, name in _TIMM_NAMES[kind].items()})

        stages = tuple(
            StageWeights(typed(DownsampleWeights, f"stages.{i}.downsample.") if i > 0 else None,
                         tuple(typed(BlockWeights, f"stages.{i}.blocks.{j}.") for j in range(depth)))
            for i, depth in enumerate(config.depths))
        return cls(typed(StemWeights, "stem."), stages, typed(HeadWeights, "head."))

    def named(self) -> dict[str, np.ndarray]:
        """The arrays by timm name, the inverse of `from_params` (fields that are None left out)."""
        def named(weights, prefix):
            return {prefix + name: getattr(weights, field) for field, name in _TIMM_NAMES[type(weights)].items()
                    if getattr(weights, field) is not None}

        out = named(self.stem, "stem.")
        for i, stage in enumerate(self.stages):
            if stage.downsample is not None:
                out.update(named(stage.downsample, f"stages.{i}.downsample."))
            for j, block in enumerate(stage.blocks):
                out.update(named(block, f"stages.{i}.blocks.{j}."))
        out.update(named(self.head, "head."))
        return out


_OPTIONAL = ("grn_weight", "grn_bias", "gamma")
# each field's timm name, below its module's prefix
_TIMM_NAMES = {
    StemWeights: {"conv_weight": "0.weight", "conv_bias": "0.bias", "norm_weight": "1.weight", "norm_bias": "1.bias"},
    DownsampleWeights: {"norm_weight": "0.weight", "norm_bias": "0.bias", "conv_weight": "1.weight",
                        "conv_bias": "1.bias"},
    BlockWeights: {"conv_dw_weight": "conv_dw.weight", "conv_dw_bias": "conv_dw.bias",
                   "norm_weight": "norm.weight", "norm_bias": "norm.bias",
                   "fc1_weight": "mlp.fc1.weight", "fc1_bias": "mlp.fc1.bias",
                   "grn_weight": "mlp.grn.weight", "grn_bias": "mlp.grn.bias",
                   "fc2_weight": "mlp.fc2.weight", "fc2_bias": "mlp.fc2.bias", "gamma": "gamma"},
    HeadWeights: {"norm_weight": "norm.weight", "norm_bias": "norm.bias", "fc_weight": "fc.weight", "fc_bias": "fc.bias"},
}


# ---- the block -------------------------------------------------------------------------------


def block(x: np.ndarray, w: BlockWeights, eps: float, grn_eps: float, record: Recorder = no_record) -> np.ndarray:
    """One ConvNeXt block. x: (N, H, W, C) -> (N, H, W, C)"""
    shortcut = x
    x = layers.depthwise_conv(x, w.conv_dw_weight, w.conv_dw_bias)  # spatial mixing, 7x7
    record("conv_dw", x)
    x = layers.layer_norm(x, w.norm_weight, w.norm_bias, eps)
    record("norm", x)
    x = layers.linear(x, w.fc1_weight, w.fc1_bias)                   # (N, H, W, C) -> (N, H, W, 4C)
    record("mlp.fc1", x)
    x = layers.gelu(x)
    record("mlp.act", x)
    if w.grn_weight is not None:
        x = layers.global_response_norm(x, w.grn_weight, w.grn_bias, grn_eps)
        record("mlp.grn", x)
    x = layers.linear(x, w.fc2_weight, w.fc2_bias)                   # (N, H, W, 4C) -> (N, H, W, C)
    record("mlp.fc2", x)
    if w.gamma is not None:
        x = x * w.gamma
    record("layer_scale", x)
    return shortcut + x


class Ops(NamedTuple):
    """The operations the network is written in, so an engine can swap in faster twins.
    `block` records what it computes inside; a fused block records nothing inside."""

    layer_norm: Callable[[np.ndarray, np.ndarray, np.ndarray, float], np.ndarray]
    block: Callable[..., np.ndarray]   # (x, BlockWeights, eps, grn_eps, record) -> x
    patchify_conv: Callable[[np.ndarray, np.ndarray, np.ndarray, int], np.ndarray]
    linear: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]   # the head's classifier


REFERENCE = Ops(layer_norm=layers.layer_norm, block=block, patchify_conv=layers.patchify_conv, linear=layers.linear)


# ---- the network -------------------------------------------------------------------------------


def forward_features(x: np.ndarray, weights: NetworkWeights, config: ConvNeXtConfig,
                     ops: Ops = REFERENCE, record: Recorder = no_record) -> np.ndarray:
    """(N, H, W, 3) normalised images -> (N, H/32, W/32, C_last) last feature map"""
    eps = config.norm_eps
    stem = weights.stem
    x = ops.patchify_conv(x, stem.conv_weight, stem.conv_bias, config.patch_size)  # (N, H/4, W/4, C0)
    record("stem.0", x)
    x = ops.layer_norm(x, stem.norm_weight, stem.norm_bias, eps)
    record("stem.1", x)
    record("stem", x)
    for i, stage in enumerate(weights.stages):
        if stage.downsample is not None:  # halve the resolution, double the width
            ds = stage.downsample
            x = ops.layer_norm(x, ds.norm_weight, ds.norm_bias, eps)
            record(f"stages.{i}.downsample.0", x)
            x = ops.patchify_conv(x, ds.conv_weight, ds.conv_bias, 2)  # (N, H/2, W/2, C)
            record(f"stages.{i}.downsample.1", x)
        for j, w in enumerate(stage.blocks):
            name = f"stages.{i}.blocks.{j}"
            x = ops.block(x, w, eps, config.grn_eps, lambda step, a, name=name: record(f"{name}.{step}", a))
            record(name, x)
        record(f"stages.{i}", x)
    return x


def forward_head(x: np.ndarray, head: HeadWeights, eps: float, pre_logits: bool = False,
                 ops: Ops = REFERENCE, record: Recorder = no_record) -> np.ndarray:
    """(N, h, w, C) -> (N, num_classes) logits, or the pooled and normed (N, C) if pre_logits"""
    x = layers.global_avg_pool(x)                                     # (N, C)
    record("head.global_pool", x)
    x = ops.layer_norm(x, head.norm_weight, head.norm_bias, eps)
    record("head.norm", x)
    if pre_logits:
        return x
    x = ops.linear(x, head.fc_weight, head.fc_bias)                   # (N, num_classes)
    record("head.fc", x)
    return x


def forward(x: np.ndarray, weights: NetworkWeights, config: ConvNeXtConfig,
            ops: Ops = REFERENCE, record: Recorder = no_record) -> np.ndarray:
    """(N, H, W, 3) normalised images -> (N, num_classes) logits"""
    features = forward_features(x, weights, config, ops, record)
    return forward_head(features, weights.head, config.norm_eps, ops=ops, record=record)
