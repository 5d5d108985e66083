"""Fuzz npconvnext's weight readers with mutated safetensors and PyTorch zip files.

    python scripts/fuzz_readers.py N [--seed S] [--timeout SECONDS] [--json] [--savedmodel]

Seeds are real files: `safetensors.numpy.save_file` and `torch.save` (protocols 2 and 4, the
official {"model": ...} wrapper, a module's state dict with its _metadata, views sharing a
storage) of small random state dicts. Each input is a seed mutated one to three times: byte
flips, truncation, splices, inserted or deleted chunks; for safetensors, edits of the JSON
header; for PyTorch zips, edits of the pickle's opcodes (integer arguments, memo indices,
globals, BUILD, nesting), of the storage entries and of the zip's compression and flags.
With --savedmodel, TensorFlow SavedModel directories join them: seeds written by
`tf.saved_model.save` in a subprocess (tensorflow-cpu), mutated in their index's bytes, in a
bundle entry's fields (re-encoded into a valid table), in the data shard, or by losing files.

Each input is read by `npconvnext.formats.read_checkpoint` in a worker process with a bounded
address space, so a crash or a hang costs only the worker, which is restarted and the input
counted. Prints: inputs tried, outcomes by type (loaded / CheckpointError / other), crashes,
hangs, unnamed errors (a CheckpointError not naming the file), peak RSS and the slowest input.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import pickletools
import re
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter

import numpy as np

BUDGET = 1 << 30      # address space a worker may map beyond what it maps after importing npconvnext
INTERESTING_INTS = [0, 1, 2, 3, 4, 7, 8, -1, -2, 255, 256, 65535, 65536, 2**31 - 1, -2**31, 2**32,
                    2**40, 2**62, 2**63 - 1, 2**63, 2**64, 10**6, 10**9]

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


# ---- mutations ------------------------------------------------------------------------------------


def mutate_bytes(data: bytes, rng, seeds) -> bytes:
    data = bytearray(data)
    if not data:
        return bytes(rng.integers(0, 256, 16, dtype=np.uint8))
    action = rng.integers(7)
    at = int(rng.integers(len(data)))
    if action == 0:  # flip a few bits
        for i in rng.integers(0, len(data), int(rng.integers(1, 9))):
            data[i] ^= 1 << int(rng.integers(8))
    elif action == 1:  # an interesting byte value
        data[at] = int(rng.choice([0, 1, 0x7F, 0x80, 0xFF]))
    elif action == 2:  # truncate
        del data[at:]
    elif action == 3:  # delete a chunk
        del data[at : at + int(rng.integers(1, 64))]
    elif action == 4:  # duplicate a chunk
        data[at:at] = data[at : at + int(rng.integers(1, 64))]
    elif action == 5:  # splice in part of another seed
        other = seeds[int(rng.integers(len(seeds)))][1]
        if isinstance(other, dict):  # a SavedModel seed: one of its files
            other = next(iter(other.values()))
        start = int(rng.integers(len(other)))
        data[at : at + int(rng.integers(1, 256))] = other[start : start + int(rng.integers(1, 256))]
    else:  # overwrite 4 bytes with an interesting little-endian integer
        value = int(rng.choice([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, len(data), len(data) + 1]))
        data[at : at + 4] = struct.pack("<I", value)
    return bytes(data)


def _header(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def mutate_safetensors_header(data: bytes, rng, seeds) -> bytes:
    try:
        header, body = _header(data)
        names = [k for k in header if k != "__metadata__"]
        assert names
    except Exception:  # noqa: BLE001 (an earlier mutation broke the header: mutate bytes instead)
        return mutate_bytes(data, rng, seeds)
    name = names[int(rng.integers(len(names)))]
    entry = header[name]
    junk = [None, True, 1.5, -1, "x", [], {}, [1, 2], 10**30, float("inf"), "F32", [[1]]]
    action = rng.integers(11)
    duplicate = False
    if action == 0 and isinstance(entry, dict):
        entry["data_offsets"][int(rng.integers(2))] = int(rng.choice(INTERESTING_INTS[:12])) + int(rng.integers(-4, 5))
    elif action == 1 and isinstance(entry, dict):
        shape = entry["shape"]
        choice = rng.integers(4)
        if choice == 0 or not shape:
            shape.append(int(rng.choice(INTERESTING_INTS)))
        elif choice == 1:
            shape[int(rng.integers(len(shape)))] = junk[int(rng.integers(len(junk)))]
        elif choice == 2:
            shape.pop()
        else:
            shape[int(rng.integers(len(shape)))] = int(rng.choice(INTERESTING_INTS))
    elif action == 2 and isinstance(entry, dict):
        entry["dtype"] = [*["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "U64", ""], *junk][
            int(rng.integers(10 + len(junk)))]
    elif action == 3 and isinstance(entry, dict):
        entry.pop(["dtype", "shape", "data_offsets"][int(rng.integers(3))])
    elif action == 4:
        header["__metadata__"] = [{"k": 1}, {"k": "v"}, [1], "x", None, {"k": None}][int(rng.integers(6))]
    elif action == 5:
        del header[name]
    elif action == 6:
        duplicate = True
    elif action == 7:  # swap two tensors' offsets
        other = header[names[int(rng.integers(len(names)))]]
        if isinstance(entry, dict) and isinstance(other, dict):
            entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
    elif action == 8:  # grow or shrink the data section
        cut = int(rng.integers(-16, 17))
        body = body[:cut] if cut < 0 else body + bytes(cut)
    elif action == 9:
        header[name] = "NEST"  # replaced below by deeply nested brackets
    else:
        header[name] = junk[int(rng.integers(len(junk)))]
    text = json.dumps(header)
    if action == 9:
        depth = int(rng.integers(10, 5000))
        text = text.replace('"NEST"', "[" * depth + "]" * depth)
    if duplicate:  # JSON with the same tensor named twice
        text = text[:-1] + ", " + json.dumps(name) + ": " + json.dumps(entry) + "}"
    raw = text.encode()
    length = len(raw) + (int(rng.integers(-3, 4)) if rng.random() < 0.1 else 0)
    return struct.pack("<Q", max(length, 0)) + raw + body


def _encode_int(value: int) -> bytes:
    if 0 <= value < 256:
        return pickle.BININT1 + bytes([value])
    if 0 <= value < 65536:
        return pickle.BININT2 + struct.pack("<H", value)
    if -2**31 <= value < 2**31:
        return pickle.BININT + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(raw)]) + raw


_SNIPPETS = [
    pickle.GLOBAL + b"os\nsystem\n", pickle.GLOBAL + b"torch\nHalfStorage\n", pickle.GLOBAL + b"collections\nOrderedDict\n",
    pickle.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n", pickle.GLOBAL + b"builtins\neval\n",
    pickle.EMPTY_DICT + pickle.BINUNICODE + b"\x05\x00\x00\x00dtype" + pickle.NONE + pickle.SETITEM + pickle.BUILD,
    pickle.MARK, pickle.EMPTY_DICT, pickle.EMPTY_TUPLE + pickle.REDUCE, pickle.BUILD, pickle.TUPLE, pickle.SETITEMS,
    pickle.LONG_BINPUT + struct.pack("<I", 300_000_000), pickle.LONG_BINGET + struct.pack("<I", 7),
    pickle.NONE + pickle.TUPLE1 * 200, pickle.EMPTY_LIST * 100 + pickle.APPEND * 99, pickle.BINPERSID,
    pickle.INST + b"os\nsystem\n", pickle.NEWOBJ, pickle.STOP, pickle.DUP, pickle.POP, pickle.NONE,
]


def mutate_pickle(data: bytes, rng, seeds) -> bytes:
    """An edit of one opcode of a pickle, found by pickletools.genops."""
    try:
        ops = [(op, arg, pos) for op, arg, pos in pickletools.genops(data)]
    except Exception:  # noqa: BLE001 (already broken: mutate bytes)
        return mutate_bytes(data, rng, seeds)
    ends = [pos for _, _, pos in ops[1:]] + [len(data)]
    i = int(rng.integers(len(ops)))
    op, arg, start = ops[i]
    end = ends[i]
    action = rng.integers(5)
    if action == 0:  # another integer argument
        ints = [k for k, (o, a, _) in enumerate(ops) if isinstance(a, int) and not isinstance(a, bool)]
        if ints:
            i = ints[int(rng.integers(len(ints)))]
            op, arg, start = ops[i]
            end = ends[i]
            value = int(rng.choice(INTERESTING_INTS)) + int(rng.integers(-2, 3))
            if op.name.endswith(("PUT", "GET")):
                code = pickle.LONG_BINPUT if op.name.endswith("PUT") else pickle.LONG_BINGET
                return data[:start] + code + struct.pack("<I", value % 2**32) + data[end:]
            return data[:start] + _encode_int(value) + data[end:]
    if action == 1:  # delete the opcode
        return data[:start] + data[end:]
    if action == 2:  # repeat it
        return data[:end] + data[start:end] * int(rng.integers(1, 40)) + data[end:]
    if action == 3:  # insert a snippet before it
        return data[:start] + _SNIPPETS[int(rng.integers(len(_SNIPPETS)))] + data[start:]
    # replace a string argument (a key, a storage key, a location, a global's name)
    strings = [k for k, (o, a, _) in enumerate(ops) if isinstance(a, str)]
    if strings:
        i = strings[int(rng.integers(len(strings)))]
        op, arg, start = ops[i]
        if op.name.startswith(("BINUNICODE", "SHORT_BINUNICODE")):
            new = ["0", "1", "99", "storage", "cpu", "model", "../x", "", "x" * 300][int(rng.integers(9))].encode()
            return data[:start] + pickle.BINUNICODE + struct.pack("<I", len(new)) + new + data[ends[i]:]
    return mutate_bytes(data, rng, seeds)


def mutate_torch_zip(data: bytes, rng, seeds) -> bytes:
    """Rewrite the zip with one entry, its compression or its flags changed."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            entries = [(info, z.read(info)) for info in z.infolist()]
    except Exception:  # noqa: BLE001
        return mutate_bytes(data, rng, seeds)
    action = rng.integers(6)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info, raw in entries:
            name = info.filename
            if name.endswith("data.pkl") and action <= 2:
                raw = mutate_pickle(raw, rng, seeds)
            elif "/data/" in name and action == 3 and rng.random() < 0.5:
                raw = raw[: int(rng.integers(len(raw) + 1))] if rng.random() < 0.5 else raw + bytes(int(rng.integers(1, 64)))
            elif "/data/" in name and action == 4 and rng.random() < 0.3:
                continue  # drop a storage
            elif name.endswith("byteorder") and action == 5 and rng.random() < 0.5:
                raw = [b"big", b"", b"little\n" * 100][int(rng.integers(3))]
            method = zipfile.ZIP_STORED
            if action == 5 and rng.random() < 0.3:
                method = [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA][int(rng.integers(3))]
            z.writestr(zipfile.ZipInfo(name, info.date_time), raw, compress_type=method)
    result = bytearray(out.getvalue())
    if action == 5 and rng.random() < 0.2:  # the encrypted flag on one entry's headers
        at = result.find(b"PK\x01\x02", int(rng.integers(len(result))))
        if at >= 0:
            result[at + 8] |= 1
    return bytes(result)


