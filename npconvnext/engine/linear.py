"""The linears on gemm.py's tiles, with what follows each product fused on the tile while it
is in cache: fc1 + bias + GELU (output left as pixel panels, fc2's input), fc2 + bias + layer
scale + residual (written back channels-last), the patchify convs and the classifier (a bias).

The two pointwise linears are most of ConvNeXt's FLOPs. Two ways to go through a linear's tiles:
panel by panel (mlp.py's `mlp_residual`, fc1 and fc2 together): one panel's hidden activations,
(4C, NR), are made and used up while in cache; the work items are panels. Weight-stationary
(here, `linear_gelu_panels`, `panels_linear`): one tile's MR weight rows against every panel of
a chunk of panels that stays in cache; the work items are shares of the output channels, for
when the panels are too few to share between the threads. Each tile sums in the same order
either way: the results are the same bits. The tiles (`pack_panel`, `fc1_gelu_tile`,
`fc2_residual_tile`) are public for mlp.py.

No BLAS call is made on the way: BLAS's idle threads busy-wait after a call, on the cores the
kernels need next. The weights are read as the model stores them, (C_in, C_out); the wrappers
take `weight.T`, a view with gemm.py's (out, in) rows, so nothing is copied.

A bfloat16 model's linears (weights as bfloat16 bits, gemm_bf16.py) run on the same kernels
with pair panels: `pack_panel` and `fc1_gelu_tile` take either layout (`fc1_gelu_tile` writes
fc2's pairs where its hidden panel is a pair panel), chosen by the panels' types when Numba
compiles them, so that each layout keeps machine code of its own; `linear_gelu_pairs` and
`pairs_linear` are the weight-stationary pair, and `linear_gelu_panels` takes bfloat16 weights
too (its float32 output is GRN's input).

Twins: layers.linear, layers.linear_bfloat16, layers.gelu, layers.patchify_conv.
"""

from __future__ import annotations

import numba
import numba.extending
import numpy as np

from .. import layers
from ..errors import InputError
from .bfloat16 import pack_pairs, pair_count, pair_rows, pair_word, to_pair_panels
from .checks import check_arguments, kernel_weights, last_dimension, takes_array
from .erf import gelu_value
from .gemm import TILES, tile_product, tile_product_transposed, tile_shape, to_panels
from .jit import INLINE_JIT, JIT, PARALLEL_JIT, rows_or_parallel


_PACK_CHANNELS = 8  # channels pack_panel copies from a pixel at a time: 32 bytes of float32, 64 of float64


@numba.njit(**JIT)
def pack_panel(x, first_pixel, panel):
    # panel <- x[first_pixel : first_pixel + NR], zeros past x's last pixel; x: (M, K); panel
    # (K, NR), pixels as columns, or (ceil(K/2), NR, 2) bfloat16 pairs (bfloat16.pack_pairs).
    # Numba compiles one of the two: the ndim of an argument is a constant to it
    if panel.ndim == 3:
        pack_pairs(x, first_pixel, panel)
        return
    k = x.shape[1]
    nr = panel.shape[1]
    count = min(nr, x.shape[0] - first_pixel)
    # eight neighbouring channels of a pixel at a time, written down eight panel rows: a channel at
    # a time, each pixel's read would be a row of x (often a cache line or more) from the last
    whole = k - k % _PACK_CHANNELS
    for ch0 in range(0, whole, _PACK_CHANNELS):
        for j in range(count):
            channels = x[first_pixel + j, ch0 : ch0 + _PACK_CHANNELS]  # (8,): one vector load, not eight
            for c in range(_PACK_CHANNELS):
                panel[ch0 + c, j] = channels[c]
    for ch in range(whole, k):
        for j in range(count):
            panel[ch, j] = x[first_pixel + j, ch]
    for ch in range(k):
        for j in range(count, nr):
            panel[ch, j] = 0.0


