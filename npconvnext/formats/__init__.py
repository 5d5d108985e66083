"""Weight files in, timm-named NumPy arrays out: no framework, no code execution.

One reader per container format, each registered with how it recognises a file's first bytes
(`registry.py`); a file's name is never trusted:
    safetensors.py   timm's and transformers' model.safetensors, npconvnext's own output
    keras.py         keras.applications ConvNeXt: legacy .h5, .weights.h5, .keras (needs h5py)
    torch_zip.py     torch.save since PyTorch 1.6: pytorch_model.bin, the official .pth
    openvino_ir.py   OpenVINO IR model.xml + model.bin (FP32 or FP16), parameters found by the graph
    savedmodel.py    TensorFlow SavedModel directories (keras.applications, the TF-Hub port),
                     their variables read by tf_bundle.py
Names inside the PyTorch-world files follow timm, the official code or transformers and are
mapped to timm's by `naming.py`.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import numpy as np

from ..config import get_config
from ..convention import Convention
from ..errors import CheckpointError
from ..preprocessing import DataConfig
# each registers its format; keras before torch_zip: both read zips, and keras checks the members
from . import keras, safetensors, savedmodel, torch_zip  # noqa: F401
from . import openvino_ir  # noqa: F401  after the others: it takes a .bin none of them recognises
from .data_config import class_names_from, data_config_from
from .naming import detect_naming, to_timm_names
from .registry import format_named, formats, sha256_of, sniff_format, weight_files
from .safetensors import read_safetensors, read_safetensors_with_metadata

__all__ = ["WeightFile", "convention_of", "detect_naming", "format_named", "formats", "load_state_dict",
           "read_checkpoint", "read_safetensors", "read_safetensors_with_metadata", "read_weight_file",
           "sha256_of", "sniff_format", "to_timm_names", "weight_files"]


class WeightFile(NamedTuple):
    """Everything npconvnext takes from one weight file, read in one pass."""

    state: dict[str, np.ndarray]          # timm names and layouts
    format: str                           # the registered format's name
    convention: Convention | None         # what the file's model takes and gives, where recorded
    data_config: DataConfig | None        # the evaluation preprocessing the file carries
    class_names: tuple[str, ...] | None   # the classifier's labels the file carries


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
    """The raw named arrays of a weight file and its format's name, names as stored."""
    path = os.fspath(path)
    fmt = sniff_format(path)
    return fmt.read(path), fmt.name


def convention_of(path: str | os.PathLike) -> Convention | None:
    """What the model in a weight file takes and gives, where its format records it (Keras);
    None for formats that hold weights only (timm's convention then)."""
    path = os.fspath(path)
    fmt = sniff_format(path)
    return fmt.convention(path) if fmt.convention else None


def read_weight_file(path: str | os.PathLike, arch: str | None = None, nonfinite: str = "error") -> WeightFile:
    """A weight file of any supported format and naming: timm-named arrays and what the file
    says about its model. See `load_state_dict` for `nonfinite`."""
    path = os.fspath(path)
    fmt = sniff_format(path)
    if fmt.name == "safetensors":  # the arrays and the metadata from one read of the header
        raw, metadata = read_safetensors_with_metadata(path)
    else:
        raw, metadata = fmt.read(path), {}
    try:
        state = to_timm_names(raw, get_config(arch) if arch else None)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    bad = [name for name, a in state.items() if a.dtype.kind == "f" and not np.isfinite(a).all()]
    if bad and nonfinite != "ignore":
        message = f"{path}: {len(bad)} tensors hold NaN or Inf: {', '.join(bad[:10])}"
        if nonfinite == "error":
            raise CheckpointError(message + " (pass nonfinite='warn' to load them anyway)")
        warnings.warn(message, stacklevel=3)
    return WeightFile(state, fmt.name, fmt.convention(path) if fmt.convention else None,
                      data_config_from(path, metadata), class_names_from(path, metadata))


def load_state_dict(path: str | os.PathLike, arch: str | None = None, nonfinite: str = "error") -> dict[str, np.ndarray]:
    """timm-named arrays from a weight file of any supported format and naming.

    nonfinite: what to do with NaN or Inf in the weights: 'error' (default: a model with them
    gives NaN logits), 'warn', or 'ignore'.
    """
    return read_weight_file(path, arch, nonfinite).state
