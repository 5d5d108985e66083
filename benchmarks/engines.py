"""The engines the benchmarks compare, each built from the files `prepare` writes: npconvnext in
each dtype and backend, timm eager, ONNX Runtime and OpenVINO from the ONNX file timm exports.

OpenVINO runs three ways. "openvino f32" asks for INFERENCE_PRECISION_HINT f32 and checks it
got it. "openvino default" asks for nothing, as an Open Model Zoo user does: on CPUs with
AVX512_BF16 or AMX its CPU plugin then runs float32 models in bfloat16; the precision it chose
is read back after compiling. "openvino default, no AMX" is the same in a process where
ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 was set before OpenVINO loaded, so that its oneDNN kernels
use AVX512_BF16 but not AMX: the figure of an AVX512_BF16 machine without AMX, on an AMX one.
The variable is read once, when the library loads, so that engine lives in a child process
(`Remote`) unless this one was started with it.

Used by bench_engines.py, bf16_accuracy.py and probes/; never run as a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

SIZE = 224
# seconds before each timed call, so that the threads of what ran before (the previous engine, the
# sgemm probe) have parked: OpenBLAS's idle threads busy-wait for about 0.1 s after a call
PAUSE = 0.2
OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
OPENVINO_DEFAULT_CONFIG = {"PERFORMANCE_HINT": "LATENCY"}  # the precision left to OpenVINO
NO_AMX = "openvino default, no AMX"
NO_AMX_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}  # oneDNN's cap: AVX512_BF16, below AMX


def files_of(model, directory):
    return dict(safetensors=os.path.join(directory, f"{model}.safetensors"),
                onnx=os.path.join(directory, f"{model}.onnx"))


def prepare(model, directory):
    """Seeded random weights as timm safetensors, and the ONNX file timm exports from them."""
    import npconvnext
    from npconvnext.params import random_state_dict
    from safetensors.numpy import save_file

    files = files_of(model, directory)
    save_file(random_state_dict(npconvnext.get_config(model)), files["safetensors"])
    try:
        timm_model = load_timm(model, files["safetensors"])
        export_onnx(timm_model, files["onnx"], (SIZE, SIZE))
    except Exception as exc:  # no timm or no exporter: the ONNX peers are left out
        print(f"# no ONNX file for {model}: {exc}", file=sys.stderr)


def export_onnx(timm_model, path, size, free_size=False):
    """timm's float32 model as ONNX, the batch dimension free (and the image's size, if
    free_size: `openvino` fixes it per input); weights past 2 GB go beside it."""
    import torch

    free = {0: "n", 2: "h", 3: "w"} if free_size else {0: "n"}
    torch.onnx.export(timm_model, torch.zeros(1, 3, *size), path, input_names=["x"], dynamic_axes={"x": free},
                      dynamo=False)


def load_timm(model, safetensors_path):
    import timm
    from safetensors.torch import load_file

    timm_model = timm.create_model(model, pretrained=False).eval()
    timm_model.load_state_dict(load_file(safetensors_path))
    return timm_model


def host_has(flag):
    """Whether /proc/cpuinfo lists `flag` (amx_tile, avx512_bf16) for this CPU."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(flag in line.split() for line in cpuinfo if line.startswith("flags"))
    except OSError:
        return False


def openvino(onnx_path, config, threads=None, shape=None):
    """OpenVINO's compiled model and the precision it runs in, read back (the hint is a request).
    shape: the input's (N, 3, H, W), fixed before compiling, for a file exported with free_size."""
    import openvino as ov

    config = dict(config, **({"INFERENCE_NUM_THREADS": threads} if threads else {}))
    core = ov.Core()
    model = onnx_path
    if shape:  # else compiled from the path, as a user would
        model = core.read_model(onnx_path)
        model.reshape(list(shape))
    compiled = core.compile_model(model, "CPU", config)
    precision = compiled.get_property("INFERENCE_PRECISION_HINT")
    return compiled, precision.get_type_name()  # "f32", "bf16", "f16"


def amx_primitives(compiled):
    """The primitive types of OpenVINO's executed graph that use AMX (its FullyConnected nodes
    show none there: probes/openvino_nodes.py profiles them)."""
    kinds = {op.get_rt_info()["primitiveType"].astype(str) for op in compiled.get_runtime_model().get_ordered_ops()}
    return sorted(kind for kind in kinds if "amx" in kind)


