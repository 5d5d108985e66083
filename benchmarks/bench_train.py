"""A training step (forward, backward, AdamW) of npconvnext against timm's eager step, taking turns.

    python benchmarks/bench_train.py [--model convnext_tiny] [--batches 8,32] [--threads 1,2] [--rounds 3]
    python benchmarks/bench_train.py --split    # npconvnext's step split by layer, batch 8

Each measurement runs in a child process (so each reports its own peak RSS), and the engines
alternate round by round, so a slow spell of the machine lands on both. Times are medians of
the steps after one warm-up step; images are 224x224 float32, labels random. Never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict

SIZE = 224
STEPS = 3


def child(engine: str, model: str, batch: int, threads: int) -> dict:
    """One engine's step times and peak RSS, in this (child) process."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)
    y = rng.integers(0, 1000, batch)
    if engine == "npconvnext":
        import warnings

        import npconvnext
        from npconvnext import train

        npconvnext.set_num_threads(threads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = npconvnext.create_model(model)
        opt = train.AdamW(net, lr=1e-4)

        def step():
            opt.step(train.loss_and_grads(net, x, y, label_smoothing=0.1)[1])
    else:
        import timm
        import torch

        torch.set_num_threads(threads)
        net = timm.create_model(model, pretrained=False).train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)

        def step():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(tx), ty, label_smoothing=0.1).backward()
            opt.step()
    step()  # warm-up
    times = []
    for _ in range(STEPS):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def split(model: str, batch: int) -> None:
    """Seconds per step of each layer function of the reference backward pass."""
    import warnings

    import numpy as np

    import npconvnext
    from npconvnext import layers, train

    spent = defaultdict(float)
    for name in [n for n in dir(layers) if not n.startswith("_") and callable(getattr(layers, n))]:
        original = getattr(layers, name)

        def timed(*args, _original=original, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[_name] += time.perf_counter() - start
        setattr(layers, name, timed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = npconvnext.create_model(model)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)
    y = rng.integers(0, 1000, batch)
    opt = train.AdamW(net, lr=1e-4)
    spent.clear()
    start = time.perf_counter()
    loss, grads = train.loss_and_grads(net, x, y)
    middle = time.perf_counter()
    opt.step(grads)
    total = time.perf_counter() - start
    print(f"{model} batch {batch}: step {total:.2f} s (loss and gradients {middle - start:.2f} s, "
          f"AdamW {total - (middle - start):.2f} s)")
    for name, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<34} {seconds:8.2f} s  {100 * seconds / total:5.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="convnext_tiny")
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--split", action="store_true")
    parser.add_argument("--child", nargs=4, metavar=("ENGINE", "MODEL", "BATCH", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        engine, model, batch, threads = args.child
        print(json.dumps(child(engine, model, int(batch), int(threads))))
        return
    if args.split:
        split(args.model, 8)
        return
    print(f"{args.model}, {SIZE}x{SIZE} float32, one training step (median of {STEPS} in each of {args.rounds} rounds)")
    print(f"{'threads':>7} {'batch':>5} {'engine':<11} {'s/step':>8} {'vs timm':>8} {'peak MB':>8} {'vs timm':>8}")
    for threads in map(int, args.threads.split(",")):
        for batch in map(int, args.batches.split(",")):
            results = defaultdict(list)
            for _ in range(args.rounds):
                for engine in ("npconvnext", "timm"):
                    out = subprocess.run([sys.executable, __file__, "--child", engine, args.model, str(batch), str(threads)],
                                         capture_output=True, text=True, check=True, env=dict(os.environ))
                    results[engine].append(json.loads(out.stdout.strip().splitlines()[-1]))
            best = {e: (statistics.median(r["seconds"] for r in rs), max(r["peak_mb"] for r in rs))
                    for e, rs in results.items()}
            for engine, (seconds, peak) in best.items():
                print(f"{threads:>7} {batch:>5} {engine:<11} {seconds:>8.2f} {seconds / best['timm'][0]:>7.2f}x "
                      f"{peak:>8.0f} {peak / best['timm'][1]:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
