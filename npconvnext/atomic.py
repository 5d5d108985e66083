"""Writing files so that a crash, a kill or an error never leaves a partial or stray file behind.

On Linux the data goes into an unnamed file (O_TMPFILE) in the destination's directory, which
the kernel frees if the process dies before it is named; only a complete, fsynced file is then
given a hidden name and renamed over the destination (a kill in the instant between those two
system calls is the one way to leave the hidden name behind). Elsewhere, or where the
filesystem has no O_TMPFILE, a hidden named temporary file is used, removed on any error but
not on a kill. Either way the file is created with mode 0o666 and the kernel applies the umask:
the process umask is never read or changed.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterable

# O_TMPFILE files are named through /proc; where the kernel or filesystem lacks O_TMPFILE,
# open() fails with one of _NO_TMPFILE and the named temporary file is used instead.
_USE_TMPFILE = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")
_NO_TMPFILE = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL}


def atomic_write(path: str | os.PathLike, payload: bytes | Iterable[bytes]) -> None:
    """Write `payload` (bytes, or an iterable of bytes-like chunks written in order) to `path`
    atomically and durably: readers see the old file or the whole new one, and a failure (on
    Linux, a kill too) leaves the directory as it was. Errors name `path`, never a temporary file."""
    path = os.fspath(path)
    chunks = [payload] if isinstance(payload, (bytes, bytearray, memoryview)) else payload
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, temp_name = _open_temp(directory, os.path.basename(path))
        try:
            for chunk in chunks:
                _write_all(fd, chunk)
            os.fsync(fd)
            if temp_name is None:  # unnamed: give it a name, then rename that over the destination
                temp_name = _link_unnamed(fd, directory, os.path.basename(path))
            os.replace(temp_name, path)
            temp_name = None
        finally:
            os.close(fd)
            if temp_name is not None:
                _remove(temp_name)
        _fsync_directory(directory)
    except OSError as exc:
        if exc.errno is None:
            raise OSError(f"cannot write {path}: {exc}") from None
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror}") from None  # same subclass


def _open_temp(directory: str, base: str) -> tuple[int, str | None]:
    """A file descriptor open for writing and the temporary file's name (None if unnamed)."""
    if _USE_TMPFILE:
        try:
            return os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666), None
        except OSError as exc:
            if exc.errno not in _NO_TMPFILE:
                raise
    for _ in range(100):
        name = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name in {directory}")


def _link_unnamed(fd: int, directory: str, base: str) -> str:
    """Give the O_TMPFILE file `fd` a fresh hidden name in `directory` and return it."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for _ in range(100):
            name = f".{base}.{secrets.token_hex(6)}.tmp"
            try:
                # a dir_fd makes CPython call linkat(AT_SYMLINK_FOLLOW), which follows the /proc
                # link to the open file; plain link() would try to link the symlink itself
                os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
                return os.path.join(directory, name)
            except FileExistsError:
                continue
    finally:
        os.close(dir_fd)
    raise FileExistsError(errno.EEXIST, f"no free temporary name in {directory}")


def _write_all(fd: int, chunk) -> None:
    view = memoryview(chunk).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable; a no-op where directories cannot be opened or synced."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(dir_fd)


def _remove(name: str) -> None:
    try:
        os.unlink(name)
    except OSError:
        pass
