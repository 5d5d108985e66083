"""Training in NumPy: gradients of every weight, AdamW, learning-rate schedules.

    loss, grads = npconvnext.train.loss_and_grads(model, x, y, label_smoothing=0.1)
    opt = npconvnext.train.AdamW(model, lr=1e-3, weight_decay=0.05)
    opt.step(grads)          # the model computes with the new weights right away

The backward pass is readable NumPy (`backward.py`, with each layer's backward twin beside its
forward in `layers.py`), checked against PyTorch autograd.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..model import ConvNeXt
from ..params import expected_shapes, to_timm_layout
from . import backward, fused
from .optim import AdamW, cosine_schedule

__all__ = ["AdamW", "cosine_schedule", "loss_and_grads"]


def loss_and_grads(model: ConvNeXt, x: np.ndarray, y: np.ndarray, label_smoothing: float = 0.0,
                   drop_path_rate: float = 0.0, drop_rate: float = 0.0,
                   rng: np.random.Generator | None = None) -> tuple[float, dict[str, np.ndarray]]:
    """Mean cross-entropy of `model` on images x with integer labels y (N,), and its
    gradient for every weight: timm's names and (PyTorch) layouts, the model's dtype, exactly
    the keys of `model.state_dict()`. x comes as `model(x)` takes it (see model.convention:
    (N, 3, H, W) normalised for timm weights); the loss is on the logits, before any softmax
    the model's file ends in.

    drop_path_rate, drop_rate: stochastic depth and head dropout, drawn from `rng` (a seeded
    numpy Generator); both are off without one.
    The model's backend chooses the layers: "numpy" the readable ones, "numba" (the default)
    the engine's kernels where it has them. A bfloat16 model is refused: training stays float32.
    """
    model.check_trainable()
    images = model.network_input(x)                                            # (N, H, W, 3)
    labels = np.asarray(y)
    classes = model.config.num_classes
    if not classes:  # a headless backbone: its output is features, there are no logits to score
        raise InputError(f"this {model.config.name} has no classifier (num_classes 0, a headless backbone), so "
                         "there is no loss to train: give it one with model.reset_classifier(K) first (finetune "
                         "does this for a folder of K classes)")
    if labels.shape != (images.shape[0],) or labels.dtype.kind not in "iu":
        raise InputError(f"labels must be {images.shape[0]} integers, one per image; got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise InputError(f"labels must lie in 0 .. {classes - 1} for this {classes}-class model; "
                         f"got {labels.min()} .. {labels.max()}")
    ops = backward.REFERENCE if model.backend == "numpy" else fused.ENGINE
    logits, cache = backward.forward(images, model.weights, model.config, drop_path_rate, drop_rate, rng, ops)
    loss, d_logits = backward.cross_entropy(logits, labels, label_smoothing)
    grads = backward.backward(d_logits, model.weights, model.config, cache, ops).named()
    shapes = expected_shapes(model.config)
    return loss, {name: np.ascontiguousarray(to_timm_layout(name, grads[name], shape), dtype=model.dtype)
                  for name, shape in shapes.items()}
