"""Weight files in, timm-named NumPy arrays out: no torch, no code execution.

Formats, detected from a file's first bytes, never from its name:
    safetensors          timm's model.safetensors, transformers' model.safetensors, our own output
    PyTorch zip          torch.save since PyTorch 1.6: timm and transformers pytorch_model.bin,
                         the official facebookresearch/ConvNeXt .pth (weights under "model")

Names: timm's are native. The other layouts map onto them through `_NAME_TABLES`, one row per
kind of parameter; the only layout changes between the formats are unit axes (a linear
(out, in) stored where timm has a 1x1 conv (out, in, 1, 1), GRN (1, 1, 1, C) where timm has
(C,)), fixed in one place, `_fit_unit_axes`.

The PyTorch reader unpickles with an allow-list: a state dict needs only tensor rebuilds, storage
types and OrderedDict; any other global in the pickle is refused by name before it is called.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections import OrderedDict

import numpy as np

from .config import VARIANTS, ConvNeXtConfig


class CheckpointError(ValueError):
    """A weight file or mapping that cannot be used; the message names the file and the problem."""


# ---- safetensors -------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bfloat16",
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def _bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: widen the bits, exactly."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file; see `read_safetensors_with_metadata`."""
    return read_safetensors_with_metadata(path)[0]


def read_safetensors_with_metadata(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of a safetensors file and its `__metadata__`, validating the header against
    the file first.

    The file is memory-mapped and the arrays are read-only views of it: loading copies nothing,
    and the pages are shared with the OS file cache. (Replace such a file by renaming a new one
    over it, as npconvnext's writers do; truncating it in place would crash its readers.)
    bfloat16 is upcast to float32 (NumPy has no bfloat16); other dtypes are kept.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > _MAX_HEADER or 8 + header_len > size:
        raise CheckpointError(f"{path}: safetensors header length {header_len} does not fit in the "
                              f"{size}-byte file (truncated or not safetensors)")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    body = memoryview(data)[8 + header_len :]
    metadata = header.pop("__metadata__", None) or {}
    spans, out = [], {}
    for name, info in header.items():
        try:
            dtype_name, shape, (start, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        if dtype_name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
        dtype = _SAFETENSORS_DTYPES[dtype_name]
        itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        if not (0 <= start <= end <= len(body)):
            raise CheckpointError(f"{path}: tensor {name!r} data [{start}, {end}) lies outside the "
                                  f"{len(body)}-byte data section (truncated or corrupted)")
        if any(s < 0 for s in shape) or end - start != int(np.prod(shape)) * itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - start} bytes, but shape {shape} "
                                  f"of {dtype_name} needs {int(np.prod(shape)) * itemsize}")
        spans.append((start, end, name))
        raw = np.frombuffer(body, dtype=np.dtype("u2" if dtype == "bfloat16" else dtype).newbyteorder("<"),
                            count=int(np.prod(shape)), offset=start)
        out[name] = (_bfloat16_to_float32(raw) if dtype == "bfloat16" else raw).reshape(shape)
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap in the data section")
    return out, metadata


# ---- PyTorch zip checkpoints, without torch -------------------------------------------------------

_STORAGE_DTYPES = {"DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
                   "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
                   "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
                   "BoolStorage": np.bool_}


class _StorageType:
    def __init__(self, name):
        self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    """torch._utils._rebuild_tensor_v2: a strided view into a storage, copied out."""
    if not size:
        return storage[offset].copy().reshape(())
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * item for s in stride))
    return np.array(view)


