"""What a weight format is to npconvnext, and which one takes a file.

A reader module defines `FORMAT = WeightFormat(...)` (or `FORMATS` for two): how it recognises
a file from its first bytes, and how it reads one into a `Reading`. `npconvnext.formats` lists
the formats in the order they are tried; nothing registers itself at import. A file is never
judged by its name. A format whose weights are a directory (a TensorFlow SavedModel) says how it
recognises one; any other directory is refused. A file is read once: its arrays, what its model
takes and gives, and its metadata all come from that one read.

What every reader shares when it meets an untrusted file is in `guard.py`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from ..convention import Convention
from ..errors import CheckpointError
from .guard import open_weight_file

HEAD_BYTES = 16  # how much of a file `recognises` sees


@dataclass(frozen=True)
class Reading:
    """What a reader gives from ONE read of a file."""

    arrays: dict[str, np.ndarray]         # by timm's names, or a PyTorch-world naming names.py maps;
                                          # a bfloat16 tensor as its bits (layers.BFloat16Bits)
    convention: Convention | None = None  # what the file's model takes and gives, where it says
    metadata: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # a safetensors header's


@dataclass(frozen=True)
class WeightFormat:
    name: str
    recognises: Callable[[bytes, str], bool]        # (the file's first HEAD_BYTES bytes, its path)
    read: Callable[[str], Reading]                  # path -> everything the file holds, in one read
    recognises_directory: Callable[[str], bool] | None = None  # (a directory's path): its weights are this format's
    files: Callable[[str], list[str]] | None = None  # path -> the files holding the weights (default: the path)
    # (arrays as read, the file's convention, another) -> the arrays that compute the same outputs
    # under the other; only for a format whose weights hold preprocessing (an IR's folded stem)
    restate: Callable[[dict[str, np.ndarray], Convention, Convention], dict[str, np.ndarray]] | None = None


def sniff(path: str, formats: Sequence[WeightFormat]) -> WeightFormat:
    """The first of `formats` that recognises the weights at `path`, from the file's first bytes
    (or, for a directory, from what it holds); errors name the file."""
    if os.path.isdir(path):
        for fmt in formats:
            if fmt.recognises_directory and fmt.recognises_directory(path):
                return fmt
    try:
        with open_weight_file(path) as f:
            head = f.read(HEAD_BYTES)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    for fmt in formats:
        if fmt.recognises(head, path):
            return fmt
    known = ", ".join(f.name for f in formats)
    raise CheckpointError(f"{path}: not a weight file npconvnext reads ({known}); it starts {head[:8]!r}")


def sha256_of_files(files: Sequence[str], progress: Callable[[int], None] | None = None) -> str:
    """sha256 of the files' bytes in order, each opened as a weight file (regular files only);
    progress(n) is called after each n bytes hashed (a progress bar's hook)."""
    digest = hashlib.sha256()
    for name in files:
        with open_weight_file(name) as f:
            try:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
                    if progress is not None:
                        progress(len(chunk))
            except OSError as exc:
                raise CheckpointError(f"{name}: cannot read ({exc.strerror or exc})") from None
    return digest.hexdigest()
