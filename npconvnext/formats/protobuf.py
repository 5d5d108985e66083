"""The protobuf wire format, decoded by hand: no protobuf library, every length checked.

A message is a sequence of (key, value): the key a varint holding the field number and the wire
type (0 varint, 1 fixed 64-bit, 2 length-delimited, 5 fixed 32-bit; 3 and 4, groups, are
refused). See https://protobuf.dev/programming-guides/encoding/. Readers of a message take its
fields in order; a later field overrides an earlier one of the same number, as in protobuf.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import CheckpointError


def varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """A base-128 varint at buf[pos:end] (at most 10 bytes, below 2**64): (value, next position)."""
    value = shift = 0
    while True:
        if pos >= end:
            raise CheckpointError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift >= 70:
            raise CheckpointError("varint longer than 10 bytes")
    if value >= 1 << 64:
        raise CheckpointError("varint beyond 64 bits")
    return value, pos


def iter_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message, one at a time: ints for varint and fixed
    fields, bytes for length-delimited ones. Groups (wire types 3, 4) are refused: none of the
    messages read has one. A field running past the message's end is refused (truncation)."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise CheckpointError("protobuf field number 0")
        if wire == 0:
            value, pos = varint(buf, pos, end)
        elif wire == 1 or wire == 5:
            width = 8 if wire == 1 else 4
            if pos + width > end:
                raise CheckpointError("truncated protobuf fixed field")
            value = int.from_bytes(buf[pos : pos + width], "little")
            pos += width
        elif wire == 2:
            length, pos = varint(buf, pos, end)
            if length > end - pos:
                raise CheckpointError(f"protobuf field of {length} bytes overruns its message")
            value = bytes(buf[pos : pos + length])
            pos += length
        else:
            raise CheckpointError(f"protobuf wire type {wire} not expected here")
        yield number, value


def fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """Every (field number, value) of a protobuf message (see `iter_fields`)."""
    return list(iter_fields(buf))


def signed64(value: int) -> int:
    """An int64 field's value: varints carry negative numbers as their two's complement."""
    return value - (1 << 64) if value >= 1 << 63 else value


def as_int(value, what: str) -> int:
    """A varint or fixed field's value; a length-delimited one where an integer belongs is refused."""
    if not isinstance(value, int):
        raise CheckpointError(f"{what} is not an integer field")
    return value


def as_bytes(value, what: str) -> bytes:
    """A length-delimited field's value; an integer where bytes belong is refused."""
    if not isinstance(value, bytes):
        raise CheckpointError(f"{what} is not a length-delimited field")
    return value


def as_text(value, what: str = "name") -> str:
    """A string field, decoded as UTF-8 (bad bytes replaced: names are only compared)."""
    return as_bytes(value, what).decode("utf-8", "replace")
