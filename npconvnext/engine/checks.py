"""Argument checks for the engine's public wrappers.

The compiled kernels index their arrays without bounds checks (Numba's default, and the reason
they vectorise): a weight one channel short would be read past its end, and an output too small
written past its end, corrupting the process's memory. So every public wrapper in kernels.py
and backward_kernels.py states the shapes it needs before it calls a kernel, and a misfit is
an InputError that names the wrapper and each argument that does not fit.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))  # the dtypes the kernels are written for


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
