"""Weight files in, timm-named NumPy arrays out: no framework, no code execution.

One reader per container format, each a `WeightFormat` (`registry.py`): how it recognises a
file's first bytes, and how one read of the file gives its arrays, its model's convention and
its metadata (a `Reading`). They are tried in this order (`formats()`); a file's name is never
trusted:
    keras.py         keras.applications ConvNeXt: legacy .h5, .weights.h5, .keras (needs h5py)
    safetensors.py   timm's and transformers' model.safetensors, npconvnext's own output
    savedmodel.py    TensorFlow SavedModel directories (keras.applications, the TF-Hub port),
                     their variables read by tf_bundle.py
    torch_zip.py     torch.save since PyTorch 1.6: pytorch_model.bin, the official .pth
    openvino_ir/     OpenVINO IR model.xml + model.bin (FP32 or FP16), parameters found by the graph
What every reader shares when it meets an untrusted file is in `guard.py`; `mapped.py` maps a
file into memory and gives its pages back once read. Foreign names (the official code's,
transformers', Keras') and layouts are mapped to timm's by `names.py`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from ..config import get_config
from ..convention import Convention
from ..errors import CheckpointError
from ..layers import BFloat16Bits
from ..preprocessing import DataConfig
from . import keras, openvino_ir, safetensors, savedmodel, torch_zip
from .data_config import class_names_from, data_config_from
from .guard import widened
from .mapped import release_all, release_pages
from .names import detect_naming, to_timm_names
from .registry import WeightFormat, sha256_of_files, sniff
from .safetensors import read_safetensors, read_safetensors_with_metadata

__all__ = ["WeightFile", "convention_of", "detect_naming", "format_named", "formats", "load_state_dict",
           "read_checkpoint", "read_safetensors", "read_safetensors_with_metadata", "read_weight_file",
           "sha256_of", "sniff_format", "to_timm_names", "weight_files"]


# The order they are tried in: keras before torch_zip, since both are zips and keras checks the
# members; openvino last, since it takes a .bin none of the others recognises.
_FORMATS: tuple[WeightFormat, ...] = (*keras.FORMATS, safetensors.FORMAT, savedmodel.FORMAT, *torch_zip.FORMATS,
                                      openvino_ir.FORMAT)


def formats() -> tuple[WeightFormat, ...]:
    """Every format npconvnext reads, in the order a file is tried against them."""
    return _FORMATS


def format_named(name: str) -> WeightFormat:
    return next(fmt for fmt in _FORMATS if fmt.name == name)


def sniff_format(path: str | os.PathLike) -> WeightFormat:
    """The format of the weights at `path`, from the file's first bytes (or, for a directory,
    from what it holds); errors name the file."""
    return sniff(os.fspath(path), _FORMATS)


def weight_files(path: str | os.PathLike) -> list[str]:
    """The files that make up the weights at `path` (to hash them): the file itself, or the files
    a directory format or a multi-file format names."""
    path = os.fspath(path)
    fmt = sniff_format(path)
    return fmt.files(path) if fmt.files else [path]


def sha256_of(path: str | os.PathLike, progress: Callable[[int], None] | None = None) -> str:
    """sha256 of the weights at `path`: of its files' bytes in order (one file; an IR's .xml and
    .bin; a SavedModel's files), so that a change to any of them shows. Regular files only: a
    FIFO or a missing file is a CheckpointError. progress(n): after each n bytes hashed."""
    return sha256_of_files(weight_files(path), progress)


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
    return widened(fmt.read(path).arrays), fmt.name


def convention_of(path: str | os.PathLike) -> Convention | None:
    """What the model in a weight file takes and gives, where its format records it (Keras);
    None for formats that hold weights only (timm's convention then)."""
    path = os.fspath(path)
    return sniff_format(path).read(path).convention


def read_weight_file(path: str | os.PathLike, arch: str | None = None, nonfinite: str = "error",
                     widen: bool = True) -> WeightFile:
    """A weight file of any supported format and naming: timm-named arrays and what the file
    says about its model. See `load_state_dict` for `nonfinite`. widen: bfloat16 tensors as
    float32 (True), or as their bits (layers.BFloat16Bits), for a model to widen only what it
    keeps in float32 (`create_model` does)."""
    path = os.fspath(path)
    fmt = sniff_format(path)
    found = fmt.read(path)
    try:
        state = to_timm_names(found.arrays, get_config(arch) if arch else None)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    bad = [name for name, a in state.items() if not _finite(a)]
    release_all(state.values())
    if bad and nonfinite != "ignore":
        message = f"{path}: {len(bad)} tensors hold NaN or Inf: {', '.join(bad[:10])}"
        if nonfinite == "error":
            raise CheckpointError(message + " (pass nonfinite='warn' to load them anyway)")
        warnings.warn(message, stacklevel=3)
    return WeightFile(widened(state) if widen else state, fmt.name, found.convention,
                      data_config_from(path, found.metadata), class_names_from(path, found.metadata))


def _finite(array: np.ndarray) -> bool:
    """Whether a tensor holds no NaN or Inf (integers always); the pages of a mapped file it
    read are given back (mapped.py): checking a file leaves it to what uses it, and never holds
    all of it."""
    if isinstance(array, BFloat16Bits):
        finite = not ((np.asarray(array) & 0x7F80) == 0x7F80).any()   # exponent all ones
    else:
        finite = array.dtype.kind != "f" or bool(np.isfinite(array).all())
    release_pages(array)
    return finite


def load_state_dict(path: str | os.PathLike, arch: str | None = None, nonfinite: str = "error") -> dict[str, np.ndarray]:
    """timm-named arrays from a weight file of any supported format and naming.

    nonfinite: what to do with NaN or Inf in the weights: 'error' (default: a model with them
    gives NaN logits), 'warn', or 'ignore'.
    """
    return read_weight_file(path, arch, nonfinite).state
