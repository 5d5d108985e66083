"""OpenVINO IR (`model.xml` + `model.bin`, IR v10 and v11), read without OpenVINO.

Tested on IR v11 as OpenVINO 2026 writes it; v10 files are taken when they use the same operations.

The `.xml` is the graph: `<layers>` of typed operations (Parameter, Const, Convolution, MVN,
MatMul, ...) joined by `<edges>` from an output port to an input port; a Const's values lie in
the `.bin` beside it (same stem), at the byte `offset` and `size` its `<data>` gives. FP16
compressed IRs store every large constant as f16 followed by a Convert to f32.

Converters do not keep module names, so the parameters are found by the graph's structure: the
reader walks from the input through the operations a ConvNeXt is made of and takes each
constant from the place it feeds, as `openvino.convert_model` writes them from a timm model
(directly or through ONNX):
    stem          Convolution 4x4 stride 4, Add bias, LayerNorm
    block         GroupConvolution 7x7, Add bias, LayerNorm, fc1 (MatMul or 1x1 Convolution) + Add,
                  Gelu (erf), [GRN (V2): ReduceL2, ReduceMean, Add eps, Divide, Multiply x, Multiply
                  weight, Add bias, Add x], fc2 + Add, [layer scale Multiply], residual Add
    downsample    LayerNorm, Convolution 2x2 stride 2, Add bias
    head          ReduceMean over H, W, LayerNorm, MatMul + Add, [SoftMax]
A LayerNorm is MVN (normalize_variance, eps inside the sqrt, over the channel axis), Multiply
weight, Add bias: what OpenVINO makes of timm's LayerNorm on both paths (through ONNX at
opsets 11, 14 and the exporter's default alike). Transposes and Reshapes between operations only move axes, and are followed.
OpenVINO folds the layer scale into fc2 where no Transpose is between (gamma then reads as 1:
the same numbers), and drops an Add of zeros or a Multiply by ones (read as zeros and ones).
Every operation on the input must be one the walk took, so nothing the graph computes is left out.

Preprocessing built into the IR stays part of the model. Operations between the input and the
stem (Gather or Split + Concat reversing the channels, Subtract / Add a mean, Multiply / Divide a
scale, a Transpose from NHWC) are composed into one per-channel affine map of the input and
folded into the stem convolution, which is exact (the stem has no padding); the stem is then
unfolded again for the input convention (convention.py) the model reports, so that timm-layout
weights see timm-style normalised RGB input. The convention is:
    - read off those operations when they are there (reversal: BGR; mean and scale inside);
    - when some were folded, the file cannot tell all: OpenVINO's PrePostProcessor folds a
      channel reversal into the constants around it (the mean and scale come out reversed, the
      stem's input channels too) and save_model folds a scale into an NCHW stem, keeping only a
      Subtract of the mean. A mean (and scale) equal to ImageNet's times 255 in either channel
      order is taken to mean 0-255 input in that order with ImageNet's std (what the Open Model
      Zoo converter adds); anything else is taken as it stands. With nothing before the stem,
      the input is taken to be timm's (normalised by the caller).
    - the caller says otherwise with create_model(convention_override=...), which re-expresses
      the stem for that convention without changing a single output (`restate_stem`); so does
      `npconvnext.convert.convert(..., convention=...)` for the timm file it writes.
    - probabilities when the graph ends in a SoftMax (the Open Model Zoo's "probs").

Hostile files: the XML is bounded in size before parsing and refused if it declares a DOCTYPE
or entities (nothing is fetched, nothing expands); every constant is checked against its shape
and the `.bin`'s size before it is read; non-finite weights (an FP16 overflow) are refused.
"""

from __future__ import annotations

import math
import os
import re
import stat
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import numpy as np

from ..config import VARIANTS
from ..convention import Convention
from ..errors import CheckpointError
from ..params import detect_architecture, expected_shapes
from .guard import open_weight_file, reading
from .registry import Reading, WeightFormat

NAME = "openvino-ir"
_MAX_XML = 16 << 20           # an IR's graph description; a ConvNeXt's is a few megabytes at most
_MAX_ELEMENTS = 1 << 31       # a constant larger than this is refused before reading
_READ_SLACK = 16 << 20        # constants may share bytes (OpenVINO stores equal ones once): reads
                              # past twice the .bin plus this are refused
_ELEMENT_TYPES = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "i64": np.dtype("<i8"),
                  "i32": np.dtype("<i4"), "f64": np.dtype("<f8")}
IMAGENET_MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)
_EPS = {cfg.norm_eps for cfg in VARIANTS.values()}


# ---- the graph ------------------------------------------------------------------------------


