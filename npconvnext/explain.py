"""Seeing inside the network: class activation maps, effective receptive fields, feature maps.

Each function is a definition from a paper, computed with npconvnext's own forward and backward
(`train/backward.py`: the same training forward and the layers' backward twins that
`npconvnext.train.loss_and_grads` runs), on either backend, in the model's dtype:

    grad_cam                   Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep
                               Networks via Gradient-based Localization"
    effective_receptive_field  Luo et al. 2016, "Understanding the Effective Receptive Field in
                               Deep Convolutional Neural Networks"
    stage_feature_maps         the traced stage outputs (`ConvNeXt.trace`), channel by channel

Only gradients with respect to activations are wanted here, so the backward walks the layers
itself and throws the weight gradients away; figures.py draws the results.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from . import layers
from .errors import InputError
from .model import ConvNeXt
from .train import backward, fused


def _ops(model: ConvNeXt) -> backward.TrainingOps:
    """The training steps of the model's backend, as loss_and_grads chooses them."""
    model.check_trainable()  # gradients run the training forward: float32 or float64 weights
    return backward.REFERENCE if model.backend == "numpy" else fused.ENGINE


def stage_index(model: ConvNeXt, layer: str) -> int:
    """"stages.i" -> i, checked against the model's number of stages."""
    match = re.fullmatch(r"stages\.(\d+)", layer)
    stages = len(model.config.depths)
    if not match or int(match.group(1)) >= stages:
        raise InputError(f"layer must be one of {', '.join(f'stages.{i}' for i in range(stages))}; got {layer!r}")
    return int(match.group(1))


def _stem(images: np.ndarray, model: ConvNeXt) -> np.ndarray:
    """Patchify conv and LayerNorm: (N, H, W, 3) -> (N, H/4, W/4, C0), with its cache."""
    stem, config = model.weights.stem, model.config
    conv = layers.patchify_conv(images, stem.conv_weight, stem.conv_bias, config.patch_size)
    return _ops(model).layer_norm(conv, stem.norm_weight, stem.norm_bias, config.norm_eps), conv


def _stage_forward(h: np.ndarray, model: ConvNeXt, i: int) -> tuple[np.ndarray, tuple]:
    """Stage i's training forward (no drop path): its output and what _stage_backward needs."""
    ops, config, stage = _ops(model), model.config, model.weights.stages[i]
    ds_input = ds_normed = None
    if stage.downsample is not None:
        ds = stage.downsample
        ds_input = h
        ds_normed = ops.layer_norm(h, ds.norm_weight, ds.norm_bias, config.norm_eps)
        h = layers.patchify_conv(ds_normed, ds.conv_weight, ds.conv_bias, 2)
    caches = []
    for w in stage.blocks:
        h, cache = ops.block_forward(h, w, config.norm_eps, config.grn_eps, None)
        caches.append(cache)
    return h, (ds_input, ds_normed, caches)


def _stage_backward(d_h: np.ndarray, model: ConvNeXt, i: int, cache: tuple) -> np.ndarray:
    """d stage input from d stage output, as backward.backward walks a stage."""
    ops, config, stage = _ops(model), model.config, model.weights.stages[i]
    ds_input, ds_normed, caches = cache
    for w, block_cache in zip(reversed(stage.blocks), reversed(caches)):
        d_h, _ = ops.block_backward(d_h, w, block_cache, config.norm_eps, config.grn_eps)
    if stage.downsample is not None:
        ds = stage.downsample
        d_normed, _, _ = layers.patchify_conv_backward(d_h, ds_normed, ds.conv_weight, 2)
        d_h, _, _ = ops.layer_norm_backward(d_normed, ds_input, ds.norm_weight, config.norm_eps)
    return d_h


def _head(features: np.ndarray, model: ConvNeXt) -> np.ndarray:
    """Pool, LayerNorm, fc: (N, h, w, C) -> (N, num_classes) logits."""
    head = model.weights.head
    pooled = layers.global_avg_pool(features)
    normed = layers.layer_norm(pooled, head.norm_weight, head.norm_bias, model.config.norm_eps)
    return layers.linear(normed, head.fc_weight, head.fc_bias)


def _head_backward(d_logits: np.ndarray, features: np.ndarray, model: ConvNeXt) -> np.ndarray:
    """d features (N, h, w, C) from d logits (N, num_classes), as backward.backward starts."""
    head, eps = model.weights.head, model.config.norm_eps
    pooled = layers.global_avg_pool(features)
    normed = layers.layer_norm(pooled, head.norm_weight, head.norm_bias, eps)
    d_normed, _, _ = layers.linear_backward(d_logits, normed, head.fc_weight)
    d_pooled, _, _ = layers.layer_norm_backward(d_normed, pooled, head.norm_weight, eps)
    return layers.global_avg_pool_backward(d_pooled, features.shape)


