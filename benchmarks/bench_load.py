"""How long `create_model(None, weights=PATH)` takes for every weight format npconvnext reads.

Each file is written by the library that owns its format, from a re-randomised model (1000
classes, every parameter off its init): timm's safetensors, torch.save'd state dicts in timm's
and the official code's naming, transformers' save_pretrained, keras.applications' ConvNeXt
saved by Keras 3 (legacy .h5, .weights.h5, .keras), a TensorFlow SavedModel (Keras' export, by
tests/support/tf_writer.py) and OpenVINO IRs (FP32, FP16-compressed) converted from timm. Each writer
runs in a child process of its own; TensorFlow runs in one with no OpenVINO (the two crash in
one process), from this interpreter if it has TensorFlow, else from --tf-python.

The loads run in a fresh process that imports none of torch, TensorFlow, Keras or OpenVINO, one
per format, after one warm-up load there (the page cache and Numba's JIT cache warm). Prints a
markdown table: format, size on disk, the median and the best of --repeats loads.

    python benchmarks/bench_load.py --tf-python TF_VENV/bin/python          # convnext_tiny, 5 loads
    python benchmarks/bench_load.py --arch convnext_atto --repeats 1          # a quick check
    python benchmarks/bench_load.py --formats safetensors,ir-fp16 --json load.json

Files are kept in --workdir (one folder per architecture) and reused by later runs. Keras and
TensorFlow have no ConvNeXt-V2: their formats are skipped for V2 architectures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ARCH = "convnext_tiny"
REPEATS = 5
SEED = 0
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # the repository: the tests' writers and randomisers (tests/) are reused

# key -> (table label, writer, path in the architecture's folder); the table keeps this order
FORMATS = {
    "safetensors": ("timm safetensors", "timm", "timm.safetensors"),
    "bin": ("timm torch.save .bin", "timm", "pytorch_model.bin"),
    "pth": ("official .pth", "timm", "convnext_official.pth"),
    "transformers": ("transformers save_pretrained", "transformers", "transformers/model.safetensors"),
    "h5": ("Keras legacy .h5", "keras", "keras.h5"),
    "weights.h5": ("Keras 3 .weights.h5", "keras", "keras.weights.h5"),
    "keras": ("Keras 3 .keras", "keras", "keras.keras"),
    "savedmodel": ("TensorFlow SavedModel", "tensorflow", "savedmodel"),
    "ir-fp32": ("OpenVINO IR FP32", "openvino", "ir-fp32.xml"),
    "ir-fp16": ("OpenVINO IR FP16", "openvino", "ir-fp16.xml"),
}
KERAS_APPLICATIONS = {"convnext_tiny": "ConvNeXtTiny", "convnext_small": "ConvNeXtSmall",
                      "convnext_base": "ConvNeXtBase", "convnext_large": "ConvNeXtLarge",
                      "convnext_xlarge": "ConvNeXtXLarge"}
FRAMEWORKS = ("torch", "tensorflow", "keras", "openvino")  # none of them may be in the timing process

_LOADER = """
import json, sys, time
import npconvnext
path, repeats = sys.argv[1], int(sys.argv[2])
npconvnext.create_model(None, weights=path)  # warm-up: page cache and JIT cache
times = []
for _ in range(repeats):
    start = time.perf_counter()
    npconvnext.create_model(None, weights=path)
    times.append(time.perf_counter() - start)
loaded = [m for m in FRAMEWORKS if m in sys.modules]
assert not loaded, f"the timing process imported {loaded}"
print(json.dumps(times))
"""


# ---- the writers: each runs in a child process (`--write WRITER`) -------------------------------


def write_timm(arch: str, out: dict[str, str]) -> None:
    """timm's own safetensors and torch.save files, and the official naming wrapped in "model"."""
    sys.path.insert(0, ROOT)
    import torch
    from safetensors.torch import save_file
    from tests.formats.test_checkpoints import official_state
    from tests.support.timm_reference import numpy_state_dict, random_timm_model

    net = random_timm_model(arch, seed=SEED)
    writers = {"safetensors": lambda path: save_file(net.state_dict(), path),
               "bin": lambda path: torch.save(net.state_dict(), path),
               "pth": lambda path: torch.save({"model": official_state(numpy_state_dict(net))}, path)}
    for key, path in out.items():
        writers[key](path)