@dataclass
class _Node:
    id: str
    type: str
    data: dict[str, str]
    inputs: list[tuple[str, str]] = field(default_factory=list)   # (source node, source port) by input port
    out_dims: dict[str, tuple[int, ...]] = field(default_factory=dict)  # output port -> dims (-1 dynamic)


class _Graph:
    """The parsed XML with its `.bin`, constants read on demand and checked."""

    def __init__(self, xml_path: str, bin_path: str):
        self.xml_path, self.bin_path = xml_path, bin_path
        self.nodes, self.consumers = _parse(_read_xml(xml_path))
        self._bin = None
        self._bin_size = 0
        self._values: dict[tuple[str, str], np.ndarray | None] = {}
        self._bytes_read = 0  # over all constants: many layers may name the same bytes of the .bin
        self.visited: set[str] = set()  # the operations the walk has taken as part of the network

    def __enter__(self):
        try:
            self._bin = open_weight_file(self.bin_path)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc} (the weights of {self.xml_path}: a .bin beside it, same name)") from None
        self._bin_size = os.fstat(self._bin.fileno()).st_size
        return self

    def __exit__(self, *exc):
        self._bin.close()

    def users(self, source: tuple[str, str]) -> list[_Node]:
        return [self.nodes[n] for n in self.consumers.get(source, [])]

    def value(self, source: tuple[str, str]) -> np.ndarray | None:
        """The constant at an output port, folding small constant subgraphs (Convert from f16,
        Reshape, Transpose, arithmetic); None when the port depends on the input."""
        if source not in self._values:
            self._values[source] = None  # a cycle in a hostile graph reads as "not constant"
            self._values[source] = self._evaluate(self.nodes[source[0]])
        return self._values[source]

    def _evaluate(self, node: _Node) -> np.ndarray | None:
        if node.type == "Const":
            return self._const(node)
        if node.type not in _CONST_OPS or not node.inputs:
            return None
        args = []
        for src in node.inputs:  # stops at the first input that depends on the network's input
            args.append(self.value(src))
            if args[-1] is None:
                return None
        try:
            _check_growth(node, args)
            return _CONST_OPS[node.type](node, *args)
        except (ValueError, IndexError, TypeError, KeyError) as exc:
            raise CheckpointError(f"layer {node.id} ({node.type}) does not compute on its constants: {exc}") from None

    def _const(self, node: _Node) -> np.ndarray:
        d = node.data
        dtype = _ELEMENT_TYPES.get(d.get("element_type", ""))
        if dtype is None:
            raise CheckpointError(f"Const layer {node.id} has element type {d.get('element_type')!r}, "
                                  f"not one of {sorted(_ELEMENT_TYPES)}")
        shape = _dims(d.get("shape", ""), f"Const layer {node.id}", allow_dynamic=False)
        count = math.prod(shape)
        offset, size = _int(d.get("offset"), node), _int(d.get("size"), node)
        if count > _MAX_ELEMENTS or size != count * dtype.itemsize:
            raise CheckpointError(f"Const layer {node.id}: {size} bytes cannot hold a {d.get('element_type')} "
                                  f"tensor of shape {list(shape)}")
        if offset + size > self._bin_size:
            raise CheckpointError(f"Const layer {node.id} lies at bytes {offset}-{offset + size} of {self.bin_path}, "
                                  f"which holds {self._bin_size}: truncated, or not this IR's weights")
        self._bytes_read += size
        if self._bytes_read > 2 * self._bin_size + _READ_SLACK:
            raise CheckpointError(f"its constants read {self._bytes_read} bytes from the {self._bin_size}-byte "
                                  f"{self.bin_path}: layers share bytes far beyond what a network does")
        self._bin.seek(offset)
        raw = self._bin.read(size)
        if len(raw) != size:
            raise CheckpointError(f"{self.bin_path}: ends inside Const layer {node.id}")
        array = np.frombuffer(raw, dtype).reshape(shape)
        if dtype.kind == "f" and not np.isfinite(array).all():
            raise CheckpointError(f"Const layer {node.id} ({d.get('element_type')} {list(shape)}) holds NaN or "
                                  "infinite values (an FP16 conversion out of range?)")
        return array


def _int(text: str | None, node: _Node) -> int:
    if text is None or not text.isdigit() or len(text) > 19:
        raise CheckpointError(f"Const layer {node.id}: offset and size must be byte counts, got {text!r}")
    return int(text)


def _dims(text: str, what: str, allow_dynamic: bool = True) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    dims = []
    for p in parts:
        if allow_dynamic and (p in ("?", "-1") or re.fullmatch(r"\d{0,12}\.\.\d{0,12}", p)):
            dims.append(-1)  # dynamic, or an interval "1..8"
        elif p.isdigit() and len(p) <= 12:
            dims.append(int(p))
        else:
            raise CheckpointError(f"{what}: bad dimension {p[:20]!r}")
    if len(dims) > 8:
        raise CheckpointError(f"{what}: {len(dims)} dimensions")
    return tuple(dims)


