"""ConvNeXt's layers as pure NumPy functions: the readable reference.

Every function takes and returns channels-last arrays, (N, H, W, C). ConvNeXt's block mixes
space in one depthwise conv and then does all its work per pixel (LayerNorm, two linears, GELU)
over the channel axis; with channels last those per-pixel steps are a contiguous last axis, the
linears are plain matrix products, and the whole net needs a single transpose at its input.
The official code (facebookresearch/ConvNeXt models/convnext.py) permutes to channels-last
inside each block for the same reason.

Weights arrive here already in compute layout (see `params.py`): a linear is (in, out), a
depthwise kernel (k, k, C), a patchify conv (k * k * in, out).

Each layer's backward twin, `<layer>_backward`, stands right after it: given the gradient of
the loss with respect to the layer's output (`dout`) and what the forward saw, it returns the
gradients with respect to the input and the weights, derived in its docstring.

The Numba kernels in `engine/` are checked against these functions. Nothing here takes a
numeric shortcut: GELU uses the exact erf, LayerNorm the biased variance as PyTorch does, and
every constant is a Python float so float64 inputs stay float64 throughout.
"""

from __future__ import annotations

import math

import numpy as np

_SQRT_HALF = math.sqrt(0.5)

# NumPy has no erf ufunc; the C library's erf through math.erf (within an ulp) is the reference
# the Numba kernels' own vectorising erfs are tested against (engine/erf.py: erf32, erf64).
_erf = np.vectorize(math.erf, otypes=[np.float64])


def patchify_conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, patch: int) -> np.ndarray:
    """Non-overlapping patch x patch convolution with stride `patch` (stem and downsampling).

    A stride-k conv with a k x k kernel sees each input pixel once, so it is a matrix product of
    the flattened patches with the kernel. Rows and columns that do not fill a whole patch are
    dropped, as PyTorch's conv with no padding drops them.
    x: (N, H, W, Cin); weight: (patch * patch * Cin, Cout); bias: (Cout,) -> (N, H//p, W//p, Cout)
    """
    n, h, w, _ = x.shape
    ho, wo = h // patch, w // patch
    # one 2-D matmul: on a 4-D array NumPy would call BLAS once per row of patches
    out = patches(x, patch) @ weight                        # (N * Ho * Wo, Cout)
    out += bias
    return out.reshape(n, ho, wo, weight.shape[1])          # (N, Ho, Wo, Cout)


def patches(x: np.ndarray, patch: int) -> np.ndarray:
    """(N, H, W, Cin) -> (N * Ho * Wo, patch * patch * Cin), the rows patchify_conv multiplies
    (the engine's patchify multiplies the same rows)."""
    n, h, w, cin = x.shape
    ho, wo = h // patch, w // patch
    cut = x[:, : ho * patch, : wo * patch, :].reshape(n, ho, patch, wo, patch, cin)  # (N, Ho, kh, Wo, kw, Cin)
    cut = cut.transpose(0, 1, 3, 2, 4, 5)                                              # (N, Ho, Wo, kh, kw, Cin)
    return cut.reshape(n * ho * wo, patch * patch * cin)


def patchify_conv_backward(dout: np.ndarray, x: np.ndarray, weight: np.ndarray, patch: int):
    """Gradients of patchify_conv: out = P @ W + b with P the flattened patches of x.

        dW = P^T dout,   db = sum over rows of dout,   dP = dout W^T
    and dP goes back to the pixels it was cut from; the dropped remainder rows and columns
    get zero, as they did not reach the output.
    dout: (N, Ho, Wo, Cout); x: (N, H, W, Cin) -> dx like x, dweight like weight, dbias (Cout,)
    """
    n, h, w, cin = x.shape
    ho, wo = h // patch, w // patch
    d = dout.reshape(n * ho * wo, -1)                                        # (M, Cout)
    dweight = patches(x, patch).T @ d                                        # (p * p * Cin, Cout)
    dpatches = (d @ weight.T).reshape(n, ho, wo, patch, patch, cin)          # (N, Ho, Wo, kh, kw, Cin)
    dx = np.zeros_like(x)
    dx[:, : ho * patch, : wo * patch, :] = dpatches.transpose(0, 1, 3, 2, 4, 5).reshape(
        n, ho * patch, wo * patch, cin)
    return dx, dweight, d.sum(axis=0)


def strided_conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, kernel: int = 3, stride: int = 2,
                 pad: int = 1) -> np.ndarray:
    """Overlapping k x k convolution with a stride and zero padding (timm's overlapping stems:
    3x3, stride 2, padding 1), as a matrix product of the im2col windows with the kernel.
    x: (N, H, W, Cin); weight: (k * k * Cin, Cout) in the patchify layout; bias: (Cout,)
    -> (N, Ho, Wo, Cout), Ho = (H + 2 pad - k) // stride + 1
    """
    rows, (n, ho, wo) = windows(x, kernel, stride, pad)
    return (rows @ weight + bias).reshape(n, ho, wo, weight.shape[1])


