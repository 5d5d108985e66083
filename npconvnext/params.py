"""ConvNeXt's parameters: timm's names and shapes, the compute layouts, random weights, strict checks.

timm's names and PyTorch layouts are the native ones; every weight format maps onto them (see
`formats/`), and the network multiplies with the compute layouts below. These are all the
layout changes there are, done once when a model is built, each with its inverse for writing
timm-layout files back out; names not listed keep their layout:
    patchify conv   (out, in, k, k)              <-> (k * k * in, out)
    depthwise conv  (C, 1, k, k)                 <-> (k, k, C)
    linear          (out, in) or (out, in, 1, 1) <-> (in, out)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from .config import VARIANTS, ConvNeXtConfig
from .errors import CheckpointError


def expected_shapes(config: ConvNeXtConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the architecture, with timm's name and PyTorch shape, in timm's order."""
    c = config
    shapes: dict[str, tuple[int, ...]] = {
        "stem.0.weight": (c.dims[0], c.in_chans, c.patch_size, c.patch_size),
        "stem.0.bias": (c.dims[0],),
        "stem.1.weight": (c.dims[0],),
        "stem.1.bias": (c.dims[0],),
    }
    mlp_tail = (1, 1) if c.conv_mlp else ()
    for i, (depth, dim) in enumerate(zip(c.depths, c.dims)):
        stage = f"stages.{i}"
        if i > 0:
            prev = c.dims[i - 1]
            shapes[f"{stage}.downsample.0.weight"] = (prev,)
            shapes[f"{stage}.downsample.0.bias"] = (prev,)
            shapes[f"{stage}.downsample.1.weight"] = (dim, prev, 2, 2)
            shapes[f"{stage}.downsample.1.bias"] = (dim,)
        hidden = c.mlp_ratio * dim
        for j in range(depth):
            block = f"{stage}.blocks.{j}"
            if c.layer_scale:
                shapes[f"{block}.gamma"] = (dim,)
            shapes[f"{block}.conv_dw.weight"] = (dim, 1, c.kernel_size, c.kernel_size)
            shapes[f"{block}.conv_dw.bias"] = (dim,)
            shapes[f"{block}.norm.weight"] = (dim,)
            shapes[f"{block}.norm.bias"] = (dim,)
            shapes[f"{block}.mlp.fc1.weight"] = (hidden, dim, *mlp_tail)
            shapes[f"{block}.mlp.fc1.bias"] = (hidden,)
            if c.use_grn:
                shapes[f"{block}.mlp.grn.weight"] = (hidden,)
                shapes[f"{block}.mlp.grn.bias"] = (hidden,)
            shapes[f"{block}.mlp.fc2.weight"] = (dim, hidden, *mlp_tail)
            shapes[f"{block}.mlp.fc2.bias"] = (dim,)
    shapes["head.norm.weight"] = (c.num_features,)
    shapes["head.norm.bias"] = (c.num_features,)
    shapes["head.fc.weight"] = (c.num_classes, c.num_features)
    shapes["head.fc.bias"] = (c.num_classes,)
    return shapes


# ---- layouts ----------------------------------------------------------------------------------


def layout_kind(name: str) -> str | None:
    """'patchify', 'depthwise', 'linear', or None for a parameter kept as it is."""
    if name == "stem.0.weight" or name.endswith(".downsample.1.weight"):
        return "patchify"
    if name.endswith(".conv_dw.weight"):
        return "depthwise"
    if name.endswith((".mlp.fc1.weight", ".mlp.fc2.weight")) or name == "head.fc.weight":
        return "linear"
    return None


def to_compute_layout(name: str, array: np.ndarray) -> np.ndarray:
    """One timm-layout weight in the layout the network multiplies with (a view where possible)."""
    kind = layout_kind(name)
    if kind == "patchify":
        out_ch, in_ch, k, _ = array.shape
        return array.transpose(2, 3, 1, 0).reshape(k * k * in_ch, out_ch)  # (kh, kw, in, out) flattened
    if kind == "depthwise":
        return array[:, 0].transpose(1, 2, 0)                               # (C, 1, k, k) -> (k, k, C)
    if kind == "linear":
        return array.reshape(array.shape[0], array.shape[1]).T              # (out, in[, 1, 1]) -> (in, out)
    return array


