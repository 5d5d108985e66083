"""Global Response Normalization (ConvNeXt V2's GRN), forward and backward.

GRN (Woo et al., "ConvNeXt V2", 2023, section 3; timm's `GlobalResponseNorm`) scales each
hidden channel by its L2 norm over the image's pixels divided by the mean of those norms:
    out = x + bias + weight * (x * n),  n = g / (mean_c(g) + eps),  g = ||x||_2 over pixels

    forward    two passes over the hidden tensor per image: the channels' energies, then the
               update in place (`global_response_norm_in_place`, the block's step; the copying
               `global_response_norm` for training's recompute)
    backward   two passes: per-channel sums over each image's pixels (of x^2, dout * x and
               dout) in float64 chunks, then dx per pixel from per-image coefficients

Twins: layers.global_response_norm, layers.global_response_norm_backward.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .checks import check_arguments, kernel_weights, takes_array
from .jit import CHUNK_PIXELS, JIT, PARALLEL_JIT, chunk_count, rows_or_parallel


@numba.njit(**JIT)
def _response_energy(image, eps):
    # image: (P, D) one image's pixels by hidden channels -> (D,) each channel's L2 norm over
    # the pixels divided by the mean of those norms; see layers.global_response_norm
    p, d = image.shape
    energy = np.zeros(d)  # float64 sums of squares per channel
    for px in range(p):
        for ch in range(d):
            v = image[px, ch]
            energy[ch] += v * v
    for ch in range(d):
        energy[ch] = math.sqrt(energy[ch])
    return (energy / (energy.mean() + eps)).astype(image.dtype)


@numba.njit(**JIT)
def _apply_response_norm_rows(image, weight, bias, relative, first, last):
    # image: (P, D), pixels first..last-1 in place
    d = image.shape[1]
    for px in range(first, last):
        for ch in range(d):
            v = image[px, ch]
            image[px, ch] = v + (bias[ch] + weight[ch] * (v * relative[ch]))


@numba.njit(**JIT)
def _global_response_norm_rows(x, weight, bias, eps, first, last):
    # x: (N, P, D) pixels by hidden channels, images first..last-1 in place
    for img in range(first, last):
        _apply_response_norm_rows(x[img], weight, bias, _response_energy(x[img], eps), 0, x.shape[1])


@numba.njit(**PARALLEL_JIT)
def _global_response_norm_(x, weight, bias, eps):
    # x: (N, P, D) pixels by hidden channels, in place
    for img in range(x.shape[0]):
        relative = _response_energy(x[img], eps)
        for px in numba.prange(x.shape[1]):
            _apply_response_norm_rows(x[img], weight, bias, relative, px, px + 1)


# ---- backward -----------------------------------------------------------------------------------


@numba.njit(**JIT)
def _grn_sums_rows(dout, x, sums, first, last):
    # dout, x: (N, P, D); sums: (N * chunks, 3, D) float64, chunks of CHUNK_PIXELS pixels of each
    # image, jobs first..last-1 (job = image * chunks + chunk): sum of x^2, of dout * x, of dout
    n, p, d = x.shape
    per_image = sums.shape[0] // n
    for job in range(first, last):
        img = job // per_image
        chunk = job % per_image
        out = sums[job]
        out[...] = 0.0
        for px in range(chunk * CHUNK_PIXELS, min(p, (chunk + 1) * CHUNK_PIXELS)):
            x_row = x[img, px]
            d_row = dout[img, px]
            for ch in range(d):
                v = np.float64(x_row[ch])
                g = np.float64(d_row[ch])
                out[0, ch] += v * v
                out[1, ch] += g * v
                out[2, ch] += g


@numba.njit(**PARALLEL_JIT)
def _grn_sums(dout, x, sums):
    for job in numba.prange(sums.shape[0]):
        _grn_sums_rows(dout, x, sums, job, job + 1)


@numba.njit(**JIT)
def _grn_input_grad_rows(dout, x, scale, coef, dx, first, last):
    # dout, x, dx: (N, P, D); scale, coef: (N, D) float64; pixel rows first..last-1 of the N * P:
    #   dx = dout * scale + coef * x
    n, p, d = x.shape
    for pixel in range(first, last):
        img = pixel // p
        px = pixel % p
        x_row = x[img, px]
        d_row = dout[img, px]
        out = dx[img, px]
        s_row = scale[img]
        c_row = coef[img]
        for ch in range(d):
            out[ch] = d_row[ch] * s_row[ch] + c_row[ch] * x_row[ch]


@numba.njit(**PARALLEL_JIT)
def _grn_input_grad(dout, x, scale, coef, dx):
    for pixel in numba.prange(x.shape[0] * x.shape[1]):
        _grn_input_grad_rows(dout, x, scale, coef, dx, pixel, pixel + 1)


# ---- public wrappers: same signatures and results as their twins in layers.py ------------------


@takes_array("x")
def global_response_norm_in_place(x, weight, bias, eps):
    """layers.global_response_norm, written over x: (N, P, D) pixels by hidden channels (the
    block's step: its input is the fc1 output no one else reads)"""
    check_arguments("global_response_norm", "x", x, 3, weight=(weight, x.shape[-1:]), bias=(bias, x.shape[-1:]))
    weight, bias = kernel_weights(x.dtype, weight, bias)  # in x's dtype, as the result
    rows_or_parallel(_global_response_norm_rows, _global_response_norm_, (x, weight, bias, eps), x.shape[0])


@takes_array("x")
def global_response_norm(x, weight, bias, eps):
    """layers.global_response_norm. x: (N, H, W, D) -> (N, H, W, D)"""
    check_arguments("global_response_norm", "x", x, 4)
    out = x.copy()
    n, h, w, d = x.shape
    global_response_norm_in_place(out.reshape(n, h * w, d), weight, bias, eps)
    return out


@takes_array("x")
def global_response_norm_backward(dout, x, weight, eps):
    """layers.global_response_norm_backward. dout, x: (N, H, W, D) -> dx, dweight (D,), dbias (D,)

    Two passes: per-channel sums over each image's pixels (of x^2, dout * x and dout), then
    dx = dout * (1 + weight * n) + (dg / g) * x per pixel, with the per-image coefficients
    worked out in between from the sums, as the twin's docstring derives them."""
    check_arguments("global_response_norm_backward", "x", x, 4, dout=(dout, x.size), weight=(weight, x.shape[-1:]))
    n, h, w, d = x.shape
    x3 = np.ascontiguousarray(x).reshape(n, h * w, d)                        # (N, P, D)
    d3 = np.ascontiguousarray(dout, dtype=x.dtype).reshape(x3.shape)
    per_image = chunk_count(h * w, CHUNK_PIXELS)
    sums = np.empty((n * per_image, 3, d))
    rows_or_parallel(_grn_sums_rows, _grn_sums, (d3, x3, sums), n * per_image)
    square, d_times_x, d_sum = sums.reshape(n, per_image, 3, d).sum(axis=1).transpose(1, 0, 2)  # 3 x (N, D)
    weight64 = weight.astype(np.float64)
    energy = np.sqrt(square)                                                 # (N, D) g
    denominator = energy.mean(axis=-1, keepdims=True) + eps                  # (N, 1) mean(g) + eps
    relative = energy / denominator                                          # (N, D) n
    d_relative = weight64 * d_times_x                                        # (N, D) dn
    d_energy = d_relative / denominator - (d_relative * energy).sum(axis=-1, keepdims=True) / (d * denominator ** 2)
    coef = np.where(energy > 0, d_energy / np.where(energy > 0, energy, 1.0), 0.0)  # 0 where g = 0, as torch
    scale = 1.0 + weight64 * relative
    dx = np.empty_like(x3)
    rows_or_parallel(_grn_input_grad_rows, _grn_input_grad, (d3, x3, scale, coef, dx), n * h * w)
    return (dx.reshape(x.shape), (relative * d_times_x).sum(axis=0).astype(x.dtype),
            d_sum.sum(axis=0).astype(x.dtype))
