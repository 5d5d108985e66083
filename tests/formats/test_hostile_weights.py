"""Hostile weight files: every one is refused with a CheckpointError naming the file, in bounded
time and memory, and none changes what later loads give.

The PyTorch files are built here from their parts (a pickle written by a real pickle.Pickler
naming torch's own globals, storages as zip entries), so each can hold exactly one defect.
"""

import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as safetensors_load_file
from safetensors.numpy import save_file

from npconvnext.errors import CheckpointError
from npconvnext.formats import read_checkpoint, read_safetensors, read_safetensors_with_metadata
from tests.support.timm_reference import numpy_state_dict, random_timm_model

# ---- building PyTorch zip checkpoints from parts -------------------------------------------------


class Storage:
    """Pickled as torch.save's persistent id: ('storage', torch.<type>, key, 'cpu', numel)."""

    def __init__(self, key, numel, storage_type=torch.FloatStorage):
        self.key, self.numel, self.type = key, numel, storage_type


class View:
    """Pickled as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride)

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (*self.args, False, collections.OrderedDict())


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        return ("storage", obj.type, obj.key, "cpu", obj.numel) if isinstance(obj, Storage) else None


def pickled(obj) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_torch_zip(path, pickle_bytes, storages=(), compress_type=zipfile.ZIP_STORED, encrypted=False):
    """A zip laid out as torch.save lays it out; storages: (key, raw bytes) pairs."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", "little")
        for key, raw in storages:
            z.writestr(f"archive/data/{key}", raw, compress_type=compress_type)
    if encrypted:  # zipfile cannot write encrypted entries: set the flag bit in every header
        data = bytearray(path.read_bytes())
        for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            start = data.find(signature)
            while start >= 0:
                data[start + flags_at] |= 0x1
                start = data.find(signature, start + 4)
        path.write_bytes(bytes(data))
    return path


def floats(n, seed=0):
    return np.random.default_rng(seed).standard_normal(n).astype("<f4").tobytes()


def assert_refused(path, match=None):
    with pytest.raises(CheckpointError, match=match) as err:
        read_checkpoint(path)
    assert str(path) in str(err.value)
    return str(err.value)


# ---- 1. views outside their storage --------------------------------------------------------------

S4 = Storage("0", 4)


@pytest.mark.parametrize("view, match", [
    (View(S4, 5, (1,), (1,)), "outside the storage"),          # offset past the end
    (View(S4, 0, (5,), (1,)), "more elements than"),           # size past the end
    (View(S4, 0, (2,), (4,)), "outside the storage"),          # stride steps past the end
    (View(S4, 0, (2, 2), (2, 2)), "outside the storage"),
    (View(S4, 3, (4,), (-1,)), "counts"),                      # negative stride
    (View(S4, -1, (1,), (1,)), "counts"),                      # negative offset
    (View(S4, 0, (2,), (True,)), "counts"),                    # a bool is not a stride
    (View(S4, 0, (2.0,), (1,)), "counts"),                     # nor a float a size
    (View(S4, 0, (2, 2), (1,)), "equally long"),               # tuple lengths differ
    (View(S4, 0, [2], [1]), "tuples"),                         # lists, not tuples
    (View(S4, 0, (1 << 62, 1 << 62, 4), (1, 1, 1)), "more elements than"),  # the product overflows int64
    (View(S4, 0, (2,), (1 << 63,)), "outside the storage"),    # the stride overflows int64
])
def test_views_reaching_outside_their_storage_are_refused(tmp_path, view, match):
    path = write_torch_zip(tmp_path / "view.pth", pickled({"w": view}), [("0", floats(4))])
    assert_refused(path, match)


