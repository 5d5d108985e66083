"""ConvNeXt's parameters as one table: timm's names and shapes, the compute layouts, random
weights, strict checks, all read off `TABLE`.

timm's names and PyTorch layouts are the native ones (timm/models/convnext.py); every weight
format maps onto them (see `formats/`), and the network multiplies with the compute layouts
below. These are all the layout changes there are, done once when a model is built, each with
its inverse for writing timm-layout files back out; a row without one keeps its layout:
    patchify conv   (out, in, k, k)              <-> (k * k * in, out)
    depthwise conv  (C, 1, k, k)                 <-> (k, k, C)
    linear          (out, in) or (out, in, 1, 1) <-> (in, out)
The typed weights the network reads (`weights.py`) take their fields from the same table.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import NamedTuple

import numpy as np

from .config import VARIANTS, ConvNeXtConfig
from .errors import CheckpointError
from .layers import BFloat16Bits

Shape = tuple[int, ...]


class Param(NamedTuple):
    """One parameter of a module: a row of `TABLE`."""

    module: str       # "stem", "downsample", "block" or "head"
    field: str        # its field in the module's typed weights (weights.py)
    timm: str         # timm's name below the module's prefix (`PREFIXES`)
    shape: Callable[[ConvNeXtConfig, int], Shape]   # PyTorch shape, from the config and the stage i
    layout: str | None  # "patchify", "depthwise", "linear": its compute layout; None: kept as it is
    role: str         # what it is, for initialising: "kernel", "bias", "norm" (a LayerNorm's scale),
                      # "gamma" (layer scale), "grn" (GRN's scale)
    only_if: str | None = None  # the config flag without which the module has no such parameter


def _mlp_tail(c: ConvNeXtConfig) -> Shape:
    return (1, 1) if c.conv_mlp else ()  # the small V1 sizes store the MLP as 1x1 convs


def _hidden(c: ConvNeXtConfig, i: int) -> int:
    return c.mlp_ratio * c.dims[i]  # the inverted bottleneck's width, 4C


# Every parameter of ConvNeXt, module by module in timm's order (timm's state_dict order).
# Shapes: C = c.dims[i] the stage's width, c.dims[i - 1] the previous stage's, 4C the MLP's.
TABLE: tuple[Param, ...] = (
    Param("stem", "conv_weight", "0.weight", lambda c, i: (c.dims[0], c.in_chans, c.patch_size, c.patch_size),
          "patchify", "kernel"),
    Param("stem", "conv_bias", "0.bias", lambda c, i: (c.dims[0],), None, "bias"),
    Param("stem", "norm_weight", "1.weight", lambda c, i: (c.dims[0],), None, "norm"),
    Param("stem", "norm_bias", "1.bias", lambda c, i: (c.dims[0],), None, "bias", only_if="norm_bias"),
    # the overlapping stems: two 3x3 stride-2 convs (stem.0, then stem.1, or stem.2 after a GELU),
    # their kernels in the patchify layout, (3 * 3 * in, out), which the strided conv multiplies too
    *(row for first, second, norm, kind in ((0, 1, 2, "stem_overlap"), (0, 2, 3, "stem_overlap_act")) for row in (
        Param(kind, "conv1_weight", f"{first}.weight", lambda c, i: (c.stem_mid, c.in_chans, 3, 3), "patchify", "kernel"),
        Param(kind, "conv1_bias", f"{first}.bias", lambda c, i: (c.stem_mid,), None, "bias"),
        Param(kind, "conv_weight", f"{second}.weight", lambda c, i: (c.dims[0], c.stem_mid, 3, 3), "patchify", "kernel"),
        Param(kind, "conv_bias", f"{second}.bias", lambda c, i: (c.dims[0],), None, "bias"),
        Param(kind, "norm_weight", f"{norm}.weight", lambda c, i: (c.dims[0],), None, "norm"),
        Param(kind, "norm_bias", f"{norm}.bias", lambda c, i: (c.dims[0],), None, "bias", only_if="norm_bias"))),

    Param("downsample", "norm_weight", "0.weight", lambda c, i: (c.dims[i - 1],), None, "norm"),
    Param("downsample", "norm_bias", "0.bias", lambda c, i: (c.dims[i - 1],), None, "bias", only_if="norm_bias"),
    Param("downsample", "conv_weight", "1.weight", lambda c, i: (c.dims[i], c.dims[i - 1], 2, 2), "patchify", "kernel"),
    Param("downsample", "conv_bias", "1.bias", lambda c, i: (c.dims[i],), None, "bias"),

    Param("block", "gamma", "gamma", lambda c, i: (c.dims[i],), None, "gamma", only_if="layer_scale"),
    Param("block", "conv_dw_weight", "conv_dw.weight", lambda c, i: (c.dims[i], 1, c.kernel_size, c.kernel_size),
          "depthwise", "kernel"),
    Param("block", "conv_dw_bias", "conv_dw.bias", lambda c, i: (c.dims[i],), None, "bias"),
    Param("block", "norm_weight", "norm.weight", lambda c, i: (c.dims[i],), None, "norm"),
    Param("block", "norm_bias", "norm.bias", lambda c, i: (c.dims[i],), None, "bias", only_if="norm_bias"),
    Param("block", "fc1_weight", "mlp.fc1.weight", lambda c, i: (_hidden(c, i), c.dims[i], *_mlp_tail(c)),
          "linear", "kernel"),
    Param("block", "fc1_bias", "mlp.fc1.bias", lambda c, i: (_hidden(c, i),), None, "bias"),
    Param("block", "grn_weight", "mlp.grn.weight", lambda c, i: (_hidden(c, i),), None, "grn", only_if="use_grn"),
    Param("block", "grn_bias", "mlp.grn.bias", lambda c, i: (_hidden(c, i),), None, "bias", only_if="use_grn"),
    Param("block", "fc2_weight", "mlp.fc2.weight", lambda c, i: (c.dims[i], _hidden(c, i), *_mlp_tail(c)),
          "linear", "kernel"),
    Param("block", "fc2_bias", "mlp.fc2.bias", lambda c, i: (c.dims[i],), None, "bias"),

    # head_norm_first: the last feature map normed before the pool, by timm's top-level norm_pre
    Param("norm_pre", "norm_weight", "weight", lambda c, i: (c.num_features,), None, "norm"),
    Param("norm_pre", "norm_bias", "bias", lambda c, i: (c.num_features,), None, "bias", only_if="norm_bias"),

    Param("head", "norm_weight", "norm.weight", lambda c, i: (c.num_features,), None, "norm",
          only_if="head_pool_first"),
    Param("head", "norm_bias", "norm.bias", lambda c, i: (c.num_features,), None, "bias", only_if="head_norm_bias"),
    Param("head", "pre_fc_weight", "pre_logits.fc.weight", lambda c, i: (c.head_features, c.num_features),
          "linear", "kernel", only_if="head_hidden_size"),
    Param("head", "pre_fc_bias", "pre_logits.fc.bias", lambda c, i: (c.head_features,), None, "bias",
          only_if="head_hidden_size"),
    # num_classes 0: no classifier (timm's head.fc is an Identity then), the features are the output
    Param("head", "fc_weight", "fc.weight", lambda c, i: (c.num_classes, c.head_features), "linear", "kernel",
          only_if="num_classes"),
    Param("head", "fc_bias", "fc.bias", lambda c, i: (c.num_classes,), None, "bias", only_if="num_classes"),
)

# timm's name of each module, to which a row's name is appended; i the stage, j the block
PREFIXES = {"stem": "stem.", "stem_overlap": "stem.", "stem_overlap_act": "stem.", "downsample": "stages.{i}.downsample.",
            "block": "stages.{i}.blocks.{j}.", "norm_pre": "norm_pre.", "head": "head."}
# the module holding each stem type's parameters (config.stem_type)
STEMS = {"patch": "stem", "overlap": "stem_overlap", "overlap_tiered": "stem_overlap", "overlap_act": "stem_overlap_act"}


def rows(module: str) -> tuple[Param, ...]:
    """The table's rows of one module, in timm's order."""
    return _ROWS[module]


_ROWS = {module: tuple(p for p in TABLE if p.module == module) for module in PREFIXES}
_BY_TIMM_NAME = {(p.module, p.timm): p for p in TABLE}
# a module's prefix with any stage and block number in it
_PREFIX_PATTERNS = {module: re.compile(re.escape(prefix).replace(r"\{i\}", r"\d+").replace(r"\{j\}", r"\d+"))
                    for module, prefix in PREFIXES.items()}


class Module(NamedTuple):
    kind: str     # a module of the table: a stem (`STEMS`), "downsample", "block", "norm_pre", "head"
    prefix: str   # timm's name of the module, with the dot: "stages.1.blocks.0."
    stage: int    # the stage it belongs to (the head: the last)


def modules(config: ConvNeXtConfig) -> Iterator[Module]:
    """Every module holding parameters, in timm's order."""
    stem = STEMS[config.stem_type]
    yield Module(stem, PREFIXES[stem], 0)
    for i, depth in enumerate(config.depths):
        if i > 0:  # stage 0 takes the stem's output as it is
            yield Module("downsample", PREFIXES["downsample"].format(i=i), i)
        for j in range(depth):
            yield Module("block", PREFIXES["block"].format(i=i, j=j), i)
    if config.head_norm_first:
        yield Module("norm_pre", PREFIXES["norm_pre"], len(config.depths) - 1)
    yield Module("head", PREFIXES["head"], len(config.depths) - 1)


