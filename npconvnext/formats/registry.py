"""Which reader takes a file: each format registers how it recognises its files' first bytes.

A file is never judged by its name. Readers register themselves when `npconvnext.formats` is
imported; the first whose `recognises` answers yes reads the file.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import CheckpointError

HEAD_BYTES = 16  # how much of a file `recognises` sees


@dataclass(frozen=True)
class WeightFormat:
    name: str
    recognises: Callable[[bytes], bool]             # the file's first HEAD_BYTES bytes
    read: Callable[[str], dict[str, np.ndarray]]    # path -> arrays by the names the file uses


_FORMATS: list[WeightFormat] = []


def register(fmt: WeightFormat) -> WeightFormat:
    _FORMATS.append(fmt)
    return fmt


def formats() -> tuple[WeightFormat, ...]:
    return tuple(_FORMATS)


def sniff_format(path: str) -> WeightFormat:
    """The format of the weight file at `path`, from its first bytes; errors name the file."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise CheckpointError(f"{path}: is a directory; pass the weight file inside it "
                              "(model.safetensors or pytorch_model.bin)")
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path}: not a regular file (a pipe, socket or device); weights must be a file")
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    for fmt in _FORMATS:
        if fmt.recognises(head):
            return fmt
    known = ", ".join(f.name for f in _FORMATS)
    raise CheckpointError(f"{path}: not a weight file npconvnext reads ({known}); it starts {head[:8]!r}")
