"""Preprocessing inside an OpenVINO IR, and the input convention it tells.

Operations between the input and the stem (Gather or Split + Concat reversing the channels,
Subtract / Add a mean, Multiply / Divide a scale, a Transpose from NHWC) are composed into one
per-channel affine map of the input (`Stem`) and folded into the stem convolution, which is
exact (the stem has no padding); the stem is then unfolded again for the input convention
(convention.py) the model reports, so that timm-layout weights see timm-style normalised RGB
input. `restate_stem` re-expresses the stem for another convention without changing a single
output. How the convention is told from the operations is in the package's docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...convention import Convention
from ...errors import CheckpointError
from .graph import Node, out_port
from .pattern import Walk

IMAGENET_MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass
class Stem:
    """What comes before the network: the input's layout and the per-channel affine map the
    IR applies, t_k = scale_k * x[source_k] + shift_k (k: the channel the stem sees)."""
    layout: str = "NCHW"
    source: tuple[int, int, int] = (0, 1, 2)
    scale: np.ndarray = field(default_factory=lambda: np.ones(3))
    shift: np.ndarray = field(default_factory=lambda: np.zeros(3))
    had_shift: bool = False
    had_scale: bool = False


def preprocessing(w: Walk) -> Stem:
    """Past the operations between the input and the stem convolution, composed."""
    stem = Stem(layout="NCHW" if w.axes == (0, 1, 2, 3) else "NHWC")
    for _ in range(32):
        users = w.g.users(w.at)
        if len(users) != 1:
            raise w.fail("one operation on the input")
        node = users[0]
        if node.type == "Convolution":
            if w.axes != (0, 1, 2, 3):
                raise CheckpointError(f"layer {node.id}: the input reaches the stem with its axes moved to "
                                      f"{list(w.axes)}, not as NCHW")
            return stem
        if node.type == "Transpose":
            w.follow_layout()
            continue
        if node.type == "Convert":
            w.move(node)
            continue
        if node.type == "Gather":
            indices, axis = w.g.value(node.inputs[1]), w.g.value(node.inputs[2]) if len(node.inputs) > 2 else None
            order = [int(i) % 3 for i in np.ravel(indices) if -3 <= i < 3] if indices is not None else []
            if axis is None or int(np.ravel(axis)[0]) % 4 != w.channel_axis or sorted(order) != [0, 1, 2] \
                    or len(order) != np.size(indices):
                raise CheckpointError(f"layer {node.id}: a Gather on the input that is not a channel permutation")
            stem.source = tuple(stem.source[i] for i in order)
            stem.scale, stem.shift = stem.scale[order], stem.shift[order]
            w.move(node)
            continue
        if node.type in ("Split", "VariadicSplit"):
            w.at = split_concat(w, node, stem)
            w.g.visited.add(w.at[0])
            continue
        if node.type in ("Subtract", "Add", "Multiply", "Divide"):
            if w.g.value(node.inputs[0]) is not None and node.type in ("Subtract", "Divide"):
                raise CheckpointError(f"layer {node.id}: {node.type} of the input from a constant")
            value = w.per_channel(node, 3, f"the input's {node.type.lower()} value").astype(np.float64)
            if node.type in ("Multiply", "Divide") and not (value > 0).all():
                raise CheckpointError(f"layer {node.id}: the input is scaled by {value.tolist()}, not positive values")
            if node.type == "Subtract":
                stem.shift = stem.shift - value
            elif node.type == "Add":
                stem.shift = stem.shift + value
            else:
                factor = value if node.type == "Multiply" else 1.0 / value
                stem.scale, stem.shift = stem.scale * factor, stem.shift * factor
            stem.had_shift |= node.type in ("Subtract", "Add")
            stem.had_scale |= node.type in ("Multiply", "Divide")
            w.move(node)
            continue
        raise w.fail("the stem Convolution or input preprocessing (Gather, Subtract, Multiply, Divide, Transpose)")
    raise w.fail("the stem Convolution within 32 operations of the input")


def split_concat(w: Walk, split: Node, stem: Stem) -> tuple[str, str]:
    """Split into 3 channels + Concat in another order: a channel permutation."""
    axis = w.g.value(split.inputs[1])
    if axis is None or int(np.ravel(axis)[0]) % 4 != w.channel_axis:
        raise CheckpointError(f"layer {split.id}: a Split of the input not along its channels")
    parts = [(split.id, p) for p in split.out_dims]
    concats = {n.id for p in parts for n in w.g.users(p)}
    if len(parts) != 3 or len(concats) != 1:
        raise CheckpointError(f"layer {split.id}: a Split of the input that is not a channel permutation")
    concat = w.g.nodes[concats.pop()]
    if concat.type != "Concat" or len(concat.inputs) != 3 or int(concat.data.get("axis", "-9")) % 4 != w.channel_axis:
        raise CheckpointError(f"layer {concat.id}: the input's channels are not concatenated back")
    order = [parts.index(s) for s in concat.inputs]
    if sorted(order) != [0, 1, 2]:
        raise CheckpointError(f"layer {concat.id}: the input's channels are not a permutation")
    stem.source = tuple(stem.source[i] for i in order)
    stem.scale, stem.shift = stem.scale[order], stem.shift[order]
    w.g.visited.add(split.id)
    return out_port(concat)


def effective_stem(weight: np.ndarray, bias: np.ndarray, stem: Stem) -> tuple[np.ndarray, np.ndarray]:
    """The stem on the raw input: conv(W, t) + b with t_k = a_k x[s_k] + c_k is conv(W', x) + b'.
    weight (O, 3, 4, 4) -> (O, 3, 4, 4), float64"""
    weight = weight.astype(np.float64)
    raw = np.zeros_like(weight)
    for k, source in enumerate(stem.source):
        raw[:, source] += weight[:, k] * stem.scale[k]
    shift = (weight * stem.shift[None, :, None, None]).sum(axis=(1, 2, 3))  # no padding: exact everywhere
    return raw, bias.astype(np.float64) + shift


def _source_channels(convention: Convention) -> list[int]:
    return [2, 1, 0] if convention.channel_order == "BGR" else [0, 1, 2]


def for_convention(raw: np.ndarray, raw_bias: np.ndarray, convention: Convention) -> tuple[np.ndarray, np.ndarray]:
    """The stem weights that give conv(raw, x) + raw_bias on the network input that
    `convention` makes of x: y_c = (x[s_c] - M_c) / S_c, so W_c = raw[s_c] S_c and
    b = raw_bias + sum raw[s_c] M_c. -> float32 (O, 3, 4, 4), (O,)"""
    source = _source_channels(convention)
    mean = np.asarray(convention.mean if convention.normalises_inside else (0.0,) * 3, np.float64)
    std = np.asarray(convention.std if convention.normalises_inside else (1.0,) * 3, np.float64)
    ordered = raw[:, source]                                                  # (O, 3, 4, 4), channel c from x[s_c]
    weight = ordered * std[None, :, None, None]
    bias = raw_bias + (ordered * mean[None, :, None, None]).sum(axis=(1, 2, 3))
    return weight.astype(np.float32), bias.astype(np.float32)


def restate_stem(state: dict[str, np.ndarray], old: Convention, new: Convention) -> dict[str, np.ndarray]:
    """The same IR's weights for another input convention: the stem re-expressed so that the
    model computes exactly the same outputs from the same input (an IR holds its whole
    function; a convention only says how it splits between caller, model and stem)."""
    old_source = _source_channels(old)
    mean = np.asarray(old.mean if old.normalises_inside else (0.0,) * 3, np.float64)
    std = np.asarray(old.std if old.normalises_inside else (1.0,) * 3, np.float64)
    weight = np.asarray(state["stem.0.weight"], np.float64)
    raw = np.zeros_like(weight)
    raw[:, old_source] = weight / std[None, :, None, None]                    # inverse of _for_convention
    raw_bias = np.asarray(state["stem.0.bias"], np.float64) - (
        raw[:, old_source] * mean[None, :, None, None]).sum(axis=(1, 2, 3))
    out = dict(state)
    out["stem.0.weight"], out["stem.0.bias"] = for_convention(raw, raw_bias, new)
    return out


def _matches(values, reference, tol=1e-3) -> bool:
    return all(abs(v - r) <= tol * max(1.0, abs(r)) for v, r in zip(values, reference))


def convention_of(stem: Stem, softmax: bool) -> Convention:
    """What the IR's model takes, from its preprocessing operations (see the package's docstring)."""
    outputs = "probabilities" if softmax else "logits"
    order = "BGR" if stem.source == (2, 1, 0) else "RGB"
    if stem.source not in ((0, 1, 2), (2, 1, 0)):
        raise CheckpointError(f"the input's channels are permuted as {list(stem.source)}, neither RGB nor BGR")
    if not (stem.had_shift or stem.had_scale):
        return Convention(layout=stem.layout, channel_order=order, outputs=outputs,
                          source="the IR (no preprocessing operations before its first convolution; if some "
                                 "are folded into it, say what it takes with convention_override)")
    # t_k = a_k x[s_k] + c_k = (x[s_k] - M_k) / S_k, k in the network's (RGB) order
    std = tuple(float(1.0 / a) for a in stem.scale)
    mean = tuple(float(-c / a) for c, a in zip(stem.shift, stem.scale))
    if min(std) <= 0:
        raise CheckpointError(f"the input is scaled by {[float(a) for a in stem.scale]}: not positive")
    source = "the IR's preprocessing operations"
    if stem.had_shift and stem.source == (0, 1, 2):
        # OpenVINO's PrePostProcessor folds a channel reversal into the constants around it (the
        # mean and scale come out reversed) and save_model folds a scale into the stem: the
        # ImageNet mean (and std) times 255 in BGR order tell a BGR input
        for guess, m, s in (("RGB", IMAGENET_MEAN_255, IMAGENET_STD_255),
                            ("BGR", IMAGENET_MEAN_255[::-1], IMAGENET_STD_255[::-1])):
            if _matches(mean, m) and (not stem.had_scale or _matches(std, s)):
                told = (f"ImageNet's mean and std in {guess} order, so {guess} 0-255 input" if stem.had_scale else
                        f"ImageNet's mean in {guess} order, so {guess} 0-255 input; the scale folded into "
                        "the first convolution taken to be ImageNet's std")
                return Convention(layout=stem.layout, channel_order=guess, scale="255", mean=IMAGENET_MEAN_255,
                                  std=IMAGENET_STD_255, outputs=outputs,
                                  source=f"the IR's preprocessing operations: {told} (if the input is otherwise, "
                                         "say so with convention_override)")
    # no pixel range is recorded: values of the order of 100 mean 0-255 pixels
    scale = "255" if max(max(abs(m) for m in mean), max(std)) > 2.0 else "unit"
    return Convention(layout=stem.layout, channel_order=order, scale=scale, mean=mean, std=std,
                      outputs=outputs, source=source)
