"""Fuzz npconvnext's weight readers with mutated weight files of every format it reads.

    python scripts/fuzz_readers.py N [--seed S] [--timeout SECONDS] [--json] [--savedmodel] [--ir]
                                     [--kinds safetensors,torch,savedmodel,ir,h5,weights.h5,keras]

Seeds are real files: `safetensors.numpy.save_file` and `torch.save` (protocols 2 and 4, the
official {"model": ...} wrapper, a module's state dict with its _metadata, views sharing a
storage) of small random state dicts. Each input is a seed mutated one to three times: byte
flips, truncation, splices, inserted or deleted chunks; for safetensors, edits of the JSON
header; for PyTorch zips, edits of the pickle's opcodes (integer arguments, memo indices,
globals, BUILD, nesting), of the storage entries and of the zip's compression and flags.
With --savedmodel, TensorFlow SavedModel directories join them: seeds written by
`tf.saved_model.save` in a subprocess (tensorflow-cpu), mutated in their index's bytes, in a
bundle entry's fields (re-encoded into a valid table), in the data shard, or by losing files.
With --ir, OpenVINO IRs join them: FP16 IRs of convnext_atto and convnextv2_atto written by
OpenVINO in a subprocess, mutated in their graph (numbers, operation types, attribute values,
characters, layer and edge lines dropped or repeated) or their weights (truncated, flipped).
The kinds h5, weights.h5 and keras are Keras files (legacy model.save .h5, save_weights, Keras 3's
.keras) of two small keras.applications ConvNeXts written by Keras on torch in a subprocess
(tests/support/keras_models.py), mutated as fuzz_keras.py says: HDF5 bytes, datasets' storage,
shapes, dtypes, links and attributes edited with h5py, and the .keras zip rebuilt.

The mutations are in fuzz_mutations.py, beside this script. Each input is read by its format's
reader (`npconvnext.formats.sniff_format(path).read`) in a worker process with a bounded address
space, so a crash or a hang costs only the worker, which is restarted and the input counted. A
SavedModel or IR whose weights' bytes the mutation left alone, or a Keras file whose edits keep
its meaning or only take information away, must give its seed's weights and convention if it
loads; one that gives others is counted as silently changed. Prints: inputs tried, outcomes by
type (loaded / CheckpointError / other), crashes, hangs, silent changes, unnamed errors (a
CheckpointError not naming the file), peak RSS and the slowest input. Inputs that crash, hang,
change silently or raise another error are kept in $TMPDIR/npconvnext-fuzz-seed<S>/.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

import numpy as np

from fuzz_keras import mutate_h5, mutate_keras
from fuzz_mutations import IR_XML, mutate_bytes, mutate_ir, mutate_safetensors_header, mutate_savedmodel, \
    mutate_torch_zip

BUDGET = 1 << 30      # address space a worker may map beyond what it maps after importing npconvnext

# ---- seeds ----------------------------------------------------------------------------------------


def seed_files(rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """(kind, bytes) of real files written by the real libraries."""
    import torch
    from safetensors.numpy import save

    def arrays():
        return {"stem.0.weight": rng.standard_normal((4, 3, 2, 2)).astype(np.float32),
                "stem.0.bias": rng.standard_normal(4).astype(np.float16),
                "stages.0.blocks.0.gamma": rng.standard_normal(4),
                "head.fc.weight": rng.standard_normal((3, 4)).astype(np.float32),
                "counts": rng.integers(0, 9, 5), "mask": rng.random(3) > 0.5}

    seeds = [("safetensors", save(arrays())), ("safetensors", save(arrays(), metadata={"format": "pt"}))]
    tensors = {k: torch.from_numpy(v) for k, v in arrays().items()}
    base = torch.from_numpy(rng.standard_normal((4, 3)).astype(np.float32))
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 2), torch.nn.LayerNorm(2))  # state dict with _metadata
    for obj, protocol in [(tensors, 2), ({"model": tensors}, 2), (tensors, 4), (module.state_dict(), 2),
                          ({"t": base.t(), "row": base[1], "bf16": base.bfloat16()}, 2)]:
        buf = io.BytesIO()
        torch.save(obj, buf, pickle_protocol=protocol)
        seeds.append(("torch", buf.getvalue()))
    return seeds


_SAVEDMODEL_WRITER = """
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import tensorflow as tf
out = sys.argv[1]
for k, dtypes in enumerate([(tf.float32, tf.float32), (tf.float16, tf.float64), (tf.bfloat16, tf.float32)]):
    m = tf.Module()
    names = ["convnext_tiny_stem/convnext_tiny_stem_conv/kernel", "convnext_tiny_stem/convnext_tiny_stem_conv/bias",
             "convnext_tiny_head_dense/kernel", "convnext_tiny_stage_0_block_0_layer_scale/variable"]
    shapes = [(4, 4, 3, 8), (8,), (8, 3), (8,)]
    m.v = [tf.Variable(tf.cast(tf.random.normal(s, seed=k), dtypes[n % 2]), name=name)
           for n, (name, s) in enumerate(zip(names, shapes))]
    tf.saved_model.save(m, os.path.join(out, str(k)))
