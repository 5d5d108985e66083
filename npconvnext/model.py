"""`ConvNeXt`: a network's weights and dtype, and the public calls on NCHW inputs as in timm.

The network itself is `network.py`; this class keeps the weights (in compute layout, see
`params.py`), chooses the implementation that runs them (the NumPy reference or the fused
engine) and converts at the public boundary: inputs and `forward_features` outputs are NCHW.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType

import numpy as np

from . import engine, layers, network
from .config import ConvNeXtConfig
from .convention import TIMM, Convention, describe_input, to_network_input, to_outputs, with_convention
from .errors import InputError
from .formats.mapped import mapping_of, memory_owner, release_all, release_pages
from .params import (check_state_dict, expected_shapes, init_state_dict, layout_kind, param_of, timm_name,
                     to_compute_layout, to_timm_layout)
from .preprocessing import DataConfig
from .weights import NetworkWeights, frozen_after, owned

BACKENDS = ("numba", "numpy")  # numba: the fused engine (default); numpy: the readable reference


class BFloat16:
    """The bfloat16 precision, `model.dtype` of a model made with dtype="bfloat16": the two
    linears of every block keep their weights as bfloat16 bits (uint16, half float32's bytes)
    and take their inputs rounded to bfloat16, summing the exact products in float32; everything
    else is float32. NumPy has no bfloat16 dtype, so this object stands in for one: it reads
    "bfloat16" (`str`, `.name`, `== "bfloat16"`), and where NumPy takes it as a dtype
    (`x.astype(model.dtype)`, through its `dtype` attribute) it is float32, what such a model
    takes and gives. (So `np.dtype("float32") == model.dtype` is True, the other way round False.)"""

    name = "bfloat16"
    dtype = np.dtype(np.float32)  # the model's inputs, activations and outputs

    def __eq__(self, other):
        return isinstance(other, BFloat16) or (isinstance(other, str) and other == self.name)

    def __hash__(self):
        return hash(self.name)

    def __repr__(self):
        return self.name


BFLOAT16 = BFloat16()
DTYPES = (np.dtype(np.float32), np.dtype(np.float64), BFLOAT16)


class HandedOver(dict):
    """A state dict handed to the model whole, its arrays held by nothing else: the model takes
    them as they are (no copy to guard against the caller's later edits) and drops each entry
    once it has stored it, so that a weight it converts (rounds to bfloat16, widens) is freed
    before the next is made. `create_model` hands over what it read from a file; a caller's own
    dict is never emptied."""


def _stored_all(state: Mapping[str, np.ndarray], dtype: np.dtype | BFloat16) -> dict[str, np.ndarray]:
    """Every weight as the model keeps it (`_stored`), a HandedOver dict emptied as it goes.
    A weight copied from a mapped file gives its pages back once stored (formats/mapped.py),
    and all of them once more at the end: reading a weight maps a window of its neighbours'
    pages too (the OS's fault-around), so that only the weights used in place stay mapped.
    Handed-over memory is kept in place once: a file may give one array for two weights (a
    shared constant), which training would otherwise update twice, in place."""
    handed = isinstance(state, HandedOver)
    params, copied, kept = {}, [], set()
    for name in list(state):
        array = state.pop(name) if handed else state[name]
        params[name] = _stored(name, array, dtype, owned=handed)
        if params[name].flags.writeable and np.may_share_memory(params[name], array):
            owner = id(memory_owner(array))  # alive while params holds a view of it
            if owner in kept:
                params[name] = params[name].copy(order="K")
            kept.add(owner)
        if mapping_of(array) is not None and not np.may_share_memory(params[name], array):
            release_pages(array)
            copied.append(array)  # a view of the file: holding it holds no memory
    release_all(copied)
    return params


def _stored(name: str, array: np.ndarray, dtype: np.dtype | BFloat16, owned: bool = False) -> np.ndarray:
    """A weight as the model keeps it: in compute layout and dtype, owned by the model. A
    read-only array (memory-mapped from a safetensors file) is used in place, and so is an
    `owned` one (handed over: HandedOver), the model's already. In bfloat16, the blocks' fc1 and
    fc2 as bfloat16 bits (`_stored_bfloat16`), the rest float32."""
    if isinstance(dtype, BFloat16) and _block_linear(name):
        return _stored_bfloat16(name, array, owned)
    return _stored_float(name, array, np.dtype(dtype), owned)


def _stored_float(name: str, array: np.ndarray, dtype: np.dtype, owned: bool) -> np.ndarray:
    """`_stored` for a weight kept as floats; a bfloat16 tensor's bits are widened first."""
    if isinstance(array, layers.BFloat16Bits):
        array, owned = layers.from_bfloat16(array), True   # a fresh array, the model's own
    compute = to_compute_layout(name, np.asarray(array))
    if layout_kind(name) not in ("linear", "patchify"):
        return np.array(compute, dtype=dtype, order="C")  # small: copied
    # Linear weights (most of the parameters) are used through their transpose, (in, out) in
    # Fortran order: (out, in) rows, as timm stores them and as the engine's tiles read them
    # (engine/gemm.py), so a mapped file is not duplicated. The patchify kernels too.
    if (compute.flags.writeable and not owned) or compute.dtype != dtype or not compute.flags.f_contiguous:
        return np.array(compute, dtype=dtype, order="F")  # the caller's later edits must not reach us
    return compute  # handed over (the model's own) or mapped read-only: used in place


def _block_linear(name: str) -> bool:
    row = param_of(name)
    return row is not None and row.module == "block" and row.field in ("fc1_weight", "fc2_weight")


def _stored_bfloat16(name: str, array: np.ndarray, owned: bool) -> np.ndarray:
    """A block linear's weight as bfloat16 bits in compute layout, (in, out) uint16 in Fortran
    order: (out, in) rows, as the pair tile reads them (engine/gemm_bf16.py). A bfloat16 file's
    bits (layers.BFloat16Bits) are used in place, mapped from a safetensors file; any other
    floats are rounded to nearest even (`_rounded_bfloat16`), once."""
    if isinstance(array, layers.BFloat16Bits):
        bits = np.asarray(array)                                                 # (out, in[, 1, 1])
        if bits.flags.writeable and not owned:
            bits = bits.copy()  # the caller's later edits must not reach us
    else:
        bits = _rounded_bfloat16(np.asarray(array))
    bits = to_compute_layout(name, bits)                                         # (in, out), a view
    bits.flags.writeable = False
    return bits


_ROUNDED_AT_ONCE = 1 << 20  # elements rounded at a time: the rounding's temporaries stay small


def _rounded_bfloat16(array: np.ndarray) -> np.ndarray:
    """layers.to_bfloat16 of a weight, a block of rows at a time; each block's pages of a mapped
    file are given back once rounded (formats/mapped.py), so that loading a float32 file into a
    bfloat16 model never holds more than a block of the file's linears. (out, ...) -> uint16"""
    rows = array.reshape(len(array), -1)                                         # (out, in)
    bits = np.empty(rows.shape, np.uint16)
    step = max(1, _ROUNDED_AT_ONCE // max(1, rows.shape[1]))
    for first in range(0, len(rows), step):
        block = rows[first : first + step]
        bits[first : first + step] = layers.to_bfloat16(block)
        release_pages(block)
    return bits.reshape(array.shape)


def _as_dtype(dtype) -> np.dtype | BFloat16:
    if isinstance(dtype, BFloat16) or (isinstance(dtype, str) and dtype == BFloat16.name):
        return BFLOAT16
    try:
        resolved = None if dtype is None else np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or not any(resolved == d for d in DTYPES[:2]):  # dtype == None is float64 in numpy
        raise InputError(f"dtype must be 'float32', 'float64' or 'bfloat16', not {dtype!r}")
    return resolved


class ConvNeXt:
    """A ConvNeXt classifier; call it on (N, 3, H, W) normalised images.

    Build it with `npconvnext.create_model`. `params` is a read-only view of the weights by timm
    name in compute layout; `state_dict()` gives copies in timm's layouts, and
    `load_state_dict` replaces them.

    `convention` says what the model takes (layout, channel order, pixel range), whether it
    normalises inside and whether it ends in a softmax, as the model in its file did (see
    convention.py);
    `data_config` is the preprocessing that gives exactly that input:
    `model(np.stack([npconvnext.preprocess(path, model.data_config)]))`.
    """

    def __init__(self, config: ConvNeXtConfig, state_dict: Mapping[str, np.ndarray],
                 dtype: str | np.dtype = "float32", backend: str = "numba", source: str = "weights",
                 convention: Convention = TIMM, data_config: DataConfig | None = None,
                 data_config_source: str = "timm's defaults"):
        self.config = config
        self.dtype = _as_dtype(dtype)
        self.backend = backend
        self.source = source
        self.convention = convention
        self.data_config = with_convention(data_config or DataConfig(), convention)
        self.data_config_source = data_config_source
        self.class_names: tuple[str, ...] | None = None  # the classifier's labels, where the weights say
        self.frozen: set[str] = set()  # timm names an optimizer leaves alone (see requires_grad_)
        self.load_state_dict(state_dict, source)

    def load_state_dict(self, state_dict: Mapping[str, np.ndarray], source: str = "weights") -> None:
        """Replace every weight (timm names and layouts), checked strictly first. A HandedOver
        dict is emptied as its weights are stored."""
        check_state_dict(state_dict, self.config, source)
        self._params = _stored_all(state_dict, self.dtype)
        self._weights = NetworkWeights.from_params(self._params, self.config)

    @property
    def weights(self) -> NetworkWeights:
        """The weights typed as the network uses them: stem, stages of blocks, head."""
        return self._weights

    # ---- for training (train/): thin methods over weights.py's helpers, on the model as in torch

    def trainable_params(self) -> dict[str, np.ndarray]:
        """The weights by timm name in compute layout, each writable and owned by the model, for
        an optimizer to update in place. Weights mapped from a file are copied here, once:
        nothing is ever written back to the file. Training stays float32: InputError for a
        bfloat16 model."""
        self.check_trainable()
        copies = owned(self._params)
        if copies is not None:
            self._params = copies
            self._weights = NetworkWeights.from_params(self._params, self.config)
        return self._params

    def check_trainable(self) -> None:
        """InputError unless this model can be trained: training stays float32 (or float64)."""
        if isinstance(self.dtype, BFloat16):
            raise InputError(f"{self.config.name} is a bfloat16 model, for inference only: training stays float32 "
                             "(as do the gradients explain.py takes); create a float32 model "
                             "(create_model(..., dtype='float32')) to train it")

    def requires_grad_(self, prefix: str = "", requires_grad: bool = True) -> ConvNeXt:
        """Freeze (False) or unfreeze the weights whose timm names start with `prefix`, e.g.
        model.requires_grad_("", False).requires_grad_("head", True) trains the head only.
        Returns the model, as torch's method of the same name does."""
        self.frozen = frozen_after(self.frozen, list(self._params), prefix, requires_grad)
        return self

    def reset_classifier(self, num_classes: int, seed: int = 0) -> None:
        """A new head.fc for `num_classes` classes, initialised as timm initialises it (see
        params.init_state_dict), for fine-tuning; 0 drops the classifier, as timm's (the model
        then gives the pooled, normed features)."""
        fc = (timm_name("head", "fc_weight"), timm_name("head", "fc_bias"))
        state = {name: self._timm_layout(name, shape) for name, shape in expected_shapes(self.config).items()
                 if name not in fc}
        self.config = replace(self.config, num_classes=num_classes)
        self.class_names = None
        fresh = init_state_dict(self.config, seed)
        state.update({name: fresh[name] for name in fc if name in fresh})
        self.load_state_dict(state, "reset_classifier")

    @property
    def params(self) -> Mapping[str, np.ndarray]:
        """The weights by timm name in compute layout (read-only mapping; see load_state_dict)."""
        return MappingProxyType(self._params)

    @property
    def backend(self) -> str:
        """Which implementation runs the network; switching it keeps the weights."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if name not in BACKENDS:
            raise InputError(f"backend must be one of {BACKENDS}, not {name!r}")
        self._backend = name

    # ---- public API, NCHW like timm -------------------------------------------------------

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits (or probabilities, if the model's file ends in a softmax: see `convention`).
        x: (N, 3, H, W) normalised images, or what `convention` says -> (N, num_classes); without
        a classifier (num_classes 0) the pooled, normed features (N, C_last), as timm's."""
        out = self._run(network.forward, self.network_input(x))
        return out if self.config.num_classes == 0 else to_outputs(out, self.convention)

    def forward_intermediates(self, x: np.ndarray, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's `forward_intermediates`: the outputs of the stages `indices` (None: all; an int
        n: the last n; a sequence: those, negative from the end), NCHW, and unless
        `intermediates_only` the last feature map first: (features, [stage outputs]). `stop_early`
        stops after the last stage taken (the features are then its output). `norm` applies
        timm's norm_pre, an identity for every architecture built here."""
        if output_fmt != "NCHW":
            raise InputError(f"output_fmt must be 'NCHW', as timm's ConvNeXt, not {output_fmt!r}")
        take = take_indices(len(self.config.depths), indices)
        last = max(take) if stop_early else len(self.config.depths) - 1
        stages: dict[int, np.ndarray] = {}

        def record(name: str, a: np.ndarray) -> None:
            if name.startswith("stages.") and name.count(".") == 1:
                stages[int(name.split(".")[1])] = a
                if int(name.split(".")[1]) == last:
                    raise _Stop

        try:
            network.forward_features(self.network_input(x), self._weights, self.config, self._ops(), record)
        except _Stop:
            pass
        nchw = {i: np.ascontiguousarray(a.transpose(0, 3, 1, 2)) for i, a in stages.items()}
        intermediates = [nchw[i] for i in take]
        return intermediates if intermediates_only else (nchw[last], intermediates)

    @property
    def feature_info(self) -> list[dict]:
        """timm's feature_info: per stage its channels, total stride and module name."""
        return [dict(num_chs=c, reduction=self.config.patch_size * 2 ** i, module=f"stages.{i}")
                for i, c in enumerate(self.config.dims)]

    def forward_features(self, x: np.ndarray) -> np.ndarray:
        """Last stage's feature map. x: (N, 3, H, W) -> (N, C_last, H // 32, W // 32) (NCHW, as
        timm's, whatever the input layout)"""
        features = self._run(network.forward_features, self.network_input(x))  # (N, h, w, C)
        return np.ascontiguousarray(features.transpose(0, 3, 1, 2))                 # (N, C, h, w)

    def forward_head(self, features: np.ndarray, pre_logits: bool = False) -> np.ndarray:
        """Head on `forward_features` output. (N, C, h, w) -> (N, num_classes), or the pooled
        and normed (N, C) embedding if `pre_logits`."""
        features = np.asarray(features)
        if features.ndim != 4 or features.shape[1] != self.config.num_features:
            raise InputError(f"forward_head expects (N, {self.config.num_features}, h, w) features, "
                             f"got shape {features.shape}")
        features = features.astype(self.dtype, copy=False).transpose(0, 2, 3, 1)  # (N, h, w, C)
        return network.forward_head(features, self._weights.head, self.config.norm_eps, pre_logits, self._ops(),
                                    norm=self.config.norm)

    def trace(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every intermediate activation of the reference path, by timm module name.

        Each array has the layout timm's forward hook on that module shows, so the two line up
        one to one:
          stem.0, stem.1, stem, stages.i.downsample.0/1, stages.i.blocks.j.conv_dw,
          stages.i.blocks.j, stages.i     (N, C, H, W)
          stages.i.blocks.j.norm, .mlp.fc1, .mlp.act, .mlp.grn (V2), .mlp.fc2
                                 (N, H, W, C) for the linear-MLP variants (tiny and up: timm
                                 permutes to channels-last around them), (N, C, H, W) for the
                                 1x1-conv ones (atto ... nano, `config.conv_mlp`)
          stages.i.blocks.j.layer_scale   (N, C, H, W) gamma * fc2 output, the residual branch
                                 (no timm module: its block multiplies by gamma inline; V2
                                 has no gamma and this is the fc2 output)
          head.global_pool, head.norm   (N, C, 1, 1);   head.fc   (N, num_classes)
        The input itself is under "input", (N, 3, H, W).
        """
        x_cl = self.network_input(x)
        mlp_steps = (".norm", ".mlp.fc1", ".mlp.act", ".mlp.grn", ".mlp.fc2")
        trace = {"input": np.ascontiguousarray(np.asarray(x, dtype=self.dtype))}

        def record(name: str, a: np.ndarray) -> None:
            if a.ndim == 2:  # head: pooled (N, C) -> (N, C, 1, 1) as timm's pool keeps dims
                a = a if name == "head.fc" else a[:, :, None, None]
            elif not (name.endswith(mlp_steps) and not self.config.conv_mlp):
                a = a.transpose(0, 3, 1, 2)                          # (N, H, W, C) -> (N, C, H, W)
            trace[name] = np.ascontiguousarray(a)

        network.forward(x_cl, self._weights, self.config, network.REFERENCE, record)
        return trace

    def num_params(self) -> int:
        """Number of learnable scalars; equals sum(p.numel() for p in timm_model.parameters())."""
        return sum(int(a.size) for a in self._params.values())

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the weights by timm name in timm's (PyTorch) layouts, in this model's dtype
        (bfloat16: float32, the bfloat16 weights' values exactly)."""
        return {name: np.array(self._timm_layout(name, shape), order="C", copy=True)
                for name, shape in expected_shapes(self.config).items()}

    def _timm_layout(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """One weight in timm's layout, bfloat16 bits widened to float32."""
        array = to_timm_layout(name, self._params[name], shape)
        return layers.from_bfloat16(array) if array.dtype == np.uint16 else array

    def describe(self) -> str:
        """Where the weights, the input convention and the preprocessing come from, in a few lines."""
        return "\n".join([
            f"{self.config.name}: {self.num_params():,} parameters, {self.config.num_classes} classes, "
            f"{self.dtype.name}, backend {self.backend}",
            f"weights: {self.source}",
            *describe_input(self.convention, self.data_config, self.data_config_source),
        ])

    def __repr__(self) -> str:
        return (f"ConvNeXt({self.config.name}, {self.num_params():,} params, "
                f"dtype={self.dtype.name}, backend={self.backend!r})")

    # ---- channels-last inside ----------------------------------------------------------------

    def _ops(self) -> network.Ops:
        """The operations the backend runs the network with."""
        return network.REFERENCE if self._backend == "numpy" else engine.FUSED

    def _run(self, fn, x: np.ndarray) -> np.ndarray:
        """fn(x, weights, config, ops): the fused engine with the batch shared between threads,
        or the reference as one plain call."""
        if self._backend == "numpy":
            return fn(x, self._weights, self.config, self._ops())
        return engine.map_over_batch(lambda images: fn(images, self._weights, self.config, self._ops()), x)

    def network_input(self, x: np.ndarray) -> np.ndarray:
        """The caller's images, as `convention` says they come, as the network takes them:
        channels last, RGB, normalised, in the model's dtype. -> (N, H, W, 3)"""
        return to_network_input(to_channels_last(x, self.config, self.dtype, self.convention.layout), self.convention)


def to_channels_last(x: np.ndarray, config: ConvNeXtConfig, dtype: np.dtype, layout: str = "NCHW") -> np.ndarray:
    """Checked images in `dtype`, channels last. (N, 3, H, W), or (N, H, W, 3) given
    layout "NHWC" (then used as it is, without a copy when dtype and order fit) -> (N, H, W, 3)"""
    x = np.asarray(x)
    channels_axis = 1 if layout == "NCHW" else 3
    if x.ndim != 4 or x.shape[channels_axis] != config.in_chans:
        expected = f"(N, {config.in_chans}, H, W)" if layout == "NCHW" else f"(N, H, W, {config.in_chans})"
        raise InputError(f"expected input of shape {expected} ({layout}), got {x.shape}")
    if x.dtype.kind != "f":
        raise InputError(f"expected floating-point images, got dtype {x.dtype}; see npconvnext.preprocess "
                         "and model.data_config")
    if layout == "NCHW":
        x = x.transpose(0, 2, 3, 1)                                           # (N, H, W, 3)
    if min(x.shape[1:3]) < config.reduction:
        raise InputError(f"input {x.shape[1]}x{x.shape[2]} is smaller than the network's total stride "
                         f"{config.reduction}: every side must be at least {config.reduction}")
    return np.ascontiguousarray(x, dtype=dtype)



class _Stop(Exception):
    """Raised by forward_intermediates' recorder once the last stage it needs has run."""


def take_indices(num_stages: int, indices: int | Sequence[int] | None) -> list[int]:
    """timm's feature_take_indices: None all stages, an int n the last n, a sequence those
    (negative from the end), as absolute indices; InputError out of range."""
    if indices is None:
        indices = num_stages
    if isinstance(indices, (int, np.integer)):
        if not 0 < indices <= num_stages:
            raise InputError(f"last-n ({indices}) is out of range (1 to {num_stages})")
        return list(range(num_stages - indices, num_stages))
    taken = [num_stages + i if i < 0 else i for i in indices]
    if any(not 0 <= i < num_stages for i in taken):
        raise InputError(f"stage indices {list(indices)} out of range for {num_stages} stages")
    return taken


class FeatureModel:
    """timm's `features_only=True` model: calling it gives the outputs of the stages
    `out_indices` as a list of NCHW arrays; `feature_info` says their channels and strides."""

    def __init__(self, model: ConvNeXt, out_indices: Sequence[int] = (0, 1, 2, 3)):
        self.model = model
        self.out_indices = tuple(take_indices(len(model.config.depths), out_indices))
        self.feature_info = FeatureInfo([model.feature_info[i] for i in self.out_indices])

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        return self.model.forward_intermediates(x, self.out_indices, stop_early=True, intermediates_only=True)

    def __repr__(self) -> str:
        return f"FeatureModel({self.model!r}, out_indices={self.out_indices})"


class FeatureInfo(list):
    """The taken stages' feature info, with timm's `channels()`, `reduction()` and `module_name()`."""

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self]

    def module_name(self) -> list[str]:
        return [f["module"] for f in self]
