"""Training forward and backward through the whole network, in readable NumPy.

The forward here is `network.forward` with two training-only additions; each block is
`network.block` itself, run with a recorder that keeps what its backward needs (one block
forward for inference and training). The backward walks the same steps in reverse with the
layers' backward twins (`layers.py`), and returns gradients with the network's typed weights'
shapes (`weights.NetworkWeights`). The loss, `cross_entropy`, closes the module.

Training additions, as timm has them:
    stochastic depth (drop path)  each block's residual branch is dropped for a whole image
                                  with probability p_b and scaled by 1 / (1 - p_b) otherwise;
                                  p_b grows linearly from 0 to drop_path_rate over the blocks
    head dropout                  elementwise on the pooled, normed features before the fc

What is kept per block, and what is recomputed in the backward (C channels a pixel; PyTorch's
autograd keeps about 12C for the same block: the inputs of conv, LayerNorm, fc1, GELU and fc2,
and fc2's output):
    kept        block input x (C), depthwise-conv output (C), fc1 output (4C), fc2 output (C)
    recomputed  LayerNorm output and its statistics (from the conv output), GELU output (from
                fc1's), GRN output (from GELU's)
The numba backend (`fused.py`, the `TrainingOps` it supplies) runs the block with the engine's
kernels and keeps about as much, differently split:
    kept        block input x (C); from one fused pass of the conv and the LayerNorm, the
                normalised conv output xhat (C) and 1 / std per pixel (1); fc1 output with its
                bias (4C); fc2 output with its bias (C)
    recomputed  GELU output and GELU's slope, from one erf; GRN output; nothing of the
                LayerNorm: its backward works from xhat and 1 / std, and fc1's weight
                gradient, normed^T dy, is w * (xhat^T dy) + b (x) (sum of dy)
It reuses the memory of what it recomputes: the slope goes where the fc1 output was, fc2's
input gradient where the GELU output was.
`backward` lets go of each block's cache once that block is done, so the memory held shrinks
as the backward walks back to the stem.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from .. import layers, network
from ..config import ConvNeXtConfig
from ..weights import BlockWeights, DownsampleWeights, HeadWeights, NetworkWeights, NormWeights, StageWeights


class BlockCache(NamedTuple):
    x: np.ndarray            # (N, H, W, C) block input
    conv: np.ndarray         # (N, H, W, C) depthwise conv output, before LayerNorm
    hidden: np.ndarray       # (N, H, W, 4C) fc1 output, before GELU
    branch: np.ndarray       # (N, H, W, C) fc2 output, before layer scale
    keep: np.ndarray | None  # (N,) drop-path scale per image: 0 or 1 / (1 - p); None: no drop path


def block_forward(x: np.ndarray, w: BlockWeights, eps: float, grn_eps: float,
                  keep: np.ndarray | None, norm: str = "layernorm") -> tuple[np.ndarray, BlockCache]:
    """network.block, keeping what block_backward needs. x: (N, H, W, C) -> (N, H, W, C)"""
    kept = {}

    def keep_some(step: str, activation: np.ndarray) -> None:
        if step in ("conv_dw", "mlp.fc1", "mlp.fc2"):
            kept[step] = activation

    out = network.block(x, w, eps, grn_eps, keep_some, keep, norm=norm)
    return out, BlockCache(x, kept["conv_dw"], kept["mlp.fc1"], kept["mlp.fc2"], keep)


def block_backward(dout: np.ndarray, w: BlockWeights, cache: BlockCache, eps: float,
                   grn_eps: float, norm: str = "layernorm") -> tuple[np.ndarray, BlockWeights]:
    """Gradients of one block: (d input, d weights). dout: (N, H, W, C)"""
    d_scaled = dout * cache.keep[:, None, None, None] if cache.keep is not None else dout
    d_gamma = None
    if w.gamma is not None:
        d_gamma = (d_scaled * cache.branch).sum(axis=(0, 1, 2))
        d_branch = d_scaled * w.gamma
    else:
        d_branch = d_scaled
    activated = layers.gelu(cache.hidden)
    d_grn_weight = d_grn_bias = None
    if w.grn_weight is not None:
        normed = layers.global_response_norm(activated, w.grn_weight, w.grn_bias, grn_eps)
        d_normed, d_fc2_weight, d_fc2_bias = layers.linear_backward(d_branch, normed, w.fc2_weight)
        d_activated, d_grn_weight, d_grn_bias = layers.global_response_norm_backward(
            d_normed, activated, w.grn_weight, grn_eps)
    else:
        d_activated, d_fc2_weight, d_fc2_bias = layers.linear_backward(d_branch, activated, w.fc2_weight)
    d_hidden = layers.gelu_backward(d_activated, cache.hidden)
    normed_conv = layers.norm_of(norm)(cache.conv, w.norm_weight, w.norm_bias, eps)
    d_normed_conv, d_fc1_weight, d_fc1_bias = layers.linear_backward(d_hidden, normed_conv, w.fc1_weight)
    d_conv, d_norm_weight, d_norm_bias = layers.norm_backward_of(norm)(d_normed_conv, cache.conv, w.norm_weight, eps)
    d_x, d_conv_weight, d_conv_bias = layers.depthwise_conv_backward(d_conv, cache.x, w.conv_dw_weight)
    grads = BlockWeights(d_conv_weight, d_conv_bias, d_norm_weight, d_norm_bias, d_fc1_weight, d_fc1_bias,
                         d_grn_weight, d_grn_bias, d_fc2_weight, d_fc2_bias, d_gamma)
    return dout + d_x, grads  # the shortcut passes dout straight through


class TrainingOps(NamedTuple):
    """The steps an engine may replace in training. REFERENCE is the readable set above; the
    numba backend's is `fused.ENGINE`."""

    layer_norm: Callable[[np.ndarray, np.ndarray, np.ndarray, float], np.ndarray]
    layer_norm_backward: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]  # (dout, x, weight, eps)
    block_forward: Callable[..., tuple[np.ndarray, tuple]]          # (x, w, eps, grn_eps, keep, norm=) -> (out, cache)
    block_backward: Callable[..., tuple[np.ndarray, BlockWeights]]  # (dout, w, cache, eps, grn_eps, norm=) -> (dx, grads)