"""


def savedmodel_seeds() -> list[tuple[str, dict[str, bytes]]]:
    """Small SavedModels written by TensorFlow (in a subprocess: it must not share this process
    with torch), their variables named as keras.applications' ConvNeXt names them."""
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
        subprocess.run([sys.executable, "-c", _SAVEDMODEL_WRITER, out], check=True, env=env, capture_output=True)
        seeds = []
        for k in sorted(os.listdir(out)):
            files = {}
            for root, _, names in os.walk(os.path.join(out, k)):
                for name in names:
                    full = os.path.join(root, name)
                    with open(full, "rb") as f:
                        files[os.path.relpath(full, os.path.join(out, k))] = f.read()
            seeds.append(("savedmodel", files))
    return seeds


_IR_WRITER = """
import sys
import openvino as ov
import timm
import torch
torch.manual_seed(0)
net = timm.create_model(sys.argv[2], pretrained=False, num_classes=3).eval()
with torch.no_grad():  # off the init: OpenVINO folds away a GRN of zeros, and layer scales of 1e-6
    for p in net.parameters():
        if p.ndim == 1:
            p.uniform_(0.1, 1.0)
ov.save_model(ov.convert_model(net, example_input=torch.zeros(1, 3, 32, 32)), sys.argv[1])
"""


def ir_seeds() -> list[tuple[str, dict[str, bytes]]]:
    """OpenVINO IRs (FP16) of small ConvNeXts written by OpenVINO (in a subprocess: it must not
    share a process with TensorFlow, which the SavedModel seeds use)."""
    seeds = []
    with tempfile.TemporaryDirectory() as out:
        for arch in ("convnext_atto", "convnextv2_atto"):
            xml = os.path.join(out, arch + ".xml")
            subprocess.run([sys.executable, "-c", _IR_WRITER, xml, arch], check=True, capture_output=True)
            with open(xml, "rb") as f, open(xml[:-4] + ".bin", "rb") as g:
                seeds.append(("ir", {IR_XML: f.read(), "model.bin": g.read()}))
    return seeds


KERAS_MODELS = ("atto", "atto-logits-no-preprocessing")  # of tests/support/keras_models.py
KERAS_KINDS = {"h5": ".h5", "weights.h5": ".weights.h5", "keras": ".keras"}  # kind -> the file's suffix


def keras_seeds(repo: str) -> list[tuple[str, bytes]]:
    """Keras 3's three files of two small keras.applications ConvNeXts, written by Keras (on torch,
    in a subprocess: this process must not import a Keras that may import TensorFlow)."""
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, KERAS_BACKEND="torch", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
        subprocess.run([sys.executable, "-m", "tests.support.keras_models", out, *KERAS_MODELS], check=True,
                       env=env, cwd=repo, capture_output=True)
        seeds = []
        for name in KERAS_MODELS:
            for kind, suffix in KERAS_KINDS.items():
                with open(os.path.join(out, name + suffix), "rb") as f:
                    seeds.append((kind, f.read()))
    return seeds


def make_input(seeds, rng, kinds=("safetensors", "torch")) -> tuple[str, bytes, object, bool]:
    """(kind, the mutated input, the seed it was made from, whether a load must give the seed's
    weights and convention)"""
    kind = kinds[int(rng.integers(len(kinds)))]
    of_kind = [data for k, data in seeds if k == kind]
    data = origin = of_kind[int(rng.integers(len(of_kind)))]
    if kind in ("savedmodel", "ir"):
        for _ in range(int(rng.choice([1, 1, 2, 3]))):
            data = (mutate_savedmodel if kind == "savedmodel" else mutate_ir)(data, rng, seeds)
        return kind, data, origin, _same_weight_bytes(kind, data, origin)
    if kind in KERAS_KINDS:  # each edit says whether the file still means what the seed does
        must_match = True
        for _ in range(int(rng.choice([1, 1, 2]))):
            data, checked = (mutate_keras if kind == "keras" else mutate_h5)(data, rng, seeds)
            must_match = must_match and checked
        return kind, data, origin, must_match
    for _ in range(int(rng.choice([1, 1, 2, 3]))):
        structured = mutate_safetensors_header if kind == "safetensors" else mutate_torch_zip
        try:
            data = mutate_bytes(data, rng, seeds) if rng.random() < 0.3 else structured(data, rng, seeds)
        except Exception:  # noqa: BLE001 (an earlier edit left nothing this one can edit)
            data = mutate_bytes(data, rng, seeds)
    return kind, data, origin, False


