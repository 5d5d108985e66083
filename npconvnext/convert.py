"""Converting any supported checkpoint to a timm-named float32 safetensors file, and checking one.

`convert` writes atomically (atomic.py): an interrupted, killed or failed conversion leaves no
file, and an existing destination is never touched unless `force`. The output is a pure
function of the source: the same source always gives the same bytes. Its metadata records the
source's sha256, which `verify` checks, together with a fresh conversion's tensors.

A large file takes seconds to minutes, so both show progress as the rest of npconvnext does
(progress.py: bars on stderr when it is a terminal, none when quiet): the source's bytes as they
are read and hashed, its tensors as they are checked, the destination's bytes as they are
written. The finished conversion is logged (INFO) on the `npconvnext` logger.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from . import progress
from .atomic import atomic_write
from .config import get_config
from .convention import Convention
from .errors import CheckpointError, InputError, NpConvNeXtError
from .formats import (convention_of, detect_naming, format_named, read_checkpoint, read_safetensors_with_metadata,
                      sha256_of, to_timm_names, weight_files)
from .formats.safetensors_writer import safetensors_chunks
from .model import ConvNeXt
from .params import detect_architecture

# metadata fields that describe the source's content (its file name may differ between copies)
_CONTENT_FIELDS = ("architecture", "num_classes", "source_sha256", "source_format", "format", "converted_by")

log = logging.getLogger(__name__)


def convert(src: str | os.PathLike, dst: str | os.PathLike, arch: str | None = None,
            force: bool = False, convention: Convention | None = None, quiet: bool = False) -> dict[str, str]:
    """Write `src` (any supported format) as timm-named float32 safetensors at `dst`.
    Returns the metadata written into the file.

    The file holds the network: preprocessing and a softmax that the source's model carries
    are left to the caller, as timm's users do them. For an OpenVINO IR whose preprocessing is
    folded into its first convolution, `convention` says what the IR takes (as create_model's
    convention_override); the stem is unfolded for it, so that timm's model computes the IR's
    logits from images normalised by that convention's mean and std.

    A checkpoint without a classifier (no head.fc: DINOv3, FCMAE and other backbones) is written
    as a headless backbone, num_classes 0, with or without `arch`. quiet: no progress bars."""
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.exists(dst) and not force:
        raise FileExistsError(f"{dst}: already exists; pass --force (force=True) to overwrite it")
    tensors, metadata = _without_frames(src, _convert_in_memory, src, arch, convention, quiet)
    chunks = list(safetensors_chunks(tensors, metadata))  # the header, then views of each tensor's bytes
    size = sum(memoryview(chunk).nbytes for chunk in chunks)
    with progress.byte_bar(size, f"writing {os.path.basename(dst)}", quiet) as bar:
        atomic_write(dst, _counted(chunks, bar.update))
    log.info("%s: %s (%s classes) from %s, %d tensors, %d bytes", dst, metadata["architecture"],
             metadata["num_classes"], metadata["source_format"], len(tensors), size,
             extra={"result": True})  # the command prints its own line
    return metadata


def _counted(chunks: Iterable[bytes | memoryview], done) -> Iterator[bytes | memoryview]:
    """The chunks, calling done(n bytes) after each is taken (written)."""
    for chunk in chunks:
        yield chunk
        done(memoryview(chunk).nbytes)


def verify(converted: str | os.PathLike, source: str | os.PathLike, quiet: bool = False) -> dict[str, str]:
    """Check that `converted` is what `convert(source)` writes: the source sha256 recorded in it
    is `source`'s, and every tensor equals a fresh conversion's, bit for bit.

    Returns the converted file's metadata; raises CheckpointError naming the file and the
    problem (a different source, a file not written by `convert`, tampered tensors).
    quiet: no progress bars (the fresh conversion's).
    """
    converted, source = os.fspath(converted), os.fspath(source)
    metadata = _without_frames(converted, read_safetensors_with_metadata, converted)[1]
    if metadata.get("converted_by") != "npconvnext" or "source_sha256" not in metadata:
        raise CheckpointError(f"{converted}: not written by `npconvnext convert` (its metadata has no "
                              "source_sha256), so there is nothing to verify it against")
    recorded, actual = metadata["source_sha256"], sha256_of(source)
    if recorded != actual:
        raise CheckpointError(f"{converted}: was converted from a file with sha256 {recorded}, but "
                              f"{source} has sha256 {actual}: a different file, or changed since")
    # the architecture is read off the source, as the recorded one is what is being checked
    convention = _recorded_convention(converted, metadata)
    fresh, fresh_metadata = _without_frames(source, _convert_in_memory, source, None, convention, quiet)
    problems = [f"metadata {k}: {metadata.get(k)!r}, a fresh conversion gives {fresh_metadata[k]!r}"
                for k in _CONTENT_FIELDS if metadata.get(k) != fresh_metadata[k]]
    problems += _without_frames(converted, _differences, converted, fresh)
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise CheckpointError(f"{converted}: does not match a fresh conversion of {source}:\n  "
                              + "\n  ".join(shown))
    return metadata


def _recorded_convention(path: str, metadata: Mapping[str, str]) -> Convention | None:
    """The input convention an IR was converted for (see `convert`), or None."""
    text = metadata.get("input_convention")
    if text is None:
        return None
    try:
        return Convention(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()})
    except (ValueError, TypeError, NpConvNeXtError) as exc:
        raise CheckpointError(f"{path}: metadata input_convention is not a convention ({exc})") from None


def _differences(converted: str, fresh: Mapping[str, np.ndarray]) -> list[str]:
    """What differs between a converted file's tensors and a fresh conversion's, one line each."""
    stored = read_safetensors_with_metadata(converted)[0]
    problems = [f"missing tensor {name}" for name in fresh if name not in stored]
    problems += [f"unexpected tensor {name}" for name in stored if name not in fresh]
    for name, expected in fresh.items():
        got = stored.get(name)
        if got is None:
            continue
        if got.dtype != expected.dtype or got.shape != expected.shape:
            problems.append(f"{name}: {got.dtype}{list(got.shape)}, a fresh conversion gives "
                            f"{expected.dtype}{list(expected.shape)}")
        elif not np.array_equal(got, expected):
            count = int(np.count_nonzero(got != expected))
            problems.append(f"{name}: {count} of {got.size} values differ from a fresh conversion")
    return problems


def _without_frames(path: str, fn, *args):
    """fn(*args), with a CheckpointError raised again as a fresh one that names `path`.

    Raised outside the handler, the new error keeps no link to the failed call's frames, which
    hold the memory-mapped or open file for as long as the error lives."""
    try:
        return fn(*args)
    except CheckpointError as exc:
        message = str(exc)
    raise CheckpointError(message if message.startswith(path) else f"{path}: {message}")


def _convert_in_memory(src: str, arch: str | None, convention: Convention | None = None,
                       quiet: bool = True) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and metadata `convert` writes for `src`."""
    # hashed first: the one pass over every byte of the source, so its bar shows the read
    with progress.byte_bar(_size_of(src), f"reading {os.path.basename(src)}", quiet) as bar:
        source_sha256 = sha256_of(src, bar.update)
    raw, container = read_checkpoint(src)
    if convention is not None:
        restate = format_named(container).restate
        if restate is None:
            raise InputError(f"{src}: a convention re-expresses an OpenVINO IR's stem; a {container} file "
                             "holds no preprocessing in its weights")
        raw = restate(raw, convention_of(src), convention)
    naming = detect_naming(raw)
    state = to_timm_names(raw, get_config(arch) if arch else None)
    if arch:
        head = state.get("head.fc.weight")
        if head is None:  # a headless backbone, num_classes 0, as detect_architecture reads one
            config = get_config(arch, num_classes=0)
        elif head.ndim == 2:
            config = get_config(arch, num_classes=int(head.shape[0]))
        else:  # the strict check below reports its shape
            config = get_config(arch)
    else:
        config = detect_architecture(state)
    # building the model checks every name and shape before anything is written
    model = ConvNeXt(config, state, dtype="float32", backend="numpy", source=src)
    tensors = model.state_dict()  # copies: the source's mapping can go
    with progress.bar(len(tensors), "checking", unit="tensor", quiet=quiet) as bar:
        bad = []
        for name, tensor in tensors.items():
            if not np.isfinite(tensor).all():
                bad.append(name)
            bar.update(1)
    if bad:
        raise CheckpointError(f"{src}: {len(bad)} tensors hold NaN or Inf: {', '.join(bad[:10])}")
    metadata = {"architecture": config.name, "num_classes": str(config.num_classes),
                "source_sha256": source_sha256, "source_format": f"{container}/{naming}",
                "source_file": os.path.basename(src), "format": "pt", "converted_by": "npconvnext"}
    if convention is not None:  # what the stem was unfolded for: `verify` does it again
        metadata["input_convention"] = json.dumps(dataclasses.asdict(convention))
    return tensors, metadata


def _size_of(src: str) -> int | None:
    """The bytes of the weights at `src` (all its files), None where a size cannot be read: the
    hash that follows reports why."""
    try:
        return sum(os.path.getsize(name) for name in weight_files(src))
    except OSError:
        return None
