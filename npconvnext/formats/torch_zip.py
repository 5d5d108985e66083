"""PyTorch zip checkpoints (torch.save since PyTorch 1.6), read without torch and without running code.

timm's and transformers' pytorch_model.bin and the official facebookresearch/ConvNeXt .pth
(weights under "model") are all this container: a zip holding `<prefix>/data.pkl`, a pickle of
the state dict whose tensors refer to raw storages stored as `<prefix>/data/<key>`.

A file is untrusted, so reading goes in three steps, each bounded by what the file holds:
  1. the pickle's opcodes are checked before unpickling (`_check_opcodes`): only those that
     build plain data and call a global, memo indices that exist, and data that neither nests
     deeply nor, shared through the memo, expands far past the pickle's own size;
  2. unpickling resolves globals through `_GLOBALS`, an allow-list, to fresh objects that refuse
     BUILD (only the state dict's own OrderedDict takes one, for its _metadata), so nothing a
     file does outlives its load; tensors come out as views (`_Tensor`) checked against their
     storage's length, not yet read;
  3. the storages the state dict uses are read (uncompressed entries of the sizes the pickle
     declares, together no larger than the file) and each view is copied out.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import zipfile
from collections import OrderedDict

import numpy as np

from ..errors import CheckpointError
from ..layers import BFloat16Bits
from .guard import MAX_DIMS, describe, open_weight_file, reading, widened
from .registry import Reading, WeightFormat

_STORAGE_DTYPES = {"DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
                   "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
                   "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
                   "BoolStorage": np.bool_}

# Every opcode a state dict's pickle (protocols 2 to 5) needs: plain data, the memo, a global
# call, a persistent id. INST, OBJ, NEWOBJ, EXT*, the text-mode opcodes and the rest are refused.
_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK",
    "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT",
    "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_LIST", "APPEND", "APPENDS",
    "EMPTY_DICT", "SETITEM", "SETITEMS",
    "BINPUT", "LONG_BINPUT", "MEMOIZE", "BINGET", "LONG_BINGET",
    "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "BINPERSID",
})
_MAX_DEPTH = 32     # nesting of the pickle's data; a state dict needs under 10
_EXPANSION = 16     # how many times its own size a pickle's data may expand to through the memo
_MAX_REUSE = 4      # elements all tensors may view, per element stored (views may share storage)
_MAX_KEY = 64       # characters in a storage key (torch writes decimal numbers)


# ---- what a pickle may touch ---------------------------------------------------------------------


class _Frozen:
    """Base of every object the unpickler hands a pickle: slots and no way to set state, so BUILD
    on one is refused (the unpickler calls `__setstate__` first) and each load gets its own."""

    __slots__ = ()

    def __setstate__(self, state):
        raise CheckpointError(f"the pickle sets attributes on {type(self).__name__.strip('_')}; "
                              "a state dict never does")


class _Global(_Frozen):
    """A global the allow-list lets a pickle call."""

    __slots__ = ("name", "function")

    def __init__(self, name, function):
        self.name, self.function = name, function

    def __call__(self, *args):
        return self.function(*args)


class _StorageType(_Frozen):
    """torch.FloatStorage and its kin: only a name, looked up in _STORAGE_DTYPES."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name


class _Storage(_Frozen):
    """A storage the pickle names: `numel` items of `dtype` in zip entry data/<key>."""

    __slots__ = ("dtype", "key", "numel")

    def __init__(self, dtype, key, numel):
        self.dtype, self.key, self.numel = dtype, key, numel


