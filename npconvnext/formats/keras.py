"""Keras ConvNeXt weights (keras.applications ConvNeXtTiny ... XLarge), read with h5py, no Keras.

Three containers, one naming:
    legacy .h5        what keras.applications downloads (convnext_tiny.h5) and model.save(".h5")
                      writes: a group per layer listing its weights in a `weight_names` attribute
    .weights.h5       Keras 3's model.save_weights: layers/<class name>/vars/0, 1, ... under a
                      group whose `name` attribute is the layer's name
    .keras            Keras 3's model.save: a zip holding model.weights.h5 and config.json
Layers are named `<model>_stem_conv`, `<model>_stage_<i>_block_<j>_depthwise_conv`, ... (the
table below). Layouts differ from timm's: conv kernels are (kh, kw, in, out), depthwise ones
(kh, kw, 1, C), dense kernels (in, out).

The model's Normalization layer (x - mean) / sqrt(variance) on 0-255 RGB pixels and its softmax
head stay part of the model (its convention). Keras does not store the Normalization's values
as weights: they come from the file's model config when it has one, else keras.applications'
(the ImageNet mean and std times 255, and a softmax), which its ConvNeXt always uses.
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile

import numpy as np

from ..convention import Convention
from ..errors import CheckpointError
from .guard import open_weight_file, reading
from .registry import Reading, WeightFormat

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_MAX_WEIGHTS_MEMBER = 8 << 30  # a .keras member larger than this is refused before reading

# Keras layer name (after the model's name) -> (timm name template, layout); {i} stage, {j} block,
# {k} downsampling block (timm's stage k + 1)
_LAYERS = [
    (r"stem_conv", "stem.0", "conv"),
    (r"stem_layernorm", "stem.1", "vector"),
    (r"downsampling_layernorm_(?P<k>\d+)", "stages.{k1}.downsample.0", "vector"),
    (r"downsampling_conv_(?P<k>\d+)", "stages.{k1}.downsample.1", "conv"),
    (r"stage_(?P<i>\d+)_block_(?P<j>\d+)_depthwise_conv", "stages.{i}.blocks.{j}.conv_dw", "depthwise"),
    (r"stage_(?P<i>\d+)_block_(?P<j>\d+)_layernorm", "stages.{i}.blocks.{j}.norm", "vector"),
    (r"stage_(?P<i>\d+)_block_(?P<j>\d+)_pointwise_conv_1", "stages.{i}.blocks.{j}.mlp.fc1", "dense"),
    (r"stage_(?P<i>\d+)_block_(?P<j>\d+)_pointwise_conv_2", "stages.{i}.blocks.{j}.mlp.fc2", "dense"),
    (r"stage_(?P<i>\d+)_block_(?P<j>\d+)_layer_scale", "stages.{i}.blocks.{j}.gamma", "scale"),
    (r"head_layernorm", "head.norm", "vector"),
    (r"head_dense", "head.fc", "dense"),
]
_COMPILED = [(re.compile(r"\w+?_" + pattern + "$"), template, layout) for pattern, template, layout in _LAYERS]
# a layer's weights in the order Keras creates them, for .weights.h5 where only the order is kept
_ROLES = {"conv": ("weight", "bias"), "depthwise": ("weight", "bias"), "dense": ("weight", "bias"),
          "vector": ("weight", "bias"), "scale": ("",)}
_KERAS_ROLES = {"kernel": "weight", "gamma": "weight", "bias": "bias", "beta": "bias", "variable": ""}
KERAS_APPLICATIONS_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
KERAS_APPLICATIONS_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def _to_timm_layout(array: np.ndarray, layout: str) -> np.ndarray:
    if layout in ("conv", "depthwise"):
        return array.transpose(3, 2, 0, 1)   # (kh, kw, in, out) -> (out, in, kh, kw); depthwise in = 1
    if layout == "dense":
        return array.T                       # (in, out) -> (out, in)
    return array


def _timm_name(layer: str) -> tuple[str, str] | None:
    """(timm module name, layout) of a Keras layer name, or None for layers without weights here."""
    for pattern, template, layout in _COMPILED:
        match = pattern.match(layer)
        if match:
            fields = match.groupdict()
            if "k" in fields:
                fields["k1"] = int(fields["k"]) + 1
            return template.format(**fields), layout
    return None


def _from_layers(layers: list[tuple[str, str, np.ndarray]], path: str) -> dict[str, np.ndarray]:
    """timm-named arrays from (Keras layer name, role, array) triples."""
    state = {}
    for layer, role, array in layers:
        found = _timm_name(layer)
        if found is None:
            continue
        module, layout = found
        name = module if role == "" else f"{module}.{role}"
        if name in state:
            raise CheckpointError(f"{path}: two Keras weights map to {name} (layer {layer})")
        state[name] = _to_timm_layout(np.asarray(array), layout) if role == "weight" else np.asarray(array)
    if "stem.0.weight" not in state:
        raise CheckpointError(f"{path}: not a Keras ConvNeXt: no layer named <model>_stem_conv "
                              f"(layers: {', '.join(sorted({l for l, _, _ in layers})[:6])})")
    return state


def _read_array(dataset, path: str) -> np.ndarray:
    if dataset.dtype.kind != "f" or dataset.ndim > 4 or dataset.size > (1 << 31):
        raise CheckpointError(f"{path}: weight {dataset.name} is {dataset.dtype} {dataset.shape}, not a float tensor")
    return dataset[()]


def _legacy_layers(root, path: str) -> list[tuple[str, str, np.ndarray]]:
    """(sub-layer name, role, array) from a legacy h5's `weight_names` lists."""
    out = []
    for layer in root.attrs.get("layer_names", []):
        layer = layer.decode() if isinstance(layer, bytes) else str(layer)
        group = root.get(layer)
        if group is None:
            raise CheckpointError(f"{path}: layer {layer!r} is listed but has no group")
        for weight in group.attrs.get("weight_names", []):
            weight = weight.decode() if isinstance(weight, bytes) else str(weight)
            parts = weight.split("/")
            # "kernel:0" (tf.keras), "variable_3" or "Variable" (an unnamed layer-scale weight)
            role = _KERAS_ROLES.get(re.sub(r"(_\d+)?(:\d+)?$", "", parts[-1]).lower())
            if role is None or weight not in group:
                raise CheckpointError(f"{path}: unexpected weight {weight!r} in layer {layer!r}")
            sublayer = parts[-2] if len(parts) > 1 else layer
            out.append((sublayer, role, _read_array(group[weight], path)))
    return out


