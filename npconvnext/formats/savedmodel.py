"""TensorFlow SavedModel directories of a ConvNeXt (as TF-Hub serves them), read without TensorFlow.

A SavedModel is a directory: saved_model.pb (the graph) and variables/variables.index with its
data shards (a tensor bundle, read by `tf_bundle.py`). The bundle names each variable by its
path in the object graph (`variables/0/.ATTRIBUTES/VARIABLE_VALUE`,
`_operations/8/_layers/3/pw_conv_2/bias/...`); the bundle's own `_CHECKPOINTABLE_OBJECT_GRAPH`
entry gives each variable's full name as well (`convnext_tiny_stem/convnext_tiny_stem_conv/kernel`,
`convnext_stage_0/convnext_block_0_0/bias`), and the graph itself: which object holds which
(a block holds `dw_conv_1`, which holds `kernel`). The full name names the layer; the graph
names a block's sub-layer and finds the block of its unnamed `gamma`; Keras 2, which names
neither the stem nor the downsampling blocks in its variables, lists its layers in order as
the root's `layer_with_weights-K`, and those are placed by that order.

Two layouts, each with its table in names.py:
    keras.applications   ConvNeXtTiny ... XLarge written by TensorFlow (Keras 3 `model.export`
                         or `tf.saved_model.save`): layer names as in `keras.py`, whose table
                         this reuses. Its Normalization layer and softmax stay part of the model:
                         keras.applications' values (the graph holds them as constants, not
                         variables), present when the graph has the layer (NHWC, 0-255 RGB):
                         saved_model.pb is parsed (`protobuf.py`) for its nodes' and functions'
                         names, which name the layers; a .pb that does not parse is refused.
    TF-Hub port          sayakpaul/ConvNeXt-TF (tfhub.dev/sayakpaul/convnext_*): `stem`,
                         `downsampling_block_{i}`, `convnext_stage_{i}` of `convnext_block_{i}_{j}`
                         (attributes dw_conv_1, layer_norm, pw_conv_1, pw_conv_2 and a raw
                         variable gamma), an unnamed head LayerNormalization, `classification_head`;
                         written by Keras 2's `model.save` (as the TF-Hub modules were) or by
                         `tf.saved_model.save` (Keras 3's `model.export` loses which block holds
                         each gamma, and is refused).
                         It takes NHWC images normalised outside the model with the ImageNet
                         mean and std, and gives logits.
Layouts as in Keras: conv kernels (kh, kw, in, out), depthwise ones (kh, kw, 1, C), dense (in, out).

TF-Hub's feature-vector twins (the port cut before its classification_head) have no head.fc:
they load as headless models. The asset as TF-Hub serves it, a `.tar.gz` of the SavedModel
directory, is read in place (`tar.py`: members checked, nothing extracted).
"""

from __future__ import annotations

import os
import posixpath
import re
import stat

import numpy as np

from ..convention import Convention
from ..errors import CheckpointError
from .guard import open_weight_file, reading
from .names import (KERAS_APPLICATIONS_MEAN, KERAS_APPLICATIONS_STD, fix_layout, keras_layer, keras_role, port_group,
                    port_sublayer)
from .protobuf import as_bytes, as_int, as_text, iter_fields
from .registry import Reading, WeightFormat
from .tar import TarArchive, is_gzip
from .tf_bundle import MAX_INDEX_BYTES, OBJECT_GRAPH_KEY, Bundle, parse_entry, parse_object_graph, read_table

GRAPH_FILE = "saved_model.pb"
VARIABLES_PREFIX = os.path.join("variables", "variables")
_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
MAX_GRAPH_BYTES = 1 << 28  # saved_model.pb: a few megabytes for any ConvNeXt (its weights are in variables/)


def _role(leaf: str) -> str | None:
    """weight / bias / '' (a raw variable such as layer scale) of a variable's last name part."""
    return keras_role(leaf.lstrip("_"))  # an object path's part may start with `_`


