"""The bfloat16 pair tile's rate on this CPU, path by path, beside float32's; and a model's.

    python benchmarks/probes/bf16_tile_probe.py tiles
        tile_product on the MLP's shapes (8 panels, weights in cache), one thread: float32,
        and the pair tile by AMX (where the CPU has it), vdpbf16ps (AVX512_BF16) and widening
    python benchmarks/probes/bf16_tile_probe.py model [THREADS,BATCH ...]
        convnext_tiny 224 in float32 and bfloat16 taking turns, ms per image

To see a CPU without bfloat16 instructions: NUMBA_CPU_FEATURES set to the host's features with
avx512bf16 and amx-* turned off (-), PYTHONPATH the worktree, and a NUMBA_CACHE_DIR of its own
(the JIT cache holds the kernels of the other path otherwise); without it, the widening path
runs at the AMX tile's 16 rows (in blocks of float32's), not at the 12 it has there.

Times are CPU time of the calling thread (time.thread_time) at one thread, so that other
processes on a shared machine count less; wall time at more. Say the load average beside any
figure. A one-off record for issue 29, not a benchmark of the suite (bench_engines.py is).
"""

import os
import sys
import time
import warnings

import numba
import numpy as np

from npconvnext import layers
from npconvnext.engine import gemm
from npconvnext.engine.bfloat16 import to_pair_panels
from npconvnext.engine.gemm_bf16 import has_amx, has_dot_product

SHAPES = ((96, 384), (384, 96), (768, 3072), (3072, 768))  # (K, N) of fc1 and fc2 in stages 0 and 3
PANELS = 8
REPEATS = 3


def _tile_loop(product):
    @numba.njit
    def run(weight, panels, tile, reps):
        mr, nr = tile.shape
        for _ in range(reps):
            for p in range(panels.shape[0]):
                for c0 in range(0, weight.shape[0], mr):
                    product(weight, c0, min(mr, weight.shape[0] - c0), panels[p], tile, nr)
    return run


def tiles():
    f32_mr, nr = gemm.TILES[np.dtype(np.float32)]
    pair_mr = gemm.TILES[np.dtype(np.uint16)][0]
    paths = {"float32": (_tile_loop(gemm.tile_product), f32_mr), "widening": (_tile_loop(gemm.tile_product_widening),
                                                                              pair_mr)}
    if has_dot_product():
        paths["vdpbf16ps"] = (_tile_loop(gemm.tile_product_dot), pair_mr)
    if has_amx():
        paths["amx"] = (_tile_loop(gemm.tile_product_amx), pair_mr)
    rng = np.random.default_rng(0)
    for k, n in SHAPES:
        x = rng.standard_normal((PANELS * nr, k)).astype(np.float32)
        w = rng.standard_normal((n, k)).astype(np.float32)
        inputs = {False: (w, gemm.to_panels(x)), True: (layers.to_bfloat16(w), to_pair_panels(x))}
        reps = max(1, int(5e8 / (PANELS * nr * k * n)))
        rates = {}
        for _ in range(REPEATS):
            for name, (run, mr) in paths.items():
                weight, panels = inputs[name != "float32"]
                tile = np.empty((mr, nr), np.float32)
                run(weight, panels, tile, 1)
                start = time.thread_time()
                run(weight, panels, tile, reps)
                rate = PANELS * nr * k * n * reps / (time.thread_time() - start) / 1e9
                rates[name] = max(rates.get(name, 0.0), rate)
        print(f"K {k:5d} N {n:5d}: " + ", ".join(f"{name} {rate:.1f}" for name, rate in rates.items()) + " GMAC/s")
    print(f"load average {os.getloadavg()[0]:.2f}")


def model(configs):
    import npconvnext

    warnings.simplefilter("ignore", UserWarning)  # random weights: timing only
    models = {d: npconvnext.create_model("convnext_tiny", seed=0, dtype=d) for d in ("float32", "bfloat16")}
    for threads, batch in configs:
        npconvnext.set_num_threads(threads)
        clock = time.thread_time if threads == 1 else time.perf_counter
        x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
        times = {d: [] for d in models}
        for m in models.values():
            m(x)
        for _ in range(REPEATS):
            for d, m in models.items():
                start = clock()
                m(x)
                times[d].append((clock() - start) / batch * 1e3)
        f32, bf16 = min(times["float32"]), min(times["bfloat16"])
        print(f"{threads} threads, batch {batch}: float32 {f32:.1f}, bfloat16 {bf16:.1f} ms/img "
              f"({f32 / bf16:.2f}x, {'CPU' if threads == 1 else 'wall'} time), load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["tiles"]:
        numba.set_num_threads(1)
        tiles()
    elif sys.argv[1:2] == ["model"]:
        model([tuple(map(int, a.split(","))) for a in sys.argv[2:]] or [(1, 1), (1, 8), (2, 1), (2, 8)])
    else:
        sys.exit(__doc__)