def _keras3_layers(root, path: str) -> list[tuple[str, str, np.ndarray]]:
    """(layer name, role, array) from Keras 3's layers/<name>/vars/<index> tree."""
    import h5py

    out = []

    def visit(name, group):
        if not (isinstance(group, h5py.Group) and name.endswith("vars") and "name" in group.attrs):
            return
        layer = str(group.attrs["name"])
        found = _timm_name(layer)
        if found is None:
            return
        roles = _ROLES[found[1]]
        arrays = [group[str(k)] for k in range(len(group))]
        if len(arrays) != len(roles):
            raise CheckpointError(f"{path}: layer {layer!r} holds {len(arrays)} weights, expected {len(roles)}")
        out.extend((layer, role, _read_array(a, path)) for role, a in zip(roles, arrays))

    root.visititems(visit)
    return out


def _convention(config: dict | None, layer_names: list[str]) -> Convention:
    """The model's convention: its Normalization layer's values and its head's activation, from
    the model config; keras.applications' when the file holds no config."""
    layers = (config or {}).get("config", {}).get("layers", [])
    if not layers:  # weights only: keras.applications' ConvNeXt always normalises and ends in softmax
        if any(n.endswith("prestem_normalization") for n in layer_names):
            return Convention(layout="NHWC", scale="255", mean=KERAS_APPLICATIONS_MEAN, std=KERAS_APPLICATIONS_STD,
                              outputs="probabilities",
                              source="keras.applications' ConvNeXt (the file holds weights only)")
        return Convention(layout="NHWC", outputs="probabilities", source="keras.applications' ConvNeXt "
                          "without preprocessing (the file holds weights only)")
    head = [l for l in layers if str(l.get("name", "")).endswith("_head_dense")]
    activation = head[0].get("config", {}).get("activation") if head else None
    outputs = "probabilities" if activation == "softmax" else "logits"
    if activation not in (None, "linear", "softmax"):
        raise CheckpointError(f"the model's classifier ends in {activation!r}, which npconvnext does not apply")
    for layer in layers:
        if layer.get("class_name") == "Normalization":
            c = layer.get("config", {})
            mean, variance = c.get("mean"), c.get("variance")
            if mean is None or variance is None or c.get("invert"):
                raise CheckpointError("the model's Normalization layer has no stored mean and variance")
            std = tuple(max(math.sqrt(v), 1e-7) for v in variance)  # Keras divides by max(sqrt(var), eps)
            return Convention(layout="NHWC", scale="255", mean=tuple(mean), std=std, outputs=outputs,
                              source="the file's model config")
    return Convention(layout="NHWC", outputs=outputs, source="the file's model config (no Normalization layer)")