class _Variable:
    """A variable of the bundle and where the object graph holds it."""

    def __init__(self, full_name: str, key: str, shape: tuple[int, ...], node: int = -1,
                 parents: tuple[tuple[int, str], ...] = (), grandparents: tuple[tuple[int, str], ...] = (),
                 top: int | None = None):
        self.full_name = re.sub(r":\d+$", "", full_name)
        self.key = key
        self.path = key[: -len(_SUFFIX)].split("/") if key.endswith(_SUFFIX) else key.split("/")
        self.shape = shape
        self.node = node          # its node in the object graph
        self.parents = parents            # (node, local name) of every object holding it: (layer, "kernel")
        self.grandparents = grandparents  # the same for the objects holding those: (block, "dw_conv_1")
        self.names = frozenset(n for _, n in parents + grandparents)
        self.top = top            # K of the root's `layer_with_weights-K` / `layer-K` it lies under (Keras 2)

    def __repr__(self):
        return f"{self.full_name or '?'} ({'/'.join(self.path)})"


_MAX_PARENTS = 64  # a Keras object lists a handful: its layer, the model's variable lists, Keras 3's copy


def _put(out: dict, name: str, v: "_Variable") -> None:
    """out[name] = v, refusing a second variable for one timm name."""
    if name in out:
        raise CheckpointError(f"two variables map to {name}: {out[name]} and {v}")
    out[name] = v


def _variables(bundle: Bundle) -> list[_Variable]:
    """Every variable the object graph lists, once. Keras 3's `model.export` lists each twice (under
    `variables/` in creation order and `_all_variables/`): the second copy of a name is dropped."""
    if OBJECT_GRAPH_KEY not in bundle.entries:
        raise CheckpointError(f"no {OBJECT_GRAPH_KEY} entry: the variables cannot be named")
    nodes = parse_object_graph(bundle.read_string(OBJECT_GRAPH_KEY))
    parents: dict[int, list[tuple[int, str]]] = {}
    for at, node in enumerate(nodes):
        for child, name in node.children:
            if not 0 <= child < len(nodes):
                raise CheckpointError(f"object graph node {at} names a child {child} of {len(nodes)} nodes")
            parents.setdefault(child, []).append((at, name))
            if len(parents[child]) > _MAX_PARENTS:  # each variable lists its grandparents: keep that small
                raise CheckpointError(f"object graph node {child} has more than {_MAX_PARENTS} parents")
    tops = _tops(nodes)
    found = []
    for at, node in enumerate(nodes):
        for name, full_name, key in node.attributes:
            if name == "VARIABLE_VALUE" and key in bundle.entries:
                up = tuple(parents.get(at, []))
                grand = tuple(g for p, _ in up for g in parents.get(p, []))
                found.append(_Variable(full_name, key, bundle.entries[key].shape, at, up, grand, tops.get(at)))
    ordered = [v for v in found if v.path[0] == "variables"]
    if ordered:
        by_name: dict[str, list[_Variable]] = {}
        for v in ordered:
            by_name.setdefault(v.full_name, []).append(v)
        for v in found:
            twins = by_name.get(v.full_name, []) if v.path[0] != "variables" else []
            if len(twins) == 1 and _stored_as(bundle, twins[0]) != _stored_as(bundle, v):
                raise CheckpointError(f"two copies of variable {v.full_name!r} hold different values "
                                      f"({twins[0].key} and {v.key})")
        found = ordered + [v for v in found if v.path[0] != "variables" and v.full_name not in by_name]
    return found


def _tops(nodes) -> dict[int, int]:
    """node -> K of the root's child `layer_with_weights-K` or `layer-K` above it (a Keras 2
    functional model's layers, in order), the lowest K where several are."""
    top_layers = sorted((int(m["k"]), child) for child, name in nodes[0].children if nodes
                        for m in [re.fullmatch(r"layer(_with_weights)?-(?P<k>\d+)", name)] if m)
    tops: dict[int, int] = {}
    for k, child in top_layers:
        stack = [child]
        while stack:  # every node is entered once: marked before its children are pushed
            node = stack.pop()
            if node in tops:
                continue
            tops[node] = k
            stack.extend(c for c, _ in nodes[node].children if c not in tops)
    return tops


