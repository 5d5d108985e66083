"""Argument checks for the engine's public wrappers, and the form they pass weights on in.

The compiled kernels index their arrays without bounds checks (Numba's default, and the reason
they vectorise): a weight one channel short would be read past its end, and an output too small
written past its end, corrupting the process's memory. So every public wrapper (layernorm.py,
depthwise.py, grn.py, linear.py, mlp.py, adamw.py, block.py) states the shapes it needs before
it calls a kernel, and a misfit is an InputError that names the wrapper and each argument that
does not fit. The array a wrapper works on is checked to be one (`takes_array`) before the
wrapper reads the others' expected shapes from it. Weights go on to the kernels read-only
(`kernel_weights`), and arrays updated in place are checked to allow it (`check_in_place`).
"""

from __future__ import annotations

import functools
import inspect

import numpy as np

from ..errors import InputError

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))  # the dtypes the kernels are written for
_LEFT_OUT = object()  # an argument not passed at all (None is a value a caller may pass)


def takes_array(name: str):
    """Decorator: InputError naming the wrapper unless its argument `name`, the array it works
    on and reads the other arguments' expected shapes from, is a NumPy array with at least one
    dimension. A call that leaves the argument out gets Python's own TypeError."""
    def decorate(wrapper):
        position = list(inspect.signature(wrapper).parameters).index(name)

        @functools.wraps(wrapper)
        def checked(*args, **kwargs):
            x = args[position] if position < len(args) else kwargs.get(name, _LEFT_OUT)
            if x is not _LEFT_OUT and (not isinstance(x, np.ndarray) or x.ndim == 0):
                what = ("None" if x is None else "a 0-d array" if isinstance(x, np.ndarray)
                        else f"a {type(x).__name__}")
                raise InputError(f"{wrapper.__name__}: {name} is {what}, not an array with dimensions")
            return wrapper(*args, **kwargs)
        return checked
    return decorate


def last_dimension(array) -> int:
    """The size of an argument's last dimension, to derive the shapes of the others from; 0 for
    None or a scalar, which then fits no expected shape."""
    return np.shape(array)[-1] if np.ndim(array) else 0


def check_arguments(wrapper: str, name: str, x: np.ndarray, ndim: int | None = None, optional: tuple[str, ...] = (),
                    **expected) -> None:
    """InputError unless x (called `name`) is float32 or float64 with `ndim` dimensions (any if
    None), and each expected argument, given as name=(array, shape), has that shape, or that
    many elements if the shape is an int. None passes only for the arguments named optional
    (left out); for any other, the kernel would read a one-element array as a whole row."""
    problems = []
    if x.dtype not in FLOATS:
        problems.append(f"{name} is {x.dtype}, not float32 or float64")
    if ndim is not None and x.ndim != ndim:
        problems.append(f"{name} has {x.ndim} dimensions, not {ndim}")
    for argument, (array, shape) in expected.items():
        if array is None:
            if argument not in optional:
                problems.append(f"{argument} is None")
        elif isinstance(shape, int):  # any shape of that many elements: the wrapper reshapes it
            if np.size(array) != shape:
                problems.append(f"{argument} has shape {np.shape(array)} where {name} of shape {x.shape} needs "
                                f"{shape} elements")
        elif np.shape(array) != shape:
            problems.append(f"{argument} has shape {np.shape(array)} where {name} of shape {x.shape} needs {shape}")
    if problems:
        raise InputError(f"{wrapper}: " + "; ".join(problems))


def check_in_place(wrapper, array, ndim):
    """InputError unless array can be updated in place: writeable, C-contiguous, ndim dimensions."""
    if array.ndim != ndim or not array.flags.c_contiguous or not array.flags.writeable:
        raise InputError(f"{wrapper}: expected a writeable C-contiguous {ndim}-D array to update in place, got "
                         f"{array.ndim}-D, contiguous {array.flags.c_contiguous}")


def kernel_weights(dtype, *arrays):
    """The arrays as the kernels take their weights: C-contiguous, in dtype (None: their own),
    read-only; None stays None. A copy is made only for another dtype or layout. Numba compiles
    a kernel once per argument type, and writability is part of it: weights mapped from a file
    are read-only, others are not. The kernels never write their weights, so taking every weight
    read-only compiles (and loads from the JIT cache) one version of each kernel, not two."""
    weights = []
    for a in arrays:
        if a is not None:
            a = np.ascontiguousarray(a, dtype)
            if a.flags.writeable:  # a view, so the caller's array keeps its flags
                a = a.view()
                a.flags.writeable = False
        weights.append(a)
    return weights
