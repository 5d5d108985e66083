"""Writing files so that a crash or an error never leaves a partial one behind."""

from __future__ import annotations

import os
import tempfile


def atomic_write(path: str | os.PathLike, payload: bytes) -> None:
    """Write `payload` to a temporary file beside `path`, then rename it into place: readers see
    the old file or the whole new one, never a partial one, and a failure leaves nothing."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".npconvnext-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
