"""The ConvNeXt forward pass: patchify stem, four stages of blocks, pooled-norm head.

Sources: Liu et al., "A ConvNet for the 2020s" (CVPR 2022) and the official code
(facebookresearch/ConvNeXt models/convnext.py); Woo et al., "ConvNeXt V2" (CVPR 2023) for GRN;
timm (timm/models/convnext.py) for the parameter names and the numbers we match.

    input (N, 3, H, W)
      stem        4x4 conv stride 4 -> LayerNorm                      (N, H/4, W/4, C0)
      stage 0     blocks                                              (N, H/4, W/4, C0)
      stage 1..3  LayerNorm -> 2x2 conv stride 2 -> blocks            (N, H/2^(i+2), ..., Ci)
      head        global average pool -> LayerNorm -> Linear          (N, num_classes)

    block(x) = x + gamma * fc2(GRN(GELU(fc1(LayerNorm(dwconv7x7(x))))))
               (GRN only in V2; gamma only in V1)

Arrays are channels-last inside (see `layers.py` for why); the only transposes are at the
public boundary, where inputs and `forward_features` outputs are NCHW as in timm.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Callable, NamedTuple

import numpy as np

from . import kernels, layers, threads
from .checkpoints import CheckpointError, detect_architecture, detect_naming, load_state_dict, to_timm_names
from .config import ConvNeXtConfig, get_config

# Weights are stored in PyTorch layouts in checkpoints and in matmul-ready channels-last
# layouts here. These are all the layout changes there are, done once at load time, each with
# its inverse for writing timm-layout files back out. Names not matched keep their layout.
#   patchify conv   (out, in, k, k)              <-> (k * k * in, out)
#   depthwise conv  (C, 1, k, k)                 <-> (k, k, C)
#   linear          (out, in) or (out, in, 1, 1) <-> (in, out)


def _patchify_to_compute(w):
    out_ch, in_ch, k, _ = w.shape
    return w.transpose(2, 3, 1, 0).reshape(k * k * in_ch, out_ch)  # (kh, kw, in, out) flattened


def _depthwise_to_compute(w):
    return w[:, 0].transpose(1, 2, 0)  # (C, 1, k, k) -> (k, k, C)


def _linear_to_compute(w):
    return w.reshape(w.shape[0], w.shape[1]).T  # (out, in[, 1, 1]) -> (in, out)


_LAYOUT_KINDS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "patchify": _patchify_to_compute,
    "depthwise": _depthwise_to_compute,
    "linear": _linear_to_compute,
}


def _layout_kind(name: str) -> str | None:
    if name in ("stem.0.weight",) or name.endswith(".downsample.1.weight"):
        return "patchify"
    if name.endswith(".conv_dw.weight"):
        return "depthwise"
    if name.endswith((".mlp.fc1.weight", ".mlp.fc2.weight")) or name == "head.fc.weight":
        return "linear"
    return None


def to_compute_layout(name: str, array: np.ndarray) -> np.ndarray:
    """One timm-layout weight in the layout the forward pass multiplies with."""
    kind = _layout_kind(name)
    return array if kind is None else _LAYOUT_KINDS[kind](array)


def to_timm_layout(name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `to_compute_layout`, given the timm shape (from `expected_shapes`)."""
    kind = _layout_kind(name)
    if kind == "patchify":
        out_ch, in_ch, k, _ = shape
        return array.reshape(k, k, in_ch, out_ch).transpose(3, 2, 0, 1)
    if kind == "depthwise":
        return array.transpose(2, 0, 1)[:, None]
    if kind == "linear":
        return array.T.reshape(shape)
    return array