def _targets(target, logits: np.ndarray) -> np.ndarray:
    """One class per image: each image's top-1 (None), one class for all, or one per image."""
    n, classes = logits.shape
    if target is None:
        return logits.argmax(axis=1)
    chosen = np.broadcast_to(np.asarray(target), (n,)) if np.ndim(target) == 0 else np.asarray(target)
    if chosen.shape != (n,) or chosen.dtype.kind not in "iu" or chosen.min() < 0 or chosen.max() >= classes:
        raise InputError(f"target must be None, or one class in 0 .. {classes - 1} or one per image "
                         f"({n}); got {target!r}")
    return chosen


def grad_cam(model: ConvNeXt, x: np.ndarray, target: int | Sequence[int] | None = None,
             layer: str = "stages.3") -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017) on a stage's output A (N, C, h, w):

        alpha_c = mean over (h, w) of d logit_target / d A_c      one weight per channel
        map     = ReLU(sum_c alpha_c A_c)                        (N, h, w)

    at the stage's resolution, before any resizing or normalisation. `target`: None for each
    image's top-1 class, a class for every image, or one class per image. The logits are the
    network's, before any softmax the model's file ends in. x: as `model(x)` takes it.
    """
    images = model.network_input(x)                                               # (N, H, W, 3)
    k = stage_index(model, layer)
    h, _ = _stem(images, model)
    caches = []
    for i in range(len(model.config.depths)):
        h, cache = _stage_forward(h, model, i)
        if i == k:
            activation = h                                                        # A, (N, h, w, C)
        if i > k:
            caches.append(cache)
    logits = _head(h, model)
    chosen = _targets(target, logits)
    d_logits = np.zeros_like(logits)
    d_logits[np.arange(len(chosen)), chosen] = 1.0
    d_h = _head_backward(d_logits, h, model)
    for i, cache in zip(reversed(range(k + 1, len(model.config.depths))), reversed(caches)):
        d_h = _stage_backward(d_h, model, i, cache)
    alpha = d_h.mean(axis=(1, 2))                                                 # (N, C)
    return np.maximum(np.einsum("nhwc,nc->nhw", activation, alpha), 0.0)


def effective_receptive_field(model: ConvNeXt, stage: int, input_size: int = 224,
                              images: np.ndarray | None = None, count: int = 4, seed: int = 0) -> np.ndarray:
    """Effective receptive field (Luo et al. 2016) of stage `stage`'s centre output unit:

        ERF = mean over images and colour channels of | d (sum_c A_c[h // 2, w // 2]) / d x |

    A the stage's output (N, C, h, w), x the network's input (N, 3, H, W) as `model(x)`
    takes it (normalised images). `images` as `model` takes them; without them, `count`
    standard-normal images of input_size x input_size drawn with `seed`. -> (H, W)
    """
    if not 0 <= stage < len(model.config.depths):
        raise InputError(f"stage must lie in 0 .. {len(model.config.depths) - 1}; got {stage}")
    if images is None:
        rng = np.random.default_rng(seed)
        images = rng.standard_normal((count, model.config.in_chans, input_size, input_size))
    x = model.network_input(np.asarray(images, dtype=model.dtype))                # (N, H, W, 3)
    h, stem_conv = _stem(x, model)
    caches = []
    for i in range(stage + 1):
        h, cache = _stage_forward(h, model, i)
        caches.append(cache)
    d_h = np.zeros_like(h)
    d_h[:, h.shape[1] // 2, h.shape[2] // 2, :] = 1.0
    for i in reversed(range(stage + 1)):
        d_h = _stage_backward(d_h, model, i, caches[i])
    stem, config = model.weights.stem, model.config
    d_conv, _, _ = _ops(model).layer_norm_backward(d_h, stem_conv, stem.norm_weight, config.norm_eps)
    d_x, _, _ = layers.patchify_conv_backward(d_conv, x, stem.conv_weight, config.patch_size)
    return np.abs(d_x).mean(axis=(0, 3))                                          # (H, W)


def stage_feature_maps(model: ConvNeXt, image: np.ndarray) -> dict[str, np.ndarray]:
    """Each stage's output for one image, channel by channel: {"stages.i": (C, h, w)}, from
    `model.trace`. image: (3, H, W) or (1, 3, H, W), as `model` takes it."""
    image = np.asarray(image)
    batch = image[None] if image.ndim == 3 else image
    if batch.ndim != 4 or batch.shape[0] != 1:
        raise InputError(f"stage_feature_maps takes one image, (3, H, W) or (1, 3, H, W); got {image.shape}")
    trace = model.trace(batch)
    return {f"stages.{i}": trace[f"stages.{i}"][0] for i in range(len(model.config.depths))}


def strongest_channels(maps: np.ndarray, count: int = 8) -> np.ndarray:
    """Indices of the `count` channels of maps (C, h, w) with the largest mean |activation|,
    strongest first."""
    strength = np.abs(maps).mean(axis=(1, 2))
    return np.argsort(-strength, kind="stable")[:count]