class _Tensor(_Frozen):
    """A strided view of a storage, checked to lie inside it; read after unpickling."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _ordered_dict(*args):
    if args:
        raise CheckpointError("the pickle builds an OrderedDict from arguments; a state dict never does")
    return OrderedDict()


def _rebuild_tensor(storage, offset, size, stride, *rest):
    """torch._utils._rebuild_tensor_v2 (and v1): (storage, offset, size, stride,
    [requires_grad, backward_hooks, metadata]); the extras are ignored."""
    if len(rest) > 3:
        raise CheckpointError(f"a tensor rebuild takes at most 7 arguments, got {4 + len(rest)}")
    return _Tensor(storage, offset, *_checked_view(storage, offset, size, stride))


def _rebuild_parameter(data, *rest):
    """torch._utils._rebuild_parameter(data, requires_grad, backward_hooks): the tensor itself."""
    if not isinstance(data, _Tensor) or len(rest) > 2:
        raise CheckpointError("a parameter rebuild must wrap one tensor")
    return data


# (module, name) -> what the pickle gets; each load builds its own from this.
_GLOBALS = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType for name in _STORAGE_DTYPES},
}


# ---- the three steps -----------------------------------------------------------------------------


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict of a PyTorch zip checkpoint (unwrapped from the official training
    scripts' {"model": ...}), with tensors as NumPy arrays (bfloat16 widened to float32). Every
    failure is a CheckpointError naming the file."""
    return widened(_read_state_dict(os.fspath(path)))


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
    """read_torch_state_dict with bfloat16 tensors as their bits (BFloat16Bits)."""
    with open_weight_file(path) as f, reading(path, "PyTorch checkpoint"):
        file_size = os.fstat(f.fileno()).st_size
        with zipfile.ZipFile(f) as archive:
            prefix = _archive_prefix(archive)
            pickled = _read_entry(archive, f"{prefix}data.pkl")
            _check_opcodes(pickled)
            state = _state_dict(_StateDictUnpickler(pickled).load())
            return _read_tensors(archive, prefix, state, file_size)


def _archive_prefix(archive: zipfile.ZipFile) -> str:
    """The folder holding data.pkl; refuses big-endian checkpoints."""
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointError("zip file is not a PyTorch checkpoint (no single */data.pkl)")
    prefix = pickles[0][: -len("data.pkl")]
    if f"{prefix}byteorder" in archive.namelist():
        if _read_entry(archive, f"{prefix}byteorder", max_size=16).strip() != b"little":
            raise CheckpointError("big-endian PyTorch checkpoints are not supported")
    return prefix


