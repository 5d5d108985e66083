"""Per-kernel times: each Numba kernel against its NumPy twin, and where a forward pass spends.

    python benchmarks/bench_kernels.py [--model convnext_tiny] [--batch 1] [--dtype float32]

--dtype bfloat16: part 1 times only the block's MLP (mlp_residual) of each stage, with float32
weights and with the same weights as bfloat16, in ms and GMAC/s; part 2 splits a bfloat16
model's forward (its linears on bfloat16 pairs, the rest float32); no part 3.

Part 1 times every kernel on the shapes of each stage of the model at 224x224 (median of RUNS).
Part 2 runs the whole model with every kernel wrapped in a timer and prints the split, the rest
being glue (layers shared between the threads, batch not split).
Part 3 gives the rate of the engine's matrix product (engine/gemm.py, with only a bias after
it) and of NumPy's BLAS on the MLP's matmuls of each stage, weights in the model's layout,
against a large BLAS gemm on as many threads: repeated calls, so caches are warm (inside a
forward they are not).
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
from npconvnext.engine import block, depthwise, gemm, grn, layernorm, linear, llvm, mlp

RUNS = 7
WARMUP = 2
PAUSE = 0.2  # s: OpenBLAS's idle threads spin about 0.1 s after a call, on the cores a kernel needs


def median_ms(fn, runs):
    time.sleep(PAUSE)  # the NumPy twin timed before may have left BLAS threads spinning
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def mlp_weights(rng, c, dtype):
    """fc1 (C, 4C) and fc2 (4C, C) of a block, scaled as trained ones are, (in, out) in Fortran
    order as the model keeps them"""
    w1 = (rng.standard_normal((c, 4 * c)) / np.sqrt(c)).astype(dtype)
    w2 = (rng.standard_normal((4 * c, c)) / np.sqrt(4 * c)).astype(dtype)
    return np.asfortranarray(w1), np.asfortranarray(w2)


def per_kernel(config, batch, dtype):
    rng = np.random.default_rng(0)
    print(f"{'kernel':<30} {'stage shape':>22} {'numba ms':>9} {'numpy ms':>9}")
    side = 224 // config.patch_size
    for i, c in enumerate(config.dims):
        h = side >> i
        x = rng.standard_normal((batch, h, h, c)).astype(dtype)
        hidden = rng.standard_normal((batch, h, h, 4 * c)).astype(dtype)
        w7, b, g = rng.standard_normal((7, 7, c)).astype(dtype), np.zeros(c, dtype), np.ones(c, dtype)
        w1, w2 = mlp_weights(rng, c, dtype)
        b4 = np.zeros(4 * c, dtype)
        panels = linear.linear_gelu_panels(x, w1, b4)
        cases = {  # name: (input shape, numba, numpy twin)
            "depthwise_conv + layer_norm": (x.shape, lambda: depthwise.depthwise_conv_layer_norm(x, w7, b, g, b, 1e-6),
                                            lambda: layers.layer_norm(layers.depthwise_conv(x, w7, b), g, b, 1e-6)),
            "layer_norm": (x.shape, lambda: layernorm.layer_norm(x, g, b, 1e-6),
                           lambda: layers.layer_norm(x, g, b, 1e-6)),
            "fc1 + gelu": (x.shape, lambda: linear.linear_gelu_panels(x, w1, b4),
                           lambda: layers.gelu(layers.linear(x, w1, b4))),
            "fc2 + layer scale + residual": (hidden.shape, lambda: linear.panels_linear(panels, w2, b, g, x),
                                             lambda: x + g * layers.linear(hidden, w2, b)),
            "fc1 + gelu + fc2 + residual": (x.shape, lambda: mlp.mlp_residual(x, w1, b4, w2, b, g, x),
                                            lambda: x + g * layers.linear(layers.gelu(layers.linear(x, w1, b4)),
                                                                          w2, b)),
            "grn": (hidden.shape, lambda: grn.global_response_norm(hidden, b4 + 1, b4, 1e-6),
                    lambda: layers.global_response_norm(hidden, b4 + 1, b4, 1e-6)),
            # timm's variants: the _rms models' norms, GELU alone (overlap_act stem, pre-logits head)
            "rms_norm": (x.shape, lambda: layernorm.rms_norm(x, g, None, 1e-6),
                         lambda: layers.rms_norm(x, g, None, 1e-6)),
            "simple_norm": (x.shape, lambda: layernorm.simple_norm(x, g, None, 1e-6),
                            lambda: layers.simple_norm(x, g, None, 1e-6)),
            "gelu": (x.shape, lambda: mlp.gelu(x), lambda: layers.gelu(x)),
        }
        for name, (shape, fast, slow) in cases.items():
            print(f"{name:<30} {str(shape):>22} {median_ms(fast, RUNS):9.2f} {median_ms(slow, RUNS):9.2f}")


def mlp_stages_bfloat16(config, batch):
    rng = np.random.default_rng(0)
    print(f"{'the block MLP, batch ' + str(batch):<30} {'stage shape':>22} {'float32 ms':>11} {'bfloat16 ms':>12} "
          f"{'GMAC/s, f32 / bf16':>18}")
    side = 224 // config.patch_size
    for i, c in enumerate(config.dims):
        h = side >> i
        x = rng.standard_normal((batch, h, h, c)).astype(np.float32)
        w1, w2 = mlp_weights(rng, c, np.float32)
        b4, b, g = np.zeros(4 * c, np.float32), np.zeros(c, np.float32), np.ones(c, np.float32)
        bits1, bits2 = np.asfortranarray(layers.to_bfloat16(w1)), np.asfortranarray(layers.to_bfloat16(w2))
        ms = [median_ms(lambda: mlp.mlp_residual(x, a1, b4, a2, b, g, x), RUNS) for a1, a2 in ((w1, w2), (bits1, bits2))]
        macs = 2 * x.size * 4 * c                                   # fc1 and fc2 of one block, per call
        rates = " / ".join(f"{macs / t / 1e6:.1f}" for t in ms)
        print(f"{'fc1 + gelu + fc2 + residual':<30} {str(x.shape):>22} {ms[0]:11.2f} {ms[1]:12.2f} {rates:>18}")


def forward_split(name, batch, dtype):
    spent = collections.Counter()
    # the public wrappers, which convnext_block and the network call by these names
    for kernel in ("depthwise_conv_layer_norm", "mlp_residual", "linear_gelu_panels", "panels_linear",
                   "global_response_norm_in_place", "layer_norm", "patchify_conv", "linear", "rms_norm",
                   "simple_norm", "gelu", "depthwise_conv"):
        original = None
        for module in (block, depthwise, grn, layernorm, linear, mlp):  # every module that calls it by this name
            if hasattr(module, kernel):
                original = original or getattr(module, kernel)

                def timed(*args, _original=original, _kernel=kernel, **kwargs):
                    start = time.perf_counter()
                    out = _original(*args, **kwargs)
                    spent[_kernel] += time.perf_counter() - start
                    return out
                setattr(module, kernel, timed)
    # every layer shared between the threads, so that each kernel's time is wall time (with the
    # batch split, bench_threads.py, the threads' times would add up)
    engine.map_over_batch = lambda fn, x: fn(x)
    model = npconvnext.create_model(name, dtype=dtype)
    # the FUSED ops were bound at import: bind them to the timed wrappers
    def strided_conv(*args, _original=layers.strided_conv, **kwargs):  # the overlapping stems' (NumPy + BLAS)
        start = time.perf_counter()
        out = _original(*args, **kwargs)
        spent["strided_conv (reference)"] += time.perf_counter() - start
        return out
    engine.FUSED = engine.FUSED._replace(layer_norm=layernorm.layer_norm, block=block.convnext_block,
                                         patchify_conv=linear.patchify_conv, linear=linear.linear,
                                         rms_norm=layernorm.rms_norm, simple_norm=layernorm.simple_norm, gelu=mlp.gelu,
                                         strided_conv=strided_conv)
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(model.dtype)
    model(x)
    spent.clear()
    start = time.perf_counter()
    for _ in range(RUNS):
        model(x)
    total = (time.perf_counter() - start) / RUNS * 1000
    print(f"\n{name} {dtype} batch {batch}: {total:.1f} ms per forward")
    nested = {"linear_gelu_panels", "panels_linear", "_global_response_norm_in_place"}  # inside others
    for kernel, seconds in spent.most_common():
        print(f"  {kernel + (' (within the above)' if kernel in nested else ''):<48} {seconds / RUNS * 1000:7.1f} ms")
    outside = total - sum(t for k, t in spent.items() if k not in nested) / RUNS * 1000
    print(f"  {'glue (python, reshapes)':<48} {outside:7.1f} ms")


def matmul_rates(config, batch, dtype):
    rng = np.random.default_rng(0)
    probe = rng.standard_normal((2048, 2048)).astype(dtype)
    probe_rate = 2 * 2048**3 / median_ms(lambda: probe @ probe, 3) / 1e6  # GFLOP/s
    print(f"\nThe MLP's matmuls, batch {batch}, {dtype.__name__}; a large {dtype.__name__} BLAS gemm: "
          f"{probe_rate:.0f} GFLOP/s")
    print(f"{'stage':<6} {'M x K x N':>18} {'gemm.py GF/s':>13} {'BLAS GF/s':>10} {'gemm.py ms x blocks':>20}")
    side = 224 // config.patch_size
    total = 0.0
    for i, (c, blocks) in enumerate(zip(config.dims, config.depths)):
        m = batch * (side >> i) ** 2
        for k, n in ((c, 4 * c), (4 * c, c)):
            x = rng.standard_normal((m, k)).astype(dtype)
            w = np.asfortranarray(rng.standard_normal((k, n)).astype(dtype))  # (in, out) as the model keeps it
            bias = np.zeros(n, dtype)
            panels = gemm.to_panels(x)
            ours = median_ms(lambda: linear.panels_linear(panels, w, bias, pixels=m), RUNS)
            blas = median_ms(lambda: x @ w, RUNS)
            flops = 2 * m * k * n
            total += ours * blocks
            print(f"{i:<6} {f'{m} x {k} x {n}':>18} {flops / ours / 1e6:13.0f} {flops / blas / 1e6:10.0f} "
                  f"{ours * blocks:20.2f}")
    print(f"MLP matmuls on gemm.py: {total:.1f} ms a forward (tiles {gemm.TILES[np.dtype(dtype)]}, "
          f"vector registers {llvm.vector_registers()})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="convnext_tiny")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.dtype == "bfloat16":
        mlp_stages_bfloat16(npconvnext.get_config(args.model), args.batch)
        forward_split(args.model, args.batch, args.dtype)
        return
    per_kernel(npconvnext.get_config(args.model), args.batch, np.dtype(args.dtype).type)
    forward_split(args.model, args.batch, args.dtype)
    matmul_rates(npconvnext.get_config(args.model), args.batch, np.dtype(args.dtype).type)


if __name__ == "__main__":
    main()
