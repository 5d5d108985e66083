"""Weight files mapped into memory, and giving their pages back once they are read.

A safetensors file's tensors are views of the file mapped read-only and shared (`WeightMapping`):
loading copies nothing. The process's resident memory counts every page of the mapping it has
read, so a model that reads a tensor only to copy it (rounding it to bfloat16, widening it to
float64) or a check that reads every tensor once would keep the file resident beside the copy.
`release_pages` drops such pages from this process: in a shared read-only file mapping a page
always holds the file's bytes, so the next read of it finds them again in the OS file cache (or
on disk). It does so for the package's own mappings only: in a private or writable mapping
(a caller's np.memmap, say) dropping a page could discard what was written to it.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable

import numpy as np

try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # NumPy 1.x
    from numpy import byte_bounds

_DONT_NEED = getattr(mmap, "MADV_DONTNEED", None) if hasattr(mmap.mmap, "madvise") else None


class WeightMapping(mmap.mmap):
    """A weight file mapped read-only and shared, whole: its pages may be dropped at any time
    (`release_pages`). Only the readers make these."""

    def __new__(cls, fileno: int):
        return super().__new__(cls, fileno, 0, access=mmap.ACCESS_READ)


def memory_owner(array: np.ndarray) -> object:
    """The object that owns an array's memory, through its chain of bases and a memoryview:
    the array itself, a buffer (bytes, an mmap), or the last array of the chain."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    owner = array if array.base is None else array.base
    return owner.obj if isinstance(owner, memoryview) else owner


def mapping_of(array: np.ndarray) -> WeightMapping | None:
    """The WeightMapping `array` is a view of; None for any other memory (the heap, a caller's
    np.memmap)."""
    owner = memory_owner(array)
    return owner if isinstance(owner, WeightMapping) else None


def release_pages(array: np.ndarray) -> None:
    """Drop this process's pages of a WeightMapping that hold `array`'s bytes (whole pages, so
    maybe a neighbour's first or last bytes too: it reads them again from the file); nothing for
    an array in other memory, or where the OS has no MADV_DONTNEED."""
    mapping = mapping_of(array)
    if mapping is None or _DONT_NEED is None or array.size == 0:
        return
    low, high = byte_bounds(array)
    origin = np.frombuffer(mapping, np.uint8, count=1).ctypes.data
    start = (low - origin) // mmap.PAGESIZE * mmap.PAGESIZE   # madvise takes whole pages
    try:
        mapping.madvise(_DONT_NEED, start, high - origin - start)
    except OSError:  # locked pages (mlockall), an OS that refuses: they stay, as before the call
        pass


def release_all(arrays: Iterable[np.ndarray]) -> None:
    """release_pages of each array, once all have been read: reading one maps a window of its
    neighbours' pages too (the OS's fault-around), so releasing each just after reading it
    leaves some of those it released before mapped again."""
    for array in arrays:
        release_pages(array)
