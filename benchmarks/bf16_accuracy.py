"""The bfloat16 engine's accuracy, measured: on every architecture, its logits' error against
float64 timm, beside OpenVINO's in the precision it picks by default (bfloat16 on CPUs with
AVX512_BF16 or AMX) and in f32, on the same model and inputs; and how often its top-1 agrees
with npconvnext float32's.

    python benchmarks/bf16_accuracy.py [--archs convnext_atto,convnextv2_tiny] [--size 64]
        [--batch 16] [--quick] [--json out.json]

Each model is timm's built with pretrained=False and every parameter re-randomised as the tests
do (tests/support/timm_reference.py: layer scales 0.1-1 and GRN drawn, not timm's near-identity
init); npconvnext loads its state dict, OpenVINO the ONNX file timm exports from it (compiled
from the file as bench_engines.py's peers are, the input's shape fixed per input set). Two input
sets: BATCH standard-normal images of SIZE x SIZE, and the repository's photos (tests/data/)
preprocessed as the architecture's data config says (224x224 for most). error = max |logits -
float64 timm's| / max |float64 timm's logits|, over the set. top-1: how many inputs' argmax
agrees with npconvnext float32's (ours) or OpenVINO f32's (OpenVINO's default). An engine that
cannot be built (this npconvnext without bfloat16, no OpenVINO) is left out with the reason
printed. Accuracy, not speed: the machine's load does not matter.
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import platform
import sys
import tempfile
import warnings

import numpy as np

import npconvnext  # the one the environment gives (PYTHONPATH, else installed), before ROOT is on the path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # tests.support: the re-randomised timm models and the photos
sys.path.insert(0, HERE)  # engines

import engines  # noqa: E402

QUICK_ARCHS = ("convnext_atto", "convnextv2_atto", "convnext_zepto_rms")
OURS = ("npconvnext bfloat16", "npconvnext float32")
OPENVINO = ("openvino default", "openvino f32")


def scaled_error(logits, reference):
    return float(np.abs(logits.astype(np.float64) - reference).max() / np.abs(reference).max())


def agreeing(logits, baseline):
    """How many rows' top-1 agree, or None if either is missing."""
    if logits is None or baseline is None:
        return None
    return int((logits.argmax(1) == baseline.argmax(1)).sum())


def photos(data_config):
    from tests.support import DATA

    files = sorted(glob.glob(os.path.join(DATA, "*.png")) + glob.glob(os.path.join(DATA, "*.jpg")))
    return np.stack([npconvnext.preprocess(f, data_config) for f in files])  # (P, 3, H, W)


def ours(state, arch, inputs):
    """{engine: [logits per input set]}; an engine that cannot be built is left out, said why."""
    out = {}
    for engine in OURS:
        try:
            net = npconvnext.create_model(arch, weights=state, dtype=engine.split()[1])
        except npconvnext.InputError as exc:
            print(f"# {arch}: {engine} unavailable: {exc}", file=sys.stderr)
            continue
        out[engine] = [net(x) for x in inputs]
        del net
        gc.collect()
    return out


def openvino(timm_model, inputs, directory):
    """{engine: [logits per input set]}, and the precision OpenVINO's default chose."""
    path = os.path.join(directory, "model.onnx")
    out, chosen = {}, None
    try:
        engines.export_onnx(timm_model, path, inputs[0].shape[2:], free_size=True)
        for engine, config in zip(OPENVINO, (engines.OPENVINO_DEFAULT_CONFIG, engines.OPENVINO_CONFIG)):
            logits = []
            for x in inputs:
                compiled, precision = engines.openvino(path, config, shape=x.shape)
                logits.append(compiled(x)[0])
                del compiled
            out[engine] = logits
            chosen = precision if engine == "openvino default" else chosen
    except Exception as exc:  # no OpenVINO, no exporter
        print(f"# OpenVINO left out: {type(exc).__name__}: {exc}", file=sys.stderr)
    return out, chosen


