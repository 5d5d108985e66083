"""safetensors: timm's and transformers' model.safetensors, and npconvnext's own output.

The file is an 8-byte little-endian header length, a JSON header naming every tensor's dtype,
shape and [start, end) in the data section, then the data section. The header is validated as
the format (huggingface/safetensors) demands before any tensor is made: no duplicate names,
known dtypes, sizes that fit the shapes, and tensors that tile the data section exactly (no
holes, no overlaps, nothing after the last one). The tensors are read-only views of the
memory-mapped file (mapped.py).
"""

from __future__ import annotations

import json
import os
import struct
from typing import NamedTuple

import numpy as np

from ..errors import CheckpointError
from ..layers import BFloat16Bits
from .guard import MAX_DIMS, describe, open_weight_file, reading, widened
from .mapped import WeightMapping
from .registry import Reading, WeightFormat

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bfloat16",
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class _Entry(NamedTuple):
    """One tensor's header entry, validated: data lies at [start, end) of the data section."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _itemsize(dtype_name: str) -> int:
    return 2 if dtype_name == "BF16" else np.dtype(DTYPES[dtype_name]).itemsize


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file; see `read_safetensors_with_metadata`."""
    return read_safetensors_with_metadata(path)[0]


def read_safetensors_with_metadata(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of a safetensors file and its `__metadata__`, validating the header against
    the file first. Every failure is a CheckpointError naming the file.

    The file is memory-mapped and the arrays are read-only views of it: loading copies nothing,
    and the pages are shared with the OS file cache. (Replace such a file by renaming a new one
    over it, as npconvnext's writers do; truncating it in place would crash its readers.)
    bfloat16 is upcast to float32 (NumPy has no bfloat16); other dtypes are kept.
    """
    tensors, metadata = _mapped_tensors(os.fspath(path))
    return widened(tensors), metadata


def _mapped_tensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """read_safetensors_with_metadata with bfloat16 tensors as their mapped bits (BFloat16Bits)."""
    with open_weight_file(path) as f, reading(path, "safetensors file"):
        size = os.fstat(f.fileno()).st_size
        header, body_start = _read_header(f, size)
        metadata = _metadata(header.pop("__metadata__", {}))
        entries = [_entry(name, info) for name, info in header.items()]
        _check_tiling(entries, size - body_start)
        body = memoryview(WeightMapping(f.fileno()))[body_start:]
        return {e.name: _array(body, e) for e in entries}, metadata


def _read_header(f, size: int) -> tuple[dict, int]:
    """The parsed JSON header and where the data section starts."""
    if size < 8:
        raise CheckpointError(f"truncated safetensors file ({size} bytes)")
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > _MAX_HEADER or 8 + header_len > size:
        raise CheckpointError(f"safetensors header length {header_len} does not fit in the "
                              f"{size}-byte file (truncated or not safetensors)")
    raw = f.read(header_len)
    try:
        header = json.loads(raw, object_pairs_hook=_refuse_duplicate_keys)
    except CheckpointError:  # a duplicate key (CheckpointError is a ValueError too)
        raise
    except RecursionError:
        raise CheckpointError("safetensors header nests too deeply to be a header") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer too long to parse
        raise CheckpointError(f"safetensors header is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(header, dict):
        raise CheckpointError("safetensors header is not a JSON object")
    return header, 8 + header_len


def _refuse_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads would keep the last of two equal keys silently; the format forbids them."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise CheckpointError(f"safetensors header names {describe(duplicate)} twice")
    return out


def _metadata(value: object) -> dict[str, str]:
    if value is None:  # the format allows null
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"safetensors __metadata__ is {describe(value)}, not a JSON object")
    for key, item in value.items():
        if not isinstance(item, str):
            raise CheckpointError(f"safetensors __metadata__ {describe(key)} is {describe(item)}, not text")
    return value


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0  # JSON true/false are bools, 1.0 a float: neither counts


def _entry(name: str, info: object) -> _Entry:
    """A tensor's header entry, its types and its byte count checked."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise CheckpointError(f"tensor {describe(name)}: header entry is not "
                              "{dtype, shape, data_offsets}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"tensor {describe(name)}: unsupported dtype {describe(dtype)} "
                              f"(npconvnext reads {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise CheckpointError(f"tensor {describe(name)}: shape is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise CheckpointError(f"tensor {describe(name)}: data_offsets is not [start, end] with "
                              "0 <= start <= end")
    start, end = offsets
    if len(shape) > MAX_DIMS:
        raise CheckpointError(f"tensor {describe(name)} has {len(shape)} dimensions (at most {MAX_DIMS})")
    needed = _bytes_needed(shape, _itemsize(dtype), limit=end - start)
    if needed != end - start:
        shown = "more" if needed is None else needed
        raise CheckpointError(f"tensor {describe(name)} has {end - start} bytes, but its shape "
                              f"of {dtype} needs {shown}")
    return _Entry(name, dtype, tuple(shape), start, end)


def _bytes_needed(shape: list[int], itemsize: int, limit: int) -> int | None:
    """prod(shape) * itemsize, or None once it passes `limit` (a product of huge sizes would
    take long to compute and means nothing)."""
    if 0 in shape:
        return 0
    total = itemsize
    for s in shape:
        total *= s
        if total > limit:
            return None
    return total


def _check_tiling(entries: list[_Entry], body_len: int) -> None:
    """The tensors must cover the data section exactly, in some order: no hole, no overlap,
    nothing past the end, nothing left over."""
    covered, previous = 0, None
    for e in sorted(entries, key=lambda e: (e.start, e.end)):
        if e.start < covered:
            raise CheckpointError(f"tensors {describe(previous)} and {describe(e.name)} overlap in the data section")
        if e.start > covered:
            raise CheckpointError(f"bytes [{covered}, {e.start}) of the data section belong to no "
                                  f"tensor (a hole before {describe(e.name)})")
        covered, previous = e.end, e.name
    if covered > body_len:
        raise CheckpointError(f"tensor {describe(previous)} data ends at {covered}, outside the "
                              f"{body_len}-byte data section (truncated or corrupted)")
    if covered < body_len:
        raise CheckpointError(f"{body_len - covered} bytes after the last tensor belong to no tensor")


def _array(body: memoryview, e: _Entry) -> np.ndarray:
    """The tensor as a read-only view of the file (bfloat16 as its bits, BFloat16Bits)."""
    dtype = np.dtype("<u2" if e.dtype == "BF16" else DTYPES[e.dtype]).newbyteorder("<")
    raw = np.frombuffer(body[e.start : e.end], dtype=dtype).reshape(e.shape)
    return raw.view(BFloat16Bits) if e.dtype == "BF16" else raw


def _read(path: str) -> Reading:
    arrays, metadata = _mapped_tensors(path)
    return Reading(arrays, metadata=metadata)


def recognises(head: bytes, path: str) -> bool:
    """A safetensors file: an 8-byte header length, then the JSON header's opening brace."""
    return len(head) >= 9 and head[8:9] == b"{"


FORMAT = WeightFormat("safetensors", recognises, _read)
