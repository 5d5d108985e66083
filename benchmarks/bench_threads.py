"""A batch shared image by image between threads (threads.map_over_batch) against every layer
shared between them, convnext_tiny at 224x224, on all of Numba's threads.

    python benchmarks/bench_threads.py [--runs 9] [--batches 2,8]

The two ways take turns call by call, RUNS rounds after warm-up; ms per image, medians.
Never run as a test.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import npconvnext  # noqa: I001  before numpy, so its thread-wait settings reach OpenBLAS
import numpy as np

from npconvnext import engine

WARMUP = 2


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--batches", default="2,8")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    split_over_batch = engine.map_over_batch

    def layers_shared(fn, x):
        return fn(x)

    print(f"{'dtype':<8} {'batch':>5} {'images split ms':>16} {'layers shared ms':>17} {'ratio':>6}")
    for dtype in ("float32", "float64"):
        model = npconvnext.create_model("convnext_tiny", dtype=dtype)
        for batch in map(int, args.batches.split(",")):
            x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(dtype)
            times = {"split": [], "shared": []}
            for round_ in range(WARMUP + args.runs):
                for way, strategy in (("split", split_over_batch), ("shared", layers_shared)):
                    engine.map_over_batch = strategy  # what model.forward calls
                    start = time.perf_counter()
                    model(x)
                    if round_ >= WARMUP:
                        times[way].append((time.perf_counter() - start) * 1000 / batch)
            engine.map_over_batch = split_over_batch
            split, shared = statistics.median(times["split"]), statistics.median(times["shared"])
            print(f"{dtype:<8} {batch:>5} {split:16.1f} {shared:17.1f} {split / shared:6.2f}")


if __name__ == "__main__":
    main()