def _check_growth(node: _Node, args: list[np.ndarray]) -> None:
    """Folding never makes a constant larger than its largest input in a real IR; a hostile one
    could broadcast two long vectors into an enormous matrix."""
    if node.type in ("Multiply", "Divide", "Add", "Subtract"):
        size = math.prod(np.broadcast_shapes(*(a.shape for a in args)))
    elif node.type == "Gather":
        size = args[0].size // max(1, args[0].shape[int(np.ravel(args[2])[0])]) * args[1].size
    else:
        return
    if size > max(a.size for a in args):
        raise CheckpointError(f"layer {node.id} ({node.type}) would make a constant of {size} values from "
                              "smaller ones; refused")


def _reshape(node, data, shape):
    shape = [int(s) for s in np.ravel(shape)]
    if node.data.get("special_zero") == "true":
        shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return data.reshape(shape)


def _unsqueeze(node, data, axes):
    out = data
    for axis in sorted(int(a) % (data.ndim + np.size(axes)) for a in np.ravel(axes)):
        out = np.expand_dims(out, axis)
    return out


_CONST_OPS = {
    "Convert": lambda node, a: a.astype(_ELEMENT_TYPES[node.data.get("destination_type")]),
    "Reshape": _reshape,
    "Unsqueeze": _unsqueeze,
    "Squeeze": lambda node, a, axes=None: np.squeeze(a, tuple(int(x) for x in np.ravel(axes))),
    "Transpose": lambda node, a, perm: a.transpose([int(p) for p in np.ravel(perm)]),
    "Multiply": lambda node, a, b: a * b,
    "Divide": lambda node, a, b: a / b,
    "Add": lambda node, a, b: a + b,
    "Subtract": lambda node, a, b: a - b,
    "Gather": lambda node, a, idx, axis: np.take(a, idx.astype(np.int64), int(np.ravel(axis)[0])),
}


def _read_xml(path: str) -> ET.Element:
    with open_weight_file(path) as f:
        text = f.read(_MAX_XML + 1)
    if len(text) > _MAX_XML:
        raise CheckpointError(f"the graph is over {_MAX_XML >> 20} MB; refused")
    try:
        text = text.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError("the graph is not UTF-8 text") from None
    declaration = re.match(r"\s*<\?xml[^>]*encoding\s*=\s*[\"']([^\"']*)", text)
    if declaration and declaration.group(1).lower().replace("-", "") not in ("utf8", "ascii", "usascii"):
        raise CheckpointError(f"the graph declares encoding {declaration.group(1)[:20]!r}; IRs are UTF-8")
    if "<!DOCTYPE" in text.upper() or "<!ENTITY" in text.upper():
        # IRs never declare them; an entity can expand without bound or name an outside file
        raise CheckpointError("the graph declares a DOCTYPE or entities, which an IR never does; refused")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise CheckpointError(f"the graph is not well-formed XML ({exc})") from None
    if root.tag != "net" or root.get("version") not in ("10", "11"):
        raise CheckpointError(f"not an OpenVINO IR v10/v11 graph (root <{root.tag[:20]}> "
                              f"version {str(root.get('version'))[:10]!r})")
    return root


def _parse(root: ET.Element) -> tuple[dict[str, _Node], dict[tuple[str, str], list[str]]]:
    layers, edges = root.find("layers"), root.find("edges")
    if layers is None or edges is None:
        raise CheckpointError("the graph has no <layers> or no <edges>")
    nodes: dict[str, _Node] = {}
    for layer in layers:
        lid = layer.get("id")
        if lid is None or lid in nodes:
            raise CheckpointError(f"a layer with a missing or repeated id {str(lid)[:20]!r}")
        data = layer.find("data")
        node = _Node(lid, str(layer.get("type")), dict(data.attrib) if data is not None else {})
        output = layer.find("output")
        for port in (output if output is not None else []):
            node.out_dims[str(port.get("id"))] = tuple(
                -1 if (d.text or "").strip() in ("?", "-1") else int(d.text) if (d.text or "").strip().isdigit() else -1
                for d in port.findall("dim"))
        nodes[lid] = node
    inputs: dict[str, dict[int, tuple[str, str]]] = {}
    consumers: dict[tuple[str, str], list[str]] = {}
    for edge in edges:
        src, src_port, dst, dst_port = (edge.get(k) for k in ("from-layer", "from-port", "to-layer", "to-port"))
        if src not in nodes or dst not in nodes or not str(dst_port).isdigit():
            raise CheckpointError(f"an edge joins unknown layers ({str(src)[:20]} -> {str(dst)[:20]})")
        if int(dst_port) in inputs.setdefault(dst, {}):
            raise CheckpointError(f"layer {dst} has two edges into its input port {dst_port}")
        inputs[dst][int(dst_port)] = (src, str(src_port))
        consumers.setdefault((src, str(src_port)), []).append(dst)
    for lid, ports in inputs.items():
        nodes[lid].inputs = [ports[p] for p in sorted(ports)]
    _check_acyclic(nodes, consumers)
    return nodes, consumers


