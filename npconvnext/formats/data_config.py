"""What a weight file says beyond its weights: the evaluation preprocessing (in its own metadata,
or beside it as timm's hub repos keep it, `config.json`) and the class names."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from ..errors import CheckpointError
from ..preprocessing import TIMM_FIELDS, DataConfig, from_timm_cfg
from .guard import open_weight_file
from .registry import HEAD_BYTES
from .safetensors import read_safetensors_with_metadata, recognises


def _metadata(path: str) -> Mapping[str, str]:
    """A safetensors file's metadata; other formats have none (none of them starts like one)."""
    if os.path.isdir(path):
        return {}
    with open_weight_file(path) as f:
        head = f.read(HEAD_BYTES)
    return read_safetensors_with_metadata(path)[1] if recognises(head, path) else {}


def data_config_for_weights(path: str | os.PathLike) -> DataConfig | None:
    """The evaluation preprocessing that a weight file carries, or None when nothing says.
    See `data_config_from`."""
    path = os.fspath(path)
    return data_config_from(path, _metadata(path))


def data_config_from(path: str, metadata: Mapping[str, str]) -> DataConfig | None:
    """The preprocessing of the weight file at `path` whose metadata is `metadata`, or None.

    Looked for, in order: the metadata key "data_config" (a JSON object with timm's
    pretrained-config fields: input_size [3, H, W], crop_pct, crop_mode, interpolation, mean,
    std); then the "pretrained_cfg" of a timm `config.json` beside the file, as timm's hub
    repos keep it. A file a user converted or fine-tuned at 384 pixels is thus evaluated at 384.
    """
    cfg, source = None, path
    text = metadata.get("data_config")
    if text is not None:
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: metadata data_config is not valid JSON ({exc})") from None
    if cfg is None:
        source = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
        try:
            with open(source, "rb") as f:  # bounded: label names make it large, never this large
                cfg = json.loads(f.read(64 << 20)).get("pretrained_cfg")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{source}: cannot read timm's pretrained_cfg ({exc})") from None
    if not isinstance(cfg, dict) or not any(cfg.get(k) is not None for k in TIMM_FIELDS):
        return None
    try:
        return from_timm_cfg(cfg)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: {exc}") from None


def class_names_from(path: str, metadata: Mapping[str, str]) -> tuple[str, ...] | None:
    """The metadata's "class_names" (a JSON list, as `npconvnext finetune` writes them), or None."""
    text = metadata.get("class_names")
    if text is None:
        return None
    try:
        names = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: metadata class_names is not valid JSON ({exc})") from None
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise CheckpointError(f"{path}: metadata class_names is not a list of names")
    return tuple(names)
