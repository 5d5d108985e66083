"""Every public wrapper of the compiled kernels refuses arguments that do not fit with an
InputError, before a kernel could read or write past an array's end (they index without
bounds checks): one wrong argument at a time, and the same call with it right runs."""

import inspect

import numpy as np
import pytest

from npconvnext import InputError, layers
from npconvnext.engine import adamw, bfloat16, block, depthwise, gemm, grn, layernorm, linear, mlp
from npconvnext.network import BlockWeights

N, H, W, C, D = 2, 8, 8, 8, 32
rng = np.random.default_rng(0)


def r(*shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def panels(m, k):
    return gemm.to_panels(r(m, k))


def bits(*shape):
    """A linear's weight as a bfloat16 model keeps it: bfloat16 bits, (in, out) in Fortran order"""
    return np.asfortranarray(layers.to_bfloat16(r(*shape)))


def block_weights(**wrong):
    weights = dict(conv_dw_weight=r(7, 7, C), conv_dw_bias=r(C), norm_weight=r(C), norm_bias=r(C),
                   fc1_weight=r(C, D), fc1_bias=r(D), fc2_weight=r(D, C), fc2_bias=r(C), gamma=r(C),
                   grn_weight=None, grn_bias=None)
    return BlockWeights(**{**weights, **wrong})


# wrapper -> (its arguments that fit, {argument: a value that does not fit})
CASES = {
    depthwise.depthwise_conv_layer_norm: (
        dict(x=r(N, H, W, C), conv_w=r(7, 7, C), conv_b=r(C), norm_w=r(C), norm_b=r(C), eps=1e-6),
        dict(x=r(H, W, C), conv_w=r(7, 7, C + 1), conv_b=r(C - 1), norm_w=r(C + 8), norm_b=r(1))),
    layernorm.layer_norm: (
        dict(x=r(N, H, W, C), weight=r(C), bias=r(C), eps=1e-6),
        dict(x=r(N, H, W, C).astype(np.float16), weight=r(C - 1), bias=r(C, 1))),
    layernorm.rms_norm: (
        dict(x=r(N, H, W, C), weight=r(C), bias=None, eps=1e-6),
        dict(x=r(N, H, W, C).astype(np.float16), weight=r(C + 1), bias=r(C))),
    layernorm.simple_norm: (
        dict(x=r(N, H, W, C), weight=r(C), bias=None, eps=1e-6),
        dict(x=r(N, H, W, C).astype(np.int32), weight=r(1), bias=r(C))),
    mlp.gelu: (
        dict(x=r(N, H, W, C)),
        dict(x=r(N, H, W, C).astype(np.int64))),
    grn.global_response_norm: (
        dict(x=r(N, H, W, D), weight=r(D), bias=r(D), eps=1e-6),
        dict(x=r(N * H * W, D), weight=r(C), bias=r(D + 1))),
    grn.global_response_norm_in_place: (
        dict(x=r(N, H * W, D), weight=r(D), bias=r(D), eps=1e-6),
        dict(x=r(N, H, W, D), weight=r(C), bias=r(D + 1))),
    linear.linear_gelu_panels: (
        dict(x=r(N, H, W, C), weight=r(C, D), bias=r(D)),
        dict(x=r(N, H, W, C).astype(np.int64), weight=r(D, C), bias=r(C))),
    linear.panels_linear: (
        dict(hidden=panels(N * H * W, D), weight=r(D, C), bias=r(C), gamma=r(C), shortcut=r(N, H, W, C)),
        dict(hidden=r(4, D, 3), weight=r(D + 1, C), bias=r(C + 1), gamma=r(D), shortcut=r(N, 2 * H, W, C))),
    linear.linear_gelu_pairs: (
        dict(x=r(N, H, W, C), weight=bits(C, D), bias=r(D)),
        dict(x=r(N, H, W, C).astype(np.int64), weight=r(C, D), bias=r(D + 1))),
    linear.pairs_linear: (
        dict(hidden=bfloat16.to_pair_panels(r(N * H * W, D)), weight=bits(D, C), bias=r(C), gamma=r(C),
             shortcut=r(N, H, W, C)),
        dict(hidden=r(4, D, 3), weight=bits(D + 2, C), bias=r(C + 1), gamma=r(D), shortcut=r(N, 2 * H, W, C))),
    linear.linear: (
        dict(x=r(N, H, W, C), weight=r(C, D), bias=r(D)),
        dict(weight=r(C + 1, D), bias=r(D - 1))),
    linear.patchify_conv: (
        dict(x=r(N, H, W, C), weight=r(2 * 2 * C, D), bias=r(D), patch=2),
        dict(x=r(H, W, C), weight=r(C, D), bias=r(C))),
    mlp.mlp_residual: (
        dict(y=r(N, H, W, C), fc1_weight=r(C, D), fc1_bias=r(D), fc2_weight=r(D, C), fc2_bias=r(C), gamma=r(C),
             shortcut=r(N, H, W, C)),
        dict(fc1_weight=r(D, C), fc1_bias=r(D + 1), fc2_weight=r(D, C + 1), fc2_bias=r(D), gamma=r(C + 1),
             shortcut=r(N, H, W + 1, C))),
    block.convnext_block: (
        dict(x=r(N, H, W, C), w=block_weights(), eps=1e-6, grn_eps=1e-6),
        dict(w=block_weights(fc2_weight=r(D, C + 1)))),
    depthwise.depthwise_conv: (
        dict(x=r(N, H, W, C), weight=r(7, 7, C), bias=r(C), shortcut=r(N, H, W, C),
             out=np.empty((N, H, W, C), np.float32)),
        dict(weight=r(7, 7, 1), bias=r(C + 1), shortcut=r(N, H, W + 2, C), out=np.empty((N, H, W, C - 1), np.float32))),
    depthwise.depthwise_conv_backward: (
        dict(dout=r(N, H, W, C), x=r(N, H, W, C), weight=r(7, 7, C)),
        dict(dout=r(N, H, W - 1, C), weight=r(7, 7, C + 1))),
    layernorm.layer_norm_backward: (
        dict(dout=r(N, H, W, C), x=r(N, H, W, C), weight=r(C), eps=1e-6),
        dict(dout=r(N, H, W, C + 1), weight=r(C - 1))),
    depthwise.depthwise_conv_layer_norm_keep: (
        dict(x=r(N, H, W, C), conv_w=r(7, 7, C), conv_b=r(C), norm_w=r(C), norm_b=r(C), eps=1e-6),
        dict(conv_w=r(7, 7, C - 1), conv_b=r(C + 1), norm_w=r(1), norm_b=r(2 * C))),
    layernorm.layer_norm_backward_kept: (
        dict(dout=r(N, H, W, C), xhat=r(N, H, W, C), rstd=r(N, H, W), weight=r(C)),
        dict(dout=r(N, H, W, 2 * C), rstd=r(N, H, W + 1), weight=r(C + 1))),
    mlp.bias_gelu_keep: (
        dict(hidden=r(N * H * W, D), bias=r(D)),
        dict(hidden=r(N * H * W, D, dtype=np.int32), bias=r(D + 1))),
    mlp.gelu_and_slope_in_place: (
        dict(hidden=r(N * H * W, D)),
        dict(hidden=r(N, H * W, D))),
    mlp.gelu_backward_with_bias: (
        dict(d_activated=r(N * H * W, D), slope=r(N * H * W, D)),
        dict(d_activated=r(N * H * W, D + 1))),
    mlp.bias_scale_residual_keep: (
        dict(branch=r(N, H, W, C), bias=r(C), gamma=r(C), keep=r(N), shortcut=r(N, H, W, C)),
        dict(bias=r(C + 1), gamma=r(1), keep=r(N + 1), shortcut=r(N, H, W, C - 1))),
    mlp.layer_scale_backward: (
        dict(dout=r(N, H, W, C), branch=r(N, H, W, C), gamma=r(C), keep=r(N)),
        dict(dout=r(N, H, W - 1, C), gamma=r(C - 1), keep=r(N - 1))),
    adamw.adamw_update: (
        dict(param=r(C, D), grad=r(C, D), exp_avg=r(C, D), exp_avg_sq=np.abs(r(C, D)), decay=0.99, lerp_weight=0.1,
             beta2=0.999, step_size=1e-3, bias_correction2_sqrt=0.5, eps=1e-8),
        dict(grad=r(C, D + 1), exp_avg=r(D, C), exp_avg_sq=r(C, D).astype(np.float64))),
    grn.global_response_norm_backward: (
        dict(dout=r(N, H, W, D), x=r(N, H, W, D), weight=r(D), eps=1e-6),
        dict(dout=r(N, H, W, D - 1), weight=r(C))),
}
BAD = [(f, argument) for f, (_, wrong) in CASES.items() for argument in wrong]


def fresh(arguments):
    """The arguments with every array copied: the wrappers may write some in place."""
    return {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in arguments.items()}


# the engine's modules with public wrappers, and their public functions that are not wrappers:
# depthwise.py's row kernel (its compiled form checks the shapes itself) and the padding it reads,
# linear.py's fc1 + GELU tile, a step of the kernels there and in mlp.py, and layernorm.py's
# table of its norms
LAYER_MODULES = (adamw, block, depthwise, grn, layernorm, linear, mlp)
NOT_WRAPPERS = {depthwise.depthwise_row, depthwise.pad_rows, linear.fc1_gelu_tile, layernorm.norm_of}
# the wrappers whose arguments another wrapper's checks name
CHECKED_AS = {block.convnext_block: "mlp_residual", grn.global_response_norm_in_place: "global_response_norm"}


def public_wrappers(module):
    return {f for name, f in vars(module).items()
            if inspect.isfunction(f) and not name.startswith("_") and f.__module__ == module.__name__}


def test_every_public_wrapper_is_tried():
    assert set().union(*map(public_wrappers, LAYER_MODULES)) - NOT_WRAPPERS == set(CASES)


@pytest.mark.parametrize("wrapper", list(CASES), ids=lambda f: f.__name__)
def test_arguments_that_fit_run(wrapper):
    fitting, _ = CASES[wrapper]
    wrapper(**fresh(fitting))


def refused(wrapper, arguments):
    """The call raises an InputError whose message starts with the wrapper's name (a block's
    weights are checked by the MLP's wrapper, GRN's in place by GRN's)."""
    name = CHECKED_AS.get(wrapper, wrapper.__name__)
    with pytest.raises(InputError, match=rf"^{name}: "):
        wrapper(**arguments)
    return True


@pytest.mark.parametrize("wrapper, argument", BAD, ids=[f"{f.__name__}-{a}" for f, a in BAD])
def test_an_argument_that_does_not_fit_is_refused(wrapper, argument):
    fitting, wrong = CASES[wrapper]
    arguments = fresh(fitting)
    arguments[argument] = wrong[argument]
    assert refused(wrapper, arguments)


def optional(wrapper):
    """The arguments None may stand for: those that default to None, and layer scale and drop
    path (None means 1)."""
    defaults = {name for name, p in inspect.signature(wrapper).parameters.items() if p.default is None}
    return defaults | {"gamma", "keep"}


# the array each wrapper works on: None there fails in Python before any kernel runs
INPUTS = {"x", "y", "hidden", "xhat", "slope", "branch", "param"}
# a required array left out (None): the kernels would read a one-element array as a row
NONE = [(f, argument) for f, (fitting, _) in CASES.items() for argument in fitting
        if isinstance(fitting[argument], np.ndarray) and argument not in INPUTS | optional(f)]


@pytest.mark.parametrize("wrapper, argument", NONE, ids=[f"{f.__name__}-{a}" for f, a in NONE])
def test_a_required_array_left_out_is_refused(wrapper, argument):
    fitting, _ = CASES[wrapper]
    arguments = fresh(fitting)
    arguments[argument] = None
    assert refused(wrapper, arguments)


NOT_ARRAYS = {"None": None, "0-d": np.float32(1.0).reshape(()), "list": [[1.0, 2.0]]}
WORKED_ON = [(f, kind) for f in CASES for kind in NOT_ARRAYS]


@pytest.mark.parametrize("wrapper, kind", WORKED_ON, ids=[f"{f.__name__}-{k}" for f, k in WORKED_ON])
def test_the_array_worked_on_must_be_one(wrapper, kind):
    """The array a wrapper reads the other arguments' shapes from is checked before it is read."""
    fitting, _ = CASES[wrapper]
    arguments = fresh(fitting)
    arguments[next(a for a in arguments if a in INPUTS)] = NOT_ARRAYS[kind]
    with pytest.raises(InputError, match=rf"^{wrapper.__name__}: "):
        wrapper(**arguments)


def test_a_wrapper_called_without_its_array_gets_pythons_error():
    with pytest.raises(TypeError):
        layernorm.layer_norm(weight=r(C), bias=r(C), eps=1e-6)
