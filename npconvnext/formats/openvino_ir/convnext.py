"""ConvNeXt as an OpenVINO IR's graph holds it: the walk from the input through the stem, the
stages' downsampling layers and blocks, and the head, each read like the network it is, taking
each parameter from the place it feeds (timm's names and layouts).

The operation sequences, as `openvino.convert_model` writes them from a timm model (directly or
through ONNX); a LayerNorm is MVN, Multiply weight, Add bias (`pattern.layer_norm`):
    stem          Convolution 4x4 stride 4, Add bias, LayerNorm
    block         GroupConvolution 7x7, Add bias, LayerNorm, fc1 (MatMul or 1x1 Convolution) + Add,
                  Gelu (erf), [GRN (V2): ReduceL2, ReduceMean, Add eps, Divide, Multiply x, Multiply
                  weight, Add bias, Add x], fc2 + Add, [layer scale Multiply], residual Add
    downsample    LayerNorm, Convolution 2x2 stride 2, Add bias
    head          ReduceMean over H, W, LayerNorm, MatMul + Add, [SoftMax]
Every operation on the input must be one the walk took (`check_nothing_else`), so nothing the
graph computes is left out.
"""

from __future__ import annotations

import math

import numpy as np

from ...errors import CheckpointError
from .graph import Graph, dims, out_port
from .pattern import Walk, bias, conv, layer_norm, linear
from .preprocessing import Stem, preprocessing

MAX_BLOCKS = 64  # per stage; ConvNeXt-XXLarge has 30


def block(w: Walk, dim: int, state: dict, name: str) -> None:
    x = w.at
    start_axes = w.axes
    state[f"{name}.conv_dw.weight"] = conv(w, 7, 1, 3, "depthwise", group=True)
    if state[f"{name}.conv_dw.weight"].shape[0] != dim:
        raise CheckpointError(f"the depthwise convolution of {name} has {state[f'{name}.conv_dw.weight'].shape[0]} "
                              f"channels, its stage {dim}")
    state[f"{name}.conv_dw.bias"] = bias(w, dim, "depthwise")
    w.channels = dim
    state[f"{name}.norm.weight"], state[f"{name}.norm.bias"] = layer_norm(w, dim, "block")
    fc1 = linear(w, "fc1")
    hidden = fc1.shape[0]
    if fc1.shape[1] != dim:
        raise CheckpointError(f"{name}: fc1 of shape {list(fc1.shape)} on {dim} channels")
    state[f"{name}.mlp.fc1.weight"], state[f"{name}.mlp.fc1.bias"] = fc1, bias(w, hidden, "fc1")
    gelu = w.take("Gelu", skip_layout=False)
    if gelu.data.get("approximation_mode", "ERF").upper() != "ERF":
        raise CheckpointError(f"layer {gelu.id}: GELU approximated by {gelu.data['approximation_mode']}, not erf")
    response_norm = grn(w, hidden)
    if response_norm is not None:
        state[f"{name}.mlp.grn.weight"], state[f"{name}.mlp.grn.bias"] = response_norm
    fc2 = linear(w, "fc2")
    if fc2.shape != (dim, hidden):
        raise CheckpointError(f"{name}: fc2 of shape {list(fc2.shape)}, expected {[dim, hidden]}")
    state[f"{name}.mlp.fc2.weight"], state[f"{name}.mlp.fc2.bias"] = fc2, bias(w, dim, "fc2")
    w.follow_layout()
    users = w.g.users(w.at)
    if len(users) == 1 and users[0].type == "Multiply":
        state[f"{name}.gamma"] = w.per_channel(w.take("Multiply"), dim, "the layer scale")
        w.follow_layout()
    residual = w.take("Add", skip_layout=False)
    if x not in residual.inputs or w.axes != start_axes:
        raise CheckpointError(f"layer {residual.id}: {name} does not end in a residual Add of its input")


def is_block_start(w: Walk) -> bool:
    return any(n.type == "GroupConvolution" for n in w.g.users(w.at))


def grn(w: Walk, hidden: int) -> tuple[np.ndarray, np.ndarray] | None:
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
    step = Walk(w.g, out_port(l2), w.axes)
    step.take("ReduceMean", skip_layout=False)                                      # mean_c(g)
    eps = step.g.value(step.other(step.take("Add", skip_layout=False)))
    divide = step.take("Divide", skip_layout=False)
    if eps is None or eps.size != 1 or divide.inputs[0] != out_port(l2) \
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


def walk_network(graph: Graph) -> tuple[dict[str, np.ndarray], Stem, bool]:
    """timm-named weights in timm layouts (stem as the IR's, preprocessing composed apart), the
    preprocessing, and whether the graph ends in a SoftMax."""
    parameter, result = _input_and_output(graph)
    shape = dims(parameter.data.get("shape", ""), "the input's shape")
    if len(shape) != 4 or 3 not in (shape[1], shape[3]):
        raise CheckpointError(f"the input has shape {list(shape)}, not an image batch")
    # (N, H, W, 3) input (a PrePostProcessor's NHWC tensor) is moved to NCHW before the stem
    nhwc = shape[3] == 3 and shape[1] != 3
    w = Walk(graph, out_port(parameter), (0, 3, 1, 2) if nhwc else (0, 1, 2, 3))
    stem = preprocessing(w)
    state: dict[str, np.ndarray] = {}
    dim = _stem(w, state)
    for i in range(4):
        if i > 0:
            dim = _downsample(w, state, i, dim)
        _stage(w, state, i, dim)
    softmax = _head(w, state, dim)
    graph.visited.update((parameter.id, result.id))
    check_nothing_else(graph)
    return state, stem, softmax