def _h5_layers(file, path: str) -> list[tuple[str, str, np.ndarray]]:
    import h5py

    with h5py.File(file, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" in root.attrs:
            return _legacy_layers(root, path)
        if "layers" in f:
            return _keras3_layers(f["layers"], path)
        raise CheckpointError("HDF5 file without Keras weights (no layer_names, no layers/)")


def _h5_config_and_names(file) -> tuple[dict | None, list[str]]:
    """The model config an .h5 holds (model.save writes one, save_weights does not) and its layer names."""
    import h5py

    with h5py.File(file, "r") as f:
        config = json.loads(f.attrs["model_config"]) if "model_config" in f.attrs else None
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" in root.attrs:
            return config, [n.decode() if isinstance(n, bytes) else str(n) for n in root.attrs["layer_names"]]
        return config, [str(g.attrs.get("name", "")) for g in _vars_groups(f["layers"])] if "layers" in f else []


def _vars_groups(root):
    import h5py

    found = []
    root.visititems(lambda name, g: found.append(g) if isinstance(g, h5py.Group) and name.endswith("vars") else None)
    return found


def _weights_member(archive: zipfile.ZipFile) -> zipfile.ZipInfo:
    members = {i.filename: i for i in archive.infolist()}
    if "model.weights.h5" not in members:
        raise CheckpointError(".keras archive without model.weights.h5")
    info = members["model.weights.h5"]
    if info.file_size > _MAX_WEIGHTS_MEMBER:
        raise CheckpointError(f"model.weights.h5 claims {info.file_size} bytes; refused")
    return info


def read_keras_h5(path: str) -> dict[str, np.ndarray]:
    """A legacy .h5 or a Keras 3 .weights.h5: timm-named arrays."""
    with reading(path, "Keras HDF5 file"):
        with open_weight_file(path) as f:
            return _from_layers(_h5_layers(f, path), path)


def read_keras_zip(path: str) -> dict[str, np.ndarray]:
    """A Keras 3 .keras file: the timm-named arrays of its model.weights.h5."""
    with reading(path, ".keras archive"):
        with open_weight_file(path) as f, zipfile.ZipFile(f) as archive:
            weights = archive.read(_weights_member(archive))
        return _from_layers(_h5_layers(io.BytesIO(weights), path), path)


def keras_h5_convention(path: str) -> Convention:
    """What the model in a Keras .h5 takes and gives (see the module docstring)."""
    with reading(path, "Keras HDF5 file"):
        with open_weight_file(path) as f:
            return _convention(*_h5_config_and_names(f))


def keras_zip_convention(path: str) -> Convention:
    """What the model in a .keras file takes and gives, from its config.json."""
    with reading(path, ".keras archive"):
        with open_weight_file(path) as f, zipfile.ZipFile(f) as archive:
            if "config.json" not in archive.namelist():
                raise CheckpointError(".keras archive without config.json")
            info = archive.getinfo("config.json")
            if info.file_size > 64 << 20:
                raise CheckpointError(f"config.json claims {info.file_size} bytes; refused")
            return _convention(json.loads(archive.read(info)), [])


def is_keras_zip(path: str) -> bool:
    """A zip whose members say Keras 3 (.keras), not PyTorch."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except Exception:  # noqa: BLE001  recognising never fails: the zip reader that takes it will say why
        return False
    return "model.weights.h5" in names and ("config.json" in names or "metadata.json" in names)


FORMATS = (WeightFormat("keras-h5", lambda head, path: head.startswith(HDF5_SIGNATURE),
                       lambda path: Reading(read_keras_h5(path), keras_h5_convention(path))),
           WeightFormat("keras-zip", lambda head, path: head[:4] == b"PK\x03\x04" and is_keras_zip(path),
                       lambda path: Reading(read_keras_zip(path), keras_zip_convention(path))))