def windows(x: np.ndarray, kernel: int, stride: int, pad: int):
    """(N, H, W, Cin) -> the (N * Ho * Wo, k * k * Cin) rows strided_conv multiplies, (N, Ho, Wo)."""
    n, h, w, cin = x.shape
    ho, wo = (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    taps = [padded[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :]
            for i in range(kernel) for j in range(kernel)]                   # k * k of (N, Ho, Wo, Cin)
    return np.stack(taps, axis=3).reshape(n * ho * wo, kernel * kernel * cin), (n, ho, wo)


def strided_conv_backward(dout: np.ndarray, x: np.ndarray, weight: np.ndarray, kernel: int = 3,
                          stride: int = 2, pad: int = 1):
    """Gradients of strided_conv: out = R @ W + b with R the im2col windows of padded x.

        dW = R^T dout,   db = sum over rows of dout,   dR = dout W^T
    and each window's dR is added back onto the padded pixels it read (windows overlap, so a
    pixel collects from several); dx is the padded gradient without its border.
    dout: (N, Ho, Wo, Cout); x: (N, H, W, Cin) -> dx like x, dweight like weight, dbias (Cout,)
    """
    n, h, w, cin = x.shape
    rows, (_, ho, wo) = windows(x, kernel, stride, pad)
    d = dout.reshape(n * ho * wo, -1)                                        # (M, Cout)
    dweight = rows.T @ d                                                     # (k * k * Cin, Cout)
    drows = (d @ weight.T).reshape(n, ho, wo, kernel, kernel, cin)
    dpadded = np.zeros((n, h + 2 * pad, w + 2 * pad, cin), dtype=x.dtype)
    for i in range(kernel):
        for j in range(kernel):
            dpadded[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :] += \
                drows[:, :, :, i, j]
    return dpadded[:, pad : pad + h, pad : pad + w, :], dweight, d.sum(axis=0)


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


def depthwise_conv_backward(dout: np.ndarray, x: np.ndarray, weight: np.ndarray):
    """Gradients of depthwise_conv: out[y, x] = b + sum_ij w[i, j] * padded[y + i, x + j].

        dw[i, j] = sum over N, y, x of padded[y + i, x + j] * dout[y, x]    (per channel)
        db       = sum over N, y, x of dout
        dpadded[y + i, x + j] += w[i, j] * dout[y, x]; dx is dpadded without its border
    dout, x: (N, H, W, C); weight: (k, k, C) -> dx (N, H, W, C), dweight (k, k, C), dbias (C,)
    """
    k = weight.shape[0]
    pad = k // 2
    n, h, w, c = x.shape
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))  # (N, H + 2p, W + 2p, C)
    dpadded = np.zeros_like(padded)
    dweight = np.empty_like(weight)
    for i in range(k):
        for j in range(k):
            dweight[i, j] = (padded[:, i : i + h, j : j + w, :] * dout).sum(axis=(0, 1, 2))
            dpadded[:, i : i + h, j : j + w, :] += dout * weight[i, j]
    return dpadded[:, pad : pad + h, pad : pad + w, :], dweight, dout.sum(axis=(0, 1, 2))


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


def layer_norm_backward(dout: np.ndarray, x: np.ndarray, weight: np.ndarray, eps: float):
    """Gradients of layer_norm, with xhat = (x - mean) * rstd and rstd = 1 / sqrt(var + eps).

        dweight = sum over pixels of dout * xhat,   dbias = sum over pixels of dout
        g = dout * weight;  dx = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat))
    (the two means are the gradient flowing through the mean and through the variance).
    The statistics are recomputed from x rather than saved: one cheap pass.
    dout, x: (..., C) -> dx (..., C), dweight (C,), dbias (C,)
    """
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    rstd = 1.0 / np.sqrt((centred * centred).mean(axis=-1, keepdims=True) + eps)
    xhat = centred * rstd
    pixels = tuple(range(x.ndim - 1))
    g = dout * weight
    dx = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return dx, (dout * xhat).sum(axis=pixels), dout.sum(axis=pixels)


def rms_norm(x: np.ndarray, weight: np.ndarray, bias: None, eps: float) -> np.ndarray:
    """RMS norm over the channel axis (timm's RmsNorm2d, convnext_atto_rms): no centring, no bias.

        y = x / sqrt(mean_c(x^2) + eps) * weight
    `bias` is there for LayerNorm's signature and must be None. x: (..., C) -> (..., C)
    """
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * weight


