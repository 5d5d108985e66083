"""A/B of two npconvnext checkouts, one process per run: convnext_tiny float32 with seeded random
weights, median ms per image of RUNS forwards at batch 1 and 8 on T threads, and a checksum of
the outputs (equal: the same bits). Run it alternately with each checkout first on PYTHONPATH and
its own NUMBA_CACHE_DIR (Numba's cache does not key on gemm.py): see
results/2026-12-03c-epyc-zen5-avx512/prefetch_ab.log."""
import json
import os
import time

import numba
import numpy as np

import npconvnext

print(npconvnext.__file__.split("/npconvnext")[0], end=" ")
numba.set_num_threads(int(os.environ.get("T", "1")))
res = {}
model = npconvnext.create_model("convnext_tiny", dtype=np.float32)
for batch in (1, 8):
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    model(x); model(x)
    ts = []
    for _ in range(int(os.environ.get("RUNS", "15"))):
        time.sleep(0.05)
        t = time.perf_counter(); model(x); ts.append((time.perf_counter() - t) / batch * 1e3)
    res[f"b{batch}"] = round(float(np.median(ts)), 2)
out = model(np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32))
res["sum"] = float(np.asarray(out, np.float64).sum())
print(json.dumps(res))
