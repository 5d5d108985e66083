"""TensorFlow's tensor bundle (a checkpoint, or a SavedModel's variables/), read without TensorFlow.

A bundle is a prefix `P` and files beside it:
    P.index                      a LevelDB-style table (an SSTable): sorted keys, each a tensor's
                                 name, whose values are protobufs; the key "" holds the header
    P.data-00000-of-0000N        the tensors' bytes, one file per shard, at the entries' offsets

The table (TensorFlow's lib/io/table, after LevelDB): data blocks, an index block mapping each
data block's last key to its (offset, size), and a 48-byte footer (two block handles, padding,
magic). Each block ends in a restart array and is followed by a 5-byte trailer: a compression
type and a masked crc32c. Keys inside a block share a prefix with the previous key. TensorFlow's
bundle writer never compresses (tensor_bundle.cc sets kNoCompression), so a snappy block is
refused rather than decoded.

Values are decoded from the protobuf wire format (`protobuf.py`), for the three messages read
here (tensor_bundle.proto, tensor_shape.proto, trackable_object_graph.proto); no protobuf library.

Every offset, length, varint and shape read from the files is checked before it is used: a
hostile bundle gets a CheckpointError, never a crash, a hang or an allocation its files do not
back; keys restored from a block are bounded by its size. Every block's and tensor's crc32c is
checked (`crc32c.py`).
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import CheckpointError
from .crc32c import crc32c, unmask_crc
from .guard import open_weight_file
from .protobuf import as_bytes, as_int, as_text, fields, signed64, varint

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48        # two block handles of up to 20 bytes each, padded, then 8 bytes of magic
BLOCK_TRAILER = 5       # compression type (1 byte) + masked crc32c (4 bytes)
MAX_INDEX_BYTES = 1 << 26  # an index holds names and offsets: kilobytes for any real model
MAX_RANK = 8
MAX_KEY_BYTES = 4096         # a tensor's name in the index: tens of bytes in real bundles
KEY_BYTES_PER_BLOCK_BYTE = 8  # keys restored from a block, per byte of it (real bundles: below 1)

# DataType enum values (types.proto) read here: float tensors, and the object graph's string
DT_FLOAT, DT_DOUBLE, DT_STRING, DT_BFLOAT16, DT_HALF = 1, 2, 7, 14, 19
_FLOAT_DTYPES = {DT_FLOAT: "f4", DT_DOUBLE: "f8", DT_HALF: "f2", DT_BFLOAT16: "u2"}  # bfloat16: raw bits
_DTYPE_NAMES = {1: "float32", 2: "float64", 3: "int32", 4: "uint8", 7: "string", 9: "int64", 10: "bool",
                14: "bfloat16", 19: "float16"}


@dataclass(frozen=True)
class Entry:
    """A BundleEntryProto: where one tensor's bytes are and what they are."""

    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int | None  # masked, as stored
    sliced: bool        # a partitioned variable, stored as slices under other keys


def parse_entry(buf: bytes, key: str) -> Entry:
    dtype, shape, shard, offset, size, crc, sliced = 0, None, 0, 0, 0, None, False
    for number, value in fields(buf):
        if number == 1:
            dtype = as_int(value, "dtype")
        elif number == 2:
            shape = _parse_shape(as_bytes(value, "shape"), key)
        elif number == 3:
            shard = as_int(value, "shard_id")
        elif number == 4:
            offset = signed64(as_int(value, "offset"))
        elif number == 5:
            size = signed64(as_int(value, "size"))
        elif number == 6:
            crc = as_int(value, "crc32c")
        elif number == 7:
            sliced = True
    if offset < 0 or size < 0:
        raise CheckpointError(f"tensor {key!r}: negative offset or size ({offset}, {size})")
    return Entry(dtype, shape or (), shard, offset, size, crc, sliced)


def _parse_shape(buf: bytes, key: str) -> tuple[int, ...]:
    dims = []
    for number, value in fields(buf):
        if number == 2:
            size = 0
            for n, v in fields(as_bytes(value, "dim")):
                if n == 1:
                    size = signed64(as_int(v, "dim size"))
            if size < 0 or size >= 1 << 40:
                raise CheckpointError(f"tensor {key!r}: dimension {size} out of range")
            dims.append(size)
            if len(dims) > MAX_RANK:
                raise CheckpointError(f"tensor {key!r}: more than {MAX_RANK} dimensions")
        elif number == 3 and value:
            raise CheckpointError(f"tensor {key!r}: unknown rank")
    return tuple(dims)


# ---- the table -------------------------------------------------------------------------------------