REFERENCE = TrainingOps(layers.layer_norm, layers.layer_norm_backward, block_forward, block_backward)


def norms(ops: TrainingOps, kind: str) -> tuple[Callable, Callable]:
    """The norm config.norm names and its backward: the ops' LayerNorm, the reference's others."""
    if kind == "layernorm":
        return ops.layer_norm, ops.layer_norm_backward
    return layers.norm_of(kind), layers.norm_backward_of(kind)


class NetworkCache(NamedTuple):
    images: np.ndarray                       # (N, H, W, 3) input
    stem_conv: np.ndarray                    # (N, H/4, W/4, C0) before the stem's norm
    stem_mids: tuple                         # overlapping stems: the first conv's output, the second's input
    downsample_inputs: list                  # per stage: the stage input before its LayerNorm (None in stage 0)
    downsample_normed: list                  # per stage: after the LayerNorm, the patchify conv's input
    blocks: list[list]                       # per stage, per block: what ops.block_forward kept
    features: np.ndarray                     # (N, h, w, C_last) last stage's output (before norm_pre)
    pooled: np.ndarray                       # (N, C_last) before the head's norm
    head_keep: np.ndarray | None             # (N, D) dropout scale: 0 or 1 / (1 - p); None: no dropout


def drop_path_rates(config: ConvNeXtConfig, drop_path_rate: float) -> list[list[float]]:
    """Each block's drop probability, linear from 0 over all blocks in order, as timm sets them."""
    rates = np.linspace(0.0, drop_path_rate, sum(config.depths)).tolist()
    out, start = [], 0
    for depth in config.depths:
        out.append(rates[start : start + depth])
        start += depth
    return out


def _keep_scale(rng: np.random.Generator | None, p: float, shape: tuple[int, ...], dtype) -> np.ndarray | None:
    """A 0 or 1 / (1 - p) mask, or None when nothing is dropped."""
    if rng is None or p <= 0.0:
        return None
    keep = 1.0 - p
    return ((rng.random(shape) < keep) / keep).astype(dtype)