def write_transformers(arch: str, out: dict[str, str]) -> None:
    """ConvNextForImageClassification (V2 for V2 architectures), save_pretrained to a folder."""
    import torch
    import transformers as tr

    from npconvnext.config import get_config

    cfg = get_config(arch)
    config_class, model_class = ((tr.ConvNextV2Config, tr.ConvNextV2ForImageClassification) if cfg.use_grn
                                 else (tr.ConvNextConfig, tr.ConvNextForImageClassification))
    hf = model_class(config_class(depths=list(cfg.depths), hidden_sizes=list(cfg.dims), num_labels=1000,
                                  layer_norm_eps=cfg.norm_eps)).eval()
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():  # off the init: layer scales and norms around 1, weights N(0, 1/fan_in)
        for name, p in hf.named_parameters():
            if "layer_scale" in name or "layernorm.weight" in name:
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.2))
    hf.save_pretrained(os.path.dirname(out["transformers"]))


def keras_model(keras, arch: str):
    """keras.applications' ConvNeXt for `arch` (224x224, 1000 classes), with its Normalization
    layer and softmax; architectures keras.applications has no class for are built by the same
    function its classes call."""
    if arch in KERAS_APPLICATIONS:
        return getattr(keras.applications, KERAS_APPLICATIONS[arch])(weights=None)
    from keras.src.applications.convnext import ConvNeXt

    from npconvnext.config import get_config

    cfg = get_config(arch)
    return ConvNeXt(depths=list(cfg.depths), projection_dims=list(cfg.dims), name=arch, weights=None)


def write_keras(arch: str, out: dict[str, str]) -> None:
    """Keras 3 on torch: model.save to a legacy .h5 and to .keras, save_weights to .weights.h5."""
    os.environ["KERAS_BACKEND"] = "torch"
    sys.path.insert(0, ROOT)
    import keras
    from tests.formats.test_keras import randomise

    model = keras_model(keras, arch)
    randomise(model, seed=SEED)
    for key, path in out.items():
        if key == "weights.h5":
            model.save_weights(path)
        else:
            model.save(path)  # the extension picks the container: legacy HDF5 or the .keras zip


def write_tensorflow(arch: str, out: dict[str, str]) -> None:
    """A SavedModel by Keras 3's export on TensorFlow, as tests/support/tf_writer.py writes it."""
    sys.path.insert(0, ROOT)
    from tests.support import tf_writer  # first: it imports TensorFlow and sets Keras' backend to it
    import keras

    name = "keras_tiny_1000" if arch == "convnext_tiny" else f"keras_{arch}_1000"
    tf_writer.MODELS.setdefault(name, (lambda: keras_model(keras, arch), "export"))
    folder = os.path.dirname(out["savedmodel"])
    tf_writer.write(folder, name)  # folder/name/, and TensorFlow's outputs in folder/name.npz
    os.replace(os.path.join(folder, name), out["savedmodel"])


def write_openvino(arch: str, out: dict[str, str]) -> None:
    """openvino.convert_model from a timm model, saved FP32 and FP16-compressed."""
    sys.path.insert(0, ROOT)
    sys.modules.setdefault("openvino_telemetry", None)  # no usage telemetry: the converter uses its stub
    import openvino as ov
    import torch
    from tests.support.timm_reference import random_timm_model

    model = ov.convert_model(random_timm_model(arch, seed=SEED), example_input=torch.zeros(1, 3, 224, 224))
    for key, path in out.items():
        ov.save_model(model, path, compress_to_fp16=key == "ir-fp16")


WRITERS = {"timm": write_timm, "transformers": write_transformers, "keras": write_keras,
           "tensorflow": write_tensorflow, "openvino": write_openvino}


# ---- the driver ---------------------------------------------------------------------------------


def _has_tensorflow() -> bool:
    return importlib.util.find_spec("tensorflow") is not None  # found, not imported


