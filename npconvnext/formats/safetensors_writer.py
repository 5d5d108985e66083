"""Writing safetensors files so that the same tensors and metadata always give the same bytes."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping

import numpy as np

from ..errors import InputError
from .safetensors import DTYPES

# the reader's table inverted (NumPy has no bfloat16 to write)
_SAFETENSORS_DTYPES = {np.dtype(t): name for name, t in DTYPES.items() if t != "bfloat16"}


def safetensors_chunks(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> Iterator[bytes | memoryview]:
    """A safetensors file, deterministically: the same tensors and metadata give the same bytes.

    (safetensors' own `save` orders the metadata by a randomly seeded hash map.) Metadata keys
    are sorted; tensors follow the mapping's order; the header is padded with spaces to a
    multiple of 8 bytes, as safetensors pads it. Yields the header, then each tensor's bytes.
    """
    arrays = {name: np.asarray(a, order="C") for name, a in tensors.items()}  # keeps 0-d arrays 0-d
    header: dict[str, object] = {"__metadata__": {k: str(metadata[k]) for k in sorted(metadata)}}
    offset = 0
    for name, a in arrays.items():
        if a.dtype not in _SAFETENSORS_DTYPES:
            raise InputError(f"{name}: dtype {a.dtype} has no safetensors name here")
        header[name] = {"dtype": _SAFETENSORS_DTYPES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    yield len(raw).to_bytes(8, "little") + raw
    for a in arrays.values():
        yield memoryview(a.astype(a.dtype.newbyteorder("<"), copy=False).reshape(-1).view(np.uint8))