def _block(data: bytes, handle: tuple[int, int], check_crc: bool = True) -> bytes:
    offset, size = handle
    if offset + size + BLOCK_TRAILER > len(data) - FOOTER_SIZE:
        raise CheckpointError(f"table block at {offset} of {size} bytes overruns the index file")
    contents = data[offset : offset + size]
    kind = data[offset + size]
    if kind == 1:
        raise CheckpointError("index block is snappy-compressed; TensorFlow's bundle writer never "
                              "compresses, and npconvnext does not decode snappy")
    if kind != 0:
        raise CheckpointError(f"index block of unknown compression type {kind}")
    if check_crc:
        stored = int.from_bytes(data[offset + size + 1 : offset + size + 5], "little")
        if crc32c(data[offset : offset + size + 1]) != unmask_crc(stored):
            raise CheckpointError(f"table block at {offset}: checksum mismatch (corrupted index)")
    return contents


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """(key, value) pairs of a table block, keys restored from their shared prefixes."""
    if len(block) < 4:
        raise CheckpointError("table block shorter than its restart count")
    restarts = int.from_bytes(block[-4:], "little")
    if restarts == 0 or restarts > (len(block) - 4) // 4:
        raise CheckpointError(f"table block with {restarts} restart points in {len(block)} bytes")
    end = len(block) - 4 - 4 * restarts
    out, pos, key, built = [], 0, b"", 0
    budget = KEY_BYTES_PER_BLOCK_BYTE * len(block) + MAX_KEY_BYTES
    while pos < end:
        shared, pos = varint(block, pos, end)
        unshared, pos = varint(block, pos, end)
        length, pos = varint(block, pos, end)
        if shared > len(key) or unshared > end - pos or length > end - pos - unshared:
            raise CheckpointError("table entry overruns its block")
        # checked before the key is built: each key may repeat all of the previous one, so keys
        # could otherwise total the square of the block's size
        built += shared + unshared
        if shared + unshared > MAX_KEY_BYTES or built > budget:
            raise CheckpointError(f"table block of {len(block)} bytes restores keys of {built} bytes "
                                  f"(one of {shared + unshared}): a bundle's tensor names are far shorter")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        out.append((key, block[pos : pos + length]))
        pos += length
    return out


def _handle(buf: bytes, pos: int, end: int) -> tuple[tuple[int, int], int]:
    offset, pos = varint(buf, pos, end)
    size, pos = varint(buf, pos, end)
    return (offset, size), pos


def read_table(data: bytes) -> dict[str, bytes]:
    """Every (key, value) of an SSTable held in `data`; keys must be strictly increasing."""
    if len(data) < FOOTER_SIZE:
        raise CheckpointError(f"index file of {len(data)} bytes is shorter than a table footer")
    footer = len(data) - FOOTER_SIZE
    if int.from_bytes(data[-8:], "little") != TABLE_MAGIC:
        raise CheckpointError("index file does not end in the table magic number (not a tensor bundle index)")
    _, pos = _handle(data, footer, footer + 40)  # the metaindex: empty in bundles, not needed
    index_handle, _ = _handle(data, pos, footer + 40)
    table, last, next_free = {}, None, 0
    for _, value in _block_entries(_block(data, index_handle)):
        handle, used = _handle(value, 0, len(value))
        if handle[0] < next_free:  # TensorFlow writes data blocks one after another, each once
            raise CheckpointError(f"table block at {handle[0]} overlaps or repeats an earlier one")
        next_free = handle[0] + handle[1] + BLOCK_TRAILER
        for key, entry in _block_entries(_block(data, handle)):
            if last is not None and key <= last:
                raise CheckpointError("index keys out of order")
            last = key
            try:
                table[key.decode("utf-8")] = entry
            except UnicodeDecodeError:
                raise CheckpointError(f"index key {key[:40]!r} is not UTF-8") from None
    return table


# ---- the bundle --------------------------------------------------------------------------------------

def _parse_index(data: bytes) -> tuple[int, str, dict[str, Entry]]:
    """(number of shards, byte order, entries by key) of an index file's bytes."""
    table = read_table(data)
    if "" not in table:
        raise CheckpointError("no bundle header (the empty key)")
    num_shards, big_endian = 1, False
    for number, value in fields(table.pop("")):
        if number == 1:
            num_shards = as_int(value, "num_shards")
        elif number == 2:
            big_endian = as_int(value, "endianness") == 1
    if not 1 <= num_shards <= 100_000:
        raise CheckpointError(f"{num_shards} shards")
    return num_shards, ">" if big_endian else "<", {key: parse_entry(value, key) for key, value in table.items()}