def _check_acyclic(nodes: dict[str, _Node], consumers: dict[tuple[str, str], list[str]]) -> None:
    """Refuse a graph with a cycle (every walk below assumes none): Kahn's order must reach
    every layer."""
    waiting = {lid: len(node.inputs) for lid, node in nodes.items()}  # input edges not yet reached
    successors: dict[str, list[str]] = {}
    for (src, _), dsts in consumers.items():
        successors.setdefault(src, []).extend(dsts)
    ready = [lid for lid, count in waiting.items() if count == 0]
    reached = 0
    while ready:
        lid = ready.pop()
        reached += 1
        for dst in successors.get(lid, ()):
            waiting[dst] -= 1
            if waiting[dst] == 0:
                ready.append(dst)
    if reached != len(nodes):
        raise CheckpointError(f"the graph has a cycle ({len(nodes) - reached} layers on or after it)")


# ---- walking the network ----------------------------------------------------------------------


def _out(node: _Node) -> tuple[str, str]:
    """The (single) data output port of a node: the one after its inputs."""
    ports = list(node.out_dims)
    if len(ports) != 1:
        raise CheckpointError(f"layer {node.id} ({node.type}) has {len(ports)} outputs, expected one")
    return node.id, ports[0]


class _Walk:
    """A cursor on the activation: its port, and where each NCHW axis sits in it (Transposes
    move axes; the network's constants are checked against the channel axis)."""

    def __init__(self, graph: _Graph, source: tuple[str, str], axes: tuple[int, ...]):
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

    def _pooled_reshape(self, node: _Node) -> bool:
        """A Reshape of a pooled (N, C, 1, 1)-like tensor: the channel axis is the one of size C
        after it (axis 0 stays the batch)."""
        dims = node.out_dims[_out(node)[1]]
        channels = self.channels
        if channels is None or len(dims) < 2 or dims.count(channels) != 1 or dims.index(channels) == 0 \
                or any(d not in (1, -1) for i, d in enumerate(dims) if i not in (0, dims.index(channels))):
            return False
        c = dims.index(channels)
        rest = [i for i in range(len(dims)) if i != c]
        self.axes = (rest[0], c, *rest[1:]) if len(rest) >= 3 else (rest[0], c)
        return True

    def take(self, *types: str, skip_layout: bool = True) -> _Node:
        """The next operation on the activation, of one of `types`; the cursor moves past it."""
        if skip_layout:
            self.follow_layout()
        found = [n for n in self.g.users(self.at) if n.type in types]
        if len(found) != 1:
            raise self.fail(" or ".join(types))
        self.move(found[0])
        return found[0]

    def move(self, node: _Node) -> None:
        """The cursor onto `node`'s output, `node` taken as part of the network."""
        self.at = _out(node)
        self.g.visited.add(node.id)

    def other(self, node: _Node) -> tuple[str, str]:
        """The input of a two-input `node` that is not the activation it was reached from."""
        sources = [s for s in node.inputs if s != self.previous(node)]
        if len(node.inputs) != 2 or len(sources) != 1:
            raise CheckpointError(f"layer {node.id} ({node.type}): expected two inputs")
        return sources[0]

    def previous(self, node: _Node) -> tuple[str, str]:
        for s in node.inputs:
            if self.g.value(s) is None:
                return s
        return node.inputs[0]

    def per_channel(self, node: _Node, channels: int, what: str) -> np.ndarray:
        """The constant operand of `node`, one value per channel along the channel axis -> (C,)"""
        value = self.g.value(self.other(node))
        if value is None:
            raise CheckpointError(f"layer {node.id} ({node.type}): {what} is not a constant")
        rank = len(self.axes)
        if value.size == 1:
            return np.full(channels, float(value.ravel()[0]), np.float32)
        wide = [rank - value.ndim + k for k, n in enumerate(value.shape) if n != 1]
        if value.size != channels or wide != [self.channel_axis]:
            raise CheckpointError(f"layer {node.id} ({node.type}): {what} has shape {list(value.shape)}, "
                                  f"not one value for each of {channels} channels on axis {self.channel_axis}")
        return value.reshape(channels).astype(np.float32)

    def constant_input(self, node: _Node, port: int, what: str) -> np.ndarray:
        value = self.g.value(node.inputs[port]) if len(node.inputs) > port else None
        if value is None:
            raise CheckpointError(f"layer {node.id} ({node.type}): {what} is not a constant")
        return value.astype(np.float32, copy=False)


