"""What every weight reader shares when it meets an untrusted file.

`open_weight_file` opens regular files only (a FIFO or a device would block or never end),
`reading` turns every failure inside into a CheckpointError naming the file, and `describe`
puts a value read from a file into an error message, bounded; `widened` gives bfloat16 tensors
as float32, NumPy lacking the dtype. The limits below bound what a reader may make of a file by
what a ConvNeXt can hold, whatever the file claims.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import numpy as np

from ..config import VARIANTS
from ..errors import CheckpointError
from ..layers import BFloat16Bits, from_bfloat16
from ..params import expected_shapes

MAX_DIMS = 64            # NumPy's limit on an array's dimensions
MAX_CLASSES = 1 << 15    # a classifier's outputs; ImageNet-22k's 21841 fit
MAX_ITEMSIZE = 8         # float64, the widest dtype a weight is stored in


def _largest() -> tuple[int, int]:
    """(elements of the largest parameter, elements of the largest model) over every variant."""
    sizes = [[_count(s) for s in expected_shapes(replace(c, num_classes=MAX_CLASSES)).values()]
             for c in VARIANTS.values()]
    return max(max(s) for s in sizes), max(sum(s) for s in sizes)


def _count(shape: tuple[int, ...]) -> int:
    total = 1
    for n in shape:
        total *= n
    return total


MAX_PARAMETER_ELEMENTS, MAX_MODEL_ELEMENTS = _largest()
# bytes the largest ConvNeXt's weights take at the widest dtype, plus room for a container's own
# structure (HDF5 groups, attributes, a model config)
MAX_MODEL_BYTES = MAX_MODEL_ELEMENTS * MAX_ITEMSIZE + (256 << 20)


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


def widened(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays with bfloat16 bits (layers.BFloat16Bits, what readers make of a bfloat16
    tensor) widened to float32, exactly, the others as they are: what the public readers give,
    NumPy having no bfloat16."""
    return {name: from_bfloat16(a) if isinstance(a, BFloat16Bits) else a for name, a in arrays.items()}


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
        text = str(exc)
        raise CheckpointError(text if text.startswith(f"{path}: ") else f"{path}: {text}") from None
    except Exception as exc:  # noqa: BLE001 (KeyboardInterrupt and SystemExit pass)
        raise CheckpointError(f"{path}: corrupted or truncated {what} ({type(exc).__name__}"
                              f"{_exception_text(exc)})") from None


def _exception_text(exc: Exception, limit: int = 200) -> str:
    if not all(isinstance(a, str) or (type(a) is int and a.bit_length() <= 64) for a in exc.args):
        return ""  # its text could hold a repr of something the file built
    text = str(exc)
    return ": " + (text if len(text) <= limit else text[:limit] + "...")
