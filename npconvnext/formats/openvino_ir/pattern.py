"""Walking an OpenVINO IR's graph along the activation: a cursor that follows the layout
operations (Transposes tracked, Reshapes of unit axes), takes the next operation of a type, and
reads the constants an operation takes (per-channel vectors, weights), and the matchers of the
operations a ConvNeXt is built from: convolutions, the bias and scale an Add or Multiply
carries, LayerNorm as OpenVINO writes it, a linear layer as MatMul or 1x1 Convolution.

A constant taken as a float parameter must be a float in the file: an integer constant there
(a weight retyped to i32, say) is refused, as OpenVINO refuses it, rather than cast.
"""

from __future__ import annotations

import math

import numpy as np

from ...config import VARIANTS
from ...errors import CheckpointError
from .graph import ELEMENT_TYPES, Graph, Node, out_port

NORM_EPS = {cfg.norm_eps for cfg in VARIANTS.values()}


def float_parameter(value: np.ndarray, node: Node, what: str) -> np.ndarray:
    """`value` as float32, refusing an integer constant where a float parameter is taken."""
    if value.dtype.kind != "f":
        element_type = next((name for name, dtype in ELEMENT_TYPES.items() if dtype == value.dtype), value.dtype)
        raise CheckpointError(f"layer {node.id} ({node.type}): {what} is an integer constant ({element_type}), "
                              "where the network takes floats; refused rather than cast")
    return value.astype(np.float32, copy=False)


class Walk:
    """A cursor on the activation: its port, and where each NCHW axis sits in it (Transposes
    move axes; the network's constants are checked against the channel axis)."""

    def __init__(self, graph: Graph, source: tuple[str, str], axes: tuple[int, ...]):
        self.g, self.at, self.axes = graph, source, axes  # axes[k]: position of NCHW axis k
        self.channels: int | None = None  # the activation's channel count, where known
        self.pooled = False               # after the head's pooling: Reshapes only move unit axes

    @property
    def channel_axis(self) -> int:
        return self.axes[1]

    def fail(self, expected: str) -> CheckpointError:
        users = ", ".join(f"{n.type} (layer {n.id})" for n in self.g.users(self.at)) or "nothing"
        node = self.g.nodes[self.at[0]]
        return CheckpointError(f"not a ConvNeXt graph npconvnext reads: after {node.type} (layer {node.id}) "
                               f"expected {expected}, found {users}")

    def follow_layout(self) -> None:
        """Past Transposes (axes tracked) and Reshapes that only move unit axes."""
        while True:
            users = self.g.users(self.at)
            if len(users) != 1 or users[0].type not in ("Transpose", "Reshape", "Squeeze", "Unsqueeze"):
                return
            node = users[0]
            if node.type == "Transpose":
                perm = self.g.value(node.inputs[1])
                if perm is None or sorted(int(p) for p in np.ravel(perm)) != list(range(len(self.axes))):
                    raise self.fail("a Transpose by a constant permutation")
                perm = [int(p) for p in np.ravel(perm)]
                self.axes = tuple(perm.index(a) for a in self.axes)
            elif not (self.pooled and self._pooled_reshape(node)):
                return
            self.move(node)

    def _pooled_reshape(self, node: Node) -> bool:
        """A Reshape of a pooled (N, C, 1, 1)-like tensor: the channel axis is the one of size C
        after it (axis 0 stays the batch)."""
        dims = node.out_dims[out_port(node)[1]]
        channels = self.channels
        if channels is None or len(dims) < 2 or dims.count(channels) != 1 or dims.index(channels) == 0 \
                or any(d not in (1, -1) for i, d in enumerate(dims) if i not in (0, dims.index(channels))):
            return False
        c = dims.index(channels)
        rest = [i for i in range(len(dims)) if i != c]
        self.axes = (rest[0], c, *rest[1:]) if len(rest) >= 3 else (rest[0], c)
        return True

    def take(self, *types: str, skip_layout: bool = True) -> Node:
        """The next operation on the activation, of one of `types`; the cursor moves past it."""
        if skip_layout:
            self.follow_layout()
        found = [n for n in self.g.users(self.at) if n.type in types]
        if len(found) != 1:
            raise self.fail(" or ".join(types))
        self.move(found[0])
        return found[0]

    def move(self, node: Node) -> None:
        """The cursor onto `node`'s output, `node` taken as part of the network."""
        self.at = out_port(node)
        self.g.visited.add(node.id)

    def other(self, node: Node) -> tuple[str, str]:
        """The input of a two-input `node` that is not the activation it was reached from."""
        sources = [s for s in node.inputs if s != self.previous(node)]
        if len(node.inputs) != 2 or len(sources) != 1:
            raise CheckpointError(f"layer {node.id} ({node.type}): expected two inputs")
        return sources[0]

    def previous(self, node: Node) -> tuple[str, str]:
        for s in node.inputs:
            if self.g.value(s) is None:
                return s
        return node.inputs[0]

    def per_channel(self, node: Node, channels: int, what: str) -> np.ndarray:
        """The constant operand of `node`, one value per channel along the channel axis -> (C,)"""
        value = self.g.value(self.other(node))
        if value is None:
            raise CheckpointError(f"layer {node.id} ({node.type}): {what} is not a constant")
        rank = len(self.axes)
        value = float_parameter(value, node, what)
        if value.size == 1:
            return np.full(channels, float(value.ravel()[0]), np.float32)
        wide = [rank - value.ndim + k for k, n in enumerate(value.shape) if n != 1]
        if value.size != channels or wide != [self.channel_axis]:
            raise CheckpointError(f"layer {node.id} ({node.type}): {what} has shape {list(value.shape)}, "
                                  f"not one value for each of {channels} channels on axis {self.channel_axis}")
        return value.reshape(channels).astype(np.float32)

    def constant_input(self, node: Node, port: int, what: str) -> np.ndarray:
        value = self.g.value(node.inputs[port]) if len(node.inputs) > port else None
        if value is None:
            raise CheckpointError(f"layer {node.id} ({node.type}): {what} is not a constant")
        return float_parameter(value, node, what)


