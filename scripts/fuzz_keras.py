"""Mutations of Keras files for scripts/fuzz_readers.py: a legacy .h5 or a .weights.h5 (HDF5 bytes
flipped, truncated, chunks edited; a dataset's declared shape, storage, fill value or dtype, an
attribute, a link edited with h5py), and a .keras zip rebuilt (config.json edited, members
recompressed, their sizes misdeclared, removed, or model.weights.h5 replaced by a mutant).

Each takes (data, rng, seeds) and gives (new data, checked): `checked` says the edit leaves the
file's meaning as it was or takes information away, so a load must give the seed's weights and
convention, or be refused. Edits that legitimately change what the file says (a byte flip in a
weight, a dtype, a renamed layer, a new mean) are only held to failing cleanly.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile

import numpy as np

from fuzz_mutations import INTERESTING_INTS, mutate_bytes


def _datasets(f) -> list:
    import h5py

    found = []
    f.visititems(lambda name, obj: found.append(obj) if isinstance(obj, h5py.Dataset) else None)
    return found


def _groups_with(f, attribute: str) -> list:
    import h5py

    found = [f] if attribute in f.attrs else []
    f.visititems(lambda name, obj: found.append(obj) if isinstance(obj, h5py.Group) and attribute in obj.attrs
                 else None)
    return found


def _recreate(dataset, values=None, **kwargs) -> None:
    """Replace a dataset by a new one of the same name, holding `values` (default its own)."""
    group, name = dataset.parent, dataset.name.rsplit("/", 1)[1]
    values = dataset[()] if values is None else values
    del group[name]
    group.create_dataset(name, data=values, **kwargs)


def _storage_edit(f, rng) -> bool:
    """The same values stored another way: chunked, compressed, checksummed, with a fill value,
    or declared at another shape (more unit axes, transposed, larger, never written)."""
    import h5py

    datasets = [d for d in _datasets(f) if d.size > 1]
    d = datasets[int(rng.integers(len(datasets)))]
    action = int(rng.integers(9))
    values = d[()]
    if action == 0:  # chunked and compressed: must read back the same
        _recreate(d, chunks=True, compression=["gzip", "lzf", None][int(rng.integers(3))],
                  shuffle=bool(rng.integers(2)), fletcher32=bool(rng.integers(2)))
    elif action == 1:  # a fill value on a dataset written whole: never read
        _recreate(d, fillvalue=float(rng.choice([0.5, np.nan, np.inf, -1e30])), chunks=bool(rng.integers(2)) or None)
    elif action == 2:  # unit axes added: the same numbers, at a shape that squeezes to the same
        axis = int(rng.integers(values.ndim + 1))
        _recreate(d, np.expand_dims(values, axis))
    elif action == 3:  # declared larger than written: the rest reads as the fill value
        group, name = d.parent, d.name.rsplit("/", 1)[1]
        del group[name]
        shape = tuple(n * int(rng.choice([1, 2, 1000])) for n in values.shape)
        big = group.create_dataset(name, shape, values.dtype, chunks=True, fillvalue=0.0)
        big[tuple(slice(0, n) for n in values.shape)] = values
    elif action == 4:  # declared, never written
        group, name = d.parent, d.name.rsplit("/", 1)[1]
        del group[name]
        group.create_dataset(name, values.shape, values.dtype, chunks=bool(rng.integers(2)) or None,
                             fillvalue=float(rng.choice([0.0, 0.01])))
    elif action == 5:  # the values read from another file (external raw storage)
        group, name = d.parent, d.name.rsplit("/", 1)[1]
        del group[name]
        target = ["/etc/hostname", "/dev/zero", "/nonexistent", "model.weights.h5"][int(rng.integers(4))]
        group.create_dataset(name, values.shape, values.dtype, external=[(target, 0, values.nbytes)])
    elif action == 6:  # a virtual dataset made of another dataset (this file's, or a missing file's)
        group, name = d.parent, d.name.rsplit("/", 1)[1]
        other = datasets[int(rng.integers(len(datasets)))]
        del group[name]
        layout = h5py.VirtualLayout(values.shape, values.dtype)
        source = h5py.VirtualSource("." if rng.random() < 0.5 else "/nonexistent.h5", other.name, other.shape)
        layout[...] = source if other.shape == values.shape else 0
        group.create_virtual_dataset(name, layout, fillvalue=0)
    elif action == 7:  # a soft or external link in its place
        group, name = d.parent, d.name.rsplit("/", 1)[1]
        other = datasets[int(rng.integers(len(datasets)))]
        del group[name]
        group[name] = h5py.SoftLink(other.name) if rng.random() < 0.5 else h5py.ExternalLink("/nonexistent.h5", "/x")
    else:  # the shape's axes swapped, or one axis made huge with nothing written
        group, name = d.parent, d.name.rsplit("/", 1)[1]
        del group[name]
        if rng.random() < 0.5:
            group.create_dataset(name, data=values.reshape(values.shape[::-1]))
        else:
            shape = list(values.shape)
            shape[int(rng.integers(len(shape)))] = int(rng.choice([2**20, 2**31, 2**40]))
            group.create_dataset(name, shape, values.dtype, chunks=tuple(min(n, 64) for n in shape))
    return True


def _dtype_edit(f, rng) -> bool:
    """A weight stored at another type: the numbers change (float16) or stop being floats."""
    datasets = _datasets(f)
    d = datasets[int(rng.integers(len(datasets)))]
    dtype = ["f2", "f8", ">f4", "i4", "u1", "?", "c8", "S4"][int(rng.integers(8))]
    _recreate(d, d[()].astype(dtype))
    return dtype in ("i4", "u1", "?", "c8", "S4")  # not a float: must be refused


def _list_edit(values: list[str], rng, names: list[str]) -> tuple[list[str], bool]:
    """A name list edited: one dropped, repeated, swapped, replaced. -> (list, whether only lost)"""
    values = list(values)
    i = int(rng.integers(len(values))) if values else 0
    action = int(rng.integers(5))
    if action == 0 and values:
        del values[i]
        return values, True
    if action == 1 and values:
        values.insert(i, values[i])
        return values, False
    if action == 2 and len(values) > 1:
        j = int(rng.integers(len(values)))
        values[i], values[j] = values[j], values[i]
        return values, False
    junk = ["", "x", "convnext_atto_stem_conv", "convnext_atto_head_dense", "kernel:0", "../..", "a" * 300, *names]
    values[i:i + 1] = [junk[int(rng.integers(len(junk)))]]
    return values, False


def _attribute_edit(f, rng) -> bool:
    """A legacy file's layer_names or weight_names, a Keras 3 layer's `name`, or the model config."""
    groups = _groups_with(f, "layer_names") + _groups_with(f, "weight_names") + _groups_with(f, "name")
    action = int(rng.integers(4))
    if action == 0 and "model_config" in f.attrs:
        f.attrs["model_config"] = mutate_config(f.attrs["model_config"], rng)[0]
        return False
    if action == 1 and groups:  # an attribute Keras never writes, or one dropped
        g = groups[int(rng.integers(len(groups)))]
        key = [k for k in ("layer_names", "weight_names", "name") if k in g.attrs][0]
        if rng.random() < 0.5:
            del g.attrs[key]
            return True
        g.attrs[key] = [1, 2] if rng.random() < 0.5 else np.zeros((2, 2))
        return False
    if not groups:
        return False
    g = groups[int(rng.integers(len(groups)))]
    key = [k for k in ("layer_names", "weight_names", "name") if k in g.attrs][0]
    value = g.attrs[key]
    names = [str(other.attrs["name"]) for other in _groups_with(f, "name")][:20]
    if key == "name":
        new, lost = _list_edit([str(value)], rng, names)
        g.attrs[key] = new[0] if new else ""
        return lost
    new, lost = _list_edit([v.decode() if isinstance(v, bytes) else str(v) for v in value], rng, names)
    g.attrs[key] = [v.encode() for v in new]
    return lost


def mutate_h5(data: bytes, rng, seeds) -> tuple[bytes, bool]:
    """An HDF5 file's bytes, or its structure edited with h5py (see the module docstring)."""
    import h5py

    action = int(rng.integers(10))
    if action < 3:
        return mutate_bytes(data, rng, seeds), False
    if action == 3 and data:  # 8 bytes in the first 64 kB, where the superblock and root group are
        at, out = int(rng.integers(min(len(data), 1 << 16))), bytearray(data)
        out[at:at + 8] = (int(rng.choice(INTERESTING_INTS)) % 2**64).to_bytes(8, "little")
        return bytes(out), False
    buffer = io.BytesIO(data)
    try:
        with h5py.File(buffer, "r+") as f:
            edits = [_storage_edit, _storage_edit, _storage_edit, _dtype_edit, _attribute_edit, _attribute_edit]
            checked = edits[action - 4](f, rng)
    except Exception:  # noqa: BLE001 (an earlier mutation broke the file: edit its bytes)
        return mutate_bytes(data, rng, seeds), False
    return buffer.getvalue(), checked