def _stored_as(bundle: Bundle, v: _Variable) -> tuple:
    """What the index records of a variable's bytes: equal for two copies of one value."""
    entry = bundle.entries[v.key]
    return entry.dtype, entry.shape, entry.size, entry.crc32c


def _keras_applications(variables: list[_Variable]) -> dict[str, _Variable]:
    """timm name -> variable for keras.applications' layer names (keras.py's table)."""
    out = {}
    for v in variables:
        parts = v.full_name.split("/")
        found = keras_layer(parts[-2]) if len(parts) >= 2 else None
        if found is None:
            continue
        role = "" if found[1] == "scale" else _role(parts[-1])  # layer scale: "variable" (Keras 3), "gamma" (Keras 2)
        if role is None:
            continue
        name = found[0] if role == "" else f"{found[0]}.{role}"
        _put(out, name, v)
    return out


def _port(variables: list[_Variable]) -> dict[str, _Variable]:
    """timm name -> variable for the TF-Hub port's layout."""
    out: dict[str, _Variable] = {}
    loose = []  # outside every named group: the head's layer norm

    blocks: dict[str, list[_Variable]] = {}
    for v in variables:
        group = port_group([*v.full_name.split("/"), *v.path])  # names.py's table "tfhub port"
        if group is None:
            loose.append(v)
            continue
        (module, kind), role = group, _role(v.path[-1]) or _role(v.full_name.split("/")[-1])
        if kind == "block":
            blocks.setdefault(module, []).append(v)
        elif kind == "head":
            _put(out, f"{module}.{role}", v)
        else:
            is_conv = _leaf(v) in ("kernel", "bias")  # a layer norm's are gamma and beta
            # stem: conv, then norm; downsampling blocks: norm, then conv
            index = (0 if is_conv else 1) if kind == "stem" else (1 if is_conv else 0)
            _put(out, f"{module}.{index}.{role}", v)
    # a block's raw gamma has no name of its own ("Variable"): it is the block object's child
    # named gamma, and the block object holds the sub-layers whose variables are named
    owners = {}
    for block, members in blocks.items():
        owners.update((holder, block) for v in members for holder, name in v.grandparents if port_sublayer([name]))
    unplaced, groups = [], {}
    for v in loose:
        owner = next((owners[p] for p, name in v.parents if name == "gamma" and p in owners), None)
        if owner is not None:
            blocks[owner].append(v)
        elif v.top is not None:  # Keras 2 names no stem or downsampling block: placed by layer order
            groups.setdefault(v.top, []).append(v)
        elif len(v.shape) == 1 and _role(v.path[-1]) in ("weight", "bias"):
            _put(out, f"head.norm.{_role(v.path[-1])}", v)
        else:
            unplaced.append(v)
    for name, v in _by_layer_order(groups).items():
        _put(out, name, v)
    for block, members in blocks.items():
        for name, v in _block_roles(block, members).items():
            _put(out, name, v)
    if unplaced and blocks:
        raise CheckpointError(f"{len(unplaced)} variables belong to no layer of the TF-Hub ConvNeXt layout "
                              f"({', '.join(map(repr, unplaced[:3]))}): their object paths do not say which "
                              "block holds them (a Keras 3 model.export of a model with raw tf.Variables?)")
    return out


def _by_layer_order(groups: dict[int, list[_Variable]]) -> dict[str, _Variable]:
    """The unnamed layers of a Keras 2 port, by their place in the model: the stem (the conv
    taking 3 channels, and its norm), the downsampling blocks in order (a norm, then a conv),
    and the head's norm (a norm alone)."""
    out, downsample = {}, 0
    for k in sorted(groups):
        members = groups[k]
        kernels = [v for v in members if len(v.shape) == 4]
        if not kernels:
            module, conv, norm = "head.norm", None, ""
        elif kernels[0].shape[2] == 3 and downsample == 0 and not any(n.startswith("stem.") for n in out):
            module, conv, norm = "stem", ".0", ".1"
        else:
            downsample += 1
            module, conv, norm = f"stages.{downsample}.downsample", ".1", ".0"
        for v in members:
            leaf = _leaf(v)
            role = _role(leaf)
            part = conv if leaf in ("kernel", "bias") else norm
            if role in (None, "") or part is None:
                raise CheckpointError(f"variable {v} in layer {k} of the model is not a conv's or a norm's")
            name = f"{module}{part}.{role}"
            _put(out, name, v)
    return out