def _check_regular(path: str, what: str) -> None:
    """Refuse a missing file, or one that is not a regular file (a FIFO would block its reader)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        raise CheckpointError(f"{path}: no such file ({what})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: not a regular file ({what}: a pipe, socket, device or directory)")


class Bundle:
    """A tensor bundle's index, parsed and checked; tensors are read from the shards on request."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        with open_weight_file(prefix + ".index") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_INDEX_BYTES:
                raise CheckpointError(f"{prefix}.index: {size} bytes; a bundle index is far smaller. Refused")
            data = f.read(size)
        try:
            self.num_shards, self.byte_order, self.entries = _parse_index(data)
        except CheckpointError as exc:
            raise CheckpointError(f"{prefix}.index: {exc}") from None
        for shard in range(self.num_shards):  # the header's count is trusted only as far as files back it
            _check_regular(self.shard_path(shard), f"shard {shard} of the {self.num_shards} its index names")

    def shard_path(self, shard: int) -> str:
        return f"{self.prefix}.data-{shard:05d}-of-{self.num_shards:05d}"

    def files(self) -> list[str]:
        """The index and every shard (each a regular file, checked when the index was read)."""
        return [self.prefix + ".index"] + [self.shard_path(k) for k in range(self.num_shards)]

    def _raw(self, key: str, entry: Entry) -> bytes:
        if not 0 <= entry.shard_id < self.num_shards:
            raise CheckpointError(f"tensor {key!r}: shard {entry.shard_id} of {self.num_shards}")
        path = self.shard_path(entry.shard_id)
        with open_weight_file(path) as f:
            size = os.fstat(f.fileno()).st_size
            if entry.offset + entry.size > size:
                raise CheckpointError(f"{path}: tensor {key!r} at {entry.offset}+{entry.size} lies beyond "
                                      f"the shard's {size} bytes (truncated shard?)")
            f.seek(entry.offset)
            raw = f.read(entry.size)
        if len(raw) != entry.size:
            raise CheckpointError(f"{path}: shard ended while reading tensor {key!r}")
        return raw

    def read(self, key: str) -> np.ndarray:
        """A float tensor, native byte order, read-only; bfloat16 widened to float32, float16 kept."""
        entry = self.entries[key]
        if entry.sliced:
            raise CheckpointError(f"tensor {key!r} is stored in slices (a partitioned variable); not supported")
        if entry.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"tensor {key!r} is {_DTYPE_NAMES.get(entry.dtype, f'dtype {entry.dtype}')}, "
                                  "not a float tensor")
        dtype = np.dtype(self.byte_order + _FLOAT_DTYPES[entry.dtype])
        count = 1
        for d in entry.shape:
            count *= d
        if count * dtype.itemsize != entry.size:
            raise CheckpointError(f"tensor {key!r}: shape {list(entry.shape)} of {dtype.itemsize}-byte values "
                                  f"needs {count * dtype.itemsize} bytes, the entry says {entry.size}")
        raw = self._raw(key, entry)
        self._check_crc(key, entry, raw)
        array = np.frombuffer(raw, dtype).reshape(entry.shape).astype(dtype.newbyteorder("="), copy=False)
        if entry.dtype == DT_BFLOAT16:
            array = (array.astype(np.uint32) << 16).view(np.float32)  # bfloat16 is a float32's top half
        return array

    def read_string(self, key: str) -> bytes:
        """A scalar string tensor (the object graph): [varint64 length][masked crc of it][bytes]."""
        entry = self.entries[key]
        if entry.dtype != DT_STRING or entry.shape != ():
            raise CheckpointError(f"tensor {key!r} is not a scalar string")
        raw = self._raw(key, entry)
        length, pos = varint(raw, 0, len(raw))
        if pos + 4 + length != len(raw):
            raise CheckpointError(f"string tensor {key!r}: length {length} does not fill its {len(raw)} bytes")
        self._check_crc(key, entry, raw)
        return raw[pos + 4 :]

    def _check_crc(self, key: str, entry: Entry, raw: bytes) -> None:
        if entry.crc32c is None:
            return
        if entry.dtype == DT_STRING:  # the writer checksums lengths as uint32, not as varints
            length, pos = varint(raw, 0, len(raw))
            raw = struct.pack(self.byte_order + ("I" if length < 1 << 32 else "Q"), length) + raw[pos:]
        if crc32c(raw) != unmask_crc(entry.crc32c):
            raise CheckpointError(f"{self.shard_path(entry.shard_id)}: tensor {key!r} fails its crc32c "
                                  "(corrupted shard)")


# ---- the object graph (trackable_object_graph.proto) ------------------------------------------------

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


@dataclass(frozen=True)
class TrackedObject:
    children: tuple[tuple[int, str], ...]      # (node id, local name)
    attributes: tuple[tuple[str, str, str], ...]  # (name, full name, checkpoint key)


def parse_object_graph(buf: bytes) -> list[TrackedObject]:
    nodes = []
    for number, value in fields(buf):
        if number != 1:
            continue
        children, attributes = [], []
        for n, v in fields(as_bytes(value, "node")):
            if n == 1:
                ref = dict(fields(as_bytes(v, "child")))
                children.append((as_int(ref.get(1, 0), "node_id"), as_text(ref.get(2, b""))))
            elif n == 2:
                tensor = dict(fields(as_bytes(v, "attribute")))
                attributes.append(tuple(as_text(tensor.get(k, b"")) for k in (1, 2, 3)))
        nodes.append(TrackedObject(tuple(children), tuple(attributes)))
    return nodes

