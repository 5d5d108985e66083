"""`create_model`: an architecture by name, with weights from a mapping, a file, the hub, or seeded
random ones; `list_models`, the architectures it builds, filtered as timm's."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from .config import ConvNeXtConfig, get_config, list_models as config_models
from .convention import TIMM, Convention
from .errors import CheckpointError, InputError
from .formats import detect_naming, format_named, read_weight_file, to_timm_names
from .hub import default_tag, matches, registry
from .model import ConvNeXt, FeatureModel, HandedOver
from .params import check_state_dict, detect_architecture, init_state_dict, random_state_dict, timm_name
from .preprocessing import DataConfig, data_config


def list_models(filter: str | list[str] = "", pretrained: bool = False, exclude_filters: str | list[str] = "",
                include_tags: bool | None = None) -> list[str]:
    """The architectures npconvnext builds, as timm's `list_models` lists them: those matching
    the wildcard `filter` (all when empty) and not `exclude_filters`; with `pretrained` only those
    with published weights, named `arch.tag` as timm names them then (`include_tags`, which
    defaults to `pretrained`; a filter without a tag then also matches the architecture's tags)."""
    include_tags = pretrained if include_tags is None else include_tags
    names = list(config_models())
    if include_tags:
        tagged = {}
        for name in registry():
            tagged.setdefault(name.split(".", 1)[0], []).append(name)
        names = [n for a in names for n in tagged.get(a, [a])]

    def expand(patterns):
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        return [e for p in patterns if p for e in ([p, p + ".*"] if include_tags and "." not in p else [p])]

    published = set(registry()) | {n.split(".", 1)[0] for n in registry()}
    keep, drop = expand(filter), expand(exclude_filters)
    return [n for n in names if (not keep or matches(n, keep)) and not (drop and matches(n, drop))
            and (not pretrained or n in published)]


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


def _classes_in(weights: Mapping[str, np.ndarray]) -> int:
    """The class count of the classifier in timm-named weights; 0 without one (a backbone)."""
    fc = weights.get(timm_name("head", "fc_weight"))
    return int(np.shape(fc)[0]) if fc is not None and np.ndim(fc) == 2 else 0


def _check_architecture(weights: Mapping[str, np.ndarray], config: ConvNeXtConfig, source: str) -> None:
    """One line naming the architecture the weights hold, when they are another's than `config`'s
    (instead of the strict check's list of every unexpected and misshaped weight)."""
    try:
        check_state_dict(weights, config, source)
        return
    except CheckpointError:
        try:
            found = detect_architecture(weights)
        except CheckpointError:
            return  # not a ConvNeXt we know: the strict check's list says more
    if found.name != config.name:
        raise CheckpointError(f"{source} holds {found.name} weights, not {config.name}: load it with "
                              f"create_model({found.name!r}, weights=...) or --model {found.name}, or without a "
                              "model name (the architecture is read off the weights)")


def _with_head(weights: dict, config: ConvNeXtConfig, found: int, seed: int, source: str) -> dict:
    """The weights with a classifier for `config.num_classes` where the file's has `found`
    classes: every other weight kept, head.fc dropped (0 classes) or new and seeded as timm
    initialises one; a new head is announced in one warning, as timm does for pretrained weights."""
    fc = (timm_name("head", "fc_weight"), timm_name("head", "fc_bias"))
    weights = {k: v for k, v in weights.items() if k not in fc}
    if config.num_classes:
        fresh = init_state_dict(config, seed)
        weights.update({k: fresh[k] for k in fc})
        had = f"a {found}-class classifier" if found else "no classifier"
        warnings.warn(f"{source} has {had}: head.fc is new for {config.num_classes} classes (timm's init, "
                      f"seed {seed}), every other weight is the file's", stacklevel=3)
    return weights


def create_model(name: str | None, weights: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
                 dtype: str | np.dtype = "float32", backend: str = "numba",
                 num_classes: int | None = None, seed: int = 0, pretrained: str | bool | None = None,
                 convention_override: Convention | None = None, features_only: bool = False,
                 out_indices: tuple[int, ...] = (0, 1, 2, 3)) -> ConvNeXt:
    """Build architecture `name` (see `list_models()`) with `weights`.

    weights: a mapping from parameter names to arrays in PyTorch layouts (conv OIHW, linear
        (out, in)), or a path to a weight file of any format in `npconvnext.formats`. None
        builds seeded random weights for experiments, with a warning.
    name: may be None when weights are given: the architecture is then read off their shapes.
        "arch.tag" names the architecture and the published weights' tag; the tag's weights
        are downloaded only when no `weights` are given.
    pretrained: a tag such as "fb_in1k": the published weights, through the huggingface-hub
        cache (see hub.py); True: the tag timm loads for `pretrained=True`; False: none.
    num_classes: taken from the weights' classifier when not given (0 for a backbone without
        one); 1000 without weights. 0 builds no classifier: the model gives the pooled, normed
        features (N, C), as timm's. Another count than the weights' gives a new seeded head.
    features_only, out_indices: as timm's, a `FeatureModel` giving the outputs of those stages
        as a list (see `ConvNeXt.forward_intermediates`), with `feature_info`.
    convention_override: what the model takes and gives, where the file cannot tell (a Keras
        weights-only file of a model built without preprocessing, say; an OpenVINO IR whose
        channel reversal and scale are folded into its first convolution); see convention.py.
    """
    if pretrained is False:
        pretrained = None
    tag = None if pretrained is True else pretrained
    if name is not None and "." in name:
        name, tag = name.split(".", 1)
        if pretrained is None and weights is None:
            pretrained = tag
    if pretrained is True:
        pretrained = tag = default_tag(get_config(name).name if name else "")
    if pretrained is not None:
        if weights is not None:
            raise InputError("pass either weights= or pretrained=, not both")
        from .hub import download_weights  # looked up at the call: tests stand a fake in for it

        weights = download_weights(f"{name}.{pretrained}")
    source, path, file = "a mapping of arrays", None, None
    made_here = False  # the arrays were read or made here: nothing else holds them
    if isinstance(weights, (str, os.PathLike)):
        path = os.fspath(weights)
        file = read_weight_file(path, arch=name, widen=False)  # the model widens what it keeps as floats
        # the arrays move to `weights`, to be handed over to the model: `file` keeps no reference
        source, weights, file = f"{path} ({file.format})", file.state, file._replace(state={})
        made_here = True
    elif weights is not None and detect_naming(weights) != "timm":
        weights = to_timm_names(dict(weights), get_config(name) if name else None)
    if name is None:
        if weights is None:
            raise InputError("name the architecture, or pass weights to read it from")
        name = detect_architecture(weights).name
    found = _classes_in(weights) if weights is not None else 1000
    config = get_config(name, num_classes=found if num_classes is None else num_classes)
    if weights is None:
        warnings.warn(f"{config.name}: no weights given, using seeded random weights (seed={seed}); "
                      "its outputs mean nothing", stacklevel=2)
        weights = random_state_dict(config, seed)
        source, made_here = f"random weights (seed {seed})", True
    else:
        _check_architecture(weights, replace(config, num_classes=found), path or source)
        if found != config.num_classes:
            weights = _with_head(dict(weights), config, found, seed, path or source)
    preprocessing, preprocessing_source = _data_config(config.name, tag, path, file and file.data_config)
    convention = convention_override or (file and file.convention) or TIMM
    restate = file and format_named(file.format).restate
    if convention_override is not None and restate:
        # such a file holds its whole function: the override only says how it splits between
        # the caller and the stem, which is re-expressed for it; no output changes
        weights = restate(weights, file.convention, convention_override)
    if made_here:
        weights = HandedOver(weights)  # each array is freed once the model has stored it
    model = ConvNeXt(config, weights, dtype=dtype, backend=backend, source=source, data_config=preprocessing,
                     data_config_source=preprocessing_source, convention=convention)
    if file and file.class_names is not None and len(file.class_names) == config.num_classes:
        model.class_names = file.class_names
    return FeatureModel(model, out_indices) if features_only else model
