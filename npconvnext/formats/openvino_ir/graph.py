"""An OpenVINO IR's graph: the `.xml` read and hardened, its layers and edges, constants read from
the `.bin` and folded within a byte budget.

The `.xml` is bounded in size before parsing and refused if it declares a DOCTYPE or entities
(nothing is fetched, nothing expands); a graph with a cycle is refused. Every constant is checked
against its shape and the `.bin`'s size before it is read; non-finite weights (an FP16 overflow)
are refused. Folding (a Convert from f16, Reshape, Transpose, arithmetic on constants) never grows
a constant beyond its inputs, and every byte read or made counts against one budget, a few times
the `.bin`'s size, so that memory stays bounded by what the file holds.
"""

from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import numpy as np

from ...errors import CheckpointError
from ..guard import open_weight_file

_MAX_XML = 16 << 20           # an IR's graph description; a ConvNeXt's is a few megabytes at most
_MAX_ELEMENTS = 1 << 31       # a constant larger than this is refused before reading
# bytes read from the .bin and made by folding, over all constants: reads may share bytes (OpenVINO
# stores equal constants once) and an FP16 IR's Converts make twice what they read
_BUDGET_PER_BIN_BYTE, _BUDGET_SLACK = 4, 16 << 20
ELEMENT_TYPES = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "i64": np.dtype("<i8"),
                 "i32": np.dtype("<i4"), "f64": np.dtype("<f8")}


@dataclass
class Node:
    """A layer of the IR."""

    id: str
    type: str
    data: dict[str, str]
    inputs: list[tuple[str, str]] = field(default_factory=list)   # (source node, source port) by input port
    out_dims: dict[str, tuple[int, ...]] = field(default_factory=dict)  # output port -> dims (-1 dynamic)


class Graph:
    """The parsed XML with its `.bin`, constants read on demand and checked."""

    def __init__(self, xml_path: str, bin_path: str):
        self.xml_path, self.bin_path = xml_path, bin_path
        self.nodes, self.consumers = _parse(_read_xml(xml_path))
        self._bin = None
        self._bin_size = 0
        self._values: dict[tuple[str, str], np.ndarray | None] = {}
        self._spent = 0  # bytes read and made, over all constants: layers may name the same bytes
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

    def users(self, source: tuple[str, str]) -> list[Node]:
        return [self.nodes[n] for n in self.consumers.get(source, [])]

    def value(self, source: tuple[str, str]) -> np.ndarray | None:
        """The constant at an output port, folding small constant subgraphs (Convert from f16,
        Reshape, Transpose, arithmetic); None when the port depends on the input."""
        if source not in self._values:
            self._values[source] = None  # a cycle in a hostile graph reads as "not constant"
            self._values[source] = self._evaluate(self.nodes[source[0]])
        return self._values[source]

    def _evaluate(self, node: Node) -> np.ndarray | None:
        if node.type == "Const":
            return self._const(node)
        if node.type not in CONST_OPS or not node.inputs:
            return None
        args = []
        for src in node.inputs:  # stops at the first input that depends on the network's input
            args.append(self.value(src))
            if args[-1] is None:
                return None
        try:
            _check_growth(node, args)
            result = CONST_OPS[node.type](node, *args)
        except (ValueError, IndexError, TypeError, KeyError) as exc:
            raise CheckpointError(f"layer {node.id} ({node.type}) does not compute on its constants: {exc}") from None
        if result.flags.owndata:  # a view (Reshape, Transpose) holds no bytes of its own
            self._spend(result.nbytes, f"folding layer {node.id} ({node.type})")
        return result

    def _spend(self, size: int, what: str) -> None:
        self._spent += size
        budget = _BUDGET_PER_BIN_BYTE * self._bin_size + _BUDGET_SLACK
        if self._spent > budget:
            raise CheckpointError(f"its constants read and make {self._spent} bytes from the {self._bin_size}-byte "
                                  f"{self.bin_path} ({what}): far beyond what a network does")

    def _const(self, node: Node) -> np.ndarray:
        d = node.data
        dtype = ELEMENT_TYPES.get(d.get("element_type", ""))
        if dtype is None:
            raise CheckpointError(f"Const layer {node.id} has element type {d.get('element_type')!r}, "
                                  f"not one of {sorted(ELEMENT_TYPES)}")
        shape = dims(d.get("shape", ""), f"Const layer {node.id}", allow_dynamic=False)
        count = math.prod(shape)
        offset, size = _int(d.get("offset"), node), _int(d.get("size"), node)
        if count > _MAX_ELEMENTS or size != count * dtype.itemsize:
            raise CheckpointError(f"Const layer {node.id}: {size} bytes cannot hold a {d.get('element_type')} "
                                  f"tensor of shape {list(shape)}")
        if offset + size > self._bin_size:
            raise CheckpointError(f"Const layer {node.id} lies at bytes {offset}-{offset + size} of {self.bin_path}, "
                                  f"which holds {self._bin_size}: truncated, or not this IR's weights")
        self._spend(size, f"reading Const layer {node.id}")
        self._bin.seek(offset)
        raw = self._bin.read(size)
        if len(raw) != size:
            raise CheckpointError(f"{self.bin_path}: ends inside Const layer {node.id}")
        array = np.frombuffer(raw, dtype).reshape(shape)
        if dtype.kind == "f" and not np.isfinite(array).all():
            raise CheckpointError(f"Const layer {node.id} ({d.get('element_type')} {list(shape)}) holds NaN or "
                                  "infinite values (an FP16 conversion out of range?)")
        return array