def measure(arch, args):
    """One architecture's row: errors and top-1 agreement per input set."""
    from tests.support.timm_reference import numpy_state_dict, random_images, random_timm_model, run_timm

    timm_model = random_timm_model(arch, seed=0)
    try:
        preprocessing = npconvnext.data_config(arch)
    except ValueError:  # an architecture with no published weights: timm's default preprocessing
        preprocessing = npconvnext.DataConfig()
    inputs = [random_images((args.batch, 3, args.size, args.size), seed=1), photos(preprocessing)]
    names = [f"random {args.size}x{args.size}", f"photos {inputs[1].shape[2]}x{inputs[1].shape[3]}"]
    with tempfile.TemporaryDirectory() as directory:
        logits, precision = openvino(timm_model, inputs, directory)
    logits.update(ours(numpy_state_dict(timm_model), arch, inputs))  # the state shares timm's memory
    reference = [run_timm(timm_model, x.astype(np.float64))["logits"] for x in inputs]  # timm -> float64
    del timm_model
    gc.collect()
    row = dict(arch=arch, openvino_default_precision=precision, sets={})
    for i, name in enumerate(names):
        got = {engine: runs[i] for engine, runs in logits.items()}
        row["sets"][name] = dict(
            inputs=len(inputs[i]),
            error={engine: scaled_error(y, reference[i]) for engine, y in got.items()},
            top1_agree={"npconvnext bfloat16 = float32": agreeing(got.get(OURS[0]), got.get(OURS[1])),
                        "openvino default = f32": agreeing(got.get(OPENVINO[0]), got.get(OPENVINO[1]))})
    return row


def cpu_name():
    with open("/proc/cpuinfo") as cpuinfo:
        return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                    platform.machine())


def print_table(rows):
    engines_seen = [e for e in OURS + OPENVINO if any(e in s["error"] for r in rows for s in r["sets"].values())]
    print("\nerror = max |logits - float64 timm's| / max |float64 timm's logits|; top-1: inputs whose argmax "
          "agrees with the same engine's float32 (npconvnext bf16 vs its float32, OpenVINO default vs its f32)")
    print(" | ".join(["arch", "inputs", *engines_seen, "bf16 error / ov default's", "top-1 bf16 = f32",
                      "top-1 ov default = f32", "ov default ran in"]))
    for r in rows:
        for name, s in r["sets"].items():
            e = s["error"]
            ratio = e[OURS[0]] / e[OPENVINO[0]] if OURS[0] in e and OPENVINO[0] in e else None
            agree = [f"{n}/{s['inputs']}" if n is not None else "-" for n in s["top1_agree"].values()]
            print(" | ".join([r["arch"], name, *[f"{e[x]:.1e}" if x in e else "-" for x in engines_seen],
                              f"{ratio:.2f}" if ratio else "-", *agree, r["openvino_default_precision"] or "-"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default=None, help="comma-separated architectures (default: every one)")
    parser.add_argument("--size", type=int, default=64, help="the random images' height and width")
    parser.add_argument("--batch", type=int, default=16, help="how many random images")
    parser.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK_ARCHS)}, 4 random images")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --json, measure the rest")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    known = npconvnext.list_models()
    archs = args.archs.split(",") if args.archs else list(QUICK_ARCHS if args.quick else known)
    unknown = [a for a in archs if a not in known]
    if unknown:
        parser.error(f"unknown architectures {unknown}; npconvnext.list_models() lists {known}")
    if args.quick:
        args.batch = min(args.batch, 4)
    rows = []
    if args.resume and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            rows = [r for r in json.load(f)["rows"] if r["arch"] in archs]
    for arch in [a for a in archs if a not in {r["arch"] for r in rows}]:
        rows.append(measure(arch, args))
        print(f"# {arch} done", file=sys.stderr, flush=True)
        if args.json:  # after each: a long run stopped early keeps what it measured
            write_json(args, rows)
    print_table(rows)


def write_json(args, rows):
    import openvino

    with open(args.json, "w") as f:
        json.dump(dict(cpu=cpu_name(), npconvnext=os.path.dirname(npconvnext.__file__),
                       openvino=openvino.__version__, numpy=np.__version__,
                       size=args.size, batch=args.batch, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
