"""Foreign names of ConvNeXt's parameters mapped onto timm's, in one table language.

timm's names are native. Every other naming is a `Table` of rows (foreign pattern, timm
template[, kind]); the first row whose pattern matches a whole name gives its timm name. Fields
in braces: {i} a stage, {j} a block, {p} weight or bias, {k} a transformers downsampling layer's
part, {m} transformers' model prefix, {d} a Keras downsampling block, timm's stage {d+1}.
    official      facebookresearch/ConvNeXt and ConvNeXt-V2 .pth (parameter names)
    transformers  ConvNextForImageClassification and its V2 (parameter names)
    keras         keras.applications' layer names after the model's name
                  (`convnext_tiny_stem_conv`) -> timm module names; a layer's kind says its
                  weights' roles (`KERAS_KINDS`) and the layout fix of its kernel
    tfhub port    the TF-Hub port's layer groups (`stem`, `downsampling_block_0`,
                  `convnext_block_0_1`, `classification_head`), each a part of a SavedModel
                  variable's name or object path -> timm module names; `tfhub port block`:
                  a port block's sub-layers by their attribute names (`dw_conv_1`, ...)
Every difference between a foreign layout and timm's is fixed here, each in one place:
    hwio       a Keras/TF conv kernel (kh, kw, in, out) -> (out, in, kh, kw) (depthwise: in = 1)
    io         a Keras/TF dense kernel (in, out) -> (out, in)
    unit axes  the PyTorch world's linear (out, in) where timm has a 1x1 conv (out, in, 1, 1),
               GRN (1, 1, 1, C) where timm has (C,): reshaped to timm's (`fit_unit_axes`)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import numpy as np

from ..config import ConvNeXtConfig
from ..errors import CheckpointError
from ..params import detect_architecture, expected_shapes

_FIELDS = {"i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)", "d": r"(?P<d>\d+)", "k": r"(?P<k>[01])",
           "p": r"(?P<p>weight|bias)", "m": r"(?P<m>convnext|convnextv2)"}


class Table:
    """A naming: rows of (foreign pattern, timm template[, kind]); `prefix` is a regular
    expression every foreign name starts with (a Keras model's name)."""

    def __init__(self, rows: list[tuple[str, ...]], prefix: str = ""):
        self.rows = rows
        self._compiled = [(self._compile(prefix, row[0]), row[1], row[2] if len(row) > 2 else None) for row in rows]

    @staticmethod
    def _compile(prefix: str, pattern: str) -> re.Pattern:
        parts = re.split(r"\{(\w)\}", pattern)  # literal, field, literal, field, ...
        return re.compile(prefix + "".join(re.escape(p) if n % 2 == 0 else _FIELDS[p] for n, p in enumerate(parts)) + "$")

    def match(self, name: str) -> tuple[str, str | None] | None:
        """(timm name, the row's kind) of a foreign name, or None when no row matches."""
        return self.first([name])

    def first(self, names: Iterable[str]) -> tuple[str, str | None] | None:
        """(timm name, kind) of the first row, in the table's order, that one of `names` matches
        (a name's parts, where a group is named by one of them)."""
        names = list(names)
        for pattern, template, kind in self._compiled:
            for name in names:
                found = pattern.match(name)
                if found:
                    fields = found.groupdict()
                    if "d" in fields:
                        fields["d+1"] = int(fields["d"]) + 1
                    return template.format(**fields), kind
        return None


_BLOCK = "stages.{i}.blocks.{j}"
_KERAS_BLOCK = "stage_{i}_block_{j}"
NAMINGS: dict[str, Table] = {
    "official": Table([  # facebookresearch/ConvNeXt and ConvNeXt-V2 .pth
        ("downsample_layers.0.0.{p}", "stem.0.{p}"),
        ("downsample_layers.0.1.{p}", "stem.1.{p}"),
        ("downsample_layers.{i}.0.{p}", "stages.{i}.downsample.0.{p}"),
        ("downsample_layers.{i}.1.{p}", "stages.{i}.downsample.1.{p}"),
        ("stages.{i}.{j}.dwconv.{p}", _BLOCK + ".conv_dw.{p}"),
        ("stages.{i}.{j}.norm.{p}", _BLOCK + ".norm.{p}"),
        ("stages.{i}.{j}.pwconv1.{p}", _BLOCK + ".mlp.fc1.{p}"),
        ("stages.{i}.{j}.pwconv2.{p}", _BLOCK + ".mlp.fc2.{p}"),
        ("stages.{i}.{j}.grn.gamma", _BLOCK + ".mlp.grn.weight"),
        ("stages.{i}.{j}.grn.beta", _BLOCK + ".mlp.grn.bias"),
        ("stages.{i}.{j}.gamma", _BLOCK + ".gamma"),
        ("norm.{p}", "head.norm.{p}"),
        ("head.{p}", "head.fc.{p}"),
    ]),
    "transformers": Table([  # ConvNextForImageClassification / ConvNextV2ForImageClassification
        ("{m}.embeddings.patch_embeddings.{p}", "stem.0.{p}"),
        ("{m}.embeddings.layernorm.{p}", "stem.1.{p}"),
        ("{m}.encoder.stages.{i}.downsampling_layer.{k}.{p}", "stages.{i}.downsample.{k}.{p}"),
        ("{m}.encoder.stages.{i}.layers.{j}.dwconv.{p}", _BLOCK + ".conv_dw.{p}"),
        ("{m}.encoder.stages.{i}.layers.{j}.layernorm.{p}", _BLOCK + ".norm.{p}"),
        ("{m}.encoder.stages.{i}.layers.{j}.pwconv1.{p}", _BLOCK + ".mlp.fc1.{p}"),
        ("{m}.encoder.stages.{i}.layers.{j}.pwconv2.{p}", _BLOCK + ".mlp.fc2.{p}"),
        ("{m}.encoder.stages.{i}.layers.{j}.grn.{p}", _BLOCK + ".mlp.grn.{p}"),
        ("{m}.encoder.stages.{i}.layers.{j}.layer_scale_parameter", _BLOCK + ".gamma"),
        ("{m}.layernorm.{p}", "head.norm.{p}"),
        ("classifier.{p}", "head.fc.{p}"),
    ]),
    "keras": Table([  # keras.applications' ConvNeXt layers (module names, not parameter names)
        ("stem_conv", "stem.0", "conv"),
        ("stem_layernorm", "stem.1", "vector"),
        ("downsampling_layernorm_{d}", "stages.{d+1}.downsample.0", "vector"),
        ("downsampling_conv_{d}", "stages.{d+1}.downsample.1", "conv"),
        (_KERAS_BLOCK + "_depthwise_conv", _BLOCK + ".conv_dw", "depthwise"),
        (_KERAS_BLOCK + "_layernorm", _BLOCK + ".norm", "vector"),
        (_KERAS_BLOCK + "_pointwise_conv_1", _BLOCK + ".mlp.fc1", "dense"),
        (_KERAS_BLOCK + "_pointwise_conv_2", _BLOCK + ".mlp.fc2", "dense"),
        (_KERAS_BLOCK + "_layer_scale", _BLOCK + ".gamma", "scale"),
        ("head_layernorm", "head.norm", "vector"),
        ("head_dense", "head.fc", "dense"),
    ], prefix=r"\w+?_"),
    "tfhub port": Table([  # sayakpaul/ConvNeXt-TF (TF-Hub's ConvNeXts): a part of a variable's name or path
        ("stem", "stem", "stem"),
        ("downsampling_block_{d}", "stages.{d+1}.downsample", "downsample"),
        ("convnext_block_{i}_{j}", _BLOCK, "block"),
        ("classification_head", "head.fc", "head"),
    ]),
    "tfhub port block": Table([  # a port block's attributes, as its object graph names them
        ("dw_conv_1", "conv_dw"),
        ("layer_norm", "norm"),
        ("pw_conv_1", "mlp.fc1"),
        ("pw_conv_2", "mlp.fc2"),
    ]),
}


class KerasKind(NamedTuple):
    fix: str | None              # the layout fix of the layer's kernel (role "weight")
    roles: tuple[str, ...]       # its weights in the order Keras creates them ("" the module itself)


KERAS_KINDS = {"conv": KerasKind("hwio", ("weight", "bias")), "depthwise": KerasKind("hwio", ("weight", "bias")),
               "dense": KerasKind("io", ("weight", "bias")), "vector": KerasKind(None, ("weight", "bias")),
               "scale": KerasKind(None, ("",))}
# a Keras weight's own name (less any _3 or :0) -> its role in timm's parameter name
KERAS_ROLES = {"kernel": "weight", "gamma": "weight", "bias": "bias", "beta": "bias", "variable": ""}
# what keras.applications' ConvNeXt does to its input in its Normalization layer (0-255 RGB)
KERAS_APPLICATIONS_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
KERAS_APPLICATIONS_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
FIXES = {"hwio": lambda a: a.transpose(3, 2, 0, 1), "io": lambda a: a.T}


def keras_layer(layer: str) -> tuple[str, str] | None:
    """(timm module name, kind) of a Keras layer name, or None for layers without weights here."""
    return NAMINGS["keras"].match(layer)


def keras_role(weight: str) -> str | None:
    """weight / bias / '' (a raw variable such as layer scale) of a Keras weight's own name."""
    return KERAS_ROLES.get(re.sub(r"(_\d+)?(:\d+)?$", "", weight).lower())


def port_group(parts: Iterable[str]) -> tuple[str, str] | None:
    """(timm module, kind) of the TF-Hub port's layer group one of a variable's name parts
    names: the first in the table's order (stem, downsampling, block, head)."""
    return NAMINGS["tfhub port"].first(parts)


def port_sublayer(parts: Iterable[str]) -> str | None:
    """The timm sub-module (conv_dw, norm, mlp.fc1, mlp.fc2) of a port block's attribute, from the
    first of `parts` that is one."""
    return next((found[0] for p in parts if (found := NAMINGS["tfhub port block"].match(p))), None)


def fix_layout(array: np.ndarray, fix: str | None) -> np.ndarray:
    """A foreign kernel in timm's layout (see the module docstring); `fix` None: as it is."""
    return array if fix is None else FIXES[fix](array)


def fixed_shape(shape: tuple[int, ...], fix: str | None) -> tuple[int, ...]:
    """The shape `fix_layout` gives an array of `shape`, without the array."""
    return shape if fix is None else FIXES[fix](np.broadcast_to(np.uint8(0), shape)).shape


def fit_unit_axes(array: np.ndarray, expected: tuple[int, ...] | None) -> np.ndarray:
    """Reshape when the shapes agree once unit axes are dropped (see the module docstring)."""
    if expected is None or array.shape == expected:
        return array
    return array.reshape(expected) if squeezed(array.shape) == squeezed(expected) else array


def squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(s for s in shape if s != 1)


_TIMM_BLOCK = re.compile(r"stages\.\d+\.blocks\.\d+\.")


def detect_naming(names: Iterable[str]) -> str:
    """Which naming a set of parameter names follows: 'timm', 'official' or 'transformers'."""
    names = set(names)
    odd = next((n for n in names if not isinstance(n, str)), None)
    if odd is not None:
        raise CheckpointError(f"parameter names must be text; one is a {type(odd).__name__}")
    # timm's block names alone are enough: strict loading then reports a missing stem by name
    if "stem.0.weight" in names or any(_TIMM_BLOCK.match(n) for n in names):
        return "timm"
    if any(n.startswith(("convnext.embeddings.", "convnextv2.embeddings.")) for n in names):
        return "transformers"
    if "downsample_layers.0.0.weight" in names:
        return "official"
    raise CheckpointError("parameter names are neither timm's, the official ConvNeXt code's nor "
                          f"transformers' (first names: {[n[:80] for n in sorted(names)[:5]]})")


def _rename(name: str, naming: str) -> str:
    """A name no row matches is kept as it is and reported by strict loading."""
    found = NAMINGS[naming].match(name)
    return name if found is None else found[0]


def to_timm_names(state: Mapping[str, np.ndarray], config: ConvNeXtConfig | None = None) -> dict[str, np.ndarray]:
    """A state dict in any of the three PyTorch-world namings, renamed (and unit axes fitted) to
    timm's. With `config`, unit axes are fitted to that architecture's shapes."""
    naming = detect_naming(state)
    renamed = {(name if naming == "timm" else _rename(name, naming)): array for name, array in state.items()}
    if config is None:
        config = detect_architecture(renamed)
    shapes = expected_shapes(config)
    return {name: fit_unit_axes(array, shapes.get(name)) for name, array in renamed.items()}
