"""The PyTorch world's three namings of ConvNeXt's parameters, mapped onto timm's.

timm's names are native. The official facebookresearch/ConvNeXt code and transformers map onto
them through `_NAME_TABLES`, one row per kind of parameter. Between these three the only layout
differences are unit axes (a linear (out, in) stored where timm has a 1x1 conv (out, in, 1, 1),
GRN (1, 1, 1, C) where timm has (C,)), fixed in one place, `_fit_unit_axes`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np

from ..config import ConvNeXtConfig
from ..errors import CheckpointError
from ..params import detect_architecture, expected_shapes

# naming -> [(source name pattern, timm name)], {i} a stage index, {j} a block index. The first
# row that matches wins; a name no row matches is kept as it is and reported by strict loading.
_BLOCK = "stages.{i}.blocks.{j}"
_NAME_TABLES: dict[str, list[tuple[str, str]]] = {
    "official": [  # facebookresearch/ConvNeXt and ConvNeXt-V2 .pth
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
    ],
    "transformers": [  # ConvNextForImageClassification / ConvNextV2ForImageClassification
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
    ],
}
_FIELDS = {"i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)", "k": r"(?P<k>[01])", "p": r"(?P<p>weight|bias)",
           "m": r"(?P<m>convnext|convnextv2)"}


def _compile(pattern: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", pattern)  # literal, field, literal, field, ...
    return re.compile("".join(re.escape(p) if n % 2 == 0 else _FIELDS[p] for n, p in enumerate(parts)) + "$")


_COMPILED = {fmt: [(_compile(src), dst) for src, dst in rows] for fmt, rows in _NAME_TABLES.items()}


def _rename(name: str, naming: str) -> str:
    for pattern, template in _COMPILED[naming]:
        match = pattern.match(name)
        if match:
            return template.format(**match.groupdict())
    return name


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


def _fit_unit_axes(array: np.ndarray, expected: tuple[int, ...] | None) -> np.ndarray:
    """Reshape when the shapes agree once unit axes are dropped (see the module docstring)."""
    if expected is None or array.shape == expected:
        return array
    squeeze = lambda shape: tuple(s for s in shape if s != 1)  # noqa: E731
    return array.reshape(expected) if squeeze(array.shape) == squeeze(expected) else array


def to_timm_names(state: Mapping[str, np.ndarray], config: ConvNeXtConfig | None = None) -> dict[str, np.ndarray]:
    """A state dict in any of the three namings, renamed (and unit axes fitted) to timm's.
    With `config`, unit axes are fitted to that architecture's shapes."""
    naming = detect_naming(state)
    renamed = {(name if naming == "timm" else _rename(name, naming)): array for name, array in state.items()}
    if config is None:
        config = detect_architecture(renamed)
    shapes = expected_shapes(config)
    return {name: _fit_unit_axes(array, shapes.get(name)) for name, array in renamed.items()}