def _leaf(v: _Variable) -> str:
    """The variable's own name: kernel, bias, gamma, beta, Variable."""
    return re.sub(r"_\d+$", "", v.full_name.split("/")[-1] if v.full_name else v.path[-1].lstrip("_"))


def _block_roles(block: str, members: list[_Variable]) -> dict[str, _Variable]:
    """A port block's variables by role: the object path's attribute name where it has one
    (dw_conv_1, layer_norm, pw_conv_1, pw_conv_2, gamma), else kernels by shape; a vector the
    path cannot place is refused rather than guessed."""
    out = {}
    for v in members:
        sub = port_sublayer([*v.path, *sorted(v.names)])
        role = _role(v.path[-1]) or _role(v.full_name.split("/")[-1])
        if sub is None and len(v.shape) == 4:
            sub = "conv_dw"
        elif sub is None and len(v.shape) == 2:
            sub = "mlp.fc1" if v.shape[1] > v.shape[0] else "mlp.fc2"
        if sub is None and (v.path[-1] == "gamma" or "gamma" in v.names) and not v.full_name.endswith("/gamma"):
            out[f"{block}.gamma"] = v  # the block's own raw variable (full name "Variable")
            continue
        if sub is None or role in (None, ""):
            raise CheckpointError(f"cannot tell which part of block {block} the variable {v} is: the "
                                  "SavedModel's object graph does not name its sub-layers")
        name = f"{block}.{sub}.{role}"
        _put(out, name, v)
    return out


def _layout(variable: _Variable) -> str:
    """names.py's layout fix of a weight, by its rank: conv kernels (depthwise ones included) or dense."""
    return "hwio" if len(variable.shape) == 4 else "io"


class _TarBundle(Bundle):
    """A tensor bundle inside a tar archive: the index and shards are members, each read once
    into memory."""

    def __init__(self, archive: TarArchive, prefix: str):
        self.prefix, self.archive, self.shards = prefix, archive, {}
        try:
            table = read_table(archive.read(prefix + ".index", MAX_INDEX_BYTES))
            if "" not in table:
                raise CheckpointError("no bundle header (the empty key)")
            header = dict(iter_fields(table.pop("")))
            self.num_shards = as_int(header.get(1, 1), "num_shards")
            self.byte_order = ">" if as_int(header.get(2, 0), "endianness") == 1 else "<"
            if not 1 <= self.num_shards <= 100_000:
                raise CheckpointError(f"{self.num_shards} shards")
            self.entries = {key: parse_entry(value, key) for key, value in table.items()}
        except CheckpointError as exc:
            raise CheckpointError(f"{prefix}.index: {exc}") from None
        for shard in range(self.num_shards):
            if self.shard_path(shard) not in archive.members:
                raise CheckpointError(f"no member {self.shard_path(shard)} (shard {shard} its index names)")

    def files(self) -> list[str]:
        return [self.archive.path]

    def _raw(self, key, entry) -> bytes:
        if not 0 <= entry.shard_id < self.num_shards:
            raise CheckpointError(f"tensor {key!r}: shard {entry.shard_id} of {self.num_shards}")
        if entry.shard_id not in self.shards:
            self.shards[entry.shard_id] = memoryview(self.archive.read(self.shard_path(entry.shard_id)))
        shard = self.shards[entry.shard_id]
        if entry.offset + entry.size > len(shard):
            raise CheckpointError(f"{self.shard_path(entry.shard_id)}: tensor {key!r} at {entry.offset}+"
                                  f"{entry.size} lies beyond the shard's {len(shard)} bytes (truncated shard?)")
        return bytes(shard[entry.offset:entry.offset + entry.size])


