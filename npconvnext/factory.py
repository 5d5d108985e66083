"""`create_model`: an architecture by name, with weights from a mapping, a file, the hub, or seeded
random ones."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

import numpy as np

from .config import get_config
from .convention import TIMM, Convention
from .errors import InputError
from .formats import detect_naming, format_named, read_weight_file, to_timm_names
from .model import ConvNeXt
from .params import detect_architecture, random_state_dict
from .preprocessing import DataConfig, data_config


def _data_config(arch: str, tag: str | None, path: str | None, carried: DataConfig | None) -> tuple[DataConfig, str]:
    """The evaluation preprocessing for these weights, and where it comes from: what the weight
    file at `path` carries, the named tag's registry entry, the architecture's first published
    tag, or timm's defaults."""
    if carried is not None:
        return carried, f"{path} (its metadata or the config.json beside it)"
    for name in ([f"{arch}.{tag}"] if tag else []) + [arch]:
        try:
            return data_config(name), f"the registry entry of {name if tag else 'its first published tag'}"
        except ValueError:
            continue
    return DataConfig(), "timm's defaults"


def create_model(name: str | None, weights: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
                 dtype: str | np.dtype = "float32", backend: str = "numba",
                 num_classes: int | None = None, seed: int = 0, pretrained: str | None = None,
                 convention_override: Convention | None = None) -> ConvNeXt:
    """Build architecture `name` (see `list_models()`) with `weights`.

    weights: a mapping from parameter names to arrays in PyTorch layouts (conv OIHW, linear
        (out, in)), or a path to a weight file of any format in `npconvnext.formats`. None
        builds seeded random weights for experiments, with a warning.
    name: may be None when weights are given: the architecture is then read off their shapes.
        "arch.tag" names the architecture and the published weights' tag; the tag's weights
        are downloaded only when no `weights` are given.
    pretrained: a tag such as "fb_in1k": the published weights, through the huggingface-hub
        cache (see hub.py).
    num_classes: taken from the weights' classifier when not given; 1000 without weights.
    convention_override: what the model takes and gives, where the file cannot tell (a Keras
        weights-only file of a model built without preprocessing, say; an OpenVINO IR whose
        channel reversal and scale are folded into its first convolution); see convention.py.
    """
    tag = pretrained
    if name is not None and "." in name:
        name, tag = name.split(".", 1)
        if pretrained is None and weights is None:
            pretrained = tag
    if pretrained is not None:
        if weights is not None:
            raise InputError("pass either weights= or pretrained=, not both")
        from .hub import download_weights

        weights = download_weights(f"{name}.{pretrained}")
    source, path, file = "a mapping of arrays", None, None
    if isinstance(weights, (str, os.PathLike)):
        path = os.fspath(weights)
        file = read_weight_file(path, arch=name)
        source, weights = f"{path} ({file.format})", file.state
    elif weights is not None and detect_naming(weights) != "timm":
        weights = to_timm_names(dict(weights), get_config(name) if name else None)
    if name is None:
        if weights is None:
            raise InputError("name the architecture, or pass weights to read it from")
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
    preprocessing, preprocessing_source = _data_config(config.name, tag, path, file and file.data_config)
    convention = convention_override or (file and file.convention) or TIMM
    restate = file and format_named(file.format).restate
    if convention_override is not None and restate:
        # such a file holds its whole function: the override only says how it splits between
        # the caller and the stem, which is re-expressed for it; no output changes
        weights = restate(weights, file.convention, convention_override)
    model = ConvNeXt(config, weights, dtype=dtype, backend=backend, source=source, data_config=preprocessing,
                     data_config_source=preprocessing_source, convention=convention)
    if file and file.class_names is not None and len(file.class_names) == config.num_classes:
        model.class_names = file.class_names
    return model