def _stored(name: str, array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A weight as the model keeps it: in compute layout and dtype, owned by the model unless
    it is a read-only array (memory-mapped from a safetensors file), which is used in place."""
    compute = to_compute_layout(name, array)
    if _layout_kind(name) != "linear":
        return np.array(compute, dtype=dtype, order="C")  # small: copied
    # Linear weights (93 % of the parameters) stay (out, in) in memory and are used through
    # their transpose, (in, out) in Fortran order, which BLAS reads as it is: no copy, so a
    # mapped file is not duplicated.
    if array.flags.writeable or compute.dtype != dtype or not compute.flags.f_contiguous:
        compute = np.array(compute, dtype=dtype, order="F")  # the caller's later edits must not reach us
    return compute


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


class BlockWeights(NamedTuple):
    """One block's weights in compute layout; C = block width, 4C = MLP hidden width."""

    conv_dw_weight: np.ndarray  # (7, 7, C)
    conv_dw_bias: np.ndarray    # (C,)
    norm_weight: np.ndarray     # (C,)
    norm_bias: np.ndarray       # (C,)
    fc1_weight: np.ndarray      # (C, 4C)
    fc1_bias: np.ndarray        # (4C,)
    grn_weight: np.ndarray | None  # (4C,) V2 only
    grn_bias: np.ndarray | None    # (4C,) V2 only
    fc2_weight: np.ndarray      # (4C, C)
    fc2_bias: np.ndarray        # (C,)
    gamma: np.ndarray | None    # (C,) V1 only: layer scale


def _no_record(name: str, x: np.ndarray) -> None:
    pass


def reference_block(x: np.ndarray, w: BlockWeights, eps: float, grn_eps: float,
                    record: Callable[[str, np.ndarray], None] = _no_record) -> np.ndarray:
    """One ConvNeXt block in plain NumPy. x: (N, H, W, C) -> (N, H, W, C)

    `record(step, activation)` sees every intermediate, named after timm's submodules.
    """
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


_DTYPES = {"float32": np.float32, "float64": np.float64}
BACKENDS = ("numba", "numpy")  # numba: fused kernels (default); numpy: the readable reference


class ConvNeXt:
    """A ConvNeXt classifier with fixed weights; call it on (N, 3, H, W) normalised images.

    Build it with `npconvnext.create_model`. `params` holds the weights by timm name in compute
    layout; `state_dict()` gives them back in timm's layouts.
    """

    def __init__(self, config: ConvNeXtConfig, state_dict: Mapping[str, np.ndarray],
                 dtype: str = "float32", backend: str = "numba", source: str = "weights"):
        if str(dtype) not in _DTYPES:
            raise ValueError(f"dtype must be 'float32' or 'float64', not {dtype!r}")
        self.config = config
        self.dtype = np.dtype(_DTYPES[str(dtype)])
        self.backend = backend
        _check_state_dict(state_dict, expected_shapes(config), source)
        self.params = {name: _stored(name, np.asarray(array), self.dtype) for name, array in state_dict.items()}
        self._blocks = [
            [self._block_weights(f"stages.{i}.blocks.{j}") for j in range(depth)]
            for i, depth in enumerate(config.depths)
        ]

    @property
    def backend(self) -> str:
        """Which implementation runs the layers; switching it keeps the weights."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {name!r}")
        self._backend = name

    def _block_weights(self, prefix: str) -> BlockWeights:
        p = self.params
        return BlockWeights(
            conv_dw_weight=p[f"{prefix}.conv_dw.weight"],
            conv_dw_bias=p[f"{prefix}.conv_dw.bias"],
            norm_weight=p[f"{prefix}.norm.weight"],
            norm_bias=p[f"{prefix}.norm.bias"],
            fc1_weight=p[f"{prefix}.mlp.fc1.weight"],
            fc1_bias=p[f"{prefix}.mlp.fc1.bias"],
            grn_weight=p.get(f"{prefix}.mlp.grn.weight"),
            grn_bias=p.get(f"{prefix}.mlp.grn.bias"),
            fc2_weight=p[f"{prefix}.mlp.fc2.weight"],
            fc2_bias=p[f"{prefix}.mlp.fc2.bias"],
            gamma=p.get(f"{prefix}.gamma"),
        )

    # ---- public API, NCHW like timm -------------------------------------------------------

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits. x: (N, 3, H, W) normalised images -> (N, num_classes)"""
        return self._over_batch(lambda images: self._head(self._features(images), pre_logits=False),
                                self._to_channels_last(x))

    def forward_features(self, x: np.ndarray) -> np.ndarray:
        """Last stage's feature map. x: (N, 3, H, W) -> (N, C_last, H // 32, W // 32)"""
        features = self._over_batch(self._features, self._to_channels_last(x))  # (N, h, w, C)
        return np.ascontiguousarray(features.transpose(0, 3, 1, 2))             # (N, C, h, w)

    def forward_head(self, features: np.ndarray, pre_logits: bool = False) -> np.ndarray:
        """Head on `forward_features` output. (N, C, h, w) -> (N, num_classes), or the pooled
        and normed (N, C) embedding if `pre_logits`."""
        features = np.asarray(features)
        if features.ndim != 4 or features.shape[1] != self.config.num_features:
            raise ValueError(f"forward_head expects (N, {self.config.num_features}, h, w) features, "
                             f"got shape {features.shape}")
        features = features.astype(self.dtype, copy=False).transpose(0, 2, 3, 1)  # (N, h, w, C)
        return self._head(features, pre_logits)

    def num_params(self) -> int:
        """Number of learnable scalars; equals sum(p.numel() for p in timm_model.parameters())."""
        return sum(int(a.size) for a in self.params.values())

    def state_dict(self) -> dict[str, np.ndarray]:
        """The weights by timm name in timm's (PyTorch) layouts, in this model's dtype."""
        shapes = expected_shapes(self.config)
        return {name: np.ascontiguousarray(to_timm_layout(name, self.params[name], shape))
                for name, shape in shapes.items()}

    def __repr__(self) -> str:
        return (f"ConvNeXt({self.config.name}, {self.num_params():,} params, "
                f"dtype={self.dtype.name}, backend={self.backend!r})")

    # ---- the network, channels-last --------------------------------------------------------

    def _over_batch(self, fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
        """fn(x), the batch shared between the threads image by image on the numba backend
        (see threads.py); the reference path stays one plain call."""
        return threads.map_over_batch(fn, x) if self._backend == "numba" else fn(x)

    def _to_channels_last(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_chans:
            raise ValueError(f"expected input of shape (N, {c.in_chans}, H, W) (NCHW), got {x.shape}")
        if x.dtype.kind != "f":
            raise TypeError(f"expected normalised floating-point images, got dtype {x.dtype}; "
                            "see npconvnext.preprocess")
        if min(x.shape[2:]) < c.reduction:
            raise ValueError(f"input {x.shape[2]}x{x.shape[3]} is smaller than the network's "
                             f"total stride {c.reduction}: every side must be at least {c.reduction}")
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=self.dtype)  # (N, H, W, 3)

    def _features(self, x: np.ndarray, record: Callable[[str, np.ndarray], None] | None = None) -> np.ndarray:
        """(N, H, W, 3) -> (N, H/32, W/32, C_last); `record` (reference path only) sees every step."""
        p, c = self.params, self.config
        fast = self._backend == "numba" and record is None
        record = record or _no_record
        layer_norm = kernels.layer_norm if fast else layers.layer_norm
        x = layers.patchify_conv(x, p["stem.0.weight"], p["stem.0.bias"], c.patch_size)  # (N, H/4, W/4, C0)
        record("stem.0", x)
        x = layer_norm(x, p["stem.1.weight"], p["stem.1.bias"], c.norm_eps)
        record("stem.1", x)
        for i, blocks in enumerate(self._blocks):
            if i > 0:  # halve the resolution, double the width
                ds = f"stages.{i}.downsample"
                x = layer_norm(x, p[f"{ds}.0.weight"], p[f"{ds}.0.bias"], c.norm_eps)
                record(f"{ds}.0", x)
                x = layers.patchify_conv(x, p[f"{ds}.1.weight"], p[f"{ds}.1.bias"], 2)
                record(f"{ds}.1", x)
            for j, weights in enumerate(blocks):
                name = f"stages.{i}.blocks.{j}"
                if fast:
                    x = kernels.convnext_block(x, weights, c.norm_eps, c.grn_eps)
                else:
                    x = reference_block(x, weights, c.norm_eps, c.grn_eps,
                                        lambda step, a, name=name: record(f"{name}.{step}", a))
                record(name, x)
        return x

    def _head(self, x: np.ndarray, pre_logits: bool,
              record: Callable[[str, np.ndarray], None] = _no_record) -> np.ndarray:
        """(N, h, w, C) -> (N, num_classes), or (N, C) if pre_logits"""
        p = self.params
        x = layers.global_avg_pool(x)                                    # (N, C)
        record("head.global_pool", x)
        x = layers.layer_norm(x, p["head.norm.weight"], p["head.norm.bias"], self.config.norm_eps)
        record("head.norm", x)
        if pre_logits:
            return x
        x = layers.linear(x, p["head.fc.weight"], p["head.fc.bias"])     # (N, num_classes)
        record("head.fc", x)
        return x

    def trace(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every intermediate activation of the reference (NumPy) path, by timm module name.

        Each array has the layout timm's forward hook on that module shows, so the two line up
        one to one:
          stem.0, stem.1, stages.i.downsample.0/1, stages.i.blocks.j.conv_dw, stages.i.blocks.j
                                 (N, C, H, W)
          stages.i.blocks.j.norm, .mlp.fc1, .mlp.act, .mlp.grn (V2), .mlp.fc2
                                 (N, H, W, C) for the linear-MLP variants (tiny and up: timm
                                 permutes to channels-last around them), (N, C, H, W) for the
                                 1x1-conv ones (atto ... nano, `config.conv_mlp`)
          stages.i.blocks.j.layer_scale   (N, C, H, W) gamma * fc2 output, the residual branch
                                 (no timm module: its block multiplies by gamma inline; V2
                                 has no gamma and this is the fc2 output)
          head.global_pool, head.norm   (N, C, 1, 1);   head.fc   (N, num_classes)
        The input itself is under "input", (N, 3, H, W).
        """
        x_cl = self._to_channels_last(x)
        mlp_steps = (".norm", ".mlp.fc1", ".mlp.act", ".mlp.grn", ".mlp.fc2")
        trace = {"input": np.ascontiguousarray(np.asarray(x, dtype=self.dtype))}

        def record(name: str, a: np.ndarray) -> None:
            if a.ndim == 2:  # head: pooled (N, C) -> (N, C, 1, 1) as timm's pool keeps dims
                a = a if name == "head.fc" else a[:, :, None, None]
            elif not (name.endswith(mlp_steps) and not self.config.conv_mlp):
                a = a.transpose(0, 3, 1, 2)                          # (N, H, W, C) -> (N, C, H, W)
            trace[name] = np.ascontiguousarray(a)

        self._head(self._features(x_cl, record), pre_logits=False, record=record)
        return trace


def _check_state_dict(state: Mapping[str, np.ndarray], expected: dict[str, tuple[int, ...]],
                      source: str) -> None:
    """Strict loading: every problem with the weights, reported together in one error."""
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


def create_model(name: str | None, weights: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
                 dtype: str = "float32", backend: str = "numba",
                 num_classes: int | None = None, seed: int = 0, pretrained: str | None = None) -> ConvNeXt:
    """Build architecture `name` (see `list_models()`) with `weights`.

    weights: a mapping from parameter names to arrays in PyTorch layouts (conv OIHW, linear
        (out, in)), or a path to a weight file: timm, official facebookresearch or transformers
        naming, safetensors or PyTorch zip (see checkpoints.py). None builds seeded random weights
        for experiments, with a warning.
    name: may be None when weights are given: the architecture is then read off their shapes.
    pretrained: a tag such as "fb_in1k" (or name "convnext_tiny.fb_in1k"): the published weights,
        through the huggingface-hub cache (see hub.py).
    num_classes: taken from the weights' classifier when not given; 1000 without weights.
    """
    if name is not None and "." in name and pretrained is None:
        name, pretrained = name.split(".", 1)
    if pretrained is not None:
        if weights is not None:
            raise ValueError("pass either weights= or pretrained=, not both")
        from .hub import download_weights

        weights = download_weights(f"{name}.{pretrained}")
    source = "weights"
    if isinstance(weights, (str, os.PathLike)):
        source = os.fspath(weights)
        weights = load_state_dict(weights, arch=name)
    elif weights is not None and detect_naming(weights) != "timm":
        weights = to_timm_names(dict(weights), get_config(name) if name else None)
    if name is None:
        if weights is None:
            raise ValueError("name the architecture, or pass weights to read it from")
        name = detect_architecture(weights).name
    if num_classes is None:
        fc = weights.get("head.fc.weight") if weights is not None else None
        num_classes = int(np.shape(fc)[0]) if fc is not None and np.ndim(fc) == 2 else 1000
    config = get_config(name, num_classes=num_classes)
    if weights is None:
        warnings.warn(f"{config.name}: no weights given, using seeded random weights (seed={seed}); "
                      "its outputs mean nothing", stacklevel=2)
        weights = random_state_dict(config, seed)
        source = f"random weights (seed {seed})"
    return ConvNeXt(config, weights, dtype=dtype, backend=backend, source=source)
