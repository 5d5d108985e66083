"""What the exact GELU costs in a float32 forward: its loop as linear.py's fc1 tile runs it,
against the same loop without the GELU, per element and per forward.

    python benchmarks/probes/gelu_cost.py [--model convnext_tiny] [--batch 8]

The fc1 tile adds the bias in float32, then evaluates GELU in float64 (erf.py's erf32, a rational
fit) and rounds once: within a float32 ulp of erf, at float64's vector width. Both loops run on a
tile of the fc1 tile's shape (12 output channels by 32 pixels on AVX-512: 1.5 KiB in, 1.5 KiB
out, in L1), one thread, CPU time of the calling thread (time.thread_time), best of ROUNDS; the
forward (float32, seeded random weights, 224x224) is timed the same way in the same process, so
that the GELU's share is of one machine state. The loop takes the same time whatever the batch:
between runs it moves with the machine. A one-off record for issue 29, not a benchmark of the
suite.
"""

import argparse
import time

import numba
import numpy as np

import npconvnext
from npconvnext.engine.erf import gelu_value
from npconvnext.engine.gemm import TILES
from npconvnext.params import random_state_dict

ROUNDS = 7
SIZE = 224


@numba.njit(cache=False, fastmath={"contract"}, error_model="numpy")
def _bias_gelu_rows(tile, bias, out, reps):
    # out = GELU(tile + bias) row by row, as linear._fc1_gelu_floats writes its hidden panel
    for _ in range(reps):
        for r in range(tile.shape[0]):
            src, dst, b = tile[r], out[r], bias[r]
            for j in range(src.shape[0]):
                dst[j] = gelu_value(src[j] + b)


@numba.njit(cache=False, fastmath={"contract"}, error_model="numpy")
def _bias_rows(tile, bias, out, reps):
    # the same loop with the bias and the conversions, without the GELU
    for _ in range(reps):
        for r in range(tile.shape[0]):
            src, dst, b = tile[r], out[r], bias[r]
            for j in range(src.shape[0]):
                dst[j] = np.float64(src[j] + b)


def best_seconds(run, *args):
    run(*args)
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.thread_time()
        run(*args)
        best = min(best, time.thread_time() - start)
    return best


def gelu_elements(config, size):
    """GELUs in one image's forward: every block's hidden activations, 4C a pixel."""
    side = size // config.patch_size
    total = 0
    for depth, dim in zip(config.depths, config.dims):
        total += depth * side * side * config.mlp_ratio * dim
        side //= 2
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="convnext_tiny")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    mr, nr = TILES[np.dtype(np.float32)]
    tile = rng.standard_normal((mr, nr)).astype(np.float32) * 2   # (MR, NR): fc1's sums
    bias = rng.standard_normal(mr).astype(np.float32) * 0.1
    out = np.empty_like(tile)
    reps = 64000
    elements = tile.size * reps
    gelu_ns = best_seconds(_bias_gelu_rows, tile, bias, out, reps) / elements * 1e9
    bias_ns = best_seconds(_bias_rows, tile, bias, out, reps) / elements * 1e9
    config = npconvnext.get_config(args.model)
    model = npconvnext.create_model(args.model, weights=random_state_dict(config, seed=0))
    x = rng.standard_normal((args.batch, 3, SIZE, SIZE)).astype(np.float32)
    forward_ms = best_seconds(model, x) / args.batch * 1e3
    per_image = gelu_elements(config, SIZE)
    gelu_ms = per_image * (gelu_ns - bias_ns) * 1e-6
    print(f"GELU loop {gelu_ns:.2f} ns an element, without the GELU {bias_ns:.2f} ns")
    print(f"{args.model} {SIZE}x{SIZE}: {per_image / 1e6:.2f} M GELUs an image, {gelu_ms:.1f} ms of a "
          f"{forward_ms:.1f} ms forward (batch {args.batch}, one thread, float32): {gelu_ms / forward_ms:.1%}")


if __name__ == "__main__":
    main()