class _SavedModel:
    """A SavedModel directory's (or its tar archive's) bundle and which variable is which timm parameter."""

    def __init__(self, path: str, archive: TarArchive | None = None):
        if archive is None:
            self.directory = _directory(path)
            self.bundle = Bundle(os.path.join(self.directory, VARIABLES_PREFIX))
            with open_weight_file(os.path.join(self.directory, GRAPH_FILE)) as f:
                self.graph = f.read(MAX_GRAPH_BYTES + 1)
        else:
            self.directory = archive.find(GRAPH_FILE)
            if self.directory is None:
                raise CheckpointError(f"an archive without {GRAPH_FILE}: not a SavedModel's")
            self.bundle = _TarBundle(archive, posixpath.join(self.directory, "variables", "variables"))
            self.graph = archive.read(posixpath.join(self.directory, GRAPH_FILE), MAX_GRAPH_BYTES + 1)
        variables = _variables(self.bundle)
        self.layout, self.mapping = "keras.applications", _keras_applications(variables)
        if "stem.0.weight" not in self.mapping:
            self.layout, self.mapping = "TF-Hub ConvNeXt port", _port(variables)
        if "stem.0.weight" not in self.mapping:
            shown = ", ".join(sorted({v.full_name or "/".join(v.path) for v in variables})[:6])
            raise CheckpointError(f"not a ConvNeXt SavedModel: no stem convolution among its {len(variables)} "
                                  f"variables ({shown or 'none'})")

    def state(self) -> dict[str, np.ndarray]:
        """timm-named arrays in timm's layouts (vectors as stored, kernels transposed)."""
        return {name: fix_layout(self.bundle.read(v.key), _layout(v)) if len(v.shape) >= 2
                else self.bundle.read(v.key) for name, v in self.mapping.items()}


def _directory(path: str) -> str:
    """The SavedModel directory of `path` (the directory itself, or its saved_model.pb)."""
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(os.path.join(directory, "variables")):
        raise CheckpointError("a SavedModel without variables/ (its weights are not in this directory)")
    if not os.path.exists(os.path.join(directory, VARIABLES_PREFIX + ".index")):
        raise CheckpointError("a SavedModel without variables/variables.index (its weights are missing)")
    return directory


def graph_names(directory: str) -> frozenset[str]:
    """The names in saved_model.pb's graphs: every node's and every function's, and every node's
    inside a function (a Keras layer's operations are named after it). The file is parsed as the
    SavedModel message it must be (protobuf wire format): one that does not parse, a truncated
    one say, is refused."""
    with open_weight_file(os.path.join(directory, GRAPH_FILE)) as f:
        return graph_names_of(f.read(MAX_GRAPH_BYTES + 1))


def graph_names_of(data: bytes) -> frozenset[str]:
    """`graph_names` of saved_model.pb's bytes."""
    if len(data) > MAX_GRAPH_BYTES:
        raise CheckpointError(f"{GRAPH_FILE} is over {MAX_GRAPH_BYTES >> 20} MB; a ConvNeXt's graph is far smaller")
    names: set[str] = set()
    try:
        graphs = 0
        for number, value in iter_fields(data):  # SavedModel: 1 schema version, 2 meta graphs
            if number == 2:
                for n, v in iter_fields(as_bytes(value, "meta_graphs")):  # MetaGraphDef: 2 graph_def
                    if n == 2:
                        graphs += 1
                        _graph_def_names(as_bytes(v, "graph_def"), names)
        if not graphs:
            raise CheckpointError("it holds no graph")
    except CheckpointError as exc:
        raise CheckpointError(f"{GRAPH_FILE} does not parse as a SavedModel ({exc}): truncated or corrupted") from None
    return frozenset(names)


