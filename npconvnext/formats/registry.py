"""Which reader takes a file: each format registers how it recognises its files' first bytes.

A file is never judged by its name. A format whose weights are a directory (a TensorFlow
SavedModel) registers how it recognises one; any other directory is refused. Readers register
themselves when `npconvnext.formats` is imported; the first whose `recognises` answers yes
reads the file. A format whose files carry the model's input convention (a Keras model's
Normalization layer, say) also registers how to read that.

What every reader shares when it meets an untrusted file: `open_weight_file` (regular files
only), `reading` (every failure a CheckpointError naming the file) and `describe` (a value
from the file in an error message, bounded).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ..convention import Convention
from ..errors import CheckpointError

HEAD_BYTES = 16  # how much of a file `recognises` sees


@dataclass(frozen=True)
class WeightFormat:
    name: str
    recognises: Callable[[bytes, str], bool]        # (the file's first HEAD_BYTES bytes, its path)
    read: Callable[[str], dict[str, np.ndarray]]    # path -> arrays by the names the file uses
    convention: Callable[[str], Convention] | None = None  # path -> what the file's model takes and gives
    recognises_directory: Callable[[str], bool] | None = None  # (a directory's path): its weights are this format's
    files: Callable[[str], list[str]] | None = None  # path -> the files holding the weights (default: the path)
    # (arrays as read, the file's convention, another) -> the arrays that compute the same outputs
    # under the other; only for a format whose weights hold preprocessing (an IR's folded stem)
    restate: Callable[[dict[str, np.ndarray], Convention, Convention], dict[str, np.ndarray]] | None = None


_FORMATS: list[WeightFormat] = []


def register(fmt: WeightFormat) -> WeightFormat:
    _FORMATS.append(fmt)
    return fmt


def formats() -> tuple[WeightFormat, ...]:
    return tuple(_FORMATS)


def format_named(name: str) -> WeightFormat:
    return next(fmt for fmt in _FORMATS if fmt.name == name)


def open_weight_file(path: str):
    """`path` opened for binary reading; refuses anything but a regular file, since a FIFO or a
    device would block or never end. Every public reader opens its file through this."""
    try:
        # O_NONBLOCK: opening a FIFO with no writer would otherwise wait forever
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory; pass the weight file inside it "
                              "(model.safetensors or pytorch_model.bin)") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise CheckpointError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise CheckpointError(f"{path}: is a directory; pass the weight file inside it "
                                  "(model.safetensors or pytorch_model.bin)")
        if not stat.S_ISREG(mode):
            raise CheckpointError(f"{path}: not a regular file (a pipe, socket or device); weights must be a file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def describe(value: object, limit: int = 60) -> str:
    """A bounded description of a value read from a file, for error messages: short text is
    quoted, anything else is named by its type (a repr could expand a shared structure
    exponentially)."""
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value)} characters)"
    if type(value) is int and value.bit_length() <= 64:
        return str(value)
    return f"a {type(value).__name__}"


@contextmanager
def reading(path: str, what: str) -> Iterator[None]:
    """Every failure inside becomes a CheckpointError naming `path`: the readers' own (raised
    without it) get it prefixed; anything else a corrupt file makes a library raise is
    described by its type and bounded text."""
    try:
        yield
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 (KeyboardInterrupt and SystemExit pass)
        raise CheckpointError(f"{path}: corrupted or truncated {what} ({type(exc).__name__}"
                              f"{_exception_text(exc)})") from None


def _exception_text(exc: Exception, limit: int = 200) -> str:
    if not all(isinstance(a, str) or (type(a) is int and a.bit_length() <= 64) for a in exc.args):
        return ""  # its text could hold a repr of something the file built
    text = str(exc)
    return ": " + (text if len(text) <= limit else text[:limit] + "...")


def weight_files(path: str) -> list[str]:
    """The files that make up the weights at `path` (to hash them): the file itself, or the files
    a directory format or a multi-file format names."""
    fmt = sniff_format(path)
    return fmt.files(path) if fmt.files else [path]


def sha256_of(path: str | os.PathLike) -> str:
    """sha256 of the weights at `path`: of its files' bytes in order (one file; an IR's .xml and
    .bin; a SavedModel's files), so that a change to any of them shows."""
    digest = hashlib.sha256()
    for name in weight_files(os.fspath(path)):
        with open(name, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def sniff_format(path: str) -> WeightFormat:
    """The format of the weight file at `path`, from its first bytes (or, for a directory, from
    what it holds); errors name the file."""
    if os.path.isdir(path):
        for fmt in _FORMATS:
            if fmt.recognises_directory and fmt.recognises_directory(path):
                return fmt
    try:
        with open_weight_file(path) as f:
            head = f.read(HEAD_BYTES)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    for fmt in _FORMATS:
        if fmt.recognises(head, path):
            return fmt
    known = ", ".join(f.name for f in _FORMATS)
    raise CheckpointError(f"{path}: not a weight file npconvnext reads ({known}); it starts {head[:8]!r}")