_INDEX = os.path.join("variables", "variables.index")
_SHARD = os.path.join("variables", "variables.data-00000-of-00001")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _table(entries: dict[bytes, bytes]) -> bytes:
    """An SSTable as TensorFlow's table builder lays it out: one data block, one index block."""
    from npconvnext.formats.crc32c import crc32c_naive, mask_crc
    from npconvnext.formats.tf_bundle import TABLE_MAGIC

    def block(pairs):
        body = b"".join(_varint(0) + _varint(len(k)) + _varint(len(v)) + k + v for k, v in pairs)
        return body + struct.pack("<II", 0, 1)

    def trailer(contents):
        crc = crc32c_naive(contents + b"\x00")
        return contents + b"\x00" + struct.pack("<I", mask_crc(crc))

    data = trailer(block(sorted(entries.items())))
    index = block([(max(entries), _varint(0) + _varint(len(data) - 5))])
    footer = _varint(len(data)) + _varint(0) + _varint(len(data)) + _varint(len(index))
    return data + trailer(index) + footer.ljust(40, b"\x00") + struct.pack("<Q", TABLE_MAGIC)


def mutate_savedmodel(files: dict[str, bytes], rng, seeds) -> dict[str, bytes]:
    files = dict(files)
    action = rng.integers(6)
    if action == 0 and _INDEX in files:  # the index's bytes
        files[_INDEX] = mutate_bytes(files[_INDEX], rng, seeds)
    elif action == 1 and _SHARD in files:  # the shard's bytes
        files[_SHARD] = mutate_bytes(files[_SHARD], rng, seeds)
    elif action == 2:  # lose a file
        names = sorted(files)
        del files[names[int(rng.integers(len(names)))]]
    elif action in (3, 4) and _INDEX in files:  # a bundle entry's field, in a valid table
        from npconvnext.formats.tf_bundle import read_table

        try:
            table = {k.encode(): v for k, v in read_table(files[_INDEX]).items()}
        except Exception:  # noqa: BLE001 (an earlier mutation broke the table)
            return {**files, _INDEX: mutate_bytes(files[_INDEX], rng, seeds)}
        keys = sorted(table)
        key = keys[int(rng.integers(len(keys)))]
        field = int(rng.choice([1, 2, 3, 4, 5, 6, 7, 9]))
        if action == 3:  # an interesting varint (a later field overrides an earlier one)
            value = int(rng.choice([v for v in INTERESTING_INTS if 0 <= v < 2**64])) + int(rng.integers(0, 3))
            payload = _varint(value % 2**64) if field != 2 else (
                lambda dim: _varint(len(dim)) + dim)(b"\x12" + (lambda d: _varint(len(d)) + d)(b"\x08" + _varint(value % 2**64)))
            table[key] = table[key] + _varint(field << 3 | (2 if field == 2 else 0)) + payload
        else:  # truncate or extend the entry's protobuf
            entry = table[key]
            table[key] = entry[: int(rng.integers(len(entry) + 1))] if rng.random() < 0.5 else entry + bytes(
                rng.integers(0, 256, int(rng.integers(1, 12)), dtype=np.uint8))
        files[_INDEX] = _table(table)
    elif _SHARD in files:  # truncate the shard
        files[_SHARD] = files[_SHARD][: int(rng.integers(len(files[_SHARD]) + 1))]
    return files


