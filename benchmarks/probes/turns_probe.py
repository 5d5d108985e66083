"""Does taking turns with the peers slow npconvnext down? Two looks at bench_engines.py's main part.

    python benchmarks/probes/turns_probe.py spin [--threads 2]
        after one call of each engine, the CPU time the process burns while its caller sleeps
        0-0.2 s (the main part's pause) and 0.2-1.0 s: threads left spinning
    python benchmarks/probes/turns_probe.py pause alone|peers [--threads 2] [--engine NAME]
        one engine's batch-1 call (npconvnext float32's unless --engine names a peer) 15 times
        back to back, then 15 times each after a 0.2 s sleep, three rounds; "peers": with every
        other engine built and run first in the process
    python benchmarks/probes/turns_probe.py faults alone|peers [--threads 1] [--batch 8]
        npconvnext float32's call after a 0.2 s sleep, 15 times, three rounds: its median time,
        and the mean per call of the minor page faults and the system CPU time of the process,
        in all and in the steps that allocate the forward's large arrays (getrusage)

convnext_tiny with seeded random weights and its ONNX export, as bench_engines.py makes them
(in a temporary folder). A one-off record for issue 29, not a benchmark of the suite; os.times
counts in 10 ms steps, getrusage's system time in ticks of the kernel's clock.
"""

import argparse
import collections
import os
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # benchmarks/, for engines
import engines  # noqa: E402

MODEL = "convnext_tiny"
OURS = "npconvnext numba float32"
PEERS = ("onnxruntime", "openvino f32", "openvino default", "timm eager")
PAUSE = 0.2  # s, as engines.PAUSE


def built(names, files, threads, batch=1):
    runs = {name: engines.build(name, MODEL, files, threads) for name in names}
    x = engines.images(batch)
    for run in runs.values():
        run(x)
        run(x)
    return runs, x


def process_cpu_seconds():
    times = os.times()
    return times.user + times.system


def spin(files, threads):
    runs, x = built((OURS, *PEERS), files, threads)
    for name, run in runs.items():
        for _ in range(2):
            run(x)
            start = process_cpu_seconds()
            time.sleep(PAUSE)
            paused = process_cpu_seconds()
            time.sleep(1.0 - PAUSE)
            print(f"{name}: CPU while the caller sleeps 0-{PAUSE} s: {(paused - start) * 1e3:.0f} ms, "
                  f"{PAUSE}-1.0 s: {(process_cpu_seconds() - paused) * 1e3:.0f} ms", flush=True)


def pause(files, threads, with_peers, engine):
    others = [name for name in (OURS, *PEERS) if name != engine]
    runs, x = built((engine, *others) if with_peers else (engine,), files, threads)
    timed = runs[engine]

    def ms(wait):
        time.sleep(wait)
        start = time.perf_counter()
        timed(x)
        return (time.perf_counter() - start) * 1e3

    label = f"{engine}, {'peers' if with_peers else 'alone'}"
    for _ in range(3):
        back_to_back = statistics.median(ms(0) for _ in range(15))
        paused = statistics.median(ms(PAUSE) for _ in range(15))
        print(f"{label}, {threads} threads: back to back {back_to_back:.1f} ms, after a {PAUSE} s pause "
              f"{paused:.1f} ms", flush=True)


def usage():
    """(minor page faults, system CPU ms) of this process so far"""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_minflt, own.ru_stime * 1e3


def counted_steps(by_step):
    """Wrap the npconvnext steps that allocate the forward's large arrays so that each adds its
    page faults to by_step: the block's depthwise conv + LayerNorm (its padded input and its
    output) and MLP (its output), the patchify convs' patches and outputs (with the classifier's,
    which takes the same linear), and the model's input (NCHW to NHWC)."""
    from npconvnext import layers, model
    from npconvnext.engine import block, linear

    def counted(owner, name, step):
        step_function = getattr(owner, name)

        def run(*args, **kwargs):
            faults = usage()[0]
            try:
                return step_function(*args, **kwargs)
            finally:
                by_step[step] += usage()[0] - faults
        setattr(owner, name, run)

    counted(block, "depthwise_conv_layer_norm", "depthwise conv + LayerNorm")
    counted(block, "mlp_residual", "MLP")
    counted(linear, "panels_linear", "patchify convs and classifier")
    counted(layers, "patches", "their patches")
    counted(model.ConvNeXt, "network_input", "input NCHW -> NHWC")


def faults(files, threads, batch, with_peers):
    by_step = collections.Counter()
    counted_steps(by_step)
    runs, x = built((OURS, *PEERS) if with_peers else (OURS,), files, threads, batch)
    ours = runs[OURS]
    label = f"{OURS}, {'peers' if with_peers else 'alone'}, {threads} thread{'s' * (threads > 1)}, batch {batch}"
    for _ in range(3):
        by_step.clear()
        times, counts, system = [], [], []
        for _ in range(15):
            time.sleep(PAUSE)
            before, start = usage(), time.perf_counter()
            ours(x)
            times.append((time.perf_counter() - start) * 1e3 / batch)
            after = usage()
            counts.append(after[0] - before[0])
            system.append(after[1] - before[1])
        steps = ", ".join(f"{step} {count / 15:.0f}" for step, count in by_step.most_common() if count) or "none"
        print(f"{label}: {statistics.median(times):.1f} ms per image; per call, mean: {statistics.mean(counts):.0f} "
              f"minor page faults ({steps}), {statistics.mean(system):.1f} ms system time", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("look", choices=["spin", "pause", "faults"])
    parser.add_argument("company", nargs="?", choices=["alone", "peers"], default="peers")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="the batch `faults` runs")
    parser.add_argument("--engine", default=OURS, choices=(OURS, *PEERS), help="whose calls `pause` times")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        engines.prepare(MODEL, directory)
        files = engines.files_of(MODEL, directory)
        if args.look == "spin":
            spin(files, args.threads)
        elif args.look == "faults":
            faults(files, args.threads, args.batch, args.company == "peers")
        else:
            pause(files, args.threads, args.company == "peers", args.engine)


if __name__ == "__main__":
    main()