def _graph_def_names(graph: bytes, names: set[str]) -> None:
    """GraphDef: 1 node (NodeDef: 1 name), 2 library (FunctionDefLibrary: 1 function, FunctionDef:
    1 signature (OpDef: 1 name), 3 node_def)."""
    for number, value in iter_fields(graph):
        if number == 1:
            names.add(_name_of(as_bytes(value, "node")))
        elif number == 2:
            for n, function in iter_fields(as_bytes(value, "library")):
                if n != 1:
                    continue
                for k, part in iter_fields(as_bytes(function, "function")):
                    if k in (1, 3):  # the signature's name, a node's name
                        names.add(_name_of(as_bytes(part, "function part")))


def _name_of(message: bytes) -> str:
    """Field 1 of a NodeDef or an OpDef: its name."""
    name = ""
    for number, value in iter_fields(message):
        if number == 1:
            name = as_text(value)
    return name


def _mentions(names: frozenset[str], *patterns: str) -> list[bool]:
    return [any(re.search(p, name) for name in names) for p in patterns]


def read(path: str) -> Reading:
    """A SavedModel directory (or its saved_model.pb): timm-named arrays and what its model takes
    and gives (see the module docstring), from one read of its files."""
    with reading(path, "TensorFlow SavedModel"):
        if not os.path.isdir(path) and _is_archive(path):
            with TarArchive(path) as archive:
                model = _SavedModel(path, archive)
                return Reading(model.state(), _convention(model.layout, graph_names_of(model.graph)))
        model = _SavedModel(path)
        return Reading(model.state(), _convention(model.layout, graph_names_of(model.graph)))


def _is_archive(path: str) -> bool:
    with open_weight_file(path) as f:
        return is_gzip(f.read(2))


def _convention(layout: str, names: frozenset[str]) -> Convention:
    if layout != "keras.applications":
        return Convention(layout="NHWC", outputs="logits", source="the TF-Hub ConvNeXt port "
                          "(tfhub.dev/sayakpaul/convnext_*: NHWC input normalised by the caller, logits)")
    normalises, softmax = _mentions(names, r"prestem_normalization", r"head_dense(_\d+)?/Softmax")
    outputs = "probabilities" if softmax else "logits"
    source = (f"keras.applications' ConvNeXt: saved_model.pb has {'a' if normalises else 'no'} Normalization "
              f"layer{' (keras.applications mean and std)' if normalises else ''} and {'a' if softmax else 'no'} softmax")
    if normalises:
        return Convention(layout="NHWC", scale="255", mean=KERAS_APPLICATIONS_MEAN, std=KERAS_APPLICATIONS_STD,
                          outputs=outputs, source=source)
    return Convention(layout="NHWC", outputs=outputs, source=source)


def saved_model_files(path: str) -> list[str]:
    """The files that make up a SavedModel's weights, for hashing: the graph, the index, the shards."""
    with reading(path, "TensorFlow SavedModel"):
        if not os.path.isdir(path) and _is_archive(path):
            return [path]
        directory = _directory(path)
        bundle = Bundle(os.path.join(directory, VARIABLES_PREFIX))
        return [os.path.join(directory, GRAPH_FILE)] + bundle.files()


def is_saved_model_dir(path: str) -> bool:
    """A directory holding saved_model.pb: a SavedModel, whatever it lacks (the reader says what)."""
    try:
        return stat.S_ISREG(os.stat(os.path.join(path, GRAPH_FILE)).st_mode)
    except (OSError, ValueError):
        return False


def _is_saved_model_graph(head: bytes, path: str) -> bool:
    """saved_model.pb itself: a SavedModel proto (schema version 1, then a MetaGraphDef) with a
    variables/ directory beside it."""
    return head[:3] == b"\x08\x01\x12" and os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(path)), "variables"))


def _recognises(head: bytes, path: str) -> bool:
    """saved_model.pb beside its variables/, or a gzip-compressed tar (TF-Hub's asset)."""
    return _is_saved_model_graph(head, path) or is_gzip(head)


FORMAT = WeightFormat("tf-savedmodel", _recognises, read, recognises_directory=is_saved_model_dir,
                      files=saved_model_files)
