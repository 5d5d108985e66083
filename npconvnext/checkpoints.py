"""Reading weight files into timm-named NumPy arrays."""

from __future__ import annotations

import os

import numpy as np


class CheckpointError(ValueError):
    """A weight file or mapping that cannot be used; the message names the file and the problem."""


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a .safetensors file, by name."""
    from safetensors.numpy import load_file

    path = os.fspath(path)
    return load_file(path)
