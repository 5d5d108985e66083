"""convnext_tiny forward time: npconvnext against every peer engine installed, in one run.

    python benchmarks/bench_engines.py [--model convnext_tiny] [--runs 15] [--json out.json]

For each batch size and thread count the engines take turns, one call each per round, RUNS
rounds after warm-up, and each engine's median is reported: the machines this runs on drift by
tens of percent within minutes, and taking turns spreads a slow spell over every engine rather
than one. A numpy 4096^3 sgemm probe on as many BLAS threads opens each round (the table shows
the median), and the sgemm floor (the model's FLOPs at that rate) is the last column's reference.
Peers: timm eager (needs the test extra), ONNX Runtime and OpenVINO (the bench extra); the
ONNX file is exported here from the timm model. Never run as a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import npconvnext  # noqa: I001  before numpy, so its thread-wait settings reach OpenBLAS (see __init__)
import numpy as np
from threadpoolctl import threadpool_limits

BATCHES = (1, 8)
THREADS = (1, 2)
WARMUP = 2
PAUSE = 0.05  # seconds between two engines' calls
SIZE = 224
MACS = {"convnext_tiny": 4.47e9}  # per 224x224 image, from `npconvnext summary`


def interleaved_ms(runners, x, runs, threads):
    """Median ms per call of each engine, the engines taking turns call by call (so a slow
    spell of the machine hits them all), and the median sgemm probe of the rounds."""
    for run in runners.values():
        for _ in range(WARMUP):
            run(x)
    times = {engine: [] for engine in runners}
    probes = []
    for round_ in range(runs):
        with threadpool_limits(threads, user_api="blas"):  # the floor: numpy's sgemm on as many threads
            probes.append(sgemm_gflops())
        for engine, run in runners.items():
            if "numpy" in engine and round_ >= 3:  # the reference backend is slow: 3 calls
                continue
            time.sleep(PAUSE)  # the previous engine's threads park, as between two requests
            start = time.perf_counter()
            run(x)
            times[engine].append(time.perf_counter() - start)
    return {engine: 1000 * statistics.median(t) for engine, t in times.items()}, statistics.median(probes)


def sgemm_gflops():
    a = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32)
    a @ a
    start = time.perf_counter()
    a @ a
    return 2 * 4096**3 / (time.perf_counter() - start) / 1e9


def engines(name, state, tmp):
    """name -> (setup(threads) -> run(x)) for every engine that can be imported."""
    def ours(backend, dtype):
        def setup(threads):
            npconvnext.set_num_threads(threads)
            model = npconvnext.create_model(name, weights=state, dtype=dtype, backend=backend)
            return lambda x: model(x.astype(dtype))
        return setup

    found = {f"npconvnext {b} {d}": ours(b, d) for b in ("numba", "numpy") for d in ("float32", "float64")}
    try:
        import timm
        import torch

        model = timm.create_model(name, pretrained=False).eval()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})

        def timm_setup(threads):
            torch.set_num_threads(threads)

            def run(x):
                with torch.no_grad():
                    return model(torch.from_numpy(x)).numpy()
            return run
        found["timm eager"] = timm_setup
        onnx_path = os.path.join(tmp, f"{name}.onnx")
        torch.onnx.export(model, torch.zeros(1, 3, SIZE, SIZE), onnx_path, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}}, dynamo=False)
    except Exception as exc:  # a peer that is not installed or fails to export is left out
        print(f"# timm/onnx export unavailable: {exc}", file=sys.stderr)
        onnx_path = None
    if onnx_path:
        try:
            import onnxruntime as ort

            def ort_setup(threads):
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = threads
                sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
                return lambda x: sess.run(None, {"x": x})[0]
            found["onnxruntime"] = ort_setup
        except ImportError:
            pass
        try:
            import openvino as ov

            def ov_setup(threads):
                core = ov.Core()
                compiled = core.compile_model(onnx_path, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                                 "INFERENCE_NUM_THREADS": threads})
                return lambda x: compiled(x)[0]
            found["openvino f32"] = ov_setup
        except ImportError:
            pass
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="convnext_tiny")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--engines", default=None, help="comma-separated substrings: run only matching engines")
    parser.add_argument("--no-cold-start", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    from npconvnext.params import random_state_dict

    state = random_state_dict(npconvnext.get_config(args.model))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        found = engines(args.model, state, tmp)
        onnx_path = os.path.join(tmp, f"{args.model}.onnx")
        cold = {} if args.no_cold_start else cold_start(args.model, onnx_path if os.path.exists(onnx_path) else None)
        chosen = {engine: setup for engine, setup in found.items()
                  if not args.engines or any(word in engine for word in args.engines.split(","))}
        for threads in THREADS:
            runners = {engine: setup(threads) for engine, setup in chosen.items()}
            for batch in BATCHES:
                x = np.random.default_rng(0).standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)
                ms, probe = interleaved_ms(runners, x, args.runs, threads)
                for engine in runners:
                    rows.append(dict(engine=engine, threads=threads, batch=batch, ms_per_image=ms[engine] / batch,
                                     sgemm_gflops=probe))
                    print(f"# {engine} threads={threads} batch={batch}: {ms[engine] / batch:.1f} ms/image",
                          file=sys.stderr)
    rows.sort(key=lambda r: list(chosen).index(r["engine"]))  # stable: by engine, then threads and batch
    macs = MACS.get(args.model)
    print(f"\n{args.model}, {SIZE}x{SIZE}, float32 input; ms per image (median); ratio = this / peer")
    peers = sorted({r["engine"] for r in rows if not r["engine"].startswith("npconvnext")})
    header = ["engine", "thr", "batch", "ms/img", "sgemm GF/s"] + [f"/{p}" for p in peers] + (["/floor"] if macs else [])
    print(" | ".join(header))
    for r in rows:
        cells = [r["engine"], str(r["threads"]), str(r["batch"]), f"{r['ms_per_image']:.1f}", f"{r['sgemm_gflops']:.0f}"]
        for p in peers:
            peer = next(q for q in rows if q["engine"] == p and q["threads"] == r["threads"] and q["batch"] == r["batch"])
            cells.append(f"{r['ms_per_image'] / peer['ms_per_image']:.2f}")
        if macs:
            floor_ms = 2 * macs / (r["sgemm_gflops"] * 1e9) * 1000
            cells.append(f"{r['ms_per_image'] / floor_ms:.2f}")
        print(" | ".join(cells))
    print("\ncold start (new process: import, load the weights, one batch-1 forward):")
    for label, result in cold.items():
        print(f"{label}: {result['seconds']:.2f} s, peak RSS {result['peak_rss_mb']} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, rows=rows, cold_start=cold), f, indent=2)


def cold_start(name, onnx_path=None):
    """Seconds and peak RSS of a fresh process (import, load weights, one batch-1 forward):
    npconvnext with its JIT cache cold and warm, and each peer that is installed."""
    from npconvnext.params import random_state_dict
    from safetensors.numpy import save_file

    # peak RSS from VmHWM: ru_maxrss would carry over this (large) parent's high-water mark,
    # since the child is forked from it before it execs
    start = "import time; t = time.perf_counter();"
    finish = ("s = time.perf_counter() - t;"
              "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1];"
              "print(s, int(hwm) / 1024)")
    ours = (f"import npconvnext, numpy as np; m = npconvnext.create_model({name!r}, weights={{path!r}});"
            f"m(np.zeros((1, 3, {SIZE}, {SIZE}), np.float32));")
    timm = (f"import torch, timm; from safetensors.torch import load_file;"
            f"m = timm.create_model({name!r}, pretrained=False).eval(); m.load_state_dict(load_file({{path!r}}));"
            f"torch.set_grad_enabled(False); m(torch.zeros(1, 3, {SIZE}, {SIZE}));")
    ort = ("import onnxruntime as ort, numpy as np;"
           "s = ort.InferenceSession({onnx!r}, providers=['CPUExecutionProvider']);"
           f"s.run(None, {{{{'x': np.zeros((1, 3, {SIZE}, {SIZE}), np.float32)}}}});")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "w.safetensors")
        save_file(random_state_dict(npconvnext.get_config(name)), path)
        runs = [("npconvnext, cold JIT", ours), ("npconvnext, warm JIT", ours), ("timm eager", timm)]
        if onnx_path:
            runs.append(("onnxruntime", ort))
        for label, code in runs:
            env = dict(os.environ, NUMBA_CACHE_DIR=os.path.join(tmp, "jit"))
            result = subprocess.run([sys.executable, "-c", (start + code + finish).format(path=path, onnx=onnx_path)],
                                    env=env, capture_output=True, text=True)
            if result.returncode:  # a peer that is not installed is left out
                last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"# cold start of {label} failed: {last_line}", file=sys.stderr)
                continue
            seconds, rss = map(float, result.stdout.split())
            out[label] = dict(seconds=round(seconds, 2), peak_rss_mb=round(rss))
    return out


if __name__ == "__main__":
    main()