def _input_and_output(graph: Graph):
    parameters = [n for n in graph.nodes.values() if n.type == "Parameter"]
    results = [n for n in graph.nodes.values() if n.type == "Result"]
    if len(parameters) != 1 or len(results) != 1:
        raise CheckpointError(f"a ConvNeXt IR has one input and one output; this one has {len(parameters)} "
                              f"and {len(results)}")
    return parameters[0], results[0]


def _stem(w: Walk, state: dict) -> int:
    """Convolution 4x4 stride 4, Add bias, LayerNorm -> the channels it gives"""
    state["stem.0.weight"] = conv(w, 4, 4, 0, "stem")
    if state["stem.0.weight"].shape[1] != 3:
        raise CheckpointError(f"the stem convolution takes {state['stem.0.weight'].shape[1]} channels, not 3")
    dim = state["stem.0.weight"].shape[0]
    state["stem.0.bias"] = bias(w, dim, "stem")
    w.channels = dim
    state["stem.1.weight"], state["stem.1.bias"] = layer_norm(w, dim, "stem")
    w.follow_layout()
    return dim


def _downsample(w: Walk, state: dict, i: int, dim: int) -> int:
    """LayerNorm, Convolution 2x2 stride 2, Add bias -> the channels it gives"""
    prefix = f"stages.{i}.downsample"
    w.channels = dim
    state[f"{prefix}.0.weight"], state[f"{prefix}.0.bias"] = layer_norm(w, dim, "downsample")
    state[f"{prefix}.1.weight"] = conv(w, 2, 2, 0, "downsample")
    if state[f"{prefix}.1.weight"].shape[1] != dim:
        raise CheckpointError(f"the downsampling convolution of stage {i} takes "
                              f"{state[f'{prefix}.1.weight'].shape[1]} channels, its input has {dim}")
    dim = state[f"{prefix}.1.weight"].shape[0]
    state[f"{prefix}.1.bias"] = bias(w, dim, "downsample")
    w.follow_layout()
    return dim


def _stage(w: Walk, state: dict, i: int, dim: int) -> None:
    """The blocks of stage i, as many as begin with a depthwise convolution."""
    j = 0
    while is_block_start(w):
        if j >= MAX_BLOCKS:
            raise CheckpointError(f"stage {i} has over {MAX_BLOCKS} blocks")
        block(w, dim, state, f"stages.{i}.blocks.{j}")
        j += 1
        w.follow_layout()
    if j == 0:
        raise w.fail(f"the first block of stage {i} (a 7x7 GroupConvolution)")


def _head(w: Walk, state: dict, dim: int) -> bool:
    """ReduceMean over H, W, LayerNorm, MatMul + Add, [SoftMax], Result -> whether a SoftMax"""
    pool = w.take("ReduceMean")
    axes = w.g.value(pool.inputs[1])
    if axes is None or sorted(int(a) % 4 for a in np.ravel(axes)) != sorted(w.axes[2:]):
        raise CheckpointError(f"layer {pool.id}: the head's pooling is not a mean over H and W")
    if pool.data.get("keep_dims") != "true":
        w.axes = (0, 1)
    w.channels, w.pooled = dim, True
    w.follow_layout()
    state["head.norm.weight"], state["head.norm.bias"] = layer_norm(w, dim, "head")
    w.follow_layout()
    fc = linear(w, "head")
    if fc.shape[1] != dim:
        raise CheckpointError(f"the classifier takes {fc.shape[1]} features, the network gives {dim}")
    state["head.fc.weight"], state["head.fc.bias"] = fc, bias(w, fc.shape[0], "classifier")
    softmax = False
    w.follow_layout()
    users = w.g.users(w.at)
    if len(users) == 1 and users[0].type in ("SoftMax", "Softmax"):
        if int(users[0].data.get("axis", "1")) % 2 != 1:
            raise CheckpointError(f"layer {users[0].id}: a SoftMax not over the classes")
        softmax = True
        w.move(users[0])
        w.follow_layout()
        users = w.g.users(w.at)
    if len(users) != 1 or users[0].type != "Result":
        raise w.fail("the output (Result) after the classifier")
    return softmax


def check_nothing_else(graph: Graph) -> None:
    """Every operation on the input is one the walk took: a graph that computes anything more
    (a side branch merged back where the walk does not look) is not read as a ConvNeXt."""
    stray = [n for n in graph.nodes.values() if n.id not in graph.visited and n.type != "Const"
             and not (n.out_dims and graph.value((n.id, next(iter(n.out_dims)))) is not None)]
    if stray:
        shown = ", ".join(f"{n.type} (layer {n.id})" for n in stray[:5])
        raise CheckpointError(f"not a ConvNeXt graph npconvnext reads: {len(stray)} operations outside the "
                              f"network it found, e.g. {shown}")