def _int(text: str | None, node: Node) -> int:
    if text is None or not text.isdigit() or len(text) > 19:
        raise CheckpointError(f"Const layer {node.id}: offset and size must be byte counts, got {text!r}")
    return int(text)


def dims(text: str, what: str, allow_dynamic: bool = True) -> tuple[int, ...]:
    """A shape attribute ("1, 3, ?, 224"): -1 for a dynamic dimension, where allowed."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    out = []
    for p in parts:
        if allow_dynamic and (p in ("?", "-1") or re.fullmatch(r"\d{0,12}\.\.\d{0,12}", p)):
            out.append(-1)  # dynamic, or an interval "1..8"
        elif p.isdigit() and len(p) <= 12:
            out.append(int(p))
        else:
            raise CheckpointError(f"{what}: bad dimension {p[:20]!r}")
    if len(out) > 8:
        raise CheckpointError(f"{what}: {len(out)} dimensions")
    return tuple(out)


def _check_growth(node: Node, args: list[np.ndarray]) -> None:
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


CONST_OPS = {
    "Convert": lambda node, a: a.astype(ELEMENT_TYPES[node.data.get("destination_type")]),
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


def _parse(root: ET.Element) -> tuple[dict[str, Node], dict[tuple[str, str], list[str]]]:
    """(layers by id, the layers taking each output port)"""
    layers, edges = root.find("layers"), root.find("edges")
    if layers is None or edges is None:
        raise CheckpointError("the graph has no <layers> or no <edges>")
    nodes: dict[str, Node] = {}
    for layer in layers:
        lid = layer.get("id")
        if lid is None or lid in nodes:
            raise CheckpointError(f"a layer with a missing or repeated id {str(lid)[:20]!r}")
        data = layer.find("data")
        node = Node(lid, str(layer.get("type")), dict(data.attrib) if data is not None else {})
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


def _check_acyclic(nodes: dict[str, Node], consumers: dict[tuple[str, str], list[str]]) -> None:
    """Refuse a graph with a cycle (every walk assumes none): Kahn's order must reach every layer."""
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


def out_port(node: Node) -> tuple[str, str]:
    """The (single) data output port of a node: the one after its inputs."""
    ports = list(node.out_dims)
    if len(ports) != 1:
        raise CheckpointError(f"layer {node.id} ({node.type}) has {len(ports)} outputs, expected one")
    return node.id, ports[0]