def make_input(seeds, rng, kinds=("safetensors", "torch")) -> tuple[str, bytes]:
    kind = kinds[int(rng.integers(len(kinds)))]
    of_kind = [data for k, data in seeds if k == kind]
    data = of_kind[int(rng.integers(len(of_kind)))]
    if kind == "savedmodel":
        for _ in range(int(rng.choice([1, 1, 2, 3]))):
            data = mutate_savedmodel(data, rng, seeds)
        return kind, data
    for _ in range(int(rng.choice([1, 1, 2, 3]))):
        structured = mutate_safetensors_header if kind == "safetensors" else mutate_torch_zip
        try:
            data = mutate_bytes(data, rng, seeds) if rng.random() < 0.3 else structured(data, rng, seeds)
        except Exception:  # noqa: BLE001 (an earlier edit left nothing this one can edit)
            data = mutate_bytes(data, rng, seeds)
    return kind, data


# ---- the worker: reads one file per line of stdin, answers one JSON line --------------------------


def _status_kb(field: str) -> int:
    """A figure of /proc/self/status. VmHWM is the peak RSS of this process image alone:
    getrusage's ru_maxrss survives exec on Linux, so it would report the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def worker() -> None:
    import resource

    import npconvnext.formats
    from npconvnext.errors import CheckpointError

    limit = _status_kb("VmSize") * 1024 + BUDGET
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print(json.dumps({"ready": _status_kb("VmHWM")}), flush=True)
    for line in sys.stdin:
        path = line.strip()
        start = time.perf_counter()
        try:
            state, _ = npconvnext.formats.read_checkpoint(path)
            ok = all(type(k) is str and isinstance(v, np.ndarray) for k, v in state.items())
            outcome, message = ("loaded" if ok else "bad result"), ""
        except CheckpointError as exc:
            outcome, message = "CheckpointError", str(exc)
        except BaseException as exc:  # noqa: BLE001 (what the fuzzer is looking for)
            outcome, message = type(exc).__name__, str(exc)[:300]
        seconds = time.perf_counter() - start
        print(json.dumps({"outcome": outcome, "named": path in message, "seconds": seconds,
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

    def read(self, path: str, timeout: float) -> dict:
        try:
            self.proc.stdin.write(path + "\n")
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
    """The input on disk: a file, or a SavedModel directory."""
    if kind != "savedmodel":
        with open(path, "wb") as f:
            f.write(data)
        return path
    os.makedirs(path)
    for name, content in data.items():
        os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
        with open(os.path.join(path, name), "wb") as f:
            f.write(content)
    return path


def _remove(path: str) -> None:
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def campaign(n: int, seed: int, timeout: float, log=None, savedmodel: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    seeds = seed_files(rng) + (savedmodel_seeds() if savedmodel else [])
    kinds = ("safetensors", "torch", "savedmodel") if savedmodel else ("safetensors", "torch")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outcomes, by_kind, reasons = Counter(), Counter(), Counter()
    crashes, hangs, unnamed, memory, others = [], [], [], [], []
    slowest = (0.0, "", "")
    peak_kb = 0
    keep = os.path.join(tempfile.gettempdir(), f"npconvnext-fuzz-seed{seed}")  # inputs that crash or hang
    with tempfile.TemporaryDirectory() as tmp:
        work = Worker(repo)
        baseline_kb = work.baseline
        for i in range(n):
            kind, data = make_input(seeds, rng, kinds)
            suffix = {"safetensors": ".safetensors", "torch": ".pth", "savedmodel": ""}[kind]
            path = _write_input(os.path.join(tmp, f"input{i}{suffix}"), kind, data)
            result = work.read(path, timeout)
            by_kind[kind] += 1
            if result["outcome"] in ("hang", "crash"):  # keep the input, restart the worker
                code = work.stop()
                kept = os.path.join(keep, os.path.basename(path))
                os.makedirs(keep, exist_ok=True)
                os.replace(path, kept)
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
            if result["outcome"] not in ("loaded", "CheckpointError"):
                others.append((i, result["outcome"], result["message"]))
            if result["seconds"] > slowest[0]:
                slowest = (result["seconds"], f"input {i} ({kind})", result["outcome"])
            _remove(path)
        work.stop()
    return {"inputs": n, "by_kind": dict(by_kind), "outcomes": dict(outcomes), "crashes": crashes,
            "hangs": hangs, "unnamed": unnamed[:10], "unnamed_count": len(unnamed), "memory": memory[:10],
            "others": others[:10], "peak_rss_mb": peak_kb / 1024, "baseline_rss_mb": baseline_kb / 1024,
            "reasons": dict(reasons.most_common()), "slowest_seconds": slowest[0], "slowest_input": slowest[1], "slowest_outcome": slowest[2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("n", type=int, nargs="?", default=1000, help="inputs to try")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before an input counts as a hang")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--log", help="write each input's outcome to this file, one JSON line each")
    parser.add_argument("--savedmodel", action="store_true",
                        help="fuzz TensorFlow SavedModel directories too (needs tensorflow-cpu for the seeds)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker()
    start = time.perf_counter()
    with open(args.log or os.devnull, "w") as log:
        summary = campaign(args.n, args.seed, args.timeout, log, args.savedmodel)
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
    print(f"unnamed errors    {summary['unnamed_count']}  {summary['unnamed'][:3]}")
    print(f"memory errors     {len(summary['memory'])}  {summary['memory'][:3]}")
    print(f"other errors      {summary['others'][:5]}")
    print(f"peak RSS          {summary['peak_rss_mb']:.0f} MB (worker after import: {summary['baseline_rss_mb']:.0f} MB)")
    print(f"slowest input     {summary['slowest_seconds'] * 1000:.1f} ms, {summary['slowest_input']}, "
          f"{summary['slowest_outcome']}")
    print(f"wall time         {summary['wall_seconds']:.1f} s")


if __name__ == "__main__":
    main()