def _files_of(path: str) -> list[str]:
    """What `create_model` reads at `path`: an IR's .xml and .bin, a folder's files, or the file."""
    if os.path.isdir(path):
        return [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
    return [path, path[:-4] + ".bin"] if path.endswith(".xml") else [path]


def _present(path: str) -> bool:
    return os.path.exists(path) and all(os.path.exists(f) for f in _files_of(path))


def write_missing(arch: str, keys: list[str], folder: str, tf_python: str | None) -> None:
    """Run each writer whose files are missing, in a child process, into a scratch folder, and
    move its files into place only once it succeeded: a killed writer leaves nothing to reuse."""
    by_writer: dict[str, list[str]] = {}
    for key in keys:
        if not _present(os.path.join(folder, FORMATS[key][2])):
            by_writer.setdefault(FORMATS[key][1], []).append(key)
    for writer, missing in by_writer.items():
        python = tf_python if writer == "tensorflow" else sys.executable
        print(f"writing {', '.join(missing)} ({writer}) ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            out = {key: os.path.join(scratch, FORMATS[key][2]) for key in missing}
            for path in out.values():
                os.makedirs(os.path.dirname(path), exist_ok=True)
            subprocess.run([python, os.path.abspath(__file__), "--write", writer, "--arch", arch,
                            "--out", json.dumps(out)], check=True)
            for key, path in out.items():
                final = os.path.join(folder, FORMATS[key][2])
                if os.path.dirname(FORMATS[key][2]):  # a format that is a folder's content (transformers)
                    path, final = os.path.dirname(path), os.path.dirname(final)
                shutil.rmtree(final, ignore_errors=True)
                if path.endswith(".xml"):
                    os.replace(path[:-4] + ".bin", final[:-4] + ".bin")
                os.replace(path, final)


def time_loads(path: str, repeats: int) -> list[float]:
    code = f"FRAMEWORKS = {FRAMEWORKS!r}\n" + _LOADER
    out = subprocess.run([sys.executable, "-c", code, path, str(repeats)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def skip_reason(key: str, arch: str, folder: str, tf_python: str | None) -> str | None:
    from npconvnext.config import get_config

    writer = FORMATS[key][1]
    if writer in ("keras", "tensorflow") and get_config(arch).use_grn:
        return "Keras has no ConvNeXt-V2"
    if writer == "tensorflow" and tf_python is None and not _present(os.path.join(folder, FORMATS[key][2])):
        return "no TensorFlow in this interpreter to write it: give --tf-python"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=ARCH)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"a subset of {','.join(FORMATS)}")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "npconvnext-bench-load"))
    parser.add_argument("--tf-python", help="a Python with TensorFlow, if this one has none")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--write", choices=WRITERS, help=argparse.SUPPRESS)  # a writer's child process
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        WRITERS[args.write](args.arch, json.loads(args.out))
        return

    keys = [k.strip() for k in args.formats.split(",") if k.strip()]
    unknown = [k for k in keys if k not in FORMATS]
    if unknown:
        parser.error(f"unknown formats {unknown}; known: {', '.join(FORMATS)}")
    tf_python = sys.executable if _has_tensorflow() else args.tf_python
    folder = os.path.join(args.workdir, args.arch)
    os.makedirs(folder, exist_ok=True)
    skipped = {k: reason for k in keys if (reason := skip_reason(k, args.arch, folder, tf_python))}
    keys = [k for k in keys if k not in skipped]
    write_missing(args.arch, keys, folder, tf_python)

    rows = []
    for key in keys:
        path = os.path.join(folder, FORMATS[key][2])
        times = time_loads(path, args.repeats)
        size = sum(os.path.getsize(f) for f in _files_of(path)) / 1e6
        rows.append(dict(format=key, label=FORMATS[key][0], path=path, size_mb=round(size, 2), times_s=times,
                         median_s=statistics.median(times), best_s=min(times)))

    print(f"\n{args.arch}, 1000 classes: `create_model(None, weights=PATH)` in a fresh process, "
          f"{args.repeats} loads after a warm-up\n")
    print("| format | size MB | median s | best s |\n| --- | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['label']} | {row['size_mb']:.1f} | {row['median_s']:.3f} | {row['best_s']:.3f} |")
    for key, reason in skipped.items():
        print(f"\nskipped {key}: {reason}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(arch=args.arch, repeats=args.repeats, results=rows, skipped=skipped), f, indent=1)


if __name__ == "__main__":
    main()
