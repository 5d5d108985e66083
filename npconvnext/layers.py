"""ConvNeXt's layers as pure NumPy functions: the readable reference.

Every function takes and returns channels-last arrays, (N, H, W, C). ConvNeXt's block mixes
space in one depthwise conv and then does all its work per pixel (LayerNorm, two linears, GELU)
over the channel axis; with channels last those per-pixel steps are a contiguous last axis, the
linears are plain matrix products, and the whole net needs a single transpose at its input.
The official code (facebookresearch/ConvNeXt models/convnext.py) permutes to channels-last
inside each block for the same reason.

Weights arrive here already in compute layout (see `params.py`): a linear is (in, out), a
depthwise kernel (k, k, C), a patchify conv (k * k * in, out).

The Numba kernels in `engine/kernels.py` are checked against these functions. Nothing here takes a
numeric shortcut: GELU uses the exact erf, LayerNorm the biased variance as PyTorch does, and
every constant is a Python float so float64 inputs stay float64 throughout.
"""

from __future__ import annotations

import math

import numpy as np

_SQRT_HALF = math.sqrt(0.5)

# NumPy has no erf ufunc; the C library's erf through math.erf (within an ulp) is the reference
# the Numba kernels' own vectorising erfs are tested against (kernels._erf32, kernels._erf64).
_erf = np.vectorize(math.erf, otypes=[np.float64])


def patchify_conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, patch: int) -> np.ndarray:
    """Non-overlapping patch x patch convolution with stride `patch` (stem and downsampling).

    A stride-k conv with a k x k kernel sees each input pixel once, so it is a matrix product of
    the flattened patches with the kernel. Rows and columns that do not fill a whole patch are
    dropped, as PyTorch's conv with no padding drops them.
    x: (N, H, W, Cin); weight: (patch * patch * Cin, Cout); bias: (Cout,) -> (N, H//p, W//p, Cout)
    """
    n, h, w, cin = x.shape
    ho, wo = h // patch, w // patch
    x = x[:, : ho * patch, : wo * patch, :]
    patches = x.reshape(n, ho, patch, wo, patch, cin)      # (N, Ho, kh, Wo, kw, Cin)
    patches = patches.transpose(0, 1, 3, 2, 4, 5)           # (N, Ho, Wo, kh, kw, Cin)
    # one 2-D matmul: on a 4-D array NumPy would call BLAS once per row of patches
    patches = patches.reshape(n * ho * wo, patch * patch * cin)  # (N * Ho * Wo, kh * kw * Cin)
    out = patches @ weight                                  # (N * Ho * Wo, Cout)
    out += bias
    return out.reshape(n, ho, wo, weight.shape[1])          # (N, Ho, Wo, Cout)


def depthwise_conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """k x k depthwise convolution, stride 1, zero padding k // 2 (ConvNeXt's spatial mixing).

    Each channel is convolved with its own kernel; the output keeps the input's size.
    x: (N, H, W, C); weight: (k, k, C); bias: (C,) -> (N, H, W, C)
    """
    k = weight.shape[0]
    pad = k // 2
    n, h, w, c = x.shape
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))  # (N, H + 2p, W + 2p, C)
    out = np.zeros_like(x)
    for i in range(k):
        for j in range(k):
            out += padded[:, i : i + h, j : j + w, :] * weight[i, j]
    return out + bias


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the channel (last) axis of each pixel independently.

        y = (x - mean_c(x)) / sqrt(var_c(x) + eps) * weight + bias,  var biased (divide by C)

    timm has two modules for this, `LayerNorm` on channels-last tensors and `LayerNorm2d` on
    channels-first ones; both normalise each pixel's C values, so on channels-last data they
    are this one function. It never normalises over H and W.
    x: (..., C); weight, bias: (C,) -> (..., C)
    """
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(axis=-1, keepdims=True)
    return centred / np.sqrt(var + eps) * weight + bias


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU, x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2))); not the tanh approximation.

    erf is evaluated in float64 and the result cast back, so float32 inputs get the correctly
    rounded float32 GELU.
    """
    return (0.5 * x * (1.0 + _erf(x * _SQRT_HALF))).astype(x.dtype, copy=False)


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Per-pixel fully connected layer, a 1x1 conv. x: (..., Cin); weight: (Cin, Cout) -> (..., Cout)"""
    return x @ weight + bias


def global_response_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """ConvNeXt-V2's GRN: feature competition across channels.

        g_c = ||x_c||_2 over H, W          (N, 1, 1, C)  each channel's global energy
        n_c = g_c / (mean_c(g) + eps)      (N, 1, 1, C)  relative to the average channel
        y   = x + (bias + weight * (x * n))
    x: (N, H, W, C); weight, bias: (C,) -> (N, H, W, C)
    """
    energy = np.sqrt((x * x).sum(axis=(1, 2), keepdims=True))       # (N, 1, 1, C)
    relative = energy / (energy.mean(axis=-1, keepdims=True) + eps)  # (N, 1, 1, C)
    return x + (bias + weight * (x * relative))


def global_avg_pool(x: np.ndarray) -> np.ndarray:
    """Mean over all pixels. x: (N, H, W, C) -> (N, C)"""
    return x.mean(axis=(1, 2))