def _rebuild_parameter(data, *_ignored):
    return data


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a tensor state dict and nothing else."""

    _ALLOWED = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
    }

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(file)
        self.archive, self.prefix, self.path = archive, prefix, path

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise CheckpointError(f"{self.path}: refusing to unpickle global {module}.{name}: a weight "
                                  "file needs only tensors, and this one asks for code to run")
        return self._ALLOWED[(module, name)]

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, numel): the raw bytes live in <prefix>data/<key>
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise CheckpointError(f"{self.path}: unexpected persistent id {pid!r}")
        storage_type, key = pid[1], pid[2]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self.path}: unexpected storage type {storage_type!r}")
        try:
            raw = self.archive.read(f"{self.prefix}data/{key}")
        except KeyError:
            raise CheckpointError(f"{self.path}: storage {key} is missing from the archive") from None
        if storage_type.dtype == "bfloat16":
            return _bfloat16_to_float32(np.frombuffer(raw, dtype="<u2"))
        dtype = np.dtype(storage_type.dtype).newbyteorder("<")
        if len(raw) % dtype.itemsize:
            raise CheckpointError(f"{self.path}: storage {key} has {len(raw)} bytes, not a whole "
                                  f"number of {dtype.name}")
        return np.frombuffer(raw, dtype=dtype)


def read_torch_zip(path: str) -> dict:
    """The object a PyTorch zip checkpoint holds, with tensors as NumPy arrays."""
    try:
        archive = zipfile.ZipFile(path)
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: zip file is not a PyTorch checkpoint (no single */data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() != b"little":
            raise CheckpointError(f"{path}: big-endian PyTorch checkpoints are not supported")
        with archive:
            return _StateDictUnpickler(io.BytesIO(archive.read(pickles[0])), archive, prefix, path).load()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, pickle.UnpicklingError,
            ValueError, TypeError, IndexError, KeyError) as exc:
        raise CheckpointError(f"{path}: corrupted or truncated PyTorch checkpoint ({type(exc).__name__}: {exc})") from None


# ---- names ----------------------------------------------------------------------------------------

# format -> [(source name pattern, timm name)], {i} a stage index, {j} a block index. The first
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


def _rename(name: str, fmt: str) -> str:
    for pattern, template in _COMPILED[fmt]:
        match = pattern.match(name)
        if match:
            return template.format(**match.groupdict())
    return name


def detect_naming(names) -> str:
    """Which naming a set of parameter names follows: 'timm', 'official' or 'transformers'."""
    names = set(names)
    if "stem.0.weight" in names:
        return "timm"
    if any(n.startswith(("convnext.embeddings.", "convnextv2.embeddings.")) for n in names):
        return "transformers"
    if "downsample_layers.0.0.weight" in names:
        return "official"
    raise CheckpointError("parameter names are neither timm's, the official ConvNeXt code's nor "
                          f"transformers' (first names: {sorted(names)[:5]})")


def _fit_unit_axes(array: np.ndarray, expected: tuple[int, ...] | None) -> np.ndarray:
    """The formats differ in layout only by unit axes: linear (out, in) vs 1x1 conv (out, in, 1, 1),
    GRN (1, 1, 1, C) vs (C,). Reshape when the shapes agree once unit axes are dropped."""
    if expected is None or array.shape == expected:
        return array
    squeeze = lambda shape: tuple(s for s in shape if s != 1)  # noqa: E731
    return array.reshape(expected) if squeeze(array.shape) == squeeze(expected) else array


def to_timm_names(state: dict[str, np.ndarray], config: ConvNeXtConfig | None = None) -> dict[str, np.ndarray]:
    """A state dict in any supported naming, renamed (and unit axes fitted) to timm's.
    With `config`, unit axes are fitted to that architecture's shapes."""
    from .model import expected_shapes

    fmt = detect_naming(state)
    renamed = {(name if fmt == "timm" else _rename(name, fmt)): array for name, array in state.items()}
    if config is None:
        config = detect_architecture(renamed)
    shapes = expected_shapes(config)
    return {name: _fit_unit_axes(array, shapes.get(name)) for name, array in renamed.items()}


def detect_architecture(state: dict[str, np.ndarray]) -> ConvNeXtConfig:
    """The variant whose parameter shapes these timm-named weights have (num_classes from the head)."""
    from dataclasses import replace

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


# ---- one entry point ------------------------------------------------------------------------------


def sniff_format(path: str) -> str:
    """'safetensors' or 'torch-zip', from the file's first bytes; errors name the file."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory; pass the weight file inside it "
                              "(model.safetensors or pytorch_model.bin)")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        raise CheckpointError(f"{path}: legacy (pre-1.6, non-zip) PyTorch pickle; re-save it with "
                              "torch.save in a current PyTorch, or convert it to safetensors")
    raise CheckpointError(f"{path}: neither safetensors nor a PyTorch zip checkpoint (starts {head[:8]!r})")


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
    """The raw named arrays of a weight file and its container format, names as stored."""
    path = os.fspath(path)
    fmt = sniff_format(path)
    if fmt == "safetensors":
        return read_safetensors(path), fmt
    obj = read_torch_zip(path)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # the official training scripts wrap the weights
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise CheckpointError(f"{path}: the checkpoint holds no plain state dict of tensors")
    return dict(obj), fmt


def load_state_dict(path: str | os.PathLike, arch: str | None = None, nonfinite: str = "error") -> dict[str, np.ndarray]:
    """timm-named arrays from a weight file of any supported format and naming.

    nonfinite: what to do with NaN or Inf in the weights: 'error' (default: a model with them
    gives NaN logits), 'warn', or 'ignore'.
    """
    from .config import get_config

    path = os.fspath(path)
    raw, _ = read_checkpoint(path)
    try:
        state = to_timm_names(raw, get_config(arch) if arch else None)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    bad = [name for name, a in state.items() if a.dtype.kind == "f" and not np.isfinite(a).all()]
    if bad and nonfinite != "ignore":
        message = f"{path}: {len(bad)} tensors hold NaN or Inf: {', '.join(bad[:10])}"
        if nonfinite == "error":
            raise CheckpointError(message + " (pass nonfinite='warn' to load them anyway)")
        warnings.warn(message, stacklevel=2)
    return state