# ---- .keras: a zip of metadata.json, config.json, model.weights.h5 --------------------------------


def _normalization(config: dict) -> dict | None:
    for layer in config["config"]["layers"]:
        if isinstance(layer, dict) and layer.get("class_name") == "Normalization" \
                and isinstance(layer.get("config"), dict):
            return layer["config"]
    return None


def mutate_config(text, rng) -> tuple[str, bool]:
    """A model config's JSON edited. -> (text, whether a load must be refused or give the seed's)"""
    try:
        config = json.loads(text)
    except Exception:  # noqa: BLE001
        return text[: int(rng.integers(len(text) + 1))], True
    if not (isinstance(config, dict) and isinstance(config.get("config"), dict)
            and isinstance(config["config"].get("layers"), list)):  # an earlier edit replaced it
        return json.dumps(config) + " ", False
    action = int(rng.integers(7))
    norm = _normalization(config)
    if action == 0 and norm is not None:  # non-finite or negative normalisation: refused
        key = ["mean", "variance"][int(rng.integers(2))]
        bad = [float("nan"), float("inf"), float("-inf"), -1.0][int(rng.integers(4 if key == "variance" else 3))]
        norm[key] = [bad] * 3 if rng.random() < 0.5 else bad
        return json.dumps(config), True
    if action == 1 and norm is not None:  # the normalisation's values of another type
        key = ["mean", "variance", "invert", "axis"][int(rng.integers(4))]
        norm[key] = [None, "x", [], [[1.0]], True, {"a": 1}, 1e308][int(rng.integers(7))]
        return json.dumps(config), False
    if action == 2:  # the head's activation
        for layer in config["config"]["layers"]:
            if isinstance(layer, dict) and str(layer.get("name", "")).endswith("head_dense") \
                    and isinstance(layer.get("config"), dict):
                layer["config"]["activation"] = ["relu", None, "linear", "softmax", 7, "x" * 100][int(rng.integers(6))]
        return json.dumps(config), False
    if action == 3:  # layers lost
        layers = config["config"]["layers"]
        del layers[int(rng.integers(len(layers) + 1)):]
        return json.dumps(config), False
    if action == 4:  # the top level replaced
        return json.dumps([None, [], "x", 1, {"config": None}, {"config": {"layers": {}}}][int(rng.integers(6))]), False
    if action == 5:  # deep nesting
        depth = int(rng.integers(10, 100_000))
        return "[" * depth + "]" * depth, True
    return text.replace("1", "9", int(rng.integers(1, 4))), False