def test_a_real_checkpoint_with_one_view_past_its_storage_is_refused(tmp_path):
    """convnext_atto whose stem weight views 1,920 floats of a 4-float storage."""
    state = numpy_state_dict(random_timm_model("convnext_atto", seed=1))
    parts, storages = {}, []
    for key, (name, array) in enumerate(state.items()):
        raw = np.ascontiguousarray(array, "<f4").tobytes()
        if name == "stem.0.weight":
            raw = raw[:16]
        storage = Storage(str(key), len(raw) // 4)
        parts[name] = View(storage, 0, array.shape, tuple(s // 4 for s in np.ascontiguousarray(array).strides))
        storages.append((str(key), raw))
    path = write_torch_zip(tmp_path / "atto.pth", pickled(collections.OrderedDict(parts)), storages)
    assert_refused(path, "more elements than the storage's 4")


def test_size_one_axes_may_have_any_stride(tmp_path):
    """torch writes arbitrary strides on axes of length 1; they are never stepped along."""
    path = write_torch_zip(tmp_path / "ok.pth", pickled({"w": View(S4, 1, (1, 3), (1 << 40, 1))}),
                           [("0", floats(4))])
    state, _ = read_checkpoint(path)
    np.testing.assert_array_equal(state["w"], np.frombuffer(floats(4), "<f4")[1:].reshape(1, 3))


# ---- 2. nothing a file does outlives its load ----------------------------------------------------

_GLOBAL, _DICT, _TEXT, _SETITEM, _BUILD = pickle.GLOBAL, pickle.EMPTY_DICT, pickle.BINUNICODE, pickle.SETITEM, pickle.BUILD


def text(s: str) -> bytes:
    return _TEXT + struct.pack("<I", len(s.encode())) + s.encode()


def attribute_dict(**attributes) -> bytes:
    return _DICT + b"".join(text(k) + text(v) + _SETITEM for k, v in attributes.items())


_SETS = attribute_dict(dtype="bfloat16", name="BFloat16Storage")  # what a later float16 load would use


@pytest.mark.parametrize("target", [b"torch\nHalfStorage\n", b"torch._utils\n_rebuild_tensor_v2\n",
                                    b"collections\nOrderedDict\n"])
@pytest.mark.parametrize("state", [_SETS, pickle.NONE + _SETS + pickle.TUPLE2], ids=["dict", "slotstate"])
def test_a_hostile_file_cannot_change_later_loads(tmp_path, target, state):
    hostile = tmp_path / "hostile.pth"
    write_torch_zip(hostile, b"\x80\x02" + _GLOBAL + target + state + _BUILD + pickle.STOP)
    assert_refused(hostile)
    weights = {"w": torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).half()}
    torch.save(weights, tmp_path / "half.pth")
    state_dict, _ = read_checkpoint(tmp_path / "half.pth")
    assert state_dict["w"].dtype == np.float16
    np.testing.assert_array_equal(state_dict["w"], weights["w"].numpy())


# ---- 3. small files that would cost gigabytes or minutes -----------------------------------------

_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from npconvnext.errors import CheckpointError
    from npconvnext.formats import read_checkpoint

    def status_kb(field):  # VmHWM: this image's peak RSS (ru_maxrss would keep the parent's across exec)
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

    budget = status_kb("VmSize") * 1024 + int(sys.argv[2])  # what the process maps now, plus the budget
    resource.setrlimit(resource.RLIMIT_AS, (budget, budget))
    before = status_kb("VmHWM")
    start = time.perf_counter()
    try:
        read_checkpoint(sys.argv[1])
        outcome, message = "loaded", ""
    except CheckpointError as exc:
        outcome, message = "CheckpointError", str(exc)
    except BaseException as exc:
        outcome, message = type(exc).__name__, str(exc)[:300]
    print(json.dumps(dict(outcome=outcome, message=message[:2000], seconds=time.perf_counter() - start,
                          grew_mb=(status_kb("VmHWM") - before) / 1024)))
""")


def read_in_child(path, budget=384 << 20, timeout=30):
    """read_checkpoint(path) in a fresh process whose address space may grow by `budget`."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    try:
        out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(budget)], env=env,
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {path} took over {timeout} s")
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def shared_tuple_dag(levels: int) -> bytes:
    """t0 = ('x',), t(k+1) = (tk, tk): a few bytes per level, 2**levels leaves once expanded."""
    ops = text("x") + pickle.TUPLE1 + pickle.BINPUT + b"\x00"
    for k in range(levels):  # the stack holds tk: fetch it again and pair the two
        ops += pickle.BINGET + bytes([k]) + pickle.TUPLE2 + pickle.BINPUT + bytes([k + 1])
    return ops


def _dag_as_persistent_id(tmp_path):
    return write_torch_zip(tmp_path / "dag.pth", b"\x80\x02" + shared_tuple_dag(40) + pickle.BINPERSID + pickle.STOP)


def _dag_as_key(tmp_path):
    body = _DICT + shared_tuple_dag(40) + pickle.NONE + _SETITEM
    return write_torch_zip(tmp_path / "dagkey.pth", b"\x80\x02" + body + pickle.STOP)


def _huge_memo_index(tmp_path):
    body = _DICT + pickle.LONG_BINPUT + struct.pack("<I", 300_000_000)
    return write_torch_zip(tmp_path / "memo.pth", b"\x80\x02" + body + pickle.STOP)


def _compressed_storage(tmp_path):
    numel = 16 << 20  # 64 MiB of float32 zeros, compressed to a few hundred kB
    deflate = zipfile.ZIP_DEFLATED
    return write_torch_zip(tmp_path / "bomb.pth", pickled({"w": View(Storage("0", numel), 0, (numel,), (1,))}),
                           [("0", bytes(4 * numel))], compress_type=deflate)


def _stride_zero_view(tmp_path):
    return write_torch_zip(tmp_path / "expand.pth", pickled({"w": View(Storage("0", 1), 0, (1 << 29,), (0,))}),
                           [("0", floats(1))])


def _repeated_views(tmp_path):
    big = Storage("0", 1 << 20)  # 4 MiB stored once, viewed 200 times
    views = {f"w{i}": View(big, 0, (1 << 20,), (1,)) for i in range(200)}
    return write_torch_zip(tmp_path / "repeat.pth", pickled(views), [("0", bytes(4 << 20))])


@pytest.mark.parametrize("make", [_dag_as_persistent_id, _dag_as_key, _huge_memo_index, _compressed_storage,
                                  _stride_zero_view, _repeated_views])
def test_small_files_cost_little(tmp_path, make):
    path = make(tmp_path)
    result = read_in_child(path)
    assert result["outcome"] == "CheckpointError", result
    assert str(path) in result["message"]
    assert result["seconds"] < 5 and result["grew_mb"] < 64, result


# ---- 4. every failure is a CheckpointError naming the file ----------------------------------------


def safetensors_bytes(header_text: str, body: bytes = b"") -> bytes:
    raw = header_text.encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.parametrize("header, body, match", [
    ('{"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}', 4, "unsupported dtype a list"),
    ('{"a": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}', 4, "shape"),
    ('{"a": {"dtype": "F32", "shape": [' + "9" * 4000 + '], "data_offsets": [0, 4]}}', 4, "needs more"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}', 4, "data_offsets"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}', 4, "data_offsets"),
    ('{"a": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', 4, "shape"),
    ('{"a": [1, 2]}', 0, "header entry"),
    ('{"a": {"dtype": "F32", "shape": [1]}}', 0, "header entry"),
    ('{"a": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}', 1, "unsupported dtype"),
    ("{" + '"a": ' * 1 + "[" * 100_000 + "]" * 100_000 + "}", 0, "nests too deeply"),
    ('{"__metadata__": [1], "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', 4, "__metadata__"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', 4, r"^\S+: safetensors header names 'a' twice$"),
])
def test_malformed_safetensors_headers(tmp_path, header, body, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(safetensors_bytes(header, bytes(body)))
    assert_refused(path, match)


def _encrypted(tmp_path):
    return write_torch_zip(tmp_path / "enc.pth", pickled({"w": View(S4, 0, (4,), (1,))}), [("0", floats(4))],
                           encrypted=True)


def _lzma(tmp_path):
    return write_torch_zip(tmp_path / "lzma.pth", pickled({"w": View(S4, 0, (4,), (1,))}), [("0", floats(4))],
                           compress_type=zipfile.ZIP_LZMA)


def _state(obj):
    return lambda tmp_path: write_torch_zip(tmp_path / "state.pth", pickled(obj), [("0", floats(4))])


def _deep_lists(tmp_path):
    deep = pickle.EMPTY_LIST * 100_000 + pickle.APPEND * 99_999
    return write_torch_zip(tmp_path / "deep.pth", b"\x80\x02" + _DICT + text("w") + deep + _SETITEM + pickle.STOP)


def _deep_tuples(tmp_path):
    deep = pickle.NONE + pickle.TUPLE1 * 100_000
    return write_torch_zip(tmp_path / "deep.pth", b"\x80\x02" + _DICT + deep + pickle.NONE + _SETITEM + pickle.STOP)


def _raw_pickle(body: bytes):
    return lambda tmp_path: write_torch_zip(tmp_path / "raw.pth", b"\x80\x02" + body + pickle.STOP)


@pytest.mark.parametrize("make, match", [
    (_encrypted, "encrypted"),
    (_lzma, "compressed"),
    (_state({("w", 1): View(S4, 0, (4,), (1,))}), "key of type tuple"),
    (_state({1: View(S4, 0, (4,), (1,))}), "key of type int"),
    (_state({"w": 1.5}), "not a tensor"),
    (_state([View(S4, 0, (4,), (1,))]), "not a state dict"),
    (_state({"model": {"w": "x" * 10_000}}), r"'w' is 'x+'\.\.\. \(10000 characters\), not a tensor"),
    (_deep_lists, "nests deeper"),
    (_deep_tuples, "nests deeper"),
    (_raw_pickle(pickle.INST + b"os\nsystem\n"), "opcode INST"),
    (_raw_pickle(pickle.BINGET + b"\x07"), "never stored"),
    (_raw_pickle(pickle.TUPLE), "no MARK"),
    (_raw_pickle(pickle.SETITEM), "too few items"),
    (_raw_pickle(pickle.NONE + pickle.BINPERSID), "persistent id is a NoneType"),
    (_raw_pickle(_GLOBAL + b"torch\nFloatStorage\n" + pickle.EMPTY_TUPLE + pickle.REDUCE), "not callable"),
    (_raw_pickle(b"X\xff\xff\xff\xff"), "truncated PyTorch checkpoint"),
])
def test_malformed_torch_checkpoints(tmp_path, make, match):
    assert_refused(make(tmp_path), match)


def test_storage_declared_larger_than_its_entry(tmp_path):
    path = write_torch_zip(tmp_path / "short.pth", pickled({"w": View(Storage("0", 8), 0, (8,), (1,))}),
                           [("0", floats(4))])
    assert_refused(path, "16 bytes where the pickle declares 32")


# ---- 5. safetensors: refuse what the format forbids, as the safetensors library does ----------------

_F32 = '{"dtype": "F32", "shape": [1], "data_offsets": [%d, %d]}'
_CASES = {
    "valid": ('{"a": ' + _F32 % (0, 4) + "}", 4),
    "hole between tensors": ('{"a": ' + _F32 % (0, 4) + ', "b": ' + _F32 % (8, 12) + "}", 12),
    "hole at the start": ('{"a": ' + _F32 % (4, 8) + "}", 8),
    "bytes after the last tensor": ('{"a": ' + _F32 % (0, 4) + "}", 8),
    "duplicate tensor name": ('{"a": ' + _F32 % (0, 4) + ', "a": ' + _F32 % (4, 8) + "}", 8),
    "duplicate field": ('{"a": {"dtype": "F32", "dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', 4),
    "overlap": ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": ' + _F32 % (4, 8) + "}", 8),
    "metadata not text": ('{"__metadata__": {"k": 1}, "a": ' + _F32 % (0, 4) + "}", 4),
    "metadata null": ('{"__metadata__": null, "a": ' + _F32 % (0, 4) + "}", 4),
    "float in shape": ('{"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}', 4),
    "empty tensor among others": ('{"z": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "a": '
                                  + _F32 % (0, 4) + "}", 4),
    "no tensors, trailing bytes": ("{}", 4),
}


@pytest.mark.parametrize("case", _CASES)
def test_safetensors_verdicts_agree_with_the_safetensors_library(tmp_path, case):
    header, body = _CASES[case]
    path = tmp_path / "case.safetensors"
    path.write_bytes(safetensors_bytes(header, floats(body // 4)))
    try:
        safetensors_load_file(path)
        theirs = "loads"
    except Exception:  # noqa: BLE001 (the library's error types vary by version)
        theirs = "refused"
    try:
        read_safetensors(path)
        ours = "loads"
    except CheckpointError as exc:
        assert str(path) in str(exc)
        ours = "refused"
    assert ours == theirs


# ---- 6. special files ---------------------------------------------------------------------------

_READERS = """
import sys, npconvnext
from npconvnext.formats import read_checkpoint, read_safetensors, read_safetensors_with_metadata
from npconvnext.formats.torch_zip import read_torch_state_dict
from npconvnext.oracle import read_golden
for read in (read_safetensors, read_safetensors_with_metadata, read_torch_state_dict, read_checkpoint,
             npconvnext.load_state_dict, read_golden):
    try:
        read(sys.argv[1])
        print(read.__name__, "loaded")
    except npconvnext.errors.CheckpointError as exc:
        print(read.__name__, "not a regular file" in str(exc) and sys.argv[1] in str(exc))
"""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_every_reader_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "weights.safetensors"
    os.mkfifo(fifo)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    try:
        out = subprocess.run([sys.executable, "-c", _READERS, str(fifo)], env=env, capture_output=True,
                             text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("a reader blocked on the FIFO")
    assert out.returncode == 0, out.stderr[-2000:]
    results = dict(line.split() for line in out.stdout.splitlines())
    assert results == dict.fromkeys(["read_safetensors", "read_safetensors_with_metadata", "read_torch_state_dict",
                                     "read_checkpoint", "load_state_dict", "read_golden"], "True")


_HASH = """
import sys
from npconvnext.errors import CheckpointError
from npconvnext.formats import sha256_of
try:
    print("hashed", sha256_of(sys.argv[1]))
except CheckpointError as exc:
    print("refused", str(exc))
"""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_sha256_of_hashes_only_regular_files(tmp_path):
    """A multi-file format's other files (an IR's .bin here) are opened as the readers open them:
    missing or a FIFO, the project's error naming it, never FileNotFoundError or a hang."""
    xml = tmp_path / "model.xml"
    xml.write_text('<?xml version="1.0"?>\n<net name="m" version="11"><layers/></net>\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for make, problem in ((lambda p: None, "no such file"), (os.mkfifo, "not a regular file")):
        make(tmp_path / "model.bin")
        try:
            out = subprocess.run([sys.executable, "-c", _HASH, str(xml)], env=env, capture_output=True,
                                 text=True, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("sha256_of blocked on the IR's .bin")
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.startswith(f"refused {tmp_path / 'model.bin'}: {problem}"), out.stdout


def test_real_files_still_load_exactly(tmp_path):
    """The hardening refuses nothing torch.save or safetensors write: several dtypes, shared
    storages, non-contiguous views, the official wrapper, protocol 4."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(6, 4, generator=gen)
    tensors = {"f32": torch.randn(2, 3, generator=gen), "f64": torch.randn(3, generator=gen).double(),
               "bf16": torch.randn(5, generator=gen).bfloat16(), "i64": torch.arange(7),
               "t": base.t(), "row": base[2], "col": base[:, 1], "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    expected = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in tensors.items()}
    for protocol in (2, 4):
        torch.save({"model": tensors}, tmp_path / "all.pth", pickle_protocol=protocol)
        state, _ = read_checkpoint(tmp_path / "all.pth")
        assert state.keys() == expected.keys()
        for k, v in expected.items():
            assert state[k].dtype == v.dtype and state[k].shape == v.shape, k
            np.testing.assert_array_equal(state[k], v, err_msg=k)
    arrays = {k: np.ascontiguousarray(v) for k, v in expected.items() if k != "bf16"}
    save_file(arrays, tmp_path / "all.safetensors", metadata={"k": "v"})
    state, metadata = read_safetensors_with_metadata(tmp_path / "all.safetensors")
    assert metadata == {"k": "v"}
    for k, v in arrays.items():
        np.testing.assert_array_equal(state[k], v, err_msg=k)
