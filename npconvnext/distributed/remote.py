"""Images behind fsspec URLs (s3://, gs://, http://, ...), read on the worker that needs them.

The file is copied to a private temporary file first and preprocessed from there, so a remote
image goes through exactly the checks a local one does (a regular file, PIL's
decompression-bomb limit, the resized-size limit); the copy stops at MAX_IMAGE_BYTES, so a
huge or endless remote file cannot fill the disk.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

from ..errors import ImageError

MAX_IMAGE_BYTES = 1 << 28  # larger files are refused before their pixels are decoded
_CHUNK = 1 << 20


@contextlib.contextmanager
def fetched(url: str, limit: int = MAX_IMAGE_BYTES) -> Iterator[str]:
    """A local temporary copy of the file at `url`, removed afterwards."""
    import fsspec

    fd, local = tempfile.mkstemp(prefix="npconvnext-", suffix=os.path.splitext(url)[1][:16])
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with fsspec.open(url, "rb") as source:
                    copied = 0
                    while chunk := source.read(min(_CHUNK, limit + 1 - copied)):
                        copied += len(chunk)
                        if copied > limit:
                            raise ImageError(f"{url}: larger than {limit} bytes, not read")
                        out.write(chunk)
            except ImageError:
                raise
            except FileNotFoundError:
                raise ImageError(f"{url}: no such file") from None
            except Exception as exc:  # each filesystem has its own errors (network, permissions)
                raise ImageError(f"{url}: cannot read ({type(exc).__name__}: {exc})") from None
        yield local
    finally:
        os.unlink(local)
