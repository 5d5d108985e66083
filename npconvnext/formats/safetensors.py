"""safetensors: timm's and transformers' model.safetensors, and npconvnext's own output.

The header (8-byte little-endian length, then JSON) is validated against the file before any
tensor is made; the tensors are read-only views of the memory-mapped file.
"""

from __future__ import annotations

import json
import mmap
import os
import struct

import numpy as np

from ..errors import CheckpointError
from .registry import WeightFormat, register

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bfloat16",
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
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
        if dtype_name not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
        dtype = _DTYPES[dtype_name]
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
        out[name] = (bfloat16_to_float32(raw) if dtype == "bfloat16" else raw).reshape(shape)
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap in the data section")
    return out, metadata


def _recognises(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{"


register(WeightFormat("safetensors", _recognises, read_safetensors))
