"""Weight files the tests write by hand, where no library writes them as the tests need."""

import json

import numpy as np

from npconvnext import layers


def write_bfloat16_safetensors(path, state):
    """A safetensors file of every tensor in bfloat16, as Hugging Face publishes them."""
    header, offset, chunks = {}, 0, []
    for name, array in state.items():
        data = layers.to_bfloat16(np.ascontiguousarray(array)).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        chunks.append(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(chunks))
