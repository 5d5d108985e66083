"""Mutations of weight files for scripts/fuzz_readers.py: bytes (flips, truncation, splices,
chunks inserted or deleted), a safetensors header's JSON, a PyTorch zip's pickle opcodes and
entries, and a SavedModel directory's files (its index's bytes, a bundle entry's fields re-encoded
into a valid table, the shard, a lost file). Each takes (data, rng, seeds) and gives new data.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import struct
import zipfile

import numpy as np

INTERESTING_INTS = [0, 1, 2, 3, 4, 7, 8, -1, -2, 255, 256, 65535, 65536, 2**31 - 1, -2**31, 2**32,
                    2**40, 2**62, 2**63 - 1, 2**63, 2**64, 10**6, 10**9]


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
        if not table:  # a table an earlier mutation left empty: nothing to edit
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


# ---- OpenVINO IRs: model.xml and model.bin ---------------------------------------------------------

IR_XML, IR_BIN = "model.xml", "model.bin"
_IR_TYPES = ["Const", "Add", "Multiply", "MVN", "Convolution", "GroupConvolution", "MatMul", "Gelu", "Transpose",
             "Result", "Parameter", "Concat", "Split", "Gather", "Subtract", "Convert", "Reshape", "Unknown"]
_IR_VALUES = ["0", "1", "3", "7", "-1", "?", "", "1.5", "x", "i32", "f16", "f64", "65535", str(2**31), str(2**63),
              str(10**30)]


def mutate_ir(files: dict[str, bytes], rng, seeds) -> dict[str, bytes]:
    """An IR's graph edited (a number, an operation's type, an attribute's value, a character, a
    layer or edge line dropped or repeated) or its weights truncated or flipped."""
    import re

    files = dict(files)
    action = int(rng.integers(7))
    if action >= 5 and IR_BIN in files:
        data = files[IR_BIN]
        files[IR_BIN] = data[: int(rng.integers(len(data) + 1))] if action == 5 else mutate_bytes(data, rng, seeds)
        return files
    text = files.get(IR_XML, b"").decode("utf-8", "replace")
    if not text:
        return files
    patterns = [r"\d+", r'type="(\w+)"', r'="([^"]*)"']
    if action < 3:
        spans = [m.span(m.lastindex or 0) for m in re.finditer(patterns[action], text)]
        if spans:
            start, end = spans[int(rng.integers(len(spans)))]
            new = _IR_TYPES if action == 1 else _IR_VALUES
            text = text[:start] + new[int(rng.integers(len(new)))] + text[end:]
    elif action == 3:
        at = int(rng.integers(len(text)))
        text = text[:at] + chr(int(rng.integers(32, 127))) + text[at + 1:]
    else:
        lines = text.split("\n")
        picks = [i for i, line in enumerate(lines) if "<edge " in line or "<layer " in line]
        if picks:
            i = picks[int(rng.integers(len(picks)))]
            lines[i:i + 1] = [] if rng.random() < 0.5 else [lines[i], lines[i]]
        text = "\n".join(lines)
    files[IR_XML] = text.encode("utf-8")
    return files