# ---- the worker: reads one file per line of stdin, answers one JSON line --------------------------


def _status_kb(field: str) -> int:
    """A figure of /proc/self/status. VmHWM is the peak RSS of this process image alone:
    getrusage's ru_maxrss survives exec on Linux, so it would report the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _digests(path: str, got) -> tuple[str, str | None]:
    """sha256 of what the reader gave (`got`), and of what loading the file as a model takes from
    it: its timm-named weights, strictly checked against the architecture they make, and its
    convention (None where loading refuses what the reader gave). A seed that is a whole
    ConvNeXt is compared by the second; a seed of a few named arrays (the SavedModels') by the first."""
    from npconvnext.errors import CheckpointError
    from npconvnext.formats import read_weight_file
    from npconvnext.params import check_state_dict, detect_architecture

    try:
        found = read_weight_file(path)
        check_state_dict(found.state, detect_architecture(found.state), path)
        loaded = _digest(found.state, found.convention)
    except CheckpointError:
        loaded = None
    return _digest(got.arrays, got.convention), loaded


def _digest(arrays: dict, convention) -> str:
    """sha256 of the arrays' names, types, shapes (unit axes left out: loading fits them to the
    architecture's) and bytes, and the convention."""
    import hashlib

    h = hashlib.sha256(repr(convention).encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        h.update(f"{name} {array.dtype.str} {tuple(n for n in array.shape if n != 1)}".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def worker() -> None:
    import resource

    import npconvnext.formats
    from npconvnext.errors import CheckpointError

    limit = _status_kb("VmSize") * 1024 + BUDGET
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print(json.dumps({"ready": _status_kb("VmHWM")}), flush=True)
    for line in sys.stdin:
        check, path = line[0] == "+", line[1:].strip()  # "+": a load is compared with its seed's
        start = time.perf_counter()
        digest = read = None
        try:
            got = npconvnext.formats.sniff_format(path).read(path)
            read = time.perf_counter()  # the time of the read alone, not of the load to compare
            ok = all(type(k) is str and isinstance(v, np.ndarray) for k, v in got.arrays.items())
            outcome, message = ("loaded" if ok else "bad result"), ""
            digest = _digests(path, got) if ok and check else None
        except CheckpointError as exc:
            outcome, message = "CheckpointError", str(exc)
        except BaseException as exc:  # noqa: BLE001 (what the fuzzer is looking for)
            outcome, message = type(exc).__name__, str(exc)[:300]
        seconds = (read or time.perf_counter()) - start
        print(json.dumps({"outcome": outcome, "named": path in message, "seconds": seconds, "digest": digest,
                          "memory": "MemoryError" in message, "message": message[:300],
                          "maxrss": _status_kb("VmHWM")}), flush=True)


class Worker:
    """A worker process and the reading of its answers with a deadline."""

    def __init__(self, repo: str):
        # this checkout's npconvnext, unless PYTHONPATH names another (to fuzz an older version)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), repo])))
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, bufsize=1)
        self.baseline = self.answer(120).get("ready")
        if self.baseline is None:
            raise RuntimeError("the fuzzing worker did not start (cannot import npconvnext?)")

    def answer(self, timeout: float) -> dict:
        """The worker's next answer, or {"outcome": "hang"} / {"outcome": "crash"}."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return {"outcome": "hang"}
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {"outcome": "crash"}

    def read(self, path: str, timeout: float, check: bool = False) -> dict:
        """The worker's answer for one input; `check`: with the digest of what loading it gives."""
        try:
            self.proc.stdin.write(("+" if check else "-") + path + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {"outcome": "crash"}
        return self.answer(timeout)

    def stop(self) -> int:
        self.proc.kill()
        return self.proc.wait()


def _reason(message: str, path: str) -> str:
    """A refusal's kind: its message without the file name, numbers and quoted names."""
    message = re.sub(r"'[^']*'|\d+", "_", message.replace(path, ""))
    return message.strip(": ")[:80]


def _write_input(path: str, kind: str, data) -> str:
    """The input on disk: a file, or a directory of files (a SavedModel; an IR's .xml and .bin,
    read by the .xml). -> the path to read"""
    if kind not in ("savedmodel", "ir"):  # one file
        with open(path, "wb") as f:
            f.write(data)
        return path
    os.makedirs(path)
    for name, content in data.items():
        os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
        with open(os.path.join(path, name), "wb") as f:
            f.write(content)
    return os.path.join(path, IR_XML) if kind == "ir" else path


def _keep(where: str, keep: str) -> str:
    """Move an input that found something to the folder `keep`. -> where it is now"""
    kept = os.path.join(keep, os.path.basename(where))
    os.makedirs(keep, exist_ok=True)
    if os.path.isdir(kept):
        shutil.rmtree(kept)
    os.replace(where, kept)
    return kept


def _remove(path: str) -> None:
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


KINDS = ("safetensors", "torch", "savedmodel", "ir", *KERAS_KINDS)


def _changed(digests: list, seed: list | None) -> bool:
    """Whether an input that loaded differs from its seed: by what loading takes from it where the
    seed loads as a model (a refusal there is clean), else by what the reader gave."""
    if seed is None or seed[1] is None:
        return seed is None or digests[0] != seed[0]
    return digests[1] is not None and digests[1] != seed[1]


def _clean_digest(work: "Worker", where: str, kind: str, files, timeout: float) -> list | None:
    """What a seed reads and loads as, unmutated (`_digests`; None where it is refused)."""
    result = work.read(_write_input(where, kind, files), timeout, check=True)
    _remove(where)
    return result.get("digest")


def _same_weight_bytes(kind: str, data: dict, origin: dict) -> bool:
    """Whether a mutation left the weights' bytes as they were: the IR's .bin, a SavedModel's shards.
    A load must then give the clean seed's weights and convention, or be refused."""
    return all(data.get(name) == content for name, content in origin.items()
               if (name.endswith(".bin") if kind == "ir" else ".data-" in name))


def campaign(n: int, seed: int, timeout: float, log=None, kinds=("safetensors", "torch"),
             seconds: float | None = None) -> dict:
    """`n` inputs, or as many as `seconds` of mutating and reading allow (the seeds' writing
    not counted): the same seed and count make the same inputs."""
    rng = np.random.default_rng(seed)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    seeds = (seed_files(rng) + (savedmodel_seeds() if "savedmodel" in kinds else [])
             + (ir_seeds() if "ir" in kinds else []) + (keras_seeds(repo) if set(kinds) & set(KERAS_KINDS) else []))
    outcomes, by_kind, reasons = Counter(), Counter(), Counter()
    crashes, hangs, unnamed, memory, others, silent = [], [], [], [], [], []
    clean: dict[int, list | None] = {}  # id(seed) -> the digests of what its clean files read and load as
    slowest = (0.0, "", "")
    peak_kb = 0
    keep = os.path.join(tempfile.gettempdir(), f"npconvnext-fuzz-seed{seed}")  # inputs that crash or hang
    with tempfile.TemporaryDirectory() as tmp:
        work = Worker(repo)
        baseline_kb = work.baseline
        began, tried = time.perf_counter(), 0
        for i in range(n):
            if seconds is not None and time.perf_counter() - began > seconds:
                break
            tried = i + 1
            kind, data, origin, must_match = make_input(seeds, rng, kinds)
            if must_match and id(origin) not in clean:
                clean[id(origin)] = _clean_digest(work, os.path.join(tmp, "clean" + KERAS_KINDS.get(kind, "")),
                                                  kind, origin, timeout)
            suffix = {"safetensors": ".safetensors", "torch": ".pth", "savedmodel": "", "ir": "", **KERAS_KINDS}[kind]
            where = os.path.join(tmp, f"input{i}{suffix}")  # the file, or the directory of files
            path = _write_input(where, kind, data)
            result = work.read(path, timeout, check=must_match)
            by_kind[kind] += 1
            if result["outcome"] in ("hang", "crash"):  # keep the input, restart the worker
                code = work.stop()
                kept = _keep(where, keep)
                (hangs if result["outcome"] == "hang" else crashes).append((i, kind, code, kept))
                outcomes[result["outcome"]] += 1
                work = Worker(repo)
                continue
            outcomes[result["outcome"]] += 1
            if log:
                log.write(json.dumps({"input": i, "kind": kind, **result}) + "\n")
            peak_kb = max(peak_kb, result["maxrss"])
            if result["outcome"] == "CheckpointError":
                reasons[_reason(result["message"], path)] += 1
            if result["outcome"] == "CheckpointError" and not result["named"]:
                unnamed.append((i, result["message"]))
            if result["memory"]:
                memory.append((i, result["message"]))
            found = []
            if result["outcome"] not in ("loaded", "CheckpointError"):
                others.append(found := [i, result["outcome"], result["message"]])
            if result["outcome"] == "loaded" and must_match and _changed(result["digest"], clean[id(origin)]):
                silent.append(found := [i, kind])  # loaded, from edits that keep the seed's meaning, not as it
            if result["seconds"] > slowest[0]:
                slowest = (result["seconds"], f"input {i} ({kind})", result["outcome"])
            if found:  # kept, to reproduce it
                found.append(_keep(where, keep))
            else:
                _remove(where)
        work.stop()
    return {"inputs": tried, "by_kind": dict(by_kind), "outcomes": dict(outcomes), "crashes": crashes, "silent": silent,
            "clean_seeds_loaded": sum(d is not None for d in clean.values()),
            "hangs": hangs, "unnamed": unnamed[:10], "unnamed_count": len(unnamed), "memory": memory[:10],
            "others": others[:10], "peak_rss_mb": peak_kb / 1024, "baseline_rss_mb": baseline_kb / 1024,
            "reasons": dict(reasons.most_common()), "slowest_seconds": slowest[0], "slowest_input": slowest[1], "slowest_outcome": slowest[2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("n", type=int, nargs="?", default=1000, help="inputs to try")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before an input counts as a hang")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--seconds", type=float, help="stop after this long (the seeds' writing not "
                        "counted); `inputs` in the summary then says how many were tried")
    parser.add_argument("--log", help="write each input's outcome to this file, one JSON line each")
    parser.add_argument("--savedmodel", action="store_true",
                        help="fuzz TensorFlow SavedModel directories too (needs tensorflow-cpu for the seeds)")
    parser.add_argument("--ir", action="store_true", help="fuzz OpenVINO IRs too (needs openvino for the seeds)")
    parser.add_argument("--kinds", help=f"the formats to fuzz, comma-separated, of {','.join(KINDS)} "
                                        "(default: safetensors,torch and those asked for above)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker()
    start = time.perf_counter()
    with open(args.log or os.devnull, "w") as log:
        kinds = tuple(args.kinds.split(",")) if args.kinds else (
            "safetensors", "torch", *(["savedmodel"] if args.savedmodel else []), *(["ir"] if args.ir else []))
        if not set(kinds) <= set(KINDS):
            parser.error(f"--kinds: {args.kinds} names a format not among {', '.join(KINDS)}")
        summary = campaign(args.n, args.seed, args.timeout, log, kinds, args.seconds)
    summary["wall_seconds"] = time.perf_counter() - start
    if args.json:
        print(json.dumps(summary))
        return
    print(f"inputs tried      {summary['inputs']}  ({', '.join(f'{k} {v}' for k, v in summary['by_kind'].items())})")
    print("outcomes          " + ", ".join(f"{k} {v}" for k, v in sorted(summary["outcomes"].items())))
    print("refusals, commonest first:")
    for reason, count in list(summary["reasons"].items())[:15]:
        print(f"  {count:6d}  {reason}")
    print(f"crashes           {len(summary['crashes'])}  {summary['crashes'][:5]}")
    print(f"hangs             {len(summary['hangs'])}  {summary['hangs'][:5]}")
    print(f"silently changed  {len(summary['silent'])}  {summary['silent'][:5]} (loaded from edits that keep "
          "the seed's meaning, but not as the seed)")
    print(f"unnamed errors    {summary['unnamed_count']}  {summary['unnamed'][:3]}")
    print(f"memory errors     {len(summary['memory'])}  {summary['memory'][:3]}")
    print(f"other errors      {summary['others'][:5]}")
    print(f"peak RSS          {summary['peak_rss_mb']:.0f} MB (worker after import: {summary['baseline_rss_mb']:.0f} MB)")
    print(f"slowest input     {summary['slowest_seconds'] * 1000:.1f} ms, {summary['slowest_input']}, "
          f"{summary['slowest_outcome']}")
    print(f"wall time         {summary['wall_seconds']:.1f} s")


if __name__ == "__main__":
    main()