def forward(x: np.ndarray, weights: NetworkWeights, config: ConvNeXtConfig, drop_path_rate: float = 0.0,
            drop_rate: float = 0.0, rng: np.random.Generator | None = None,
            ops: TrainingOps = REFERENCE) -> tuple[np.ndarray, NetworkCache]:
    """Training forward. x: (N, H, W, 3) -> (N, num_classes) logits and what the backward needs.
    Drop path and dropout need `rng`; without one they are off (evaluation)."""
    eps, n = config.norm_eps, x.shape[0]
    norm, _ = norms(ops, config.norm)
    stem_conv, stem_mids = stem_convs(x, weights.stem, config)
    h = norm(stem_conv, weights.stem.norm_weight, weights.stem.norm_bias, eps)
    ds_inputs, ds_normed, block_caches = [], [], []
    for stage, rates in zip(weights.stages, drop_path_rates(config, drop_path_rate)):
        if stage.downsample is not None:
            ds = stage.downsample
            ds_inputs.append(h)
            normed = norm(h, ds.norm_weight, ds.norm_bias, eps)
            ds_normed.append(normed)
            h = layers.patchify_conv(normed, ds.conv_weight, ds.conv_bias, 2)
        else:
            ds_inputs.append(None)
            ds_normed.append(None)
        caches = []
        for w, rate in zip(stage.blocks, rates):
            h, cache = ops.block_forward(h, w, eps, config.grn_eps, _keep_scale(rng, rate, (n,), x.dtype),
                                         norm=config.norm)
            caches.append(cache)
        block_caches.append(caches)
    mapped = h if weights.norm_pre is None else norm(h, weights.norm_pre.norm_weight, weights.norm_pre.norm_bias, eps)
    pooled = layers.global_avg_pool(mapped)                                         # (N, C)
    embedded = head_embedding(pooled, weights.head, config)                         # (N, D)
    head_keep = _keep_scale(rng, drop_rate, embedded.shape, x.dtype)
    if head_keep is not None:
        embedded = embedded * head_keep
    logits = layers.linear(embedded, weights.head.fc_weight, weights.head.fc_bias)  # (N, num_classes)
    return logits, NetworkCache(x, stem_conv, stem_mids, ds_inputs, ds_normed, block_caches, h, pooled, head_keep)


def stem_convs(x: np.ndarray, w, config: ConvNeXtConfig) -> tuple[np.ndarray, tuple]:
    """The stem up to its norm (network.stem), and what its backward needs of the overlapping
    stems: (N, H, W, 3) -> (N, H/4, W/4, C0), (first conv's output, second conv's input)"""
    if config.stem_type == "patch":
        return layers.patchify_conv(x, w.conv_weight, w.conv_bias, config.patch_size), ()
    first = layers.strided_conv(x, w.conv1_weight, w.conv1_bias)
    second = layers.gelu(first) if config.stem_type == "overlap_act" else first
    return layers.strided_conv(second, w.conv_weight, w.conv_bias), (first, second)


def stem_backward(d_conv: np.ndarray, w, config: ConvNeXtConfig, cache: NetworkCache):
    """Gradients of the stem's convs, given d loss / d (their output, before the norm)."""
    if config.stem_type == "patch":
        _, d_weight, d_bias = layers.patchify_conv_backward(d_conv, cache.images, w.conv_weight, config.patch_size)
        return d_weight, d_bias
    first, second = cache.stem_mids
    d_second, d_weight, d_bias = layers.strided_conv_backward(d_conv, second, w.conv_weight)
    d_first = layers.gelu_backward(d_second, first) if config.stem_type == "overlap_act" else d_second
    _, d_weight1, d_bias1 = layers.strided_conv_backward(d_first, cache.images, w.conv1_weight)
    return d_weight1, d_bias1, d_weight, d_bias


def head_embedding(pooled: np.ndarray, head: HeadWeights, config: ConvNeXtConfig) -> np.ndarray:
    """What the classifier reads (network.forward_head's pre_logits): the pooled features
    normed (unless head_norm_first normed the map), through the pre-logits fc + GELU if any."""
    x = pooled
    if head.norm_weight is not None:
        x = layers.norm_of(config.norm)(x, head.norm_weight, head.norm_bias, config.norm_eps)
    if head.pre_fc_weight is not None:
        x = layers.gelu(layers.linear(x, head.pre_fc_weight, head.pre_fc_bias))
    return x


