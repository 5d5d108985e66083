"""Per-kernel times: each Numba kernel against its NumPy twin, and where a forward pass spends.

    python benchmarks/bench_kernels.py [--model convnext_tiny] [--batch 1] [--dtype float32]

Part 1 times every kernel on the shapes of each stage of the model at 224x224 (median of RUNS).
Part 2 runs the whole model with every kernel wrapped in a timer and prints the split, the rest
being NumPy's BLAS matmuls and glue (layers shared between the threads, batch not split).
Part 3 gives BLAS's rate on the MLP's matmuls of each stage, weights in the model's layout,
against a large sgemm on as many threads: repeated calls, so caches are warm (inside a forward
they are not, and the matmuls take longer).
Never run as a test.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
import warnings

import numpy as np

import npconvnext
from npconvnext import engine, layers
from npconvnext.engine import kernels

RUNS = 7
WARMUP = 2


def median_ms(fn, runs):
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def per_kernel(config, batch, dtype):
    rng = np.random.default_rng(0)
    print(f"{'kernel':<30} {'stage shape':>22} {'numba ms':>9} {'numpy ms':>9}")
    side = 224 // config.patch_size
    for i, c in enumerate(config.dims):
        h = side >> i
        x = rng.standard_normal((batch, h, h, c)).astype(dtype)
        hidden = rng.standard_normal((batch, h, h, 4 * c)).astype(dtype)
        w7, b, g = rng.standard_normal((7, 7, c)).astype(dtype), np.zeros(c, dtype), np.ones(c, dtype)
        w1 = (rng.standard_normal((c, 4 * c)) / np.sqrt(c)).astype(dtype)
        b4 = np.zeros(4 * c, dtype)
        bias_gelu = kernels._bias_gelu_float32_ if dtype == np.float32 else kernels._bias_gelu_float64_
        flat_hidden = hidden.reshape(-1, 4 * c)
        cases = {  # name: (input shape, numba, numpy twin)
            "depthwise_conv + layer_norm": (x.shape, lambda: kernels.depthwise_conv_layer_norm(x, w7, b, g, b, 1e-6),
                                            lambda: layers.layer_norm(layers.depthwise_conv(x, w7, b), g, b, 1e-6)),
            "layer_norm": (x.shape, lambda: kernels.layer_norm(x, g, b, 1e-6),
                           lambda: layers.layer_norm(x, g, b, 1e-6)),
            "linear + gelu (fc1)": (x.shape, lambda: kernels.linear_gelu(x, w1, b4),
                                    lambda: layers.gelu(layers.linear(x, w1, b4))),
            "bias + gelu only": (hidden.shape, lambda: bias_gelu(flat_hidden.copy(), b4),
                                 lambda: layers.gelu(hidden + b4)),
            "grn": (hidden.shape, lambda: kernels.global_response_norm(hidden, b4 + 1, b4, 1e-6),
                    lambda: layers.global_response_norm(hidden, b4 + 1, b4, 1e-6)),
        }
        for name, (shape, fast, slow) in cases.items():
            print(f"{name:<30} {str(shape):>22} {median_ms(fast, RUNS):9.2f} {median_ms(slow, RUNS):9.2f}")


def forward_split(name, batch, dtype):
    spent = collections.Counter()
    for kernel in ("_depthwise_conv7_layer_norm", "_layer_norm", "_bias_gelu_float32_", "_bias_gelu_float64_",
                   "_bias_scale_residual_", "_global_response_norm_",  # parallel loops, and the row
                   "_depthwise_conv7_layer_norm_rows", "_layer_norm_rows", "_bias_gelu_float32_rows",  # bodies
                   "_bias_gelu_float64_rows", "_bias_scale_residual_rows", "_response_energy",  # one thread uses
                   "_apply_response_norm_rows"):
        original = getattr(kernels, kernel)

        def timed(*args, _original=original, _kernel=kernel):
            start = time.perf_counter()
            out = _original(*args)
            spent[_kernel] += time.perf_counter() - start
            return out
        setattr(kernels, kernel, timed)
    original_patchify = layers.patchify_conv

    def patchify(*args):
        start = time.perf_counter()
        out = original_patchify(*args)
        spent["patchify_conv (reshape + BLAS)"] += time.perf_counter() - start
        return out
    layers.patchify_conv = patchify
    # every layer shared between the threads, so that each kernel's time is wall time (with the
    # batch split, bench_threads.py, the threads' times would add up)
    engine.map_over_batch = lambda fn, x: fn(x)
    model = npconvnext.create_model(name, dtype=dtype)
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(dtype)
    model(x)
    spent.clear()
    start = time.perf_counter()
    for _ in range(RUNS):
        model(x)
    total = (time.perf_counter() - start) / RUNS * 1000
    print(f"\n{name} {dtype} batch {batch}: {total:.1f} ms per forward")
    for kernel, seconds in spent.most_common():
        print(f"  {kernel:<34} {seconds / RUNS * 1000:7.1f} ms")
    print(f"  {'BLAS matmuls (fc1, fc2) + glue':<34} {total - sum(spent.values()) / RUNS * 1000:7.1f} ms")


def blas_rates(config, batch, dtype):
    rng = np.random.default_rng(0)
    probe = rng.standard_normal((2048, 2048)).astype(dtype)
    probe_rate = 2 * 2048**3 / median_ms(lambda: probe @ probe, 3) / 1e6  # GFLOP/s
    print(f"\nBLAS on the MLP matmuls, batch {batch}, {dtype.__name__}; large {dtype.__name__} gemm: "
          f"{probe_rate:.0f} GFLOP/s")
    print(f"{'stage':<6} {'M x K x N':>18} {'GFLOP/s':>8} {'ms x blocks':>12} {'at the large rate':>18}")
    side = 224 // config.patch_size
    total = at_probe = 0.0
    for i, (c, blocks) in enumerate(zip(config.dims, config.depths)):
        m = batch * (side >> i) ** 2
        for k, n in ((c, 4 * c), (4 * c, c)):
            x = rng.standard_normal((m, k)).astype(dtype)
            w = np.asfortranarray(rng.standard_normal((k, n)).astype(dtype))  # (in, out) as the model keeps it
            ms = median_ms(lambda: x @ w, RUNS)
            flops = 2 * m * k * n
            total += ms * blocks
            at_probe += flops / probe_rate / 1e6 * blocks
            print(f"{i:<6} {f'{m} x {k} x {n}':>18} {flops / ms / 1e6:8.0f} {ms * blocks:12.2f} "
                  f"{flops / probe_rate / 1e6 * blocks:18.2f}")
    print(f"MLP matmuls: {total:.1f} ms a forward, {at_probe:.1f} ms at the large gemm's rate")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="convnext_tiny")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    per_kernel(npconvnext.get_config(args.model), args.batch, np.dtype(args.dtype).type)
    forward_split(args.model, args.batch, args.dtype)
    blas_rates(npconvnext.get_config(args.model), args.batch, np.dtype(args.dtype).type)


if __name__ == "__main__":
    main()
