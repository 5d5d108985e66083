"""AdamW's update in one pass over a parameter and its two moments (the numba backend's
optimizer step; train/optim.py's AdamW calls it).

Its twin is train/optim.py's NumPy steps, torch's order: the kernel gives them to the bit, so it
is compiled without fused multiply-adds (jit.EXACT_JIT).
"""

from __future__ import annotations

import numba
import numpy as np

from ..errors import InputError
from .jit import EXACT_JIT, EXACT_PARALLEL_JIT, INLINE_JIT, chunk_count, rows_or_parallel


_CHUNK_ELEMENTS = 1 << 16  # elements of a parameter per job of the AdamW loop


@numba.njit(**EXACT_JIT)
def _adamw_rows(param, grad, exp_avg, exp_avg_sq, decay, lerp_weight, lerp_rest, beta2, one_minus_beta2,
                step_size, bias_correction2_sqrt, eps, first, last):
    # param, grad, exp_avg, exp_avg_sq: (P,) flat, one dtype, as are the scalars; elements of
    # chunks first..last-1 of _CHUNK_ELEMENTS, each step rounded as train.optim.AdamW's NumPy
    # statements round it (torch's order): decay, lerp of the mean, the squares' average, update
    p = param.shape[0]
    for chunk in range(first, last):
        for i in range(chunk * _CHUNK_ELEMENTS, min(p, (chunk + 1) * _CHUNK_ELEMENTS)):
            g = grad[i]
            m = exp_avg[i]
            if lerp_weight < 0.5:                 # torch's lerp, from whichever end is nearer
                m = m + lerp_weight * (g - m)
            else:
                m = g - (g - m) * lerp_rest    # lerp_rest = 1 - lerp_weight
            v = exp_avg_sq[i] * beta2 + (one_minus_beta2 * g) * g
            denominator = np.sqrt(v) / bias_correction2_sqrt + eps
            param[i] = param[i] * decay - step_size * (m / denominator)
            exp_avg[i] = m
            exp_avg_sq[i] = v


@numba.njit(**EXACT_PARALLEL_JIT)
def _adamw(param, grad, exp_avg, exp_avg_sq, decay, lerp_weight, lerp_rest, beta2, one_minus_beta2, step_size,
           bias_correction2_sqrt, eps):
    for chunk in numba.prange(_chunks_of(param.shape[0], _CHUNK_ELEMENTS)):
        _adamw_rows(param, grad, exp_avg, exp_avg_sq, decay, lerp_weight, lerp_rest, beta2, one_minus_beta2,
                    step_size, bias_correction2_sqrt, eps, chunk, chunk + 1)


@numba.njit(**INLINE_JIT)
def _chunks_of(count, size):
    return (count + size - 1) // size


def adamw_update(param, grad, exp_avg, exp_avg_sq, decay, lerp_weight, beta2, step_size,
                 bias_correction2_sqrt, eps):
    """One AdamW step in place on param and its moments, all of one dtype and memory layout (C
    or Fortran contiguous), as train.optim.AdamW computes it in NumPy:
        param *= decay;  exp_avg = lerp(exp_avg, grad, lerp_weight)
        exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * grad^2
        param -= step_size * exp_avg / (sqrt(exp_avg_sq) / bias_correction2_sqrt + eps)
    The scalars are rounded to the arrays' dtype first, as NumPy rounds them."""
    arrays = (param, grad, exp_avg, exp_avg_sq)
    if (not all(isinstance(a, np.ndarray) for a in arrays)
            or len({(a.dtype, a.shape, a.strides) for a in arrays}) != 1
            or not all(a.flags.writeable for a in arrays[::2])
            or not (param.flags.c_contiguous or param.flags.f_contiguous)):
        raise InputError("adamw_update: AdamW's arrays must share one dtype, shape and contiguous layout, "
                         "and be writeable")
    flat = [a.reshape(-1) if a.flags.c_contiguous else a.T.reshape(-1) for a in arrays]  # views, memory order
    scalar = param.dtype.type
    args = (*flat, scalar(decay), scalar(lerp_weight), scalar(1.0 - lerp_weight), scalar(beta2), scalar(1.0 - beta2),
            scalar(step_size), scalar(bias_correction2_sqrt), scalar(eps))
    chunks = chunk_count(param.size, _CHUNK_ELEMENTS)
    if chunks == 1:  # a bias or norm scale: not worth waking threads
        _adamw_rows(*args, 0, 1)
    else:
        rows_or_parallel(_adamw_rows, _adamw, args, chunks)