def _members(data: bytes) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(info, z.read(info)) for info in z.infolist()]


def mutate_keras(data: bytes, rng, seeds) -> tuple[bytes, bool]:
    """A .keras zip rebuilt with its config, a member's compression, size or presence, or its
    model.weights.h5 changed; or its bytes edited."""
    try:
        members = _members(data)
    except Exception:  # noqa: BLE001 (an earlier mutation broke the zip)
        return mutate_bytes(data, rng, seeds), False
    action = int(rng.integers(8))
    if action == 0:
        return mutate_bytes(data, rng, seeds), False
    checked = True
    out = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w") as z:
        warnings.simplefilter("ignore")  # a duplicate name, on purpose
        for info, raw in members:
            method = zipfile.ZIP_STORED
            if action == 1 and info.filename == "config.json":
                text, checked = mutate_config(raw.decode("utf-8", "replace"), rng)
                raw = text.encode()
            elif action == 2:  # recompressed: the same members (LZMA of the weights takes seconds: never)
                methods = [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA][:2 if len(raw) > 1 << 20 else 3]
                method = methods[int(rng.integers(len(methods)))]
            elif action == 3 and rng.random() < 0.4:  # a member lost
                continue
            elif action == 4 and info.filename == "model.weights.h5":
                raw, checked = mutate_h5(raw, rng, seeds)
            elif action == 5 and rng.random() < 0.3:  # a member twice, the second another's bytes
                z.writestr(zipfile.ZipInfo(info.filename, info.date_time), raw)
                raw, checked = members[int(rng.integers(len(members)))][1], False
            z.writestr(zipfile.ZipInfo(info.filename, info.date_time), raw, compress_type=method, compresslevel=1)
        if action == 6:  # a member Keras never writes
            z.writestr("assets/x.txt", b"x" * int(rng.integers(1, 1000)))
    result = bytearray(out.getvalue())
    starts = _headers(result)
    if action == 7 and starts:  # a header's sizes or CRC misdeclared, in the local header or the directory
        at = starts[int(rng.integers(len(starts)))]
        field = at + (int(rng.choice([14, 18, 22])) + (2 if result[at + 2] == 1 else 0))
        result[field:field + 4] = int(rng.choice([0, 1, 2**31 - 1, 2**32 - 1, 4096])).to_bytes(4, "little")
    return bytes(result), checked


def _headers(data: bytearray) -> list[int]:
    """Where the zip's local and central headers start."""
    found, at = [], 0
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):
        at = data.find(sig)
        while at >= 0 and len(found) < 24:
            found.append(at)
            at = data.find(sig, at + 4)
    return found