def _read_entry(archive: zipfile.ZipFile, name: str, size: int | None = None, max_size: int | None = None) -> bytes:
    """A zip entry's bytes. torch.save stores entries uncompressed, so a stored entry's size is
    bytes the file really holds; a compressed one could expand without bound and is refused."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise CheckpointError(f"entry {describe(name)} is missing from the archive") from None
    if info.flag_bits & 0x1:
        raise CheckpointError(f"entry {describe(name)} is encrypted")
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise CheckpointError(f"entry {describe(name)} is compressed (zip method {info.compress_type}); "
                              "torch.save stores entries uncompressed")
    if size is not None and info.file_size != size:
        raise CheckpointError(f"entry {describe(name)} has {info.file_size} bytes where the pickle "
                              f"declares {size}")
    if max_size is not None and info.file_size > max_size:
        raise CheckpointError(f"entry {describe(name)} has {info.file_size} bytes, more than {max_size}")
    return archive.read(info)


def _check_opcodes(pickled: bytes) -> None:
    """Step 1: before unpickling, refuse what a small pickle could turn into unbounded work:
    opcodes a state dict does not need, memo indices never stored (the C unpickler sizes its
    memo by the largest index), and data that, shared through the memo, would expand past a
    few times the pickle's size or nest deeply (hashing or comparing it would take exponential
    time, or overflow the C stack). The stack is simulated with each item's (expanded size,
    depth)."""
    limit = _EXPANSION * len(pickled)
    stack: list[tuple[int, int]] = []
    marks: list[int] = []           # where each open MARK sits in `stack`
    memo: list[tuple[int, int]] = []

    def pop(n: int) -> list[tuple[int, int]]:
        if len(stack) - (marks[-1] if marks else 0) < n:
            raise CheckpointError(f"pickle opcode {op.name} at byte {pos} finds too few items on the stack")
        items = stack[len(stack) - n :]
        del stack[len(stack) - n :]
        return items

    def pop_to_mark() -> list[tuple[int, int]]:
        if not marks:
            raise CheckpointError(f"pickle opcode {op.name} at byte {pos} has no MARK")
        return pop(len(stack) - marks.pop())

    for op, arg, pos in pickletools.genops(pickled):
        name = op.name
        if name not in _OPCODES:
            raise CheckpointError(f"pickle opcode {name} at byte {pos}: a state dict does not need it")
        if name == "MARK":
            marks.append(len(stack))
        elif name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
            index = len(memo) if name == "MEMOIZE" else arg
            if index > len(memo):
                raise CheckpointError(f"pickle memo index {index} at byte {pos} skips past {len(memo)}")
            memo[index : index + 1] = pop(1)
            stack.append(memo[index])
        elif name in ("BINGET", "LONG_BINGET"):
            if arg >= len(memo):
                raise CheckpointError(f"pickle memo index {arg} at byte {pos} was never stored")
            stack.append(memo[arg])
        elif name in ("APPENDS", "SETITEMS"):  # add the items above the MARK to the container below it
            items = pop_to_mark()
            stack.append(_grown(pop(1)[0], items))
        elif name in ("APPEND", "SETITEM", "BUILD"):
            items = pop(len(op.stack_before) - 1)
            stack.append(_grown(pop(1)[0], items))
        else:
            items = pop_to_mark() if name == "TUPLE" else pop(len(op.stack_before))
            if op.stack_after:
                stack.append(_nested(items, len(arg) if isinstance(arg, str) else 0))
        if stack and (stack[-1][0] > limit or stack[-1][1] > _MAX_DEPTH):
            raise CheckpointError(f"pickle data at byte {pos} expands past {_EXPANSION} times the "
                                  f"pickle's size or nests deeper than {_MAX_DEPTH}")


def _nested(items: list[tuple[int, int]], own_size: int) -> tuple[int, int]:
    """(expanded size, depth) of a new object holding `items`."""
    return 1 + own_size + sum(s for s, _ in items), 1 + max((d for _, d in items), default=0)


def _grown(container: tuple[int, int], items: list[tuple[int, int]]) -> tuple[int, int]:
    """(expanded size, depth) of a container once `items` are added to it."""
    return container[0] + sum(s for s, _ in items), max(container[1], 1 + max((d for _, d in items), default=0))


class _StateDictUnpickler(pickle.Unpickler):
    """Step 2: unpickles through the allow-list, with fresh objects for this load only."""

    def __init__(self, pickled: bytes):
        super().__init__(io.BytesIO(pickled))
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        make = _GLOBALS.get((module, name))
        if make is None:
            raise CheckpointError(f"refusing to unpickle global {module[:100]}.{name[:100]}: "
                                  "a weight file needs only tensors, and this one asks for code to run")
        return make(name) if make is _StorageType else _Global(name, make)

    def persistent_load(self, pid):
        """('storage', storage type, key, location, numel) -> the one _Storage of that key."""
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and type(pid[2]) is str and len(pid[2]) <= _MAX_KEY
                and _is_count(pid[4])):
            raise CheckpointError(f"persistent id is {describe(pid)}, not ('storage', type, key, location, numel)")
        dtype, key, numel = _STORAGE_DTYPES[pid[1].name], pid[2], pid[4]
        storage = self.storages.setdefault(key, _Storage(dtype, key, numel))
        if (storage.dtype, storage.numel) != (dtype, numel):
            raise CheckpointError(f"storage {describe(key)} is declared twice, differently")
        return storage


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0  # a bool is not a count, nor a float


def _checked_view(storage, offset, size, stride) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(size, stride) of a tensor view, once it is known to lie inside its storage."""
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"a tensor's storage is {describe(storage)}, not a storage")
    if not (_is_count(offset) and type(size) is tuple and type(stride) is tuple
            and len(size) == len(stride) <= MAX_DIMS and all(map(_is_count, size + stride))):
        raise CheckpointError(f"storage {describe(storage.key)}: a tensor's offset, size and stride "
                              "are not a count and two equally long tuples of counts")
    if _numel(size, limit=storage.numel) is None:
        raise CheckpointError(f"storage {describe(storage.key)}: a tensor views more elements than "
                              f"the storage's {storage.numel}")
    if 0 in size:
        last = offset - 1  # an empty view reads nothing, but may not start past the end
    else:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.numel:
        raise CheckpointError(f"storage {describe(storage.key)}: a tensor reaches element {last}, "
                              f"outside the storage's {storage.numel}")
    return size, stride