def present(param: Param, config: ConvNeXtConfig) -> bool:
    """Whether an architecture has this row's parameter (V1's gamma, V2's GRN, a norm's bias, a
    classifier, ...)."""
    return param.only_if is None or getattr(config, param.only_if)


def timm_name(module: str, field: str, stage: int = 0, block: int = 0) -> str:
    """timm's full name of one parameter, e.g. ("block", "gamma", 0, 0) -> "stages.0.blocks.0.gamma"."""
    return PREFIXES[module].format(i=stage, j=block) + next(p.timm for p in _ROWS[module] if p.field == field)


def param_of(name: str, config: ConvNeXtConfig | None = None) -> Param | None:
    """The table's row of a timm name ("stages.1.blocks.0.mlp.fc1.weight"), None if it has none.
    The stems share names ("stem.1.weight" is the patch stem's norm, an overlapping stem's conv):
    given `config`, the row of its stem; without, the first stem that has the name."""
    kinds = {m.kind for m in modules(config)} if config is not None else PREFIXES
    for module, pattern in _PREFIX_PATTERNS.items():
        prefix = pattern.match(name)
        if prefix and module in kinds and (module, name[prefix.end():]) in _BY_TIMM_NAME:
            return _BY_TIMM_NAME[(module, name[prefix.end():])]
    return None