@numba.njit(**INLINE_JIT)
def _channel_blocks(n, mr, groups, group):
    # the tiles' first output channels in this group's share of n channels
    blocks = -(-n // mr)
    return range(group * blocks // groups * mr, (group + 1) * blocks // groups * mr, mr)


def fc1_gelu_tile(panel, pixels, weight, bias, c0, tile, hidden_panel):
    """hidden_panel's channels c0 .. c0 + MR - 1, its first `pixels` pixels = GELU(weight[c0 :
    c0 + MR] @ panel + bias[c0 : c0 + MR]), in the hidden panel's layout: (D, NR) floats
    (`_fc1_gelu_floats`), or (ceil(D/2), NR, 2) bfloat16 pairs, fc2's input in a bfloat16 model
    (`_fc1_gelu_pairs`). Compiled, the choice is made once per type."""
    if hidden_panel.ndim == 3:
        _fc1_gelu_pairs(panel, pixels, weight, bias, c0, tile, hidden_panel)
    else:
        _fc1_gelu_floats(panel, pixels, weight, bias, c0, tile, hidden_panel)


# An overload, not pack_panel's ndim branch: Numba prunes no branch in a function it inlines at
# its IR (inline="always"), and the other branch does not type.
@numba.extending.overload(fc1_gelu_tile, inline="always")
def _fc1_gelu_tile_compiled(panel, pixels, weight, bias, c0, tile, hidden_panel):
    if hidden_panel.ndim == 3:
        return (lambda panel, pixels, weight, bias, c0, tile, hidden_panel:
                _fc1_gelu_pairs(panel, pixels, weight, bias, c0, tile, hidden_panel))
    return (lambda panel, pixels, weight, bias, c0, tile, hidden_panel:
            _fc1_gelu_floats(panel, pixels, weight, bias, c0, tile, hidden_panel))


@numba.njit(**INLINE_JIT)
def _fc1_gelu_floats(panel, pixels, weight, bias, c0, tile, hidden_panel):
    # hidden_panel[c0 : c0 + MR, :pixels] = GELU(weight[c0 : c0 + MR] @ panel + bias[c0 : c0 + MR]);
    # panel: (K, NR) pixels as columns, the first `pixels` of them in use; weight: (D, K);
    # hidden_panel: (D, NR); tile: (MR, NR) scratch. GELU in float64, rounded once. bfloat16
    # weights (uint16): panel (K2, NR, 2) pairs, hidden_panel float32 (GRN's input)
    rows = min(tile.shape[0], weight.shape[0] - c0)
    tile_product(weight, c0, rows, panel, tile, pixels)
    for r in range(rows):
        b = bias[c0 + r]
        src = tile[r]                  # (NR,)
        dst = hidden_panel[c0 + r]     # (NR,)
        for j in range(pixels):
            dst[j] = gelu_value(src[j] + b)


@numba.njit(**INLINE_JIT)
def _fc1_gelu_pairs(panel, pixels, weight, bias, c0, tile, hidden_pairs):
    # _fc1_gelu_floats for a bfloat16 model: panel (K2, NR, 2) pairs, weight (D, K) uint16, and the
    # GELU's float32 result rounded to bfloat16 into hidden_pairs (ceil(D/2), NR, 2), channel c
    # at [c // 2, :, c % 2]: fc2's pair panel, written once. c0 even (MR is). Two tile rows at a
    # time, one word a pixel, so that the loop vectorises.
    rows = min(tile.shape[0], weight.shape[0] - c0)
    tile_product(weight, c0, rows, panel, tile, pixels)
    words = hidden_pairs.view(np.uint32)                       # (ceil(D/2), NR, 1)
    for r in range(0, rows, 2):
        low, dst = tile[r], words[(c0 + r) >> 1]               # (NR,), (NR, 1)
        b_low = bias[c0 + r]
        if r + 1 < rows:
            high, b_high = tile[r + 1], bias[c0 + r + 1]
            for j in range(pixels):
                dst[j, 0] = pair_word(np.float32(gelu_value(low[j] + b_low)), np.float32(gelu_value(high[j] + b_high)))
        else:  # an odd D's last channel: its pair's other half stays zero
            for j in range(pixels):
                dst[j, 0] = pair_word(np.float32(gelu_value(low[j] + b_low)), np.float32(0.0))


@numba.njit(**INLINE_JIT)
def fc2_residual_tile(hidden_panel, weight, bias, gamma, shortcut, out, first_pixel, c0, tile):
    # out[first_pixel : first_pixel + NR, c0 : c0 + MR] = shortcut + gamma * (hidden_panel^T @
    # weight[c0 : c0 + MR]^T + bias), the same part of each; gamma None means 1, shortcut None
    # means 0 (Numba compiles each case without the test). hidden_panel: (D, NR); weight: (C, D);
    # out, shortcut: (M, C); tile: (NR, MR) scratch, pixels by channels as out has them.
    channels = min(tile.shape[1], weight.shape[0] - c0)
    pixels = min(tile.shape[0], out.shape[0] - first_pixel)
    tile_product_transposed(weight, c0, channels, hidden_panel, tile, pixels)
    b = bias[c0 : c0 + channels]
    g = b if gamma is None else gamma[c0 : c0 + channels]
    for j in range(pixels):
        t = tile[j]                                                   # (MR,)
        o = out[first_pixel + j, c0 : c0 + channels]                  # (MR,)
        if shortcut is None:
            for r in range(channels):
                o[r] = t[r] + b[r]
        else:
            s = shortcut[first_pixel + j, c0 : c0 + channels]         # (MR,)
            if gamma is None:
                for r in range(channels):
                    o[r] = s[r] + (t[r] + b[r])
            else:
                for r in range(channels):
                    o[r] = s[r] + g[r] * (t[r] + b[r])


_CACHED_PANEL_BYTES = 1 << 19  # about half a core's L2: the panels a weight-stationary pass keeps


def _panels_in_cache(panels: np.ndarray) -> int:
    """How many of these (P, K, NR) panels a weight-stationary pass goes through at a time:
    every tile's weight rows meet a chunk of panels that stays in cache, then the next chunk."""
    return max(1, _CACHED_PANEL_BYTES // (panels[0].nbytes or 1))


@numba.njit(**JIT)
def _linear_gelu_panels_rows(x, pixels, weight, bias, hidden, chunk, groups, first, last):
    # hidden = GELU(x @ weight.T + bias) as pixel panels; x: (P, K, NR) pixel panels of `pixels`
    # pixels; weight: (D, K); bias: (D,); hidden (P, D, NR). bfloat16: x (P, K2, NR, 2) pair
    # panels, weight (D, K) uint16, hidden (P, D, NR) float32 or (P, ceil(D/2), NR, 2) pairs
    # (fc1_gelu_tile). The output channels of groups first..last-1 (of `groups` shares), `chunk`
    # panels at a time
    mr, nr = tile_shape(weight)
    tile = np.empty((mr, nr), dtype=bias.dtype)  # (MR, NR); bias: the dtype of the sums (bfloat16: float32)
    for group in range(first, last):
        for start in range(0, x.shape[0], chunk):
            for c0 in _channel_blocks(weight.shape[0], mr, groups, group):
                for p in range(start, min(start + chunk, x.shape[0])):
                    fc1_gelu_tile(x[p], min(nr, pixels - p * nr), weight, bias, c0, tile, hidden[p])


@numba.njit(**PARALLEL_JIT)
def _linear_gelu_panels(x, pixels, weight, bias, hidden, chunk, groups):
    for group in numba.prange(groups):
        _linear_gelu_panels_rows(x, pixels, weight, bias, hidden, chunk, groups, group, group + 1)


@numba.njit(**JIT)
def _panels_linear_rows(hidden, weight, bias, gamma, shortcut, out, chunk, groups, first, last):
    # out (M, C) = shortcut + gamma * (hidden @ weight.T + bias), hidden as pixel panels
    # (P, D, NR); weight: (C, D); gamma None means 1; shortcut None means 0; the output channels
    # of groups first..last-1 (of `groups` shares), `chunk` panels at a time
    mr, nr = tile_shape(weight)
    tile = np.empty((nr, mr), dtype=bias.dtype)  # (NR, MR); bias: the dtype of the sums (bfloat16: float32)
    for group in range(first, last):
        for start in range(0, hidden.shape[0], chunk):
            for c0 in _channel_blocks(weight.shape[0], mr, groups, group):
                for p in range(start, min(start + chunk, hidden.shape[0])):
                    fc2_residual_tile(hidden[p], weight, bias, gamma, shortcut, out, p * nr, c0, tile)


@numba.njit(**PARALLEL_JIT)
def _panels_linear(hidden, weight, bias, gamma, shortcut, out, chunk, groups):
    for group in numba.prange(groups):
        _panels_linear_rows(hidden, weight, bias, gamma, shortcut, out, chunk, groups, group, group + 1)


# ---- public wrappers: same signatures and results as their twins in layers.py ------------------


def _channel_groups(tiles: int) -> int:
    """Shares of a linear's output channels (`tiles` tiles of them) for the threads: several a
    thread, so that one late thread delays little."""
    threads = numba.get_num_threads()
    return 1 if threads == 1 else min(tiles, 4 * threads)


@takes_array("x")
def linear_gelu_panels(x, weight, bias):
    """layers.gelu(layers.linear(x, weight, bias)) as pixel panels (gemm.py), weight-stationary.
    x: (..., K); weight: (K, D) -> (P, D, NR), the M pixels of x in P = ceil(M / NR) panels"""
    d = last_dimension(weight)
    check_arguments("linear_gelu_panels", "x", x, None, weight=(weight, (x.shape[-1], d)), bias=(bias, (d,)))
    flat = np.ascontiguousarray(x).reshape(-1, x.shape[-1])   # (M, K)
    if weight.dtype == np.uint16:  # bfloat16 bits: pair panels in, float32 panels out (GRN's input)
        (bias,), rows = kernel_weights(np.float32, bias), pair_rows(weight)  # rows (D, K): the bits in place
        panels = to_pair_panels(flat)                         # (P, K2, NR, 2)
    else:
        rows, bias = kernel_weights(flat.dtype, weight.T, bias)  # rows (D, K): a view of the weights
        panels = to_panels(flat)                              # (P, K, NR)
    mr, nr = TILES[bias.dtype]
    hidden = np.empty((panels.shape[0], rows.shape[0], nr), dtype=bias.dtype)
    groups = _channel_groups(-(-rows.shape[0] // mr))
    rows_or_parallel(_linear_gelu_panels_rows, _linear_gelu_panels,
                      (panels, flat.shape[0], rows, bias, hidden, _panels_in_cache(panels), groups), groups,
                      blas_between=False)
    return hidden


@takes_array("hidden")
def panels_linear(hidden, weight, bias, gamma=None, shortcut=None, pixels=None):
    """shortcut + gamma * layers.linear(x, weight, bias), x given as pixel panels, weight-
    stationary; gamma None means 1, shortcut None means 0. hidden: (P, D, NR); weight: (D, C);
    shortcut: (..., C), or the pixel count M when there is none -> like shortcut, or (M, C)"""
    c = last_dimension(weight)
    check_arguments("panels_linear", "hidden", hidden, 3, optional=("gamma",),
                    weight=(weight, hidden.shape[1:2] + (c,)), bias=(bias, (c,)), gamma=(gamma, (c,)))
    nr = TILES[hidden.dtype][1]
    m = pixels if shortcut is None else shortcut.size // max(1, shortcut.shape[-1])
    fits = (hidden.shape[2] == nr and m is not None and 0 <= m <= hidden.shape[0] * nr
            and (shortcut is None or shortcut.shape[-1] == c))
    if not fits:
        raise InputError(f"panels_linear: hidden panels of shape {hidden.shape} (panels of {nr} pixels) do not fit "
                         f"a shortcut of shape {np.shape(shortcut)} with {c} channels, or pixels={pixels} without one")
    hidden = np.ascontiguousarray(hidden)
    rows, bias, gamma = kernel_weights(hidden.dtype, weight.T, bias, gamma)  # rows (C, D): a view of the weights
    out = np.empty((m, rows.shape[0]), dtype=hidden.dtype)
    residual = None if shortcut is None else np.ascontiguousarray(shortcut).reshape(m, -1)  # (M, C)
    groups = _channel_groups(-(-rows.shape[0] // TILES[hidden.dtype][0]))
    rows_or_parallel(_panels_linear_rows, _panels_linear,
                      (hidden, rows, bias, gamma, residual, out, _panels_in_cache(hidden), groups), groups,
                      blas_between=False)
    return out if shortcut is None else out.reshape(shortcut.shape)


@takes_array("x")
def linear_gelu_pairs(x, weight, bias):
    """linear_gelu_panels for a bfloat16 model, its output rounded to bfloat16 as fc2's pair
    panels. x: (..., K) float32; weight: (K, D) bfloat16 bits -> (P, ceil(D/2), NR, 2) uint16"""
    d = last_dimension(weight)
    check_arguments("linear_gelu_pairs", "x", x, None, weight=(weight, (x.shape[-1], d)), bias=(bias, (d,)))
    if weight.dtype != np.uint16:
        raise InputError(f"linear_gelu_pairs: weight is {weight.dtype}, not bfloat16 bits (uint16)")
    flat = np.ascontiguousarray(x).reshape(-1, x.shape[-1])   # (M, K)
    (bias,), rows = kernel_weights(np.float32, bias), pair_rows(weight)
    mr, nr = TILES[np.dtype(np.uint16)]
    panels = to_pair_panels(flat, parallel=False)             # (P, K2, NR, 2): few, packed on this thread
    # an odd D's missing channel is read (times a zero weight): zero, not whatever memory held
    hidden = (np.zeros if d % 2 else np.empty)((panels.shape[0], pair_count(d), nr, 2), np.uint16)
    groups = _channel_groups(-(-d // mr))
    rows_or_parallel(_linear_gelu_panels_rows, _linear_gelu_panels,
                      (panels, flat.shape[0], rows, bias, hidden, _panels_in_cache(panels), groups), groups,
                      blas_between=False)
    return hidden


@takes_array("hidden")
def pairs_linear(hidden, weight, bias, gamma=None, shortcut=None, pixels=None):
    """panels_linear for a bfloat16 model: hidden (P, ceil(D/2), NR, 2) bfloat16 pair panels
    (uint16); weight (D, C) bfloat16 bits; bias, gamma, shortcut float32 -> float32, like
    shortcut, or (M, C)"""
    c = last_dimension(weight)
    nr = TILES[np.dtype(np.uint16)][1]
    m = pixels if shortcut is None else shortcut.size // max(1, shortcut.shape[-1])
    fits = (hidden.dtype == np.uint16 and hidden.ndim == 4 and getattr(weight, "dtype", None) == np.uint16
            and np.ndim(weight) == 2 and hidden.shape[1:] == (pair_count(weight.shape[0]), nr, 2)
            and np.shape(bias) == (c,) and (gamma is None or np.shape(gamma) == (c,)) and m is not None
            and 0 <= m <= hidden.shape[0] * nr and (shortcut is None or shortcut.shape[-1] == c))
    if not fits:
        raise InputError(f"pairs_linear: pair panels {hidden.dtype} {hidden.shape} (panels of {nr} pixels) do not fit "
                         f"a {getattr(weight, 'dtype', None)} weight of shape {np.shape(weight)}, bias "
                         f"{np.shape(bias)}, gamma {np.shape(gamma)}, a shortcut of shape {np.shape(shortcut)} or "
                         f"pixels={pixels}")
    hidden = np.ascontiguousarray(hidden)
    rows, (bias, gamma) = pair_rows(weight), kernel_weights(np.float32, bias, gamma)  # rows (C, D)
    out = np.empty((m, c), dtype=np.float32)
    residual = None if shortcut is None else np.ascontiguousarray(shortcut, np.float32).reshape(m, -1)  # (M, C)
    groups = _channel_groups(-(-c // TILES[np.dtype(np.uint16)][0]))
    rows_or_parallel(_panels_linear_rows, _panels_linear,
                      (hidden, rows, bias, gamma, residual, out, _panels_in_cache(hidden), groups), groups,
                      blas_between=False)
    return out if shortcut is None else out.reshape(shortcut.shape)


@takes_array("x")
def linear(x, weight, bias):
    """layers.linear on gemm.py's tiles. x: (..., K); weight: (K, D) -> (..., D)"""
    d = last_dimension(weight)
    check_arguments("linear", "x", x, None, weight=(weight, (x.shape[-1], d)), bias=(bias, (d,)))
    flat = np.ascontiguousarray(x).reshape(-1, x.shape[-1])                 # (M, K)
    out = panels_linear(to_panels(flat), weight, bias, pixels=flat.shape[0])  # (M, D)
    return out.reshape(*x.shape[:-1], weight.shape[1])


@takes_array("x")
def patchify_conv(x, weight, bias, patch):
    """layers.patchify_conv on gemm.py's tiles. x: (N, H, W, Cin) -> (N, H//p, W//p, Cout)"""
    d = last_dimension(weight)
    check_arguments("patchify_conv", "x", x, 4, weight=(weight, (patch * patch * x.shape[-1], d)), bias=(bias, (d,)))
    n, h, w, _ = x.shape
    patches = layers.patches(x, patch)                                       # (M, p * p * Cin)
    out = panels_linear(to_panels(patches), weight, bias, pixels=patches.shape[0])  # (M, Cout)
    return out.reshape(n, h // patch, w // patch, weight.shape[1])
