"""Keras ConvNeXt weights (keras.applications ConvNeXtTiny ... XLarge), read with h5py, no Keras.

Three containers, one naming:
    legacy .h5        what keras.applications downloads (convnext_tiny.h5) and model.save(".h5")
                      writes: a group per layer listing its weights in a `weight_names` attribute
    .weights.h5       Keras 3's model.save_weights: layers/<class name>/vars/0, 1, ... under a
                      group whose `name` attribute is the layer's name
    .keras            Keras 3's model.save: a zip holding model.weights.h5 and config.json
Layers are named `<model>_stem_conv`, `<model>_stage_<i>_block_<j>_depthwise_conv`, ... (the
table "keras" in names.py, which also fixes Keras' layouts to timm's).

The model's Normalization layer (x - mean) / sqrt(variance) on 0-255 RGB pixels and its softmax
head stay part of the model (its convention). Keras does not store the Normalization's values
as weights: they come from the file's model config when it has one, else keras.applications'
(the ImageNet mean and std times 255, and a softmax), which its ConvNeXt always uses.

An HDF5 file is untrusted: soft and external links, external raw storage and virtual datasets
are refused (they read other files); every dataset's declared shape is checked against the
architecture before any is read, and one whose chunks or bytes were never written is refused
(it would read back as its fill value). A .keras member is decompressed only up to the largest
ConvNeXt's size.
"""

from __future__ import annotations

import io
import json
import math
import zipfile

import numpy as np

from ..convention import Convention
from ..errors import CheckpointError
from ..params import detect_architecture, expected_shapes
from .guard import MAX_MODEL_BYTES, MAX_PARAMETER_ELEMENTS, describe, open_weight_file, reading
from .names import (KERAS_APPLICATIONS_MEAN, KERAS_APPLICATIONS_STD, KERAS_KINDS, fix_layout, fixed_shape,
                    keras_layer, keras_role, squeezed)
from .registry import Reading, WeightFormat

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
MAX_WEIGHTS_BYTES = MAX_MODEL_BYTES  # a .keras's model.weights.h5 is decompressed up to this, never past it
_MAX_CONFIG = 64 << 20               # a .keras's config.json
_KERAS_MEMBERS = ("metadata.json", "config.json", "model.weights.h5")  # what Keras writes, in this order
_CHUNK = 1 << 20


def _convention(config: dict | None, layer_names: list[str]) -> Convention:
    """The model's convention: its Normalization layer's values and its head's activation, from
    the model config; keras.applications' when the file holds no config."""
    layers = (config or {}).get("config", {}).get("layers", []) if isinstance(config, dict) else []
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
            mean, variance = _values(c.get("mean")), _values(c.get("variance"))
            if mean is None or variance is None or c.get("invert"):
                raise CheckpointError("the model's Normalization layer has no stored mean and variance")
            if not all(math.isfinite(v) for v in mean + variance):
                raise CheckpointError("the model's Normalization layer holds NaN or Inf in its mean or "
                                      "variance (as non-finite weights, it would make every output NaN)")
            if any(v < 0 for v in variance):
                raise CheckpointError("the model's Normalization layer has a negative variance")
            std = tuple(max(math.sqrt(v), 1e-7) for v in variance)  # Keras divides by max(sqrt(var), eps)
            return Convention(layout="NHWC", scale="255", mean=mean, std=std, outputs=outputs,
                              source="the file's model config")
    return Convention(layout="NHWC", outputs=outputs, source="the file's model config (no Normalization layer)")


