"""Can the peers be run as on an AVX2 machine here? And our AVX2 code's rates on this CPU.

    python benchmarks/probes/avx2_probe.py peers
        OpenVINO's FullyConnected: its kernel and rate, as is and with ONEDNN_MAX_CPU_ISA=AVX2
        (run twice, the variable set in the second run's environment)
    python benchmarks/probes/avx2_probe.py ours
        run with NUMBA_CPU_NAME=haswell and NUMBA_CPU_FEATURES without AVX-512 (benchmarks/run.sh's
        avx2 steps set them): the tiles, and the micro-kernel's rate on the MLP shapes, caches warm

OpenVINO and ONNX Runtime run the MLP's matmuls on MLAS, which picks its kernels from CPUID;
oneDNN's ONEDNN_MAX_CPU_ISA caps only OpenVINO's convolutions and elementwise nodes. A
one-off record for issue 15, not a benchmark of the suite.
"""

import os
import sys
import time

import numpy as np


def best_seconds(fn, runs=200):
    for _ in range(10):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[runs // 2]


def peers():
    import openvino as ov
    import openvino.opset13 as ops

    m, k, n = 196, 1536, 384  # stage 2's fc2 at batch 1
    x = ops.parameter([m, k], np.float32)
    w = ops.constant(np.random.default_rng(0).standard_normal((n, k)).astype(np.float32))
    compiled = ov.Core().compile_model(ov.Model([ops.matmul(x, w, False, True)], [x]), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})
    kinds = {op.get_rt_info()["primitiveType"].astype(str) for op in compiled.get_runtime_model().get_ops()
             if op.get_rt_info()["layerType"].astype(str) == "FullyConnected"}
    a = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    seconds = best_seconds(lambda: compiled(a))
    print(f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')}: OpenVINO FullyConnected {sorted(kinds)}, "
          f"{m}x{k}x{n} in {seconds * 1e3:.3f} ms, {2 * m * k * n / seconds / 1e9:.0f} GFLOP/s")


def ours():
    import numba

    from npconvnext.engine.gemm import TILES, _tile_product, to_panels

    mr, nr = TILES[np.dtype(np.float32)]
    print(f"NUMBA_CPU_NAME={os.environ.get('NUMBA_CPU_NAME')}: float32 tiles {mr} x {nr}")

    @numba.njit
    def tiles(weight, panels, reps):
        tile = np.empty((mr, nr), np.float32)
        for _ in range(reps):
            for p in range(panels.shape[0]):
                for c0 in range(0, weight.shape[0], mr):
                    _tile_product(weight, c0, min(mr, weight.shape[0] - c0), panels[p], tile, nr)
        return tile[0, 0]

    rng = np.random.default_rng(0)
    for k, n in ((96, 384), (384, 96), (384, 1536), (1536, 384), (768, 3072)):
        weight = rng.standard_normal((n, k)).astype(np.float32)
        weight.flags.writeable = False
        panels = to_panels(rng.standard_normal((4 * nr, k)).astype(np.float32))
        reps = max(1, int(2e8 / (2 * 4 * nr * k * n)))
        seconds = best_seconds(lambda: tiles(weight, panels, reps), runs=7)
        print(f"micro-kernel, (N, K) = ({n}, {k}), 4 panels: {2 * 4 * nr * k * n * reps / seconds / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    {"peers": peers, "ours": ours}[sys.argv[1]]()
