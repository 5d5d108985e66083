"""Does taking turns with the peers slow npconvnext down? Two looks at bench_engines.py's main part.

    python benchmarks/probes/turns_probe.py spin [--threads 2]
        after one call of each engine, the CPU time the process burns while its caller sleeps
        0-0.2 s (the main part's pause) and 0.2-1.0 s: threads left spinning
    python benchmarks/probes/turns_probe.py pause alone|peers [--threads 2] [--engine NAME]
        one engine's batch-1 call (npconvnext float32's unless --engine names a peer) 15 times
        back to back, then 15 times each after a 0.2 s sleep, three rounds; "peers": with every
        other engine built and run first in the process

convnext_tiny with seeded random weights and its ONNX export, as bench_engines.py makes them
(in a temporary folder). A one-off record for issue 29, not a benchmark of the suite; os.times
counts in 10 ms steps.
"""

import argparse
import os
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


def built(names, files, threads):
    runs = {name: engines.build(name, MODEL, files, threads) for name in names}
    x = engines.images(1)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("look", choices=["spin", "pause"])
    parser.add_argument("company", nargs="?", choices=["alone", "peers"], default="peers")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engine", default=OURS, choices=(OURS, *PEERS), help="whose calls `pause` times")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        engines.prepare(MODEL, directory)
        files = engines.files_of(MODEL, directory)
        if args.look == "spin":
            spin(files, args.threads)
        else:
            pause(files, args.threads, args.company == "peers", args.engine)


if __name__ == "__main__":
    main()