def _values(value: object) -> tuple[float, ...] | None:
    """A config's mean or variance as numbers (a list, or one number for every channel)."""
    if value is None:
        return None
    if not (isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise CheckpointError("the model's Normalization layer's mean or variance is not a list of numbers")
    return tuple(float(v) for v in value)


# ---- an HDF5 file's weights, checked before they are read -----------------------------------------


def _refuse_links(f) -> None:
    """Soft and external links could make a weight another file's, or another dataset's."""
    import h5py

    def visit(name, link):
        if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
            return f"{describe(name)} is {'an external' if isinstance(link, h5py.ExternalLink) else 'a soft'} link"
        return None

    found = f.visititems_links(visit)
    if found is not None:
        raise CheckpointError(f"{found}; a Keras weight file's datasets are its own")


def _legacy_weights(root) -> list[tuple[str, str, object]]:
    """(sub-layer name, role, dataset) from a legacy h5's `weight_names` lists."""
    out = []
    for layer in root.attrs.get("layer_names", []):
        layer = layer.decode() if isinstance(layer, bytes) else str(layer)
        group = root.get(layer)
        if group is None:
            raise CheckpointError(f"layer {describe(layer)} is listed but has no group")
        for weight in group.attrs.get("weight_names", []):
            weight = weight.decode() if isinstance(weight, bytes) else str(weight)
            parts = weight.split("/")
            # "kernel:0" (tf.keras), "variable_3" or "Variable" (an unnamed layer-scale weight)
            role = keras_role(parts[-1])
            if role is None or weight not in group:
                raise CheckpointError(f"unexpected weight {describe(weight)} in layer {describe(layer)}")
            out.append((parts[-2] if len(parts) > 1 else layer, role, group[weight]))
    return out


def _keras3_weights(root) -> tuple[list[tuple[str, str, object]], list[str]]:
    """(layer name, role, dataset) from Keras 3's layers/<name>/vars/<index> tree, and the names
    of every layer there."""
    import h5py

    out, names = [], []

    def visit(name, group):
        if not (isinstance(group, h5py.Group) and name.endswith("vars")):
            return
        names.append(str(group.attrs.get("name", "")))
        found = keras_layer(names[-1]) if "name" in group.attrs else None
        if found is None:
            return
        roles = KERAS_KINDS[found[1]].roles
        if len(group) != len(roles):
            raise CheckpointError(f"layer {describe(names[-1])} holds {len(group)} weights, expected {len(roles)}")
        out.extend((names[-1], role, group[str(k)]) for k, role in enumerate(roles))

    root.visititems(visit)
    return out, names


def _keras_weights(f) -> tuple[list[tuple[str, str, object]], list[str]]:
    """(layer name, role, dataset) of every weight, unread, and the file's layer names."""
    root = f["model_weights"] if "model_weights" in f else f
    if "layer_names" in root.attrs:
        weights = _legacy_weights(root)
        return weights, [n.decode() if isinstance(n, bytes) else str(n) for n in root.attrs["layer_names"]]
    if "layers" in f:
        return _keras3_weights(f["layers"])
    raise CheckpointError("HDF5 file without Keras weights (no layer_names, no layers/)")


def _check_dataset(dataset) -> None:
    """A weight must be a float dataset of at most a ConvNeXt parameter's size, stored in this file."""
    import h5py

    if not isinstance(dataset, h5py.Dataset):
        raise CheckpointError(f"weight {describe(dataset.name)} is a group, not a dataset")
    if dataset.dtype.kind != "f" or dataset.ndim > 4 or dataset.size > MAX_PARAMETER_ELEMENTS:
        raise CheckpointError(f"weight {describe(dataset.name)} is {dataset.dtype} {dataset.shape}, not a "
                              "float tensor a ConvNeXt could hold")
    if dataset.external:
        raise CheckpointError(f"weight {describe(dataset.name)} keeps its data in another file (external storage)")
    if dataset.is_virtual:
        raise CheckpointError(f"weight {describe(dataset.name)} is a virtual dataset, made of other datasets")


def _check_stored(dataset) -> None:
    """Refuse a dataset whose bytes or chunks were never written: they would read as its fill value."""
    if dataset.size == 0:
        return
    if dataset.chunks is not None:
        chunks = math.prod(-(-n // c) for n, c in zip(dataset.shape, dataset.chunks))
        written = dataset.id.get_num_chunks()
        if written < chunks:
            raise CheckpointError(f"weight {describe(dataset.name)}: {chunks - written} of its {chunks} chunks "
                                  "were never written (they would read as the fill value)")
        return
    stored, needed = dataset.id.get_storage_size(), dataset.size * dataset.dtype.itemsize
    if stored < needed:
        raise CheckpointError(f"weight {describe(dataset.name)} stores {stored} of its {needed} bytes (the rest "
                              "would read as the fill value)")


def _read_checked(weights: list[tuple[str, str, object]], layer_names: list[str]) -> dict:
    """timm-named arrays of (Keras layer name, role, dataset) triples; every declared shape is
    checked against the architecture they make before any dataset is read."""
    found = {}
    for layer, role, dataset in weights:
        match = keras_layer(layer)
        if match is None:
            continue
        module, kind = match
        name = module if role == "" else f"{module}.{role}"
        if name in found:
            raise CheckpointError(f"two Keras weights map to {name} (layer {describe(layer)})")
        _check_dataset(dataset)
        found[name] = (dataset, KERAS_KINDS[kind].fix if role == "weight" else None)
    if "head.norm.weight" in found and "head.fc.weight" not in found:  # Keras' head: both, or neither
        raise CheckpointError("the head's layer norm has weights but no <model>_head_dense layer does: the "
                              "classifier's weights are lost (keras.applications' head has both or neither)")
    if "stem.0.weight" not in found:
        shown = ", ".join(describe(n) for n in sorted(set(layer_names) | {l for l, _, _ in weights})[:6])
        raise CheckpointError(f"not a Keras ConvNeXt: no layer named <model>_stem_conv (layers: {shown})")
    shapes = {name: fixed_shape(d.shape, fix) for name, (d, fix) in found.items()}
    config = detect_architecture({name: np.broadcast_to(np.uint8(0), s) for name, s in shapes.items()})
    expected = expected_shapes(config)
    for name, (dataset, _) in found.items():
        if name not in expected or squeezed(shapes[name]) != squeezed(expected[name]):
            wanted = f"{expected[name]}" if name in expected else "no such parameter"
            raise CheckpointError(f"weight {describe(dataset.name)} ({name}) is {dataset.shape}; "
                                  f"{config.name} has {wanted}")
        _check_stored(dataset)
    return {name: fix_layout(np.asarray(dataset[()]), fix) for name, (dataset, fix) in found.items()}


def _read_h5(file, config: dict | None = None, from_config: bool = False) -> Reading:
    """A Keras HDF5 file's arrays and convention, from one open; `from_config`: the convention
    comes from `config` (a .keras's config.json) rather than from the file."""
    import h5py

    with h5py.File(file, "r") as f:
        _refuse_links(f)
        if not from_config and "model_config" in f.attrs:
            config = _parse_json(f.attrs["model_config"], "the model_config attribute")
        weights, layer_names = _keras_weights(f)
        state = _read_checked(weights, layer_names)
    return Reading(state, _convention(config, layer_names))


def read_keras_h5(path: str) -> Reading:
    """A legacy .h5 or a Keras 3 .weights.h5: timm-named arrays and the model's convention."""
    with reading(path, "Keras HDF5 file"):
        with open_weight_file(path) as f:
            return _read_h5(f)


def read_keras_zip(path: str) -> Reading:
    """A Keras 3 .keras file: the timm-named arrays of its model.weights.h5, the convention of
    its config.json."""
    with reading(path, "Keras .keras file"):
        with open_weight_file(path) as f:
            try:
                archive = zipfile.ZipFile(f)
            except zipfile.BadZipFile as exc:
                raise CheckpointError(f"truncated or corrupted Keras .keras file (a zip without its "
                                      f"directory: {str(exc)[:100]})") from None
            with archive:
                config = _config(archive)
                weights = _weights_member(archive)
        return _read_h5(weights, config, from_config=True)


def _config(archive: zipfile.ZipFile) -> dict:
    if "config.json" not in archive.namelist():
        raise CheckpointError(".keras archive without config.json")
    info = archive.getinfo("config.json")
    if info.file_size > _MAX_CONFIG:
        raise CheckpointError(f"config.json claims {info.file_size} bytes; refused")
    return _parse_json(_bounded(archive, info, _MAX_CONFIG).getvalue(), "config.json")


def _parse_json(text, what: str):
    """A config's JSON, or the project's error saying why it is not one."""
    try:
        return json.loads(text)
    except RecursionError:  # json's parser recurses once per level of nesting
        raise CheckpointError(f"{what} nests too deeply to be a Keras model's config") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a number too long to parse
        raise CheckpointError(f"{what} is not valid JSON ({str(exc)[:200]})") from None


def _weights_member(archive: zipfile.ZipFile) -> io.BytesIO:
    """model.weights.h5, decompressed up to MAX_WEIGHTS_BYTES and never past it."""
    if "model.weights.h5" not in archive.namelist():
        raise CheckpointError(".keras archive without model.weights.h5")
    info = archive.getinfo("model.weights.h5")
    if info.file_size > MAX_WEIGHTS_BYTES:
        raise CheckpointError(f"model.weights.h5 claims {info.file_size} bytes, more than the largest "
                              f"ConvNeXt's {MAX_WEIGHTS_BYTES}; refused")
    return _bounded(archive, info, MAX_WEIGHTS_BYTES)


def _bounded(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> io.BytesIO:
    """A member's bytes, streamed: refused once they pass `limit`, whatever its header says."""
    out = io.BytesIO()
    with archive.open(info) as member:
        while chunk := member.read(_CHUNK):
            if out.tell() + len(chunk) > limit:
                raise CheckpointError(f"{info.filename} decompresses to more than {limit} bytes; refused")
            out.write(chunk)
    out.seek(0)
    return out


def is_keras_zip(path: str) -> bool:
    """A zip whose members say Keras 3 (.keras), not PyTorch (no data.pkl): from its directory, or, in a zip
    without one (truncated), from its first member's name (Keras writes metadata.json first)."""
    try:
        with open_weight_file(path) as f:
            local = f.read(30)
            first = f.read(int.from_bytes(local[26:28], "little")) if len(local) == 30 else b""
            try:
                with zipfile.ZipFile(f) as archive:
                    names = set(archive.namelist())
            except zipfile.BadZipFile:
                return first.decode("utf-8", "replace") in _KERAS_MEMBERS
    except Exception:  # noqa: BLE001  recognising never fails: the zip reader that takes it will say why
        return False
    # any of Keras' members, and no pickle: a .keras that lost its weights is still reported as one
    return bool(names & set(_KERAS_MEMBERS)) and not any(n.rsplit("/", 1)[-1] == "data.pkl" for n in names)


FORMATS = (WeightFormat("keras-h5", lambda head, path: head.startswith(HDF5_SIGNATURE), read_keras_h5),
           WeightFormat("keras-zip", lambda head, path: head[:4] == b"PK\x03\x04" and is_keras_zip(path),
                        read_keras_zip))