def head_backward(d_logits: np.ndarray, head: HeadWeights, config: ConvNeXtConfig,
                  cache: NetworkCache) -> tuple[np.ndarray, HeadWeights]:
    """Gradients of the head: d loss / d pooled features (N, C), and the head's weights'."""
    normed = cache.pooled
    if head.norm_weight is not None:
        normed = layers.norm_of(config.norm)(cache.pooled, head.norm_weight, head.norm_bias, config.norm_eps)
    hidden = None if head.pre_fc_weight is None else layers.linear(normed, head.pre_fc_weight, head.pre_fc_bias)
    embedded = normed if hidden is None else layers.gelu(hidden)
    if cache.head_keep is not None:
        embedded = embedded * cache.head_keep
    d_embedded, d_fc_weight, d_fc_bias = layers.linear_backward(d_logits, embedded, head.fc_weight)
    if cache.head_keep is not None:
        d_embedded = d_embedded * cache.head_keep
    d_pre_weight = d_pre_bias = None
    d_normed = d_embedded
    if hidden is not None:
        d_normed, d_pre_weight, d_pre_bias = layers.linear_backward(
            layers.gelu_backward(d_embedded, hidden), normed, head.pre_fc_weight)
    d_norm_weight = d_norm_bias = None
    d_pooled = d_normed
    if head.norm_weight is not None:
        d_pooled, d_norm_weight, d_norm_bias = layers.norm_backward_of(config.norm)(
            d_normed, cache.pooled, head.norm_weight, config.norm_eps)
    return d_pooled, HeadWeights(d_norm_weight, d_norm_bias, d_fc_weight, d_fc_bias, d_pre_weight, d_pre_bias)


def backward(d_logits: np.ndarray, weights: NetworkWeights, config: ConvNeXtConfig,
             cache: NetworkCache, ops: TrainingOps = REFERENCE) -> NetworkWeights:
    """Gradients of every weight, given d loss / d logits (N, num_classes); same structure and
    compute layouts as `weights`. Uses the cache up: each block's part is dropped once used."""
    eps = config.norm_eps
    _, norm_backward = norms(ops, config.norm)
    d_pooled, head_grads = head_backward(d_logits, weights.head, config, cache)
    d_h = layers.global_avg_pool_backward(d_pooled, cache.features.shape)
    norm_pre_grads = None
    if weights.norm_pre is not None:  # head_norm_first: the map was normed before the pool
        d_h, d_weight, d_bias = norm_backward(d_h, cache.features, weights.norm_pre.norm_weight, eps)
        norm_pre_grads = NormWeights(d_weight, d_bias)
    stage_grads = []
    for i in reversed(range(len(weights.stages))):
        stage = weights.stages[i]
        block_grads = []
        for w in reversed(stage.blocks):  # each block's cache let go once used: the memory goes back
            d_h, grads = ops.block_backward(d_h, w, cache.blocks[i].pop(), eps, config.grn_eps, norm=config.norm)
            block_grads.append(grads)
        ds_grads = None
        if stage.downsample is not None:
            ds = stage.downsample
            d_normed, d_conv_weight, d_conv_bias = layers.patchify_conv_backward(
                d_h, cache.downsample_normed.pop(), ds.conv_weight, 2)
            d_h, d_norm_weight, d_norm_bias = norm_backward(d_normed, cache.downsample_inputs.pop(), ds.norm_weight, eps)
            ds_grads = DownsampleWeights(d_norm_weight, d_norm_bias, d_conv_weight, d_conv_bias)
        stage_grads.append(StageWeights(ds_grads, tuple(reversed(block_grads))))
    stem = weights.stem
    d_stem_conv, d_stem_norm_weight, d_stem_norm_bias = norm_backward(d_h, cache.stem_conv, stem.norm_weight, eps)
    stem_grads = type(stem)(*stem_backward(d_stem_conv, stem, config, cache), d_stem_norm_weight, d_stem_norm_bias)
    return NetworkWeights(stem_grads, tuple(reversed(stage_grads)), head_grads, norm_pre_grads, weights.stem_kind)


def cross_entropy(logits: np.ndarray, labels: np.ndarray, label_smoothing: float = 0.0) -> tuple[float, np.ndarray]:
    """Mean cross-entropy with label smoothing, as torch.nn.functional.cross_entropy computes it,
    and its gradient with respect to the logits.

        target = (1 - s) one_hot(y) + s / K;   loss = mean over images of -sum_k target_k log p_k
        d loss / d logits = (softmax(logits) - target) / N
    logits: (N, K); labels: (N,) integers -> (loss, (N, K))
    """
    n, k = logits.shape
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))     # (N, K)
    target = np.full_like(logits, label_smoothing / k)
    target[np.arange(n), labels] += 1.0 - label_smoothing
    loss = float(-(target * log_probs).sum() / n)
    return loss, (np.exp(log_probs) - target) / n
