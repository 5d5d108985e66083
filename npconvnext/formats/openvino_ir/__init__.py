"""OpenVINO IR (`model.xml` + `model.bin`, IR v10 and v11), read without OpenVINO.

Tested on IR v11 as OpenVINO 2026 writes it; v10 files are taken when they use the same operations.

The `.xml` is the graph: `<layers>` of typed operations (Parameter, Const, Convolution, MVN,
MatMul, ...) joined by `<edges>` from an output port to an input port; a Const's values lie in
the `.bin` beside it (same stem), at the byte `offset` and `size` its `<data>` gives. FP16
compressed IRs store every large constant as f16 followed by a Convert to f32.

Converters do not keep module names, so the parameters are found by the graph's structure: the
reader walks from the input through the operations a ConvNeXt is made of and takes each
constant from the place it feeds, as `openvino.convert_model` writes them from a timm model
(directly or through ONNX); the operation sequences are in `convnext.py`. A LayerNorm is MVN
(normalize_variance, eps inside the sqrt, over the channel axis), Multiply weight, Add bias: what
OpenVINO makes of timm's LayerNorm on both paths (through ONNX at opsets 11, 14 and the
exporter's default alike). Transposes and Reshapes between operations only move axes, and are
followed. OpenVINO folds the layer scale into fc2 where no Transpose is between (gamma then
reads as 1: the same numbers), and drops an Add of zeros or a Multiply by ones (read as zeros
and ones). Every operation on the input must be one the walk took, so nothing the graph
computes is left out.

Preprocessing built into the IR stays part of the model (`preprocessing.py`). Operations between the input and the
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

Hostile files (`graph.py`): the XML is bounded in size before parsing and refused if it declares
a DOCTYPE or entities (nothing is fetched, nothing expands); every constant is checked against its
shape and the `.bin`'s size before it is read; bytes read and bytes made by folding share one
budget; non-finite weights (an FP16 overflow) and integer constants where the network takes
floats are refused.

The modules, in the order they import one another: `graph.py` (the XML, the node graph, constant
folding), `pattern.py` (the walk cursor and the matchers of single operations), `preprocessing.py`
(the input's preprocessing and the convention), `convnext.py` (the network's operation sequences).
"""

from __future__ import annotations

import os
import re
import stat

import numpy as np

from ...errors import CheckpointError
from ...params import detect_architecture, expected_shapes
from ..guard import open_weight_file, reading
from ..registry import Reading, WeightFormat
from .convnext import walk_network
from .graph import Graph
from .preprocessing import IMAGENET_MEAN_255, IMAGENET_STD_255, convention_of, effective_stem, for_convention, \
    restate_stem

__all__ = ["FORMAT", "IMAGENET_MEAN_255", "IMAGENET_STD_255", "NAME", "read", "restate_stem"]

NAME = "openvino-ir"


def _paths(path: str) -> tuple[str, str]:
    """(graph .xml, weights .bin) for a path to either: the other beside it, same stem."""
    stem, ext = os.path.splitext(path)
    if ext.lower() == ".bin":
        return stem + ".xml", path
    return path, stem + ".bin"


def read(path: str) -> Reading:
    """An IR's ConvNeXt: timm-named arrays in timm layouts, its stem for the convention read off
    its preprocessing, and that convention, from one read of its two files."""
    xml, bin_ = _paths(path)
    with reading(xml, "OpenVINO IR"):
        with Graph(xml, bin_) as graph:
            state, stem, softmax = walk_network(graph)
        convention = convention_of(stem, softmax)
        raw, raw_bias = effective_stem(state["stem.0.weight"], state["stem.0.bias"], stem)
        state["stem.0.weight"], state["stem.0.bias"] = for_convention(raw, raw_bias, convention)
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


FORMAT = WeightFormat(NAME, _recognises, read, files=lambda path: list(_paths(path)), restate=restate_stem)
