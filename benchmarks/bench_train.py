"""A training step (forward, backward, AdamW) of npconvnext against timm's eager step, taking turns.

    python benchmarks/bench_train.py [--model convnext_tiny] [--batches 8,32] [--threads 1,2] [--rounds 3]
                                     [--default-wait]
    python benchmarks/bench_train.py --split [--batches 8] [--threads 2] [--backend numba] [--size 224]
                                                # npconvnext's step split by kernel and BLAS call

Each measurement runs in a child process (so each reports its own peak RSS), and the engines
alternate round by round, so a slow spell of the machine lands on both. Times are medians of
the steps after one warm-up step, wall and CPU (all threads; steadier on a busy machine);
images are 224x224 float32, labels random. Never a test.

npconvnext's children run with WAIT_SETTINGS in their environment, the settings
npconvnext/engine/threads.py recommends (without them its kernels run on one thread, see
engine/jit.py, rows_or_parallel); --default-wait runs them in this process's environment instead.
timm's children always get this process's environment (torch's OpenMP is tuned for its default).
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
WAIT_SETTINGS = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}
# the environment this script was started in, before it restarted itself with WAIT_SETTINGS
_ORIGINAL_ENVIRONMENT = json.loads(os.environ.get("_BENCH_TRAIN_ENVIRONMENT", "null")) or dict(os.environ)


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
    times, cpu_times = [], []
    for _ in range(STEPS):
        start, cpu = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
    return {"seconds": statistics.median(times), "cpu_seconds": statistics.median(cpu_times),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def split(model: str, batch: int, threads: int, backend: str, size: int = SIZE) -> None:
    """Seconds per step in each layer function, kernel and BLAS call of npconvnext's training
    step (exclusive of the timed calls inside it), wall and CPU time, after a warm-up step."""
    import inspect
    import warnings

    import numpy as np

    import npconvnext
    from npconvnext import layers, train
    from npconvnext.engine import adamw, block, depthwise, grn, layernorm, linear, mlp
    from npconvnext.train import backward, fused

    spent = defaultdict(lambda: [0.0, 0.0, 0])  # label -> wall s, CPU s, calls
    inside = [[0.0, 0.0]]                         # the timed calls running: time spent in their timed callees

    def timed(label, fn):
        def run(*args, **kwargs):
            label_ = label(fn) if callable(label) else label
            inside.append([0.0, 0.0])
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                callees = inside.pop()
                entry = spent[label_]
                entry[0] += wall - callees[0]
                entry[1] += cpu - callees[1]
                entry[2] += 1
                inside[-1][0] += wall
                inside[-1][1] += cpu
        return run

    # every public function, wherever a module calls it by name (block.py calls the layer modules')
    short = {m.__name__: m.__name__.rsplit(".", 1)[1] for m in (layers, adamw, block, depthwise, grn, layernorm,
                                                                 linear, mlp)}
    for module in (layers, adamw, block, depthwise, grn, layernorm, linear, mlp):
        for name, f in list(vars(module).items()):
            if not name.startswith("_") and inspect.isfunction(f) and f.__module__ in short:
                setattr(module, name, timed(f"{short[f.__module__]}.{name}", f))

    def blas_label(_):
        return f"BLAS in {sys._getframe(2).f_code.co_name}"  # the block function calling block.matmul

    block.matmul = timed(blas_label, np.matmul)
    fused.ENGINE = fused.ENGINE._replace(layer_norm=layernorm.layer_norm,
                                         layer_norm_backward=layernorm.layer_norm_backward)
    backward.REFERENCE = backward.REFERENCE._replace(layer_norm=layers.layer_norm,
                                                     layer_norm_backward=layers.layer_norm_backward)
    npconvnext.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = npconvnext.create_model(model, backend=backend)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    y = rng.integers(0, 1000, batch)
    opt = train.AdamW(net, lr=1e-4)
    opt.step = timed("AdamW.step", opt.step)
    total = [0.0, 0.0]
    for step in range(1 + STEPS):
        if step == 1:  # after the warm-up step
            spent.clear()
            total = [0.0, 0.0]
        wall, cpu = time.perf_counter(), time.process_time()
        opt.step(train.loss_and_grads(net, x, y, label_smoothing=0.1)[1])
        total[0] += time.perf_counter() - wall
        total[1] += time.process_time() - cpu
    timed_wall, timed_cpu = sum(v[0] for v in spent.values()), sum(v[1] for v in spent.values())
    spent["(untimed: Python and NumPy glue)"] = [total[0] - timed_wall, total[1] - timed_cpu, 0]
    print(f"{model} {size}x{size} batch {batch}, {threads} thread(s), backend {backend}: {total[0] / STEPS:.3f} s a step "
          f"(CPU {total[1] / STEPS:.3f} s), mean of {STEPS} after a warm-up step")
    print(f"  {'':<44} {'wall s':>8} {'%':>6} {'CPU s':>8} {'calls':>6}")
    for label, (wall, cpu, calls) in sorted(spent.items(), key=lambda kv: -kv[1][0]):
        print(f"  {label:<44} {wall / STEPS:8.3f} {100 * wall / total[0]:5.1f}% {cpu / STEPS:8.3f} {calls // STEPS:6d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="convnext_tiny")
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=SIZE, help="image side (default 224)")
    parser.add_argument("--split", action="store_true")
    parser.add_argument("--backend", default="numba", help="with --split: numba or numpy")
    parser.add_argument("--default-wait", action="store_true", help="npconvnext without WAIT_SETTINGS")
    parser.add_argument("--child", nargs=4, metavar=("ENGINE", "MODEL", "BATCH", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        engine, model, batch, threads = args.child
        print(json.dumps(child(engine, model, int(batch), int(threads))))
        return
    wait = {} if args.default_wait else WAIT_SETTINGS
    if any(os.environ.get(k) != v for k, v in wait.items()):  # they act only from a process's start
        env = dict(os.environ, **wait, _BENCH_TRAIN_ENVIRONMENT=json.dumps(dict(os.environ)))
        sys.exit(subprocess.run([sys.executable, __file__, *sys.argv[1:]], env=env).returncode)
    if args.split:
        split(args.model, int(args.batches.split(",")[0]), int(args.threads.split(",")[0]), args.backend, args.size)
        return
    print(f"{args.model}, {SIZE}x{SIZE} float32, one training step (median of {STEPS} in each of {args.rounds} rounds); "
          f"npconvnext with {wait or 'the environment as it is'}")
    print(f"{'threads':>7} {'batch':>5} {'engine':<11} {'s/step':>8} {'vs timm':>8} {'CPU s':>8} {'vs timm':>8} "
          f"{'peak MB':>8} {'vs timm':>8}")
    for threads in map(int, args.threads.split(",")):
        for batch in map(int, args.batches.split(",")):
            results = defaultdict(list)
            for _ in range(args.rounds):
                for engine in ("npconvnext", "timm"):
                    env = dict(os.environ) if engine == "npconvnext" else dict(_ORIGINAL_ENVIRONMENT)
                    out = subprocess.run([sys.executable, __file__, "--child", engine, args.model, str(batch), str(threads)],
                                         capture_output=True, text=True, check=True, env=env)
                    results[engine].append(json.loads(out.stdout.strip().splitlines()[-1]))
            best = {e: (statistics.median(r["seconds"] for r in rs), statistics.median(r["cpu_seconds"] for r in rs),
                        max(r["peak_mb"] for r in rs)) for e, rs in results.items()}
            for engine, (seconds, cpu, peak) in best.items():
                print(f"{threads:>7} {batch:>5} {engine:<11} {seconds:>8.2f} {seconds / best['timm'][0]:>7.2f}x "
                      f"{cpu:>8.2f} {cpu / best['timm'][1]:>7.2f}x {peak:>8.0f} {peak / best['timm'][2]:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
