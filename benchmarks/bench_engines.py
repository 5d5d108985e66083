"""npconvnext against every peer engine installed: speed, threads, memory, cold start, and speed
in a process where torch ran first.

    python benchmarks/bench_engines.py [--parts main,beside,memory,cold] [--threads 1,2]
        [--batches 1,8] [--runs 15] [--rounds 3] [--runtime-python PATH] [--json out.json] [--quick]

main    the engines take turns call by call in one process, RUNS rounds after warm-up, for each
        thread count and batch size (--threads 1,2,...,N is the thread sweep); each engine's
        median, in ms per image and images/s. The machines this runs on drift by tens of
        percent within minutes: taking turns spreads a slow spell over every engine. A numpy
        4096^3 sgemm probe on as many BLAS threads opens each round; the sgemm floor is the
        model's FLOPs at the probe's median rate. The engines' order turns by one each round,
        so that none always runs first after the probe.
beside  npconvnext alone in a fresh process, against fresh processes where torch and timm (or
        ONNX Runtime, or OpenVINO) were imported and ran a forward first; the processes take
        turns, ROUNDS rounds, and each reports its median.
memory  peak RSS (VmHWM) of a fresh process that loads one engine and runs two forwards:
        convnext_tiny at batch 1 and 32, convnext_xxlarge at batch 1. For npconvnext also its
        split: RSS after the import, what loading, the forwards and the peak add to it, and the
        bytes of the weights as the model keeps them.
cold    a fresh process: import, load the weights, one batch-1 forward (time and peak RSS);
        npconvnext with its JIT cache cold (an empty NUMBA_CACHE_DIR) and warm; ROUNDS rounds.
        --runtime-python PATH adds npconvnext run by an interpreter whose environment has only
        its runtime dependencies (what users install) to memory and cold: this one has the
        extras, and Numba imports SciPy, when installed, at its first compile or cache load.
        npconvnext's modules are byte-compiled first, as `pip install` leaves an installed
        package (an editable install under PYTHONDONTWRITEBYTECODE=1, as on the developers'
        machines, would leave every import to compile its sources).

Peers: timm eager (the test extra), ONNX Runtime and OpenVINO (the bench extra), from an ONNX
file exported here from timm. OpenVINO runs as "openvino f32" (INFERENCE_PRECISION_HINT f32,
checked after compiling), as "openvino default" (no hint: on CPUs with AMX or AVX512-BF16 its CPU
plugin runs float32 models in bfloat16; the precision it chose is read back and printed) and, on
a CPU with AMX, as "openvino default, no AMX" (oneDNN capped at AVX512_BF16 in a child process;
see engines.py). npconvnext runs in float32, float64 and, where this npconvnext has it, bfloat16
(float32 in and out); an engine that cannot be built is left out with the reason printed. timm
loads as a user does (create_model, then load_state_dict). --quick checks every part in a few
minutes with small models. Never run as a test.
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # cold-start children count from here (before any heavy import)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402

from engines import (NO_AMX, NO_AMX_ENV, OPENVINO_CONFIG, OPENVINO_DEFAULT_CONFIG, PAUSE, SIZE,  # noqa: E402
                     build, close, files_of, images, prepare, seconds_of)

WARMUP = 2
OURS = "npconvnext numba float32"
OURS_BF16 = "npconvnext numba bfloat16"
PEERS = ("timm eager", "onnxruntime", "openvino f32")
DEFAULT_PEERS = ("openvino default", NO_AMX)  # OpenVINO in the precision it picks
RUNTIME_ONLY = "npconvnext numba float32, runtime install"  # run by --runtime-python
MAIN_ENGINES = ("npconvnext numba float32", "npconvnext numba float64", "npconvnext numpy float32", OURS_BF16,
                "timm eager", "onnxruntime", "openvino f32", *DEFAULT_PEERS)
MEMORY_CASES = (("convnext_tiny", 1), ("convnext_tiny", 32), ("convnext_xxlarge", 1))
QUICK_MEMORY_CASES = (("convnext_atto", 1), ("convnext_atto", 4))
FIRST = ("torch", "onnxruntime", "openvino")  # what the `beside` part runs before npconvnext


def median_ms_per_image(run, x, runs):
    for _ in range(WARMUP):
        run(x)
    times = []
    for _ in range(runs):
        time.sleep(PAUSE)
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / len(x)


def peak_rss_mb():
    # VmHWM, not ru_maxrss: ru_maxrss keeps the high-water mark of the parent this child was
    # forked from before it exec'd
    return status_mb("VmHWM")


def status_mb(field):
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field)).split()[1]) / 1024


# ---- children: each prints one JSON line --------------------------------------------------------


def child(args):
    kind, payload = args.child, json.loads(args.payload)
    warnings.simplefilter("ignore")
    files = files_of(payload["model"], payload["dir"])
    if kind == "prepare":
        prepare(payload["model"], payload["dir"])
        result = {}
    elif kind == "cold":  # import, load, one batch-1 forward, counted from this process's start
        build(payload["engine"], payload["model"], files, None)(images(1))
        result = dict(seconds=time.perf_counter() - _STARTED, peak_rss_mb=peak_rss_mb())
    elif kind == "memory":
        ours = payload["engine"].startswith("npconvnext")
        if ours:
            import npconvnext  # noqa: F401  (so that what the weights add shows apart)
        imported = status_mb("VmRSS")
        run = build(payload["engine"], payload["model"], files, None)
        loaded = status_mb("VmRSS")
        x = images(payload["batch"])
        run(x)
        run(x)
        result = dict(peak_rss_mb=peak_rss_mb())
        if ours:
            result["split"] = dict(imported=imported, loaded=loaded, ran=status_mb("VmRSS"), peak=peak_rss_mb(),
                                   weights=run.weights_mb)
    elif kind == "beside":
        first = payload["first"]
        if first:  # as a notebook would: the peer loads and runs first, at its default threads
            build({"torch": "timm eager", "onnxruntime": "onnxruntime", "openvino": "openvino f32"}[first],
                  payload["model"], files, None)(images(1))
        result = {}
        for threads in payload["threads"]:
            run = build(OURS, payload["model"], files, threads)
            for batch in payload["batches"]:
                result[f"{threads} {batch}"] = median_ms_per_image(run, images(batch), payload["runs"])
    else:
        raise ValueError(kind)
    print(json.dumps(result))


def run_child(kind, payload, env=None, python=None):
    """A child's JSON result, or None (with the reason on stderr) if it failed. `python`: the
    interpreter to run it with (default: this one)."""
    env = dict(env or os.environ, **(NO_AMX_ENV if payload.get("engine") == NO_AMX else {}))
    process = subprocess.run([python or sys.executable, __file__, "--child", kind, "--payload", json.dumps(payload)],
                             env=env, capture_output=True, text=True)
    if process.returncode:
        last_line = (process.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"# {kind} {payload.get('engine') or payload.get('first') or ''} failed: {last_line}", file=sys.stderr)
        return None
    return json.loads(process.stdout.strip().splitlines()[-1])


# ---- the parts --------------------------------------------------------------------------------


def sgemm_gflops():
    import numpy as np

    a = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32)
    a @ a
    start = time.perf_counter()
    a @ a
    return 2 * 4096**3 / (time.perf_counter() - start) / 1e9


def main_table(args, files):
    """Rows (engine, threads, batch, ms per image, sgemm GF/s, OpenVINO's precision), the engines
    taking turns."""
    from threadpoolctl import threadpool_limits

    chosen = [e for e in MAIN_ENGINES if not args.engines or any(w in e for w in args.engines.split(","))]
    rows = []
    for threads in args.threads:
        runners = {}
        for engine in chosen:
            try:
                runners[engine] = build(engine, args.model, files, threads)
            except Exception as exc:  # a peer that is not installed, a dtype this npconvnext lacks
                print(f"# {engine} unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        if not runners:
            continue
        for batch in args.batches:
            x = images(batch)
            for run in runners.values():
                for _ in range(WARMUP):
                    run(x)
            times, probes = {engine: [] for engine in runners}, []
            order = list(runners.items())
            for round_ in range(args.runs):
                with threadpool_limits(threads, user_api="blas"):  # the floor: numpy's sgemm on as many threads
                    probes.append(sgemm_gflops())
                shift = round_ % len(order)  # the opening engine cycles, so none always follows the probe
                for engine, run in order[shift:] + order[:shift]:
                    if "numpy" in engine and round_ >= 3:  # the reference backend is slow: 3 calls
                        continue
                    time.sleep(PAUSE)
                    times[engine].append(seconds_of(run, x))
            for engine, t in times.items():
                ms = 1000 * statistics.median(t) / batch
                rows.append(dict(engine=engine, threads=threads, batch=batch, ms_per_image=ms, images_per_s=1000 / ms,
                                 sgemm_gflops=statistics.median(probes),
                                 precision=getattr(runners[engine], "precision", None)))
                print(f"# {engine} threads={threads} batch={batch}: {ms:.1f} ms/image", file=sys.stderr)
        for run in runners.values():
            close(run)
    return rows


def print_main(rows, model):
    import npconvnext
    from npconvnext.summary import summarize

    macs = sum(row.macs for row in summarize(npconvnext.get_config(model), (SIZE, SIZE)))  # per image
    peers = [p for p in PEERS + DEFAULT_PEERS if any(r["engine"] == p for r in rows)]
    chose = sorted({f"{r['engine']}: {r['precision']}" for r in rows if r["engine"] in DEFAULT_PEERS})
    print(f"\n{model}, {SIZE}x{SIZE}, float32 input; engines taking turns call by call in one process; "
          "median ms per image; ratio = this / peer; floor = the model's FLOPs at numpy's sgemm rate. "
          f"OpenVINO f32: {OPENVINO_CONFIG}; default: {OPENVINO_DEFAULT_CONFIG}, no AMX: {NO_AMX_ENV} "
          f"in a child process; precision read back: {', '.join(chose) or '-'}")
    print(" | ".join(["engine", "threads", "batch", "ms/image", "images/s", "sgemm GF/s"]
                     + [f"/{p}" for p in peers] + ["/floor"]))
    for r in sorted(rows, key=lambda r: (MAIN_ENGINES.index(r["engine"]), r["threads"], r["batch"])):
        same = {q["engine"]: q for q in rows if (q["threads"], q["batch"]) == (r["threads"], r["batch"])}
        floor_ms = 2 * macs / (r["sgemm_gflops"] * 1e9) * 1000
        print(" | ".join([r["engine"], str(r["threads"]), str(r["batch"]), f"{r['ms_per_image']:.1f}",
                          f"{r['images_per_s']:.1f}", f"{r['sgemm_gflops']:.0f}"]
                         + [f"{r['ms_per_image'] / same[p]['ms_per_image']:.2f}" if p in same else "-" for p in peers]
                         + [f"{r['ms_per_image'] / floor_ms:.2f}"]))
    print_sweep(rows)


def print_sweep(rows):
    """Images/s per thread count and batch; ours / the fastest float32 peer, and our bfloat16 /
    OpenVINO in its default precision (below 1 is slower)."""
    print("\nthread sweep, images/s (ours / peer: below 1 is slower)")
    sweep = [e for e in (OURS, "onnxruntime", "openvino f32", OURS_BF16, *DEFAULT_PEERS)
             if any(r["engine"] == e for r in rows)]
    ratios = [("float32 / best float32 peer", OURS, ("onnxruntime", "openvino f32")),
              ("bfloat16 / openvino default", OURS_BF16, ("openvino default",)),
              ("bfloat16 / no AMX", OURS_BF16, (NO_AMX,))]
    print(" | ".join(["threads", "batch"] + sweep + [name for name, _, _ in ratios]))
    for threads in sorted({r["threads"] for r in rows}):
        for batch in sorted({r["batch"] for r in rows}):
            rate = {r["engine"]: r["images_per_s"] for r in rows if (r["threads"], r["batch"]) == (threads, batch)}
            cells = []
            for _, ours, against in ratios:
                best = max((rate[e] for e in against if e in rate), default=None)
                cells.append(f"{rate[ours] / best:.2f}" if best and ours in rate else "-")
            print(" | ".join([str(threads), str(batch)] + [f"{rate[e]:.1f}" if e in rate else "-" for e in sweep]
                             + cells))


def beside(args, directory):
    """{first or 'alone': {'threads batch': median of the processes' medians}}, the processes taking turns."""
    firsts = [None] + [f for f in FIRST if f in args.first]
    samples = {f or "alone": {} for f in firsts}
    for _ in range(args.rounds):
        for first in firsts:
            got = run_child("beside", dict(model=args.model, dir=directory, first=first, threads=args.threads,
                                           batches=args.batches, runs=args.runs))
            for key, ms in (got or {}).items():
                samples[first or "alone"].setdefault(key, []).append(ms)
    result = {first: {key: statistics.median(ms) for key, ms in by_key.items()} for first, by_key in samples.items()}
    print(f"\nnpconvnext {args.model} in a fresh process alone, and after another engine was imported and "
          f"ran a forward in it; ms per image, median of {args.rounds} processes (each a median of {args.runs})")
    after_names = [f"after {f}" for f in firsts[1:]]
    print(" | ".join(["threads batch", "alone"] + after_names + [f"{name} / alone" for name in after_names]))
    for key, alone in result["alone"].items():
        after = [result[f].get(key) for f in firsts[1:]]
        print(" | ".join([key, f"{alone:.1f}"] + [f"{a:.1f}" if a else "-" for a in after]
                         + [f"{a / alone:.2f}" if a else "-" for a in after]))
    return result


def memory(args, cases, directories):
    """{model batch: {engine: peak RSS MB}}, each engine alone in a fresh process, and
    {model batch: {engine: npconvnext's split}} (see `print_split`)."""
    engines = [OURS, OURS_BF16, *PEERS, *DEFAULT_PEERS] + ([RUNTIME_ONLY] if args.runtime_python else [])
    result, splits = {}, {}
    model, batch = cases[0]
    for python, ours in {(None, OURS), (None, OURS_BF16), (args.runtime_python, OURS)}:
        # fill each interpreter's JIT cache: a compile is not the model's
        run_child("memory", dict(model=model, dir=directories[model], engine=ours, batch=batch), python=python)
    for model, batch in cases:
        row = result[f"{model} {batch}"] = {}
        for engine in engines:
            python = args.runtime_python if engine == RUNTIME_ONLY else None
            got = run_child("memory", dict(model=model, dir=directories[model], engine=OURS if python else engine,
                                           batch=batch), python=python)
            if got:
                row[engine] = got["peak_rss_mb"]
                if "split" in got and not python:
                    splits.setdefault(f"{model} {batch}", {})[engine] = got["split"]
    print("\npeak RSS (MB) of a fresh process that loads the model and runs two forwards, one engine each")
    print(" | ".join(["model", "batch"] + engines))
    for key, row in result.items():
        print(" | ".join(key.split() + [f"{row[e]:.0f}" if e in row else "-" for e in engines]))
        if OURS in row and OURS_BF16 in row:
            print(f"  {key}: npconvnext bfloat16 / float32 peak RSS {row[OURS_BF16] / row[OURS]:.2f}")
    print_split(splits)
    return result, splits


def print_split(splits):
    """npconvnext's RSS after its import, and what loading, the two forwards and the peak add to
    it, beside the weights' bytes as the model keeps them (MB); bfloat16 over float32 of each."""
    print("\nnpconvnext: RSS after the import (MB), what loading, the forwards and the peak add to it, "
          "and the weights as the model keeps them")
    for key, split in splits.items():
        added = {engine: dict(load=s["loaded"] - s["imported"], forwards=s["ran"] - s["imported"],
                              peak=s["peak"] - s["imported"], weights=s["weights"]) for engine, s in split.items()}
        for engine, s in split.items():
            print(f"{key} {engine}: import {s['imported']:.0f}, "
                  + ", ".join(f"{what} +{mb:.0f}" for what, mb in added[engine].items() if what != "weights")
                  + f"; weights {s['weights']:.0f}")
        if OURS in added and OURS_BF16 in added:
            print(f"  {key}: bfloat16 / float32, " + ", ".join(
                f"{what} {added[OURS_BF16][what] / added[OURS][what]:.2f}" for what in ("weights", "peak", "forwards")
                if added[OURS][what] > 0))


def byte_compile_npconvnext(python=None):
    """Write npconvnext's .pyc files for this interpreter, as pip does at install."""
    subprocess.run([python or sys.executable, "-c", "import compileall, os, sys, npconvnext; "
                    "sys.exit(not compileall.compile_dir(os.path.dirname(npconvnext.__file__), quiet=1))"],
                   check=True)


def cold(args, directory):
    """{label: {seconds, peak_rss_mb}} medians over ROUNDS fresh processes, taking turns."""
    for python in {None, args.runtime_python}:
        byte_compile_npconvnext(python)
    jit = os.path.join(directory, "jit")
    warm_env = dict(os.environ, NUMBA_CACHE_DIR=os.path.join(jit, "warm"))
    cases = [("npconvnext, JIT cache cold", OURS, None, None), ("npconvnext, JIT cache warm", OURS, warm_env, None),
             ("npconvnext bfloat16, JIT cache cold", OURS_BF16, None, None),
             ("npconvnext bfloat16, JIT cache warm", OURS_BF16, warm_env, None)]
    if args.runtime_python:
        cases += [(f"{RUNTIME_ONLY}, JIT cache cold", OURS, None, args.runtime_python),
                  (f"{RUNTIME_ONLY}, JIT cache warm", OURS, warm_env, args.runtime_python)]
    for _, engine, env, python in cases:
        if env is warm_env:
            run_child("cold", dict(model=args.model, dir=directory, engine=engine), warm_env, python)  # fills it
    cases += [(engine, engine, None, None) for engine in PEERS + DEFAULT_PEERS]
    samples = {label: [] for label, _, _, _ in cases}
    for round_ in range(args.rounds):
        for index, (label, engine, env, python) in enumerate(cases):
            cold_env = dict(os.environ, NUMBA_CACHE_DIR=os.path.join(jit, f"cold-{round_}-{index}"))  # empty
            got = run_child("cold", dict(model=args.model, dir=directory, engine=engine), env or cold_env, python)
            if got:
                samples[label].append(got)
    result = {label: dict(seconds=statistics.median(s["seconds"] for s in got),
                          peak_rss_mb=statistics.median(s["peak_rss_mb"] for s in got))
              for label, got in samples.items() if got}
    print(f"\ncold start of {args.model}: a fresh process imports, loads the weights and runs one batch-1 "
          f"forward; medians of {args.rounds} processes")
    for label, r in result.items():
        print(f"{label}: {r['seconds']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="main,beside,memory,cold")
    parser.add_argument("--model", default="convnext_tiny")
    parser.add_argument("--threads", default="1,2", help="thread counts, e.g. 1,2,4,8,16 for a sweep")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runs", type=int, default=15, help="calls per engine and case (main, beside)")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per case (beside, cold)")
    parser.add_argument("--engines", default=None, help="main: comma-separated substrings of the engines to run")
    parser.add_argument("--first", default=",".join(FIRST), help="beside: what runs before npconvnext")
    parser.add_argument("--runtime-python", default=None,
                        help="memory, cold: also run npconvnext under this interpreter, one whose environment "
                             "has npconvnext with its runtime dependencies only, as `pip install npconvnext` "
                             "gives (Numba imports SciPy at its first compile or cache load when installed)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="check every part in minutes: small models, few runs")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--payload", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    warnings.simplefilter("ignore")
    parts = args.parts.split(",")
    args.threads = [int(t) for t in args.threads.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    memory_cases = MEMORY_CASES
    if args.quick:
        args.runs, args.rounds, memory_cases = min(args.runs, 3), 1, QUICK_MEMORY_CASES
    results = dict(model=args.model, threads=args.threads, batches=args.batches, runs=args.runs, rounds=args.rounds,
                   openvino=OPENVINO_CONFIG, openvino_default=OPENVINO_DEFAULT_CONFIG, openvino_no_amx_env=NO_AMX_ENV)
    with tempfile.TemporaryDirectory() as tmp:
        models = {args.model} | ({model for model, _ in memory_cases} if "memory" in parts else set())
        directories = {model: os.path.join(tmp, model) for model in models}  # ONNX files past 2 GB put
        for model, directory in sorted(directories.items()):                   # each weight beside them
            os.mkdir(directory)
            run_child("prepare", dict(model=model, dir=directory))  # in a child: this process never holds it
        directory = directories[args.model]
        if "beside" in parts:
            results["beside"] = beside(args, directory)
        if "memory" in parts:
            results["memory"], results["memory_split"] = memory(args, memory_cases, directories)
        if "cold" in parts:
            results["cold_start"] = cold(args, directory)
        if "main" in parts:  # last: it imports every engine into this process
            results["rows"] = main_table(args, files_of(args.model, directory))
            print_main(results["rows"], args.model)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