def rms_norm_backward(dout: np.ndarray, x: np.ndarray, weight: np.ndarray, eps: float):
    """Gradients of rms_norm, with r = 1 / sqrt(mean_c(x^2) + eps) and xhat = x r:
    d xhat_i / d x_j = r delta_ij - r^3 x_i x_j / C, so with g = dout * weight

        dx = r (g - xhat mean_c(g xhat)),   dweight = sum over pixels of dout * xhat
    dout, x: (..., C) -> dx (..., C), dweight (C,), dbias None
    """
    rstd = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    xhat = x * rstd
    g = dout * weight
    dx = rstd * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return dx, (dout * xhat).sum(axis=tuple(range(x.ndim - 1))), None


def simple_norm(x: np.ndarray, weight: np.ndarray, bias: None, eps: float) -> np.ndarray:
    """timm's SimpleNorm2d (convnext_zepto_rms): x scaled by its channels' unbiased variance,
    not centred, no bias (torch.var divides by C - 1).

        y = x / sqrt(var_c(x) + eps) * weight,   var_c(x) = sum_c (x - mean_c(x))^2 / (C - 1)
    `bias` must be None. x: (..., C) -> (..., C)
    """
    centred = x - x.mean(axis=-1, keepdims=True)
    var = (centred * centred).sum(axis=-1, keepdims=True) / (x.shape[-1] - 1)
    return x / np.sqrt(var + eps) * weight


def simple_norm_backward(dout: np.ndarray, x: np.ndarray, weight: np.ndarray, eps: float):
    """Gradients of simple_norm, with r = 1 / sqrt(var + eps): d var / d x_j = 2 (x_j - m) / (C - 1)
    (the mean's own derivative sums to zero against x_j - m), so with g = dout * weight

        dx = r g - r^3 (x - m) / (C - 1) * sum_c(g x),   dweight = sum over pixels of dout * x r
    dout, x: (..., C) -> dx (..., C), dweight (C,), dbias None
    """
    centred = x - x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt((centred * centred).sum(axis=-1, keepdims=True) / (x.shape[-1] - 1) + eps)
    g = dout * weight
    dx = rstd * g - rstd ** 3 * centred / (x.shape[-1] - 1) * (g * x).sum(axis=-1, keepdims=True)
    return dx, (dout * x * rstd).sum(axis=tuple(range(x.ndim - 1))), None


def norm_of(kind: str):
    """The norm function of config.norm, with layer_norm's signature (x, weight, bias, eps)."""
    return {"layernorm": layer_norm, "rmsnorm": rms_norm, "simplenorm": simple_norm}[kind]


def norm_backward_of(kind: str):
    """The backward twin of norm_of(kind): (dout, x, weight, eps) -> (dx, dweight, dbias or None)."""
    return {"layernorm": layer_norm_backward, "rmsnorm": rms_norm_backward, "simplenorm": simple_norm_backward}[kind]


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU, x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2))); not the tanh approximation.

    erf is evaluated in float64 and the result cast back, so float32 inputs get the correctly
    rounded float32 GELU.
    """
    return (0.5 * x * (1.0 + _erf(x * _SQRT_HALF))).astype(x.dtype, copy=False)


_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu_backward(dout: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Gradient of the exact GELU: d/dx x Phi(x) = Phi(x) + x phi(x), phi the normal density.
    dout, x: any shape -> dx of that shape"""
    cdf = 0.5 * (1.0 + _erf(x * _SQRT_HALF))
    pdf = _INV_SQRT_2PI * np.exp(-0.5 * x.astype(np.float64) ** 2)
    return (dout * (cdf + x * pdf)).astype(x.dtype, copy=False)


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Per-pixel fully connected layer, a 1x1 conv. x: (..., Cin); weight: (Cin, Cout) -> (..., Cout)"""
    flat = x.reshape(-1, x.shape[-1])  # one 2-D matmul: on a 4-D array NumPy calls BLAS per row
    return (flat @ weight + bias).reshape(*x.shape[:-1], weight.shape[1])


def linear_backward(dout: np.ndarray, x: np.ndarray, weight: np.ndarray):
    """Gradients of linear, out = x W + b over all pixels M:
        dx = dout W^T,  dW = x^T dout (summed over pixels),  db = sum over pixels of dout
    dout: (..., Cout); x: (..., Cin); weight: (Cin, Cout) -> dx, dweight (Cin, Cout), dbias (Cout,)"""
    flat_x = x.reshape(-1, x.shape[-1])            # (M, Cin)
    flat_d = dout.reshape(-1, dout.shape[-1])      # (M, Cout)
    return (flat_d @ weight.T).reshape(x.shape), flat_x.T @ flat_d, flat_d.sum(axis=0)


# ---- bfloat16: the block's two linears with bfloat16 inputs ------------------------------------
# bfloat16 is the top half of a float32 (sign, 8 exponent bits, 7 mantissa bits); NumPy has no
# such dtype, so its values are kept as their bits, uint16 arrays. The product of two bfloat16
# values (8 significant bits each) fits float32's 24 exactly: only the sums round.


def to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 or float64 -> bfloat16 bits (uint16), rounded to nearest, ties to even; NaN stays
    a (quiet) NaN, overflow gives infinity, subnormals round like any other value.
    float64 goes through float32 rounded to odd (truncated, lowest bit set if inexact): with
    16 more bits than bfloat16 that gives the correctly rounded result, not a double rounding."""
    x = np.asarray(x)
    if x.dtype == np.float64:
        single = x.astype(np.float32)
        wide = single.astype(np.float64)
        inexact = (wide != x) & ~np.isnan(x)
        bits = single.view(np.uint32).copy()
        bits[inexact & (np.abs(wide) > np.abs(x))] -= 1   # rounded away from zero: back to the truncation
        bits[inexact] |= 1
    else:
        bits = np.asarray(x, np.float32).view(np.uint32)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16      # ties to even: add 0x7fff plus the kept last bit
    return np.where(nan, (bits >> 16) | 0x40, rounded).astype(np.uint16)