def expected_shapes(config: ConvNeXtConfig) -> dict[str, Shape]:
    """Every parameter of the architecture, with timm's name and PyTorch shape, in timm's order."""
    return {m.prefix + p.timm: p.shape(config, m.stage)
            for m in modules(config) for p in _ROWS[m.kind] if present(p, config)}


# ---- layouts ----------------------------------------------------------------------------------


def layout_kind(name: str) -> str | None:
    """'patchify', 'depthwise', 'linear', or None for a parameter kept as it is. A name two stems
    share (a conv kernel in one, a norm scale in the other) has the conv's layout, which
    applies to 4-D arrays only."""
    layouts = [row.layout for module, pattern in _PREFIX_PATTERNS.items() if (prefix := pattern.match(name))
               for row in [_BY_TIMM_NAME.get((module, name[prefix.end():]))] if row is not None]
    return next((layout for layout in layouts if layout is not None), None)


def to_compute_layout(name: str, array: np.ndarray) -> np.ndarray:
    """One timm-layout weight in the layout the network multiplies with (a view where possible).
    A layout applies to arrays of its rank only: a name that is one stem's conv kernel (4-D)
    is another stem's norm scale (1-D), kept as it is."""
    kind = layout_kind(name)
    if kind == "patchify" and array.ndim == 4:
        out_ch, in_ch, k, _ = array.shape
        return array.transpose(2, 3, 1, 0).reshape(k * k * in_ch, out_ch)  # (kh, kw, in, out) flattened
    if kind == "depthwise":
        return array[:, 0].transpose(1, 2, 0)                               # (C, 1, k, k) -> (k, k, C)
    if kind == "linear":
        return array.reshape(array.shape[0], array.shape[1]).T              # (out, in[, 1, 1]) -> (in, out)
    return array


def to_timm_layout(name: str, array: np.ndarray, shape: Shape) -> np.ndarray:
    """Inverse of `to_compute_layout`, given the timm shape (from `expected_shapes`)."""
    kind = layout_kind(name)
    if kind == "patchify" and len(shape) == 4:
        out_ch, in_ch, k, _ = shape
        return array.reshape(k, k, in_ch, out_ch).transpose(3, 2, 0, 1)    # (k*k*in, out) -> (out, in, k, k)
    if kind == "depthwise":
        return array.transpose(2, 0, 1)[:, None]                            # (k, k, C) -> (C, 1, k, k)
    if kind == "linear":
        return array.T.reshape(shape)                                       # (in, out) -> (out, in[, 1, 1])
    return array


