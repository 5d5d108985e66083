"""Reference numbers for porters: golden files of every activation and layer-by-layer comparison.

A golden file is safetensors: "input" and every entry of `ConvNeXt.trace`, by timm module name,
with metadata (architecture, weights sha256 or seed, preprocessing, dtype): its provenance.
`traced_model` builds the model and input a golden file is made from and writes that metadata;
`golden_weights` reads it back, so that a comparison runs the weights the file was made with.
`compare` lines two traces up name by name; `timm_trace` produces timm's side with forward
hooks, importing torch and timm only when called (they are never needed otherwise).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import NamedTuple

import numpy as np

from .atomic import atomic_write
from .errors import CheckpointError, InputError
from .factory import create_model
from .formats import read_safetensors_with_metadata, sha256_of
from .formats.safetensors_writer import safetensors_chunks
from .model import ConvNeXt
from .preprocessing import DataConfig, preprocess

#: default tolerance by dtype, relative to each tensor's largest magnitude (the parity contract)
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}


class LayerError(NamedTuple):
    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float      # max |a - b| / max |b|, the scale-relative error the tolerances use
    ok: bool


def compare(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], tolerance: float) -> list[LayerError]:
    """Errors of every tensor in `expected` that `actual` has too, in `expected`'s order.
    A missing name or a shape mismatch is a failing row."""
    rows = []
    for name, ref in expected.items():
        got = actual.get(name)
        if got is None or got.shape != ref.shape:
            rows.append(LayerError(name, tuple(ref.shape), float("inf"), float("inf"), False))
            continue
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        max_rel = max_abs / scale if scale else max_abs
        rows.append(LayerError(name, tuple(ref.shape), max_abs, max_rel, max_rel <= tolerance))
    return rows


def format_table(rows: list[LayerError], tolerance: float) -> str:
    lines = [f"{'layer':<34} {'shape':>20} {'max abs':>10} {'max rel':>10}"]
    for r in rows:
        lines.append(f"{r.name:<34} {str(r.shape):>20} {r.max_abs:10.3e} {r.max_rel:10.3e}{'' if r.ok else '  FAIL'}")
    first = next((r for r in rows if not r.ok), None)
    worst = max(rows, key=lambda r: r.max_rel)
    lines.append(f"{len(rows)} tensors; worst {worst.name} {worst.max_rel:.3e}; tolerance {tolerance:g}; "
                 + (f"first past it: {first.name}" if first else "all within"))
    return "\n".join(lines)


def write_golden(trace: dict[str, np.ndarray], path: str, metadata: dict[str, str]) -> None:
    """Write a trace as safetensors, atomically (see atomic.py), the same bytes for the same trace."""
    atomic_write(path, safetensors_chunks(trace, {k: str(v) for k, v in metadata.items()}))


def read_golden(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors (read-only views of the memory-mapped file) and metadata of a golden file."""
    tensors, metadata = read_safetensors_with_metadata(path)
    if "input" not in tensors:
        del tensors  # the error must not keep the file mapped
        raise CheckpointError(f"{path}: not a golden file (no 'input' tensor)")
    return tensors, metadata


def traced_model(model: str | None, weights: str | None, dtype: str, weight_seed: int | None, seed: int,
                 input_size: int, image: str | None = None) -> tuple[ConvNeXt, np.ndarray, dict[str, str]]:
    """The model, its input (1, 3, H, W) and the golden metadata saying how both were made:
    the weight file (its sha256) or npconvnext's random weights (their seed, default 0); the
    photo `image` through timm's eval preprocessing, or a standard normal input drawn with `seed`."""
    name = model or "convnext_tiny"
    arch = name.split(".")[0]
    if weights:
        net = create_model(arch if model else None, weights=weights, dtype=dtype)
        meta = {"weights_sha256": sha256_of(weights)}
    else:
        weight_seed = weight_seed if weight_seed is not None else 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = create_model(arch, dtype=dtype, seed=weight_seed)
        meta = {"weights": f"npconvnext random_state_dict seed {weight_seed}", "weight_seed": str(weight_seed)}
    config = DataConfig()
    if image:
        x = preprocess(image, config)[None].astype(dtype)
        meta.update(input=f"image {os.path.basename(image)}", preprocessing=json.dumps(config.__dict__))
    else:
        x = np.random.default_rng(seed).standard_normal((1, 3, input_size, input_size)).astype(dtype)
        meta.update(input=f"standard normal, numpy default_rng({seed})")
    meta.update(architecture=net.config.name, dtype=dtype)
    return net, x, meta


def golden_weights(golden: str, metadata: dict[str, str], weights: str | None, weight_seed: int | None) -> int | None:
    """The random-weights seed to compare with the golden file at `golden`, as its metadata
    records the weights it was made with: a weight file's sha256 (then `weights` must be that
    file; `weight_seed` is returned as given) or npconvnext's random-weights seed (then no
    `weights`, and `weight_seed` None or that seed). A golden that records neither needs `weights`.
    Raises InputError where the weights given are not the golden's."""
    recorded = metadata.get("weights_sha256")
    seed_text = metadata.get("weight_seed")
    if seed_text is None:  # golden files written before weight_seed was recorded on its own
        match = re.fullmatch(r"npconvnext random_state_dict seed (\d+)", metadata.get("weights", ""))
        seed_text = match and match.group(1)
    if recorded:
        if not weights:
            raise InputError(f"{golden}: was made with the weight file of sha256 {recorded}; pass that "
                             "file with --weights")
        actual = sha256_of(weights)
        if actual != recorded:
            raise InputError(f"{weights}: sha256 {actual} is not that of the weights "
                             f"{golden} was made with ({recorded})")
    elif seed_text:
        seed = int(seed_text)
        if weights:
            raise InputError(f"{golden}: was made with npconvnext's random weights (seed {seed}), "
                             "not a weight file: drop --weights")
        if weight_seed is not None and weight_seed != seed:
            raise InputError(f"{golden}: was made with random-weights seed {seed}, not "
                             f"--weight-seed {weight_seed}")
        return seed
    elif not weights:
        raise InputError(f"{golden}: its metadata does not say which weights made it (no weights_sha256 "
                         "or weight_seed); pass them with --weights")
    return weight_seed


def timm_trace(model, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """timm's activations for `model`'s weights and input x, through forward hooks on the
    modules `names` lists (the keys of `model.trace(x)`). Each is timm's own module output, so a
    correct model never fails: "layer_scale", which timm computes inline, is the output of the
    block's drop_path (an identity at inference) that it goes through, not block output minus
    block input (which loses every digit when the layer scale is small, 1e-6 at timm's init)."""
    import timm
    import torch

    config = model.config
    net = timm.create_model(config.name, pretrained=False, num_classes=config.num_classes).eval()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    net = net.to(torch.float64 if model.dtype == np.float64 else torch.float32)
    wanted = set(names)
    out: dict[str, np.ndarray] = {"input": np.asarray(x, dtype=model.dtype)}
    hooks = []
    for name, module in net.named_modules():
        block, _, leaf = name.rpartition(".")
        key = f"{block}.layer_scale" if leaf == "drop_path" else name
        if key in wanted:
            hooks.append(module.register_forward_hook(
                lambda m, args, result, key=key: out.__setitem__(key, result.detach().numpy().copy())))
    with torch.no_grad():
        net(torch.from_numpy(np.asarray(x, dtype=model.dtype)))
    for h in hooks:
        h.remove()
    return {name: out[name] for name in names if name in out}