def build(engine, model, files, threads):
    """run(x) for x (N, 3, SIZE, SIZE) float32, with `threads` threads (None: the engine's default).
    OpenVINO's runs carry `precision`, the one it chose."""
    if engine.startswith("npconvnext"):
        import npconvnext

        _, backend, dtype = engine.split()
        if threads:
            npconvnext.set_num_threads(threads)
        net = npconvnext.create_model(model, weights=files["safetensors"], dtype=dtype, backend=backend)
        takes = "float32" if dtype == "bfloat16" else dtype  # bfloat16: float32 in, float32 out

        def run(x):
            return net(x.astype(takes))
        run.weights_mb = sum(a.nbytes for a in net.params.values()) / 2**20  # as the model keeps them
        return run
    if engine == "timm eager":
        import torch

        if threads:
            torch.set_num_threads(threads)
        timm_model = load_timm(model, files["safetensors"])

        def run(x):
            with torch.no_grad():
                return timm_model(torch.from_numpy(x)).numpy()
        return run
    if not os.path.exists(files["onnx"]):
        raise RuntimeError("no ONNX file")
    if engine == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(files["onnx"], options, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"x": x})[0]
    if engine == "openvino f32":
        compiled, precision = openvino(files["onnx"], OPENVINO_CONFIG, threads)
        if precision != "f32":
            raise RuntimeError(f"OpenVINO runs in {precision}, not f32")
        return with_precision(lambda x: compiled(x)[0], precision)
    if engine == "openvino default":
        compiled, precision = openvino(files["onnx"], OPENVINO_DEFAULT_CONFIG, threads)
        return with_precision(lambda x: compiled(x)[0], precision)
    if engine == NO_AMX:
        if not (host_has("amx_tile") and host_has("avx512_bf16")):
            raise RuntimeError("this CPU has no AMX (or no AVX512_BF16): 'openvino default' is the figure")
        if os.environ.get("ONEDNN_MAX_CPU_ISA") != NO_AMX_ENV["ONEDNN_MAX_CPU_ISA"]:
            return Remote(engine, model, files, threads)
        compiled, precision = openvino(files["onnx"], OPENVINO_DEFAULT_CONFIG, threads)
        if amx_primitives(compiled):  # the variable was not honoured
            raise RuntimeError(f"OpenVINO still uses AMX under {NO_AMX_ENV}: {amx_primitives(compiled)}")
        return with_precision(lambda x: compiled(x)[0], precision)
    raise ValueError(f"unknown engine {engine!r}")


def with_precision(run, precision):
    run.precision = precision
    return run


def images(batch, seed=0):
    import numpy as np

    return np.random.default_rng(seed).standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)


class Remote:
    """An engine in a child process that needs its own environment (NO_AMX_ENV), taking turns with
    the engines of this one: each call has the child run the same input (`images` of that batch)
    once and answer the seconds it took, which `seconds_of` returns in place of a timing here."""

    def __init__(self, engine, model, files, threads):
        payload = dict(engine=engine, model=model, files=files, threads=threads)
        self.process = subprocess.Popen([sys.executable, __file__, json.dumps(payload)], text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        env=dict(os.environ, **NO_AMX_ENV))
        ready = json.loads(self.process.stdout.readline() or '{"error": "the child died"}')
        if "error" in ready:
            self.close()
            raise RuntimeError(ready["error"])
        self.precision = ready["precision"]

    def __call__(self, x):
        self.process.stdin.write(f"{len(x)}\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def seconds_of(run, x):
    """The seconds one call of `run` on x takes (a Remote's, as its child timed it)."""
    if isinstance(run, Remote):
        return run(x)
    start = time.perf_counter()
    run(x)
    return time.perf_counter() - start


def close(run):
    if isinstance(run, Remote):
        run.close()


def serve(payload):
    """A Remote's child: build the engine, say so, then time one call per batch size read."""
    try:
        run = build(payload["engine"], payload["model"], payload["files"], payload["threads"])
    except Exception as exc:
        print(json.dumps(dict(error=f"{type(exc).__name__}: {exc}")), flush=True)
        return
    print(json.dumps(dict(precision=run.precision)), flush=True)
    inputs = {}
    for line in sys.stdin:
        batch = int(line)
        x = inputs.setdefault(batch, images(batch))
        start = time.perf_counter()
        run(x)
        print(time.perf_counter() - start, flush=True)


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