def _numel(size: tuple[int, ...], limit: int) -> int | None:
    """prod(size), or None once it passes `limit` (a product of huge sizes means nothing)."""
    if 0 in size:
        return 0
    total = 1
    for n in size:
        total *= n
        if total > limit:
            return None
    return total


def _state_dict(obj: object) -> dict[str, _Tensor]:
    """The name -> tensor dict inside what the pickle built, unwrapped from the training
    scripts' {"model": ...} or {"state_dict": ...}."""
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise CheckpointError(f"the checkpoint holds {describe(obj)}, not a state dict of tensors")
    for name, value in obj.items():
        if type(name) is not str:
            raise CheckpointError(f"the state dict has a key of type {type(name).__name__}, not a name")
        if not isinstance(value, _Tensor):
            raise CheckpointError(f"the state dict's {describe(name)} is {describe(value)}, not a tensor")
    return obj


def _read_tensors(archive: zipfile.ZipFile, prefix: str, state: dict[str, _Tensor], file_size: int) -> dict[str, np.ndarray]:
    """Step 3: read each storage the state dict uses once and copy its tensors out; the
    storages together must fit in the file, and the tensors in their storages."""
    storages = {id(t.storage): t.storage for t in state.values()}
    stored = sum(s.numel * _itemsize(s.dtype) for s in storages.values())
    if stored > file_size:
        raise CheckpointError(f"the storages declare {stored} bytes, more than the file's {file_size}")
    viewed = sum(_numel(t.size, limit=t.storage.numel) for t in state.values())
    if viewed > _MAX_REUSE * sum(s.numel for s in storages.values()):
        raise CheckpointError(f"the tensors view {viewed} elements in all, more than {_MAX_REUSE} times "
                              "what their storages hold")
    names_by_storage: dict[int, list[str]] = {}
    for name, t in state.items():
        names_by_storage.setdefault(id(t.storage), []).append(name)
    out = {}
    for key, names in names_by_storage.items():
        data = _read_storage(archive, prefix, storages[key])
        out.update({name: _copy_view(data, state[name]) for name in names})
    return {name: out[name] for name in state}


def _itemsize(dtype) -> int:
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


def _read_storage(archive: zipfile.ZipFile, prefix: str, storage: _Storage) -> np.ndarray:
    raw = _read_entry(archive, f"{prefix}data/{storage.key}", size=storage.numel * _itemsize(storage.dtype))
    if storage.dtype == "bfloat16":
        return np.frombuffer(raw, dtype="<u2").view(BFloat16Bits)
    return np.frombuffer(raw, dtype=np.dtype(storage.dtype).newbyteorder("<"))


def _copy_view(data: np.ndarray, t: _Tensor) -> np.ndarray:
    """The tensor's elements copied out of its storage (bounds checked by `_checked_view`); a
    bfloat16 storage's keep their BFloat16Bits mark."""
    if 0 in t.size:
        return np.zeros_like(data, shape=t.size)
    # an axis of length 1 is never stepped along: its stride may be anything, so make it 0
    strides = tuple(s * data.itemsize if n > 1 else 0 for n, s in zip(t.size, t.stride))
    return np.lib.stride_tricks.as_strided(data[t.offset :], shape=t.size, strides=strides, subok=True).copy()


def _refuse_legacy(path: str) -> Reading:
    raise CheckpointError(f"{path}: legacy (pre-1.6, non-zip) PyTorch pickle; re-save it with "
                          "torch.save in a current PyTorch, or convert it to safetensors")


def _read(path: str) -> Reading:
    return Reading(_read_state_dict(path))


FORMATS = (WeightFormat("torch-zip", lambda head, path: head[:4] == b"PK\x03\x04", _read),
           WeightFormat("torch-legacy-pickle", lambda head, path: head[:1] == b"\x80", _refuse_legacy))