def _attr(node: _Node, name: str, expected: str, what: str) -> None:
    got = node.data.get(name, "").replace(" ", "")
    if got != expected:
        raise CheckpointError(f"layer {node.id} ({node.type}): {name} is {got[:30]!r}, "
                              f"a ConvNeXt {what} has {expected!r}")


def _conv(w: _Walk, kernel: int, stride: int, pad: int, what: str, group: bool = False) -> np.ndarray:
    """A (group) convolution on the activation -> its weights (out, in, k, k)."""
    node = w.take("GroupConvolution" if group else "Convolution")
    if w.axes[:2] != (0, 1):
        raise CheckpointError(f"layer {node.id}: the {what} convolution does not get an NCHW tensor")
    for name, value in (("strides", f"{stride},{stride}"), ("dilations", "1,1"),
                        ("pads_begin", f"{pad},{pad}"), ("pads_end", f"{pad},{pad}")):
        _attr(node, name, value, what)
    weight = w.constant_input(node, 1, f"the {what} weight")
    if group:  # (C, 1, 1, k, k): C groups of one channel -> (C, 1, k, k)
        if weight.ndim != 5 or weight.shape[1:3] != (1, 1):
            raise CheckpointError(f"layer {node.id}: {what} weight of shape {list(weight.shape)} is not depthwise")
        weight = weight[:, 0]
    if weight.ndim != 4 or weight.shape[2:] != (kernel, kernel):
        raise CheckpointError(f"layer {node.id}: {what} weight of shape {list(weight.shape)}, expected "
                              f"{kernel}x{kernel} kernels")
    return weight


def _affine(w: _Walk, op: str, channels: int, what: str, neutral: float) -> np.ndarray:
    """The per-channel constant of the `op` (Add or Multiply) right after the activation, or
    `neutral` for each channel when there is none: OpenVINO drops an Add of zeros and a
    Multiply by ones."""
    users = w.g.users(w.at)
    if len(users) == 1 and users[0].type == op and any(w.g.value(s) is not None for s in users[0].inputs):
        return w.per_channel(w.take(op, skip_layout=False), channels, what)
    return np.full(channels, neutral, np.float32)


def _bias(w: _Walk, channels: int, what: str) -> np.ndarray:
    return _affine(w, "Add", channels, f"the {what} bias", 0.0)


