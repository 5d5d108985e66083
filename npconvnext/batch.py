"""One batch of image files through a model: the code the single-process command and the
cluster's tasks share, so that both give the same rows for the same images.

A batch is read image by image (an image that cannot be read or preprocessed, for whatever
reason, becomes a failure naming the file and the problem, and the others go on), stacked, run
through the model once, and turned into rows: the top-k classes with their probabilities, or
the pooled pre-logits embeddings. Nothing here imports Dask; distributed/ runs the same code
on a cluster's workers.

Images behind fsspec URLs (s3://, gs://, http://, ...) are copied to a private temporary file
first and preprocessed from there (`fetched`), so a remote image goes through exactly the
checks a local one does (a regular file, PIL's decompression-bomb limit, the resized-size
limit); the copy stops at MAX_IMAGE_BYTES, so a huge or endless remote file cannot fill the disk.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from . import preprocessing
from .errors import ImageError, InputError
from .factory import create_model
from .hub import pretrained_entry
from .labels import imagenet_labels
from .model import ConvNeXt
from .preprocessing import DataConfig

MAX_IMAGE_BYTES = 1 << 28  # a remote file larger than this is refused before its pixels are decoded
_CHUNK = 1 << 20
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
DEFAULT_MODEL = "convnext_tiny.fb_in1k"


def shown(text: str) -> str:
    """A file name, or a message holding one, as printable text: bytes of a name that are not
    UTF-8 (which Python keeps as lone surrogates) become backslash escapes such as \\xff."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def describe(exc: BaseException) -> str:
    """An error as the text a user needs: for an OS error, the file and the reason."""
    if isinstance(exc, OSError) and exc.strerror:
        named = isinstance(exc.filename, (str, bytes)) and exc.filename
        return f"{os.fsdecode(exc.filename)}: {exc.strerror}" if named else exc.strerror
    if isinstance(exc, MemoryError):
        return f"out of memory{f' ({exc})' if str(exc) else ''}"
    return str(exc) or type(exc).__name__


def failure(path: str, exc: BaseException) -> str:
    """'path: reason', printable, for an image that could not be read."""
    reason = shown(describe(exc))
    return reason if reason.startswith(shown(path)) else f"{shown(path)}: {reason}"


# ---- which files --------------------------------------------------------------------------------

def list_images(inputs: list[str], keep_missing: bool = False) -> list[str]:
    """The image files named by `inputs`, in a fixed order: a directory's images (by suffix,
    walked in sorted order), a file as it is, a glob pattern's matches (sorted; `**` recurses),
    and fsspec URLs (`file://`, `s3://`, ...) of any of these (then URLs, which the
    cluster's workers read through fsspec). A name that is none of these raises InputError,
    or with `keep_missing` stays in the list, to fail when it is read as an unreadable file does."""
    paths: list[str] = []
    for item in inputs:
        if "://" in item:
            paths += _remote_images(item)
        elif os.path.isdir(item):
            for root, _, files in sorted(os.walk(item)):
                paths += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_SUFFIXES)]
        elif os.path.exists(item):
            paths.append(item)
        elif glob.has_magic(item):
            matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not matches:
                raise InputError(f"{shown(item)}: no file matches")
            paths += matches
        elif keep_missing:
            paths.append(item)
        else:
            raise InputError(f"{shown(item)}: no such file or directory")
    if not paths:
        raise InputError("no images found in " + ", ".join(map(shown, inputs)))
    return paths


def _remote_images(url: str) -> list[str]:
    """The images under an fsspec URL (a directory, a glob or a file), as URLs; local ones as paths."""
    from fsspec.core import url_to_fs
    from fsspec.implementations.local import LocalFileSystem

    fs, root = url_to_fs(url)
    if fs.isdir(root):
        found = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_SUFFIXES))
    elif glob.has_magic(root):
        found = sorted(p for p in fs.glob(root) if fs.isfile(p))
        if not found:
            raise InputError(f"{shown(url)}: no file matches")
    elif fs.exists(root):
        found = [root]
    else:
        raise InputError(f"{shown(url)}: no such file or directory")
    return found if isinstance(fs, LocalFileSystem) else [fs.unstrip_protocol(p) for p in found]