# ---- random weights and strict checking ----------------------------------------------------------


def _roles(config: ConvNeXtConfig) -> Iterator[tuple[str, Shape, str]]:
    """(timm name, shape, role) of every parameter, in timm's order."""
    for m in modules(config):
        for p in _ROWS[m.kind]:
            if present(p, config):
                yield m.prefix + p.timm, p.shape(config, m.stage), p.role


def random_state_dict(config: ConvNeXtConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random weights of realistic magnitude, timm names and layouts, float32.

    Not timm's training init: that init sets gamma to 1e-6, which makes every block an identity
    and hides mistakes. Here every parameter moves the output: weights ~ N(0, 1/fan_in),
    norm scales around 1, biases, GRN scales and gammas of a few tenths, as trained checkpoints have.
    """
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape, role in _roles(config):
        if role == "gamma":
            value = rng.uniform(0.05, 0.5, shape)
        elif role == "norm":
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        elif role in ("bias", "grn"):
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
    for name, shape, role in _roles(config):
        if role == "gamma":
            value = np.full(shape, layer_scale_init)
        elif role == "kernel":
            value = np.clip(0.02 * rng.standard_normal(shape), -2.0, 2.0)
        elif role == "norm":
            value = np.ones(shape)
        else:  # biases and GRN
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
                 if k in state and not _floating(state[k])]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("wrong shape", misshaped), ("not floating point", not_float)):
        if items:
            shown = items if len(items) <= 20 else items[:20] + [f"... and {len(items) - 20} more"]
            problems.append(f"{len(items)} {title}:\n    " + "\n    ".join(shown))
    if problems:
        raise CheckpointError(f"{source}: weights do not fit this architecture:\n  " + "\n  ".join(problems))


def _floating(array) -> bool:
    """Floats, or a bfloat16 tensor's bits (layers.BFloat16Bits)."""
    return isinstance(array, BFloat16Bits) or np.asarray(array).dtype.kind == "f"


def detect_architecture(state: Mapping[str, np.ndarray]) -> ConvNeXtConfig:
    """The variant whose parameter shapes these timm-named weights have (num_classes from the
    head, 0 without one)."""

    def shape(name):
        return tuple(np.shape(state[name])) if name in state else None

    dims, depths = [], []
    for i in range(4):
        conv_dw = timm_name("block", "conv_dw_weight", i)
        if shape(conv_dw) is None:
            raise CheckpointError(f"cannot tell the architecture: no {conv_dw}")
        dims.append(shape(conv_dw)[0])
        blocks = PREFIXES["block"].split("{j}")[0].format(i=i)                   # "stages.{i}.blocks."
        depths.append(len({n[len(blocks):].split(".")[0] for n in state if n.startswith(blocks)}))
    found = dict(depths=tuple(depths), dims=tuple(dims), use_grn=timm_name("block", "grn_weight") in state,
                 layer_scale=timm_name("block", "gamma") in state, stem_type=_stem_type(shape, dims[0]),
                 norm_bias=timm_name("block", "norm_bias") in state, head_norm_first="norm_pre.weight" in state,
                 head_hidden_size=(shape(timm_name("head", "pre_fc_weight")) or (None,))[0])
    # no two variants share these; the MLP's storage (linear or 1x1 conv) is left to the loader
    for config in VARIANTS.values():
        if all(getattr(config, k) == v for k, v in found.items()):
            head = shape(timm_name("head", "fc_weight"))  # none: a headless backbone
            return replace(config, num_classes=head[0] if head else 0)
    raise CheckpointError(f"no ConvNeXt variant has depths {tuple(depths)} and widths {tuple(dims)} "
                          f"(GRN: {found['use_grn']}, layer scale: {found['layer_scale']}, "
                          f"stem: {found['stem_type']}, norm bias: {found['norm_bias']}, "
                          f"head norm first: {found['head_norm_first']}, head hidden: {found['head_hidden_size']})")


def _stem_type(shape: Callable[[str], Shape | None], width: int) -> str:
    """The stem type whose parameters these are: a 3x3 first conv is an overlapping stem, with
    a GELU between its convs if the second is stem.2, tiered if the first is narrower."""
    first = shape("stem.0.weight")
    if first is None or first[-1] != 3:
        return "patch"
    if shape("stem.2.weight") is not None and len(shape("stem.2.weight")) == 4:
        return "overlap_act"
    return "overlap" if first[0] == width else "overlap_tiered"