def _layer_norm(w: _Walk, channels: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """MVN over the channel axis, Multiply weight, Add bias -> (weight, bias)"""
    mvn = w.take("MVN")
    axes = w.g.value(mvn.inputs[1]) if len(mvn.inputs) > 1 else None
    rank = len(w.axes)
    if axes is None or sorted({int(a) % rank for a in np.ravel(axes)}) != [w.channel_axis]:
        raise CheckpointError(f"layer {mvn.id}: the {what} LayerNorm does not normalise over the channels only")
    _attr(mvn, "normalize_variance", "true", f"{what} LayerNorm")
    _attr(mvn, "eps_mode", "INSIDE_SQRT", f"{what} LayerNorm")
    eps = float(mvn.data.get("eps", "nan"))
    if not any(math.isclose(eps, e, rel_tol=1e-5) for e in _EPS):
        raise CheckpointError(f"layer {mvn.id}: LayerNorm eps {eps}, ConvNeXt's is one of {sorted(_EPS)}")
    weight = _affine(w, "Multiply", channels, f"the {what} LayerNorm weight", 1.0)
    bias = _affine(w, "Add", channels, f"the {what} LayerNorm bias", 0.0)
    return weight, bias


def _linear(w: _Walk, what: str) -> np.ndarray:
    """fc as a MatMul on channels-last or a 1x1 Convolution on NCHW -> weight (out, in)"""
    w.follow_layout()
    kinds = {n.type for n in w.g.users(w.at)}
    if "Convolution" in kinds:
        return _conv(w, 1, 1, 0, what)[:, :, 0, 0]
    node = w.take("MatMul")
    if w.channel_axis != len(w.axes) - 1:
        raise CheckpointError(f"layer {node.id}: the {what} MatMul does not act on the channel axis")
    _attr(node, "transpose_a", "false", what)
    weight = w.constant_input(node, 1, f"the {what} weight")
    if weight.ndim != 2:
        raise CheckpointError(f"layer {node.id}: {what} weight of shape {list(weight.shape)}")
    return weight if node.data.get("transpose_b") == "true" else weight.T


def _grn(w: _Walk, hidden: int) -> tuple[np.ndarray, np.ndarray] | None:
    """ConvNeXt-V2's global response norm after the GELU, if there, -> (weight, bias):
    y = x + bias + weight * x * n, n = g / (mean_c(g) + eps), g = ||x||_2 over H, W."""
    x = w.at
    users = w.g.users(x)
    if not any(n.type == "ReduceL2" for n in users):
        return None
    l2 = [n for n in users if n.type == "ReduceL2"][0]
    l2_axes = w.g.value(l2.inputs[1])
    spatial = sorted(w.axes[2:])
    if l2_axes is None or sorted(int(a) % len(w.axes) for a in np.ravel(l2_axes)) != spatial:
        raise CheckpointError(f"layer {l2.id}: GRN's ReduceL2 is not over H and W")
    step = _Walk(w.g, _out(l2), w.axes)
    step.take("ReduceMean", skip_layout=False)                                      # mean_c(g)
    eps = step.g.value(step.other(step.take("Add", skip_layout=False)))
    divide = step.take("Divide", skip_layout=False)
    if eps is None or eps.size != 1 or divide.inputs[0] != _out(l2) \
            or not math.isclose(float(eps.ravel()[0]), 1e-6, rel_tol=1e-4):
        raise CheckpointError(f"layer {divide.id}: not ConvNeXt-V2's GRN (g / (mean(g) + 1e-6))")
    scaled = step.take("Multiply", skip_layout=False)
    if x not in scaled.inputs:
        raise CheckpointError(f"layer {scaled.id}: GRN does not multiply its input")
    w.g.visited.add(l2.id)
    weight = step.per_channel(step.take("Multiply", skip_layout=False), hidden, "GRN's weight")
    bias = step.per_channel(step.take("Add", skip_layout=False), hidden, "GRN's bias")
    residual = step.take("Add", skip_layout=False)
    if x not in residual.inputs:
        raise CheckpointError(f"layer {residual.id}: GRN does not add its input back")
    w.at = step.at
    return weight, bias


@dataclass
class _Stem:
    """What comes before the network: the input's layout and the per-channel affine map the
    IR applies, t_k = scale_k * x[source_k] + shift_k (k: the channel the stem sees)."""
    layout: str = "NCHW"
    source: tuple[int, int, int] = (0, 1, 2)
    scale: np.ndarray = field(default_factory=lambda: np.ones(3))
    shift: np.ndarray = field(default_factory=lambda: np.zeros(3))
    had_shift: bool = False
    had_scale: bool = False


def _preprocessing(w: _Walk) -> _Stem:
    """Past the operations between the input and the stem convolution, composed."""
    stem = _Stem(layout="NCHW" if w.axes == (0, 1, 2, 3) else "NHWC")
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
            w.at = _split_concat(w, node, stem)
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


def _split_concat(w: _Walk, split: _Node, stem: _Stem) -> tuple[str, str]:
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
    return _out(concat)


def _block(w: _Walk, dim: int, state: dict, name: str) -> None:
    x = w.at
    start_axes = w.axes
    state[f"{name}.conv_dw.weight"] = _conv(w, 7, 1, 3, "depthwise", group=True)
    if state[f"{name}.conv_dw.weight"].shape[0] != dim:
        raise CheckpointError(f"the depthwise convolution of {name} has {state[f'{name}.conv_dw.weight'].shape[0]} "
                              f"channels, its stage {dim}")
    state[f"{name}.conv_dw.bias"] = _bias(w, dim, "depthwise")
    w.channels = dim
    state[f"{name}.norm.weight"], state[f"{name}.norm.bias"] = _layer_norm(w, dim, "block")
    fc1 = _linear(w, "fc1")
    hidden = fc1.shape[0]
    if fc1.shape[1] != dim:
        raise CheckpointError(f"{name}: fc1 of shape {list(fc1.shape)} on {dim} channels")
    state[f"{name}.mlp.fc1.weight"], state[f"{name}.mlp.fc1.bias"] = fc1, _bias(w, hidden, "fc1")
    gelu = w.take("Gelu", skip_layout=False)
    if gelu.data.get("approximation_mode", "ERF").upper() != "ERF":
        raise CheckpointError(f"layer {gelu.id}: GELU approximated by {gelu.data['approximation_mode']}, not erf")
    grn = _grn(w, hidden)
    if grn is not None:
        state[f"{name}.mlp.grn.weight"], state[f"{name}.mlp.grn.bias"] = grn
    fc2 = _linear(w, "fc2")
    if fc2.shape != (dim, hidden):
        raise CheckpointError(f"{name}: fc2 of shape {list(fc2.shape)}, expected {[dim, hidden]}")
    state[f"{name}.mlp.fc2.weight"], state[f"{name}.mlp.fc2.bias"] = fc2, _bias(w, dim, "fc2")
    w.follow_layout()
    users = w.g.users(w.at)
    if len(users) == 1 and users[0].type == "Multiply":
        state[f"{name}.gamma"] = w.per_channel(w.take("Multiply"), dim, "the layer scale")
        w.follow_layout()
    residual = w.take("Add", skip_layout=False)
    if x not in residual.inputs or w.axes != start_axes:
        raise CheckpointError(f"layer {residual.id}: {name} does not end in a residual Add of its input")


def _is_block_start(w: _Walk) -> bool:
    return any(n.type == "GroupConvolution" for n in w.g.users(w.at))


def _walk(graph: _Graph) -> tuple[dict[str, np.ndarray], _Stem, bool]:
    """timm-named weights in timm layouts (stem as the IR's, preprocessing composed apart), the
    preprocessing, and whether the graph ends in a SoftMax."""
    parameters = [n for n in graph.nodes.values() if n.type == "Parameter"]
    results = [n for n in graph.nodes.values() if n.type == "Result"]
    if len(parameters) != 1 or len(results) != 1:
        raise CheckpointError(f"a ConvNeXt IR has one input and one output; this one has {len(parameters)} "
                              f"and {len(results)}")
    shape = _dims(parameters[0].data.get("shape", ""), "the input's shape")
    if len(shape) != 4 or 3 not in (shape[1], shape[3]):
        raise CheckpointError(f"the input has shape {list(shape)}, not an image batch")
    # (N, H, W, 3) input (a PrePostProcessor's NHWC tensor) is moved to NCHW before the stem
    nhwc = shape[3] == 3 and shape[1] != 3
    w = _Walk(graph, _out(parameters[0]), (0, 3, 1, 2) if nhwc else (0, 1, 2, 3))
    stem = _preprocessing(w)
    state: dict[str, np.ndarray] = {}
    state["stem.0.weight"] = _conv(w, 4, 4, 0, "stem")
    if state["stem.0.weight"].shape[1] != 3:
        raise CheckpointError(f"the stem convolution takes {state['stem.0.weight'].shape[1]} channels, not 3")
    dim = state["stem.0.weight"].shape[0]
    state["stem.0.bias"] = _bias(w, dim, "stem")
    w.channels = dim
    state["stem.1.weight"], state["stem.1.bias"] = _layer_norm(w, dim, "stem")
    w.follow_layout()
    for i in range(4):
        if i > 0:
            prefix = f"stages.{i}.downsample"
            w.channels = dim
            state[f"{prefix}.0.weight"], state[f"{prefix}.0.bias"] = _layer_norm(w, dim, "downsample")
            state[f"{prefix}.1.weight"] = _conv(w, 2, 2, 0, "downsample")
            if state[f"{prefix}.1.weight"].shape[1] != dim:
                raise CheckpointError(f"the downsampling convolution of stage {i} takes "
                                      f"{state[f'{prefix}.1.weight'].shape[1]} channels, its input has {dim}")
            dim = state[f"{prefix}.1.weight"].shape[0]
            state[f"{prefix}.1.bias"] = _bias(w, dim, "downsample")
            w.follow_layout()
        j = 0
        while _is_block_start(w):
            if j >= 64:
                raise CheckpointError(f"stage {i} has over 64 blocks")
            _block(w, dim, state, f"stages.{i}.blocks.{j}")
            j += 1
            w.follow_layout()
        if j == 0:
            raise w.fail(f"the first block of stage {i} (a 7x7 GroupConvolution)")
    pool = w.take("ReduceMean")
    axes = graph.value(pool.inputs[1])
    if axes is None or sorted(int(a) % 4 for a in np.ravel(axes)) != sorted(w.axes[2:]):
        raise CheckpointError(f"layer {pool.id}: the head's pooling is not a mean over H and W")
    if pool.data.get("keep_dims") != "true":
        w.axes = (0, 1)
    w.channels, w.pooled = dim, True
    w.follow_layout()
    state["head.norm.weight"], state["head.norm.bias"] = _layer_norm(w, dim, "head")
    w.follow_layout()
    fc = _linear(w, "head")
    if fc.shape[1] != dim:
        raise CheckpointError(f"the classifier takes {fc.shape[1]} features, the network gives {dim}")
    state["head.fc.weight"], state["head.fc.bias"] = fc, _bias(w, fc.shape[0], "classifier")
    softmax = False
    w.follow_layout()
    users = graph.users(w.at)
    if len(users) == 1 and users[0].type in ("SoftMax", "Softmax"):
        axis = int(users[0].data.get("axis", "1"))
        if axis % 2 != 1:
            raise CheckpointError(f"layer {users[0].id}: a SoftMax not over the classes")
        softmax = True
        w.move(users[0])
        w.follow_layout()
        users = graph.users(w.at)
    if len(users) != 1 or users[0].type != "Result":
        raise w.fail("the output (Result) after the classifier")
    graph.visited.update((parameters[0].id, results[0].id))
    _check_nothing_else(graph)
    return state, stem, softmax


def _check_nothing_else(graph: _Graph) -> None:
    """Every operation on the input is one the walk took: a graph that computes anything more
    (a side branch merged back where the walk does not look) is not read as a ConvNeXt."""
    stray = [n for n in graph.nodes.values() if n.id not in graph.visited and n.type != "Const"
             and not (n.out_dims and graph.value((n.id, next(iter(n.out_dims)))) is not None)]
    if stray:
        shown = ", ".join(f"{n.type} (layer {n.id})" for n in stray[:5])
        raise CheckpointError(f"not a ConvNeXt graph npconvnext reads: {len(stray)} operations outside the "
                              f"network it found, e.g. {shown}")


# ---- conventions and the stem -------------------------------------------------------------------


def _effective_stem(weight: np.ndarray, bias: np.ndarray, stem: _Stem) -> tuple[np.ndarray, np.ndarray]:
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


def _for_convention(raw: np.ndarray, raw_bias: np.ndarray, convention: Convention) -> tuple[np.ndarray, np.ndarray]:
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
    out["stem.0.weight"], out["stem.0.bias"] = _for_convention(raw, raw_bias, new)
    return out


def _matches(values, reference, tol=1e-3) -> bool:
    return all(abs(v - r) <= tol * max(1.0, abs(r)) for v, r in zip(values, reference))


def _convention(stem: _Stem, softmax: bool) -> Convention:
    """What the IR's model takes, from its preprocessing operations (see the module docstring)."""
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


# ---- the format ---------------------------------------------------------------------------------


def _paths(path: str) -> tuple[str, str]:
    """(graph .xml, weights .bin) for a path to either: the other beside it, same stem."""
    stem, ext = os.path.splitext(path)
    if ext.lower() == ".bin":
        return stem + ".xml", path
    return path, stem + ".bin"


def _read(path: str) -> Reading:
    xml, bin_ = _paths(path)
    with reading(xml, "OpenVINO IR"):
        with _Graph(xml, bin_) as graph:
            state, stem, softmax = _walk(graph)
        convention = _convention(stem, softmax)
        raw, raw_bias = _effective_stem(state["stem.0.weight"], state["stem.0.bias"], stem)
        state["stem.0.weight"], state["stem.0.bias"] = _for_convention(raw, raw_bias, convention)
        config = detect_architecture(_with_layer_scale(state))
        state = _to_config(state, config)
    return Reading(state, convention)


def _with_layer_scale(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """gamma where a V1 graph has it folded into fc2 (ones: the same numbers); V2 has none."""
    if "stages.0.blocks.0.mlp.grn.weight" in state:
        return state
    out = dict(state)
    for name in [n for n in state if n.endswith(".conv_dw.weight")]:
        block = name[: -len(".conv_dw.weight")]
        out.setdefault(f"{block}.gamma", np.ones(state[name].shape[0], np.float32))
    return out


def _to_config(state: dict[str, np.ndarray], config) -> dict[str, np.ndarray]:
    """Every array in timm's shape for `config` (fc weights (out, in) or (out, in, 1, 1)), float32."""
    state = _with_layer_scale(state)
    expected = expected_shapes(config)
    out = {}
    for name, array in state.items():
        if name not in expected:
            raise CheckpointError(f"{name}: not a parameter of {config.name}")
        out[name] = np.ascontiguousarray(array, np.float32).reshape(expected[name])
    return out


def _recognises(head: bytes, path: str) -> bool:
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith((b"<?xml", b"<net")):
        try:
            with open_weight_file(path) as f:
                start = f.read(4096)
        except CheckpointError:
            return False
        return re.search(rb"<net[\s>]", start) is not None
    xml, bin_ = _paths(path)
    if bin_ != path or xml == path:
        return False
    try:  # the weights half of an IR: no signature of its own, so its graph beside it decides
        if not stat.S_ISREG(os.stat(xml).st_mode):
            return False
        with open_weight_file(xml) as f:
            return re.search(rb"<net[\s>]", f.read(4096)) is not None
    except (OSError, CheckpointError):
        return False


FORMAT = WeightFormat(NAME, _recognises, _read, files=lambda path: list(_paths(path)), restate=restate_stem)
