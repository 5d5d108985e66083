"""Tar archives (plain or gzip-compressed) read in place, never extracted: the TF-Hub asset of a
SavedModel is a `.tar.gz` of its directory, and npconvnext reads its members from the archive.

An archive is untrusted: every member is checked before any is read, and one hostile member
refuses the whole archive: an absolute name, a `..` part, a link (symbolic or hard), a device,
FIFO or anything else that is neither a regular file nor a directory, a member larger than the
largest model's weights (guard.MAX_MODEL_BYTES), or members adding up past that. Python's
tarfile (the standard library) parses the headers; nothing here writes a byte to disk.
"""

from __future__ import annotations

import posixpath
import tarfile

from ..errors import CheckpointError
from .guard import MAX_MODEL_BYTES, open_weight_file

GZIP_MAGIC = b"\x1f\x8b"
MAX_MEMBERS = 10_000  # a SavedModel holds a handful of files


def is_gzip(head: bytes) -> bool:
    return head[:2] == GZIP_MAGIC


def _checked_name(info: tarfile.TarInfo) -> str:
    """The member's name without a leading "./", refusing what could point outside the archive."""
    name = info.name
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or "\\" in name:
        raise CheckpointError(f"member {name!r} has an absolute path: refused")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise CheckpointError(f"member {name!r} has a '..' in its path: refused")
    if info.issym() or info.islnk():
        raise CheckpointError(f"member {name!r} is a link (to {info.linkname!r}): refused")
    if not (info.isreg() or info.isdir()):
        raise CheckpointError(f"member {name!r} is a device, FIFO or other special file: refused")
    if info.size > MAX_MODEL_BYTES:
        raise CheckpointError(f"member {name!r} is {info.size} bytes, more than any ConvNeXt's weights: refused")
    return "/".join(parts)


class TarArchive:
    """The regular files of a checked archive by name ("a/variables/variables.index"), read
    into memory on request."""

    def __init__(self, path: str):
        self.path = path
        self._file = open_weight_file(path)  # a regular file: not a FIFO or a device
        try:
            self._tar = tarfile.open(fileobj=self._file, mode="r:*")
            self.members: dict[str, tarfile.TarInfo] = {}
            total = 0
            for count, info in enumerate(self._tar, 1):
                if count > MAX_MEMBERS:
                    raise CheckpointError(f"more than {MAX_MEMBERS} members: not a SavedModel's archive")
                name = _checked_name(info)
                total += info.size
                if total > MAX_MODEL_BYTES:
                    raise CheckpointError("its members add up to more than any ConvNeXt's weights: refused")
                if info.isreg():
                    self.members[name] = info
        except tarfile.TarError as exc:
            self.close()
            raise CheckpointError(f"not a readable tar archive ({exc})") from None
        except BaseException:
            self.close()
            raise

    def read(self, name: str, limit: int | None = None) -> bytes:
        """A member's bytes (at most `limit` of them, else refused)."""
        info = self.members.get(name)
        if info is None:
            raise CheckpointError(f"no member {name!r} in the archive")
        if limit is not None and info.size > limit:
            raise CheckpointError(f"member {name!r} is {info.size} bytes, more than {limit}: refused")
        data = self._tar.extractfile(info).read()
        if len(data) != info.size:
            raise CheckpointError(f"member {name!r} ends after {len(data)} of its {info.size} bytes (truncated)")
        return data

    def find(self, leaf: str) -> str | None:
        """The directory (in the archive) holding the shallowest member named `leaf`."""
        found = sorted((n.count("/"), n) for n in self.members if posixpath.basename(n) == leaf)
        return posixpath.dirname(found[0][1]) if found else None

    def close(self) -> None:
        if getattr(self, "_tar", None) is not None:
            self._tar.close()
        self._file.close()

    def __enter__(self) -> TarArchive:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