# ---- the model ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """What builds the model, small enough to send to every worker (the weights are read there)."""
    model: str | None = None        # architecture or arch.tag; None with weights: read off the file
    weights: str | None = None      # a weight file every worker reads at this path; None: the tag's
    dtype: str = "float32"
    input_size: int | None = None   # overrides the crop size of the model's preprocessing


def load_model(spec: ModelSpec) -> tuple[ConvNeXt, DataConfig]:
    """The model and the preprocessing that gives it its input: the model's own data_config,
    from the weight file, the tag, or the architecture's first published tag (input_size
    overrides the size). With weights: the architecture read off the file unless `model` names it."""
    name = spec.model or DEFAULT_MODEL
    arch, _, tag = name.partition(".")
    if spec.weights:
        model = create_model(name if spec.model else None, weights=spec.weights, dtype=spec.dtype)
    else:
        model = create_model(arch, pretrained=tag or "fb_in1k", dtype=spec.dtype)
    config = model.data_config
    if spec.input_size:
        config = replace(config, input_size=(spec.input_size, spec.input_size))
    return model, config


def model_source(spec: ModelSpec, model: ConvNeXt) -> tuple[str, str]:
    """(the model's name, where its weights came from), as reports record them: arch.tag and the
    hub repo's file for a tag; the architecture (read off the file, unless named) and the file's
    absolute path for a weight file."""
    if spec.weights:
        return spec.model or model.config.name, os.path.abspath(spec.weights)
    arch, _, tag = (spec.model or DEFAULT_MODEL).partition(".")
    entry = pretrained_entry(f"{arch}.{tag or 'fb_in1k'}")
    return entry["name"], f"huggingface hub: {entry['hf_hub_id']}/{entry['file']}"


def class_labels(model: ConvNeXt) -> tuple[str, ...] | list[str] | None:
    """The classifier's label names: the weights' own, ImageNet's for 1000 classes, else None."""
    return model.class_names or (imagenet_labels() if model.config.num_classes == 1000 else None)


# ---- one batch ----------------------------------------------------------------------------------

def read_batch(paths: list[str], config: DataConfig) -> tuple[list[str], np.ndarray | None, dict[str, str]]:
    """(the paths read, their inputs stacked (N, 3, H, W) or None if none was, {path: failure})."""
    good, arrays, failed = [], [], {}
    for path in paths:
        try:
            arrays.append(_preprocess(path, config))
            good.append(path)
        except (ValueError, OSError, MemoryError) as exc:  # ValueError includes NpConvNeXtError
            failed[path] = failure(path, exc)
    return good, (np.stack(arrays) if arrays else None), failed


def _preprocess(path: str, config: DataConfig) -> np.ndarray:
    if "://" not in path:
        if not os.path.lexists(path):
            raise ImageError(f"{path}: no such file or directory")
        return preprocessing.preprocess(path, config)
    with fetched(path) as local:
        return preprocessing.preprocess(local, config)


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


def softmax(logits: np.ndarray) -> np.ndarray:
    """(N, K) -> (N, K), each row summing to one."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class Prediction:
    indices: list[int]         # the top-k classes, most probable first
    names: list[str]           # their labels ("class i" where the model has none)
    probabilities: list[float]


def classify(model: ConvNeXt, x: np.ndarray, top_k: int) -> list[Prediction]:
    """The top-k classes of each image of x (N, 3, H, W)."""
    labels = class_labels(model)
    outputs = model(x).astype(np.float64)                                       # (N, K)
    probs = outputs if model.convention.outputs == "probabilities" else softmax(outputs)
    predictions = []
    for p in probs:
        top = np.argsort(-p)[:top_k]
        predictions.append(Prediction([int(i) for i in top], [labels[i] if labels else f"class {i}" for i in top],
                                      [float(p[i]) for i in top]))
    return predictions


def classified_row(path: str, prediction: Prediction) -> dict:
    """The JSON object of one classified image (`classify --json` prints these)."""
    return {"file": shown(path), "labels": prediction.names, "indices": prediction.indices,
            "probabilities": [round(p, 6) for p in prediction.probabilities]}


def embed(model: ConvNeXt, x: np.ndarray) -> np.ndarray:
    """Pooled pre-logits embeddings. (N, 3, H, W) -> (N, D)"""
    return model.forward_head(model.forward_features(x), pre_logits=True)
