"""Converting any supported checkpoint to a timm-named float32 safetensors file, safely.

The output is written atomically (atomic.py), so an interrupted or failed conversion leaves no
partial file, and an existing destination is never touched unless `force`.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from safetensors.numpy import save

from .atomic import atomic_write
from .errors import CheckpointError
from .formats import detect_naming, read_checkpoint, to_timm_names
from .params import detect_architecture
from .config import get_config
from .model import ConvNeXt


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert(src: str, dst: str, arch: str | None = None, force: bool = False) -> dict[str, str]:
    """Write `src` (any supported format) as timm-named float32 safetensors at `dst`.
    Returns the metadata written into the file."""
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.exists(dst) and not force:
        raise FileExistsError(f"{dst}: already exists; pass --force (force=True) to overwrite it")
    raw, container = read_checkpoint(src)
    naming = detect_naming(raw)
    try:
        state = to_timm_names(raw, get_config(arch) if arch else None)
    except CheckpointError as exc:
        raise CheckpointError(f"{src}: {exc}") from None
    config = get_config(arch, num_classes=state["head.fc.weight"].shape[0]) if arch else detect_architecture(state)
    # building the model checks every name and shape before anything is written
    model = ConvNeXt(config, state, dtype="float32", backend="numpy", source=src)
    tensors = model.state_dict()
    bad = [k for k, v in tensors.items() if not np.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{src}: {len(bad)} tensors hold NaN or Inf: {', '.join(bad[:10])}")
    metadata = {"architecture": config.name, "num_classes": str(config.num_classes),
                "source_sha256": sha256_of(src), "source_format": f"{container}/{naming}",
                "source_file": os.path.basename(src), "format": "pt", "converted_by": "npconvnext"}
    atomic_write(dst, save(tensors, metadata=metadata))
    return metadata