def to_timm_layout(name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `to_compute_layout`, given the timm shape (from `expected_shapes`)."""
    kind = layout_kind(name)
    if kind == "patchify":
        out_ch, in_ch, k, _ = shape
        return array.reshape(k, k, in_ch, out_ch).transpose(3, 2, 0, 1)
    if kind == "depthwise":
        return array.transpose(2, 0, 1)[:, None]
    if kind == "linear":
        return array.T.reshape(shape)
    return array


# ---- random weights and strict checking ----------------------------------------------------------


def random_state_dict(config: ConvNeXtConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random weights of realistic magnitude, timm names and layouts, float32.

    Not timm's training init: that init sets gamma to 1e-6, which makes every block an identity
    and hides mistakes. Here every parameter moves the output: weights ~ N(0, 1/fan_in),
    norm scales around 1, biases and gammas of a few tenths, as trained checkpoints have.
    """
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith(".gamma"):
            value = rng.uniform(0.05, 0.5, shape)
        elif name.endswith("norm.weight") or name.endswith("downsample.0.weight") or name == "stem.1.weight":
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name.endswith(".bias") or name.endswith("grn.weight"):
            value = 0.2 * rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        state[name] = value.astype(np.float32)
    return state


def init_state_dict(config: ConvNeXtConfig, seed: int = 0, layer_scale_init: float = 1e-6) -> dict[str, np.ndarray]:
    """timm's training init, for training from scratch: conv and linear weights ~ N(0, 0.02)
    (timm truncates at +-2, which never bites at that width), biases 0, norm scales 1, layer
    scale `layer_scale_init`, GRN 0. timm names and layouts, float32."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith(".gamma"):
            value = np.full(shape, layer_scale_init)
        elif layout_kind(name) is not None:
            value = np.clip(0.02 * rng.standard_normal(shape), -2.0, 2.0)
        elif name.endswith(".weight") and "grn" not in name:  # LayerNorm scales
            value = np.ones(shape)
        else:
            value = np.zeros(shape)
        state[name] = value.astype(np.float32)
    return state


def check_state_dict(state: Mapping[str, np.ndarray], config: ConvNeXtConfig, source: str) -> None:
    """Strict loading: every problem with the weights, reported together in one error."""
    expected = expected_shapes(config)
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k}: got {tuple(np.shape(state[k]))}, expected {expected[k]}"
                 for k in expected if k in state and tuple(np.shape(state[k])) != expected[k]]
    not_float = [f"{k}: dtype {np.asarray(state[k]).dtype}" for k in expected
                 if k in state and np.asarray(state[k]).dtype.kind != "f"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("wrong shape", misshaped), ("not floating point", not_float)):
        if items:
            shown = items if len(items) <= 20 else items[:20] + [f"... and {len(items) - 20} more"]
            problems.append(f"{len(items)} {title}:\n    " + "\n    ".join(shown))
    if problems:
        raise CheckpointError(f"{source}: weights do not fit this architecture:\n  " + "\n  ".join(problems))


def detect_architecture(state: Mapping[str, np.ndarray]) -> ConvNeXtConfig:
    """The variant whose parameter shapes these timm-named weights have (num_classes from the head)."""

    def shape(name):
        return tuple(np.shape(state[name])) if name in state else None

    dims, depths = [], []
    for i in range(4):
        dw = shape(f"stages.{i}.blocks.0.conv_dw.weight")
        if dw is None:
            raise CheckpointError(f"cannot tell the architecture: no stages.{i}.blocks.0.conv_dw.weight")
        dims.append(dw[0])
        depths.append(len({n.split(".")[3] for n in state if n.startswith(f"stages.{i}.blocks.")}))
    found = dict(depths=tuple(depths), dims=tuple(dims), use_grn="stages.0.blocks.0.mlp.grn.weight" in state,
                 layer_scale="stages.0.blocks.0.gamma" in state)
    # no two variants share these; the MLP's storage (linear or 1x1 conv) is left to the loader
    for config in VARIANTS.values():
        if all(getattr(config, k) == v for k, v in found.items()):
            head = shape("head.fc.weight")
            return replace(config, num_classes=head[0]) if head else config
    raise CheckpointError(f"no ConvNeXt variant has depths {tuple(depths)} and widths {tuple(dims)} "
                          f"(GRN: {found['use_grn']}, layer scale: {found['layer_scale']})")