def from_bfloat16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly: the bits become a float32's top half."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


class BFloat16Bits(np.ndarray):
    """A bfloat16 tensor of a weight file as its bits (uint16), marked so that nothing takes it
    for integers. The readers make these and `create_model` keeps them so: a bfloat16 model uses
    the bits as they are, any other widens them (`from_bfloat16`) one tensor at a time. The
    public readers give them widened. Views keep the mark; `np.asarray` drops it."""


def linear_bfloat16(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """linear with x rounded to bfloat16 and the weight given as bfloat16 bits: the products are
    exact, summed in float32 (in BLAS's order). x: (..., Cin) float32; weight: (Cin, Cout)
    uint16; bias: (Cout,) float32 -> (..., Cout) float32"""
    return linear(from_bfloat16(to_bfloat16(x)), from_bfloat16(weight), bias)


def linear_for(weight: np.ndarray):
    """The linear for a weight as the model stores it: bfloat16 bits (uint16) or floats."""
    return linear_bfloat16 if weight.dtype == np.uint16 else linear


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


def global_response_norm_backward(dout: np.ndarray, x: np.ndarray, weight: np.ndarray, eps: float):
    """Gradients of global_response_norm, y = x + bias + weight * x * n, n_c = g_c / (m + eps),
    g_c = ||x_c||, m = mean_c(g):

        dx (direct)  = dout * (1 + weight * n)
        dn_c         = sum over pixels of dout * weight * x             (N, 1, 1, C)
        dg_c         = dn_c / (m + eps) - sum_k(dn_k g_k) / (C (m + eps)^2)
        dx (via g)   = dg_c * x / g_c          (0 where g_c = 0, as PyTorch's norm gives)
        dweight = sum of dout * x * n,   dbias = sum of dout
    dout, x: (N, H, W, C) -> dx (N, H, W, C), dweight (C,), dbias (C,)
    """
    energy = np.sqrt((x * x).sum(axis=(1, 2), keepdims=True))       # (N, 1, 1, C)
    denominator = energy.mean(axis=-1, keepdims=True) + eps          # (N, 1, 1, 1)
    relative = energy / denominator                                  # (N, 1, 1, C)
    d_relative = (dout * weight * x).sum(axis=(1, 2), keepdims=True)  # (N, 1, 1, C)
    d_energy = (d_relative / denominator
                - (d_relative * energy).sum(axis=-1, keepdims=True) / (x.shape[-1] * denominator ** 2))
    safe = np.where(energy > 0, energy, 1.0)
    dx = dout * (1.0 + weight * relative) + np.where(energy > 0, d_energy / safe, 0.0) * x
    return dx, (dout * x * relative).sum(axis=(0, 1, 2)), dout.sum(axis=(0, 1, 2))


def global_avg_pool(x: np.ndarray) -> np.ndarray:
    """Mean over all pixels. x: (N, H, W, C) -> (N, C)"""
    return x.mean(axis=(1, 2))


def global_avg_pool_backward(dout: np.ndarray, shape: tuple[int, int, int, int]) -> np.ndarray:
    """Each pixel gets 1 / (H W) of its image's gradient. dout: (N, C) -> (N, H, W, C)"""
    n, h, w, c = shape
    return np.broadcast_to((dout / (h * w))[:, None, None, :], shape).copy()
