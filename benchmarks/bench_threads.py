"""Thread settings for convnext_tiny at 224x224, on all of Numba's threads.

    python benchmarks/bench_threads.py [--runs 9] [--batches 2,8]
    python benchmarks/bench_threads.py --wait-settings [--rounds 4] [--batches 1,8]

Default: a batch shared image by image between threads (threads.map_over_batch) against every
layer shared between them; the two ways take turns call by call, RUNS rounds after warm-up.

--wait-settings: the same forward pass in fresh processes with and without WAIT_SETTINGS in the
environment (the OpenMP runtime and OpenBLAS read them once, when they start, so only a new
process shows them), taking turns process by process for ROUNDS rounds.

Both print ms per image, medians. Never run as a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import numba
import numpy as np

import npconvnext
from npconvnext import engine

WARMUP = 2
# Idle threads park at once instead of spinning: the settings npconvnext recommends trying.
WAIT_SETTINGS = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}


def forward_ms(model, x, runs):
    """Median ms per image of model(x) after WARMUP calls."""
    times = []
    for round_ in range(WARMUP + runs):
        start = time.perf_counter()
        model(x)
        if round_ >= WARMUP:
            times.append((time.perf_counter() - start) * 1000 / len(x))
    return statistics.median(times)


def split_against_shared(args):
    npconvnext.set_num_threads(numba.get_num_threads())  # hands BLAS's count over: the split may run
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


def one_process(args):
    """The child of --wait-settings: its medians as JSON, {batch: ms per image}."""
    model = npconvnext.create_model("convnext_tiny")
    result = {}
    for batch in map(int, args.batches.split(",")):
        x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
        result[batch] = forward_ms(model, x, args.runs)
    print(json.dumps(result))


def with_and_without_wait_settings(args):
    base = {k: v for k, v in os.environ.items() if k not in WAIT_SETTINGS}
    envs = {"without": base, "with": dict(base, **WAIT_SETTINGS)}
    times = {way: {} for way in envs}  # way -> batch -> [ms per image, one per process]
    for _ in range(args.rounds):
        for way, env in envs.items():
            child = subprocess.run([sys.executable, __file__, "--child", "--runs", str(args.runs),
                                    "--batches", args.batches], env=env, capture_output=True, text=True, check=True)
            for batch, ms in json.loads(child.stdout).items():
                times[way].setdefault(batch, []).append(ms)
    print(f"threads: {numba.get_num_threads()}; with = {WAIT_SETTINGS}")
    print(f"{'batch':>5} {'without ms':>11} {'with ms':>8} {'ratio':>6}   per-process medians (without | with)")
    for batch in times["without"]:
        without, with_ = (statistics.median(times[way][batch]) for way in ("without", "with"))
        spread = " ".join(f"{t:.1f}" for t in times["without"][batch]) + " | " + \
            " ".join(f"{t:.1f}" for t in times["with"][batch])
        print(f"{batch:>5} {without:11.1f} {with_:8.1f} {with_ / without:6.2f}   {spread}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--batches", default=None, help="default 2,8; with --wait-settings 1,8")
    parser.add_argument("--wait-settings", action="store_true")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.child:
        one_process(args)
    elif args.wait_settings:
        args.batches = args.batches or "1,8"
        with_and_without_wait_settings(args)
    else:
        args.batches = args.batches or "2,8"
        split_against_shared(args)


if __name__ == "__main__":
    main()
