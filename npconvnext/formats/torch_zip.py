"""PyTorch zip checkpoints (torch.save since PyTorch 1.6), read without torch and without running code.

timm's and transformers' pytorch_model.bin and the official facebookresearch/ConvNeXt .pth
(weights under "model") are all this container. The pickle inside is read with an allow-list:
a state dict needs only tensor rebuilds, storage types and OrderedDict; any other global is
refused by name before it is called.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict

import numpy as np

from ..errors import CheckpointError
from .registry import WeightFormat, register
from .safetensors import bfloat16_to_float32

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
            return bfloat16_to_float32(np.frombuffer(raw, dtype="<u2"))
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


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """The state dict of a PyTorch zip checkpoint, unwrapped from the training scripts' dicts."""
    obj = read_torch_zip(path)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # the official training scripts wrap the weights
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise CheckpointError(f"{path}: the checkpoint holds no plain state dict of tensors")
    return dict(obj)


def _refuse_legacy(path: str) -> dict[str, np.ndarray]:
    raise CheckpointError(f"{path}: legacy (pre-1.6, non-zip) PyTorch pickle; re-save it with "
                          "torch.save in a current PyTorch, or convert it to safetensors")


register(WeightFormat("torch-zip", lambda head: head[:4] == b"PK\x03\x04", read_torch_state_dict))
register(WeightFormat("torch-legacy-pickle", lambda head: head[:1] == b"\x80", _refuse_legacy))