def attr(node: Node, name: str, expected: str, what: str) -> None:
    got = node.data.get(name, "").replace(" ", "")
    if got != expected:
        raise CheckpointError(f"layer {node.id} ({node.type}): {name} is {got[:30]!r}, "
                              f"a ConvNeXt {what} has {expected!r}")


def conv(w: Walk, kernel: int, stride: int, pad: int, what: str, group: bool = False) -> np.ndarray:
    """A (group) convolution on the activation -> its weights (out, in, k, k)."""
    node = w.take("GroupConvolution" if group else "Convolution")
    if w.axes[:2] != (0, 1):
        raise CheckpointError(f"layer {node.id}: the {what} convolution does not get an NCHW tensor")
    for name, value in (("strides", f"{stride},{stride}"), ("dilations", "1,1"),
                        ("pads_begin", f"{pad},{pad}"), ("pads_end", f"{pad},{pad}")):
        attr(node, name, value, what)
    weight = w.constant_input(node, 1, f"the {what} weight")
    if group:  # (C, 1, 1, k, k): C groups of one channel -> (C, 1, k, k)
        if weight.ndim != 5 or weight.shape[1:3] != (1, 1):
            raise CheckpointError(f"layer {node.id}: {what} weight of shape {list(weight.shape)} is not depthwise")
        weight = weight[:, 0]
    if weight.ndim != 4 or weight.shape[2:] != (kernel, kernel):
        raise CheckpointError(f"layer {node.id}: {what} weight of shape {list(weight.shape)}, expected "
                              f"{kernel}x{kernel} kernels")
    return weight


def affine(w: Walk, op: str, channels: int, what: str, neutral: float) -> np.ndarray:
    """The per-channel constant of the `op` (Add or Multiply) right after the activation, or
    `neutral` for each channel when there is none: OpenVINO drops an Add of zeros and a
    Multiply by ones."""
    users = w.g.users(w.at)
    if len(users) == 1 and users[0].type == op and any(w.g.value(s) is not None for s in users[0].inputs):
        return w.per_channel(w.take(op, skip_layout=False), channels, what)
    return np.full(channels, neutral, np.float32)


def bias(w: Walk, channels: int, what: str) -> np.ndarray:
    return affine(w, "Add", channels, f"the {what} bias", 0.0)


def layer_norm(w: Walk, channels: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """MVN over the channel axis, Multiply weight, Add bias -> (weight, bias)"""
    mvn = w.take("MVN")
    axes = w.g.value(mvn.inputs[1]) if len(mvn.inputs) > 1 else None
    rank = len(w.axes)
    if axes is None or sorted({int(a) % rank for a in np.ravel(axes)}) != [w.channel_axis]:
        raise CheckpointError(f"layer {mvn.id}: the {what} LayerNorm does not normalise over the channels only")
    attr(mvn, "normalize_variance", "true", f"{what} LayerNorm")
    attr(mvn, "eps_mode", "INSIDE_SQRT", f"{what} LayerNorm")
    eps = float(mvn.data.get("eps", "nan"))
    if not any(math.isclose(eps, e, rel_tol=1e-5) for e in NORM_EPS):
        raise CheckpointError(f"layer {mvn.id}: LayerNorm eps {eps}, ConvNeXt's is one of {sorted(NORM_EPS)}")
    weight = affine(w, "Multiply", channels, f"the {what} LayerNorm weight", 1.0)
    bias = affine(w, "Add", channels, f"the {what} LayerNorm bias", 0.0)
    return weight, bias


def linear(w: Walk, what: str) -> np.ndarray:
    """fc as a MatMul on channels-last or a 1x1 Convolution on NCHW -> weight (out, in)"""
    w.follow_layout()
    kinds = {n.type for n in w.g.users(w.at)}
    if "Convolution" in kinds:
        return conv(w, 1, 1, 0, what)[:, :, 0, 0]
    node = w.take("MatMul")
    if w.channel_axis != len(w.axes) - 1:
        raise CheckpointError(f"layer {node.id}: the {what} MatMul does not act on the channel axis")
    attr(node, "transpose_a", "false", what)
    weight = w.constant_input(node, 1, f"the {what} weight")
    if weight.ndim != 2:
        raise CheckpointError(f"layer {node.id}: {what} weight of shape {list(weight.shape)}")
    return weight if node.data.get("transpose_b") == "true" else weight.T
