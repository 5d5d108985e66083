"""CRC-32C (Castagnoli), as LevelDB's tables and TensorFlow's tensor bundles use it.

`crc32c` is a compiled slicing-by-4 loop (Intel's "slicing-by-N" tables, as in LevelDB's
util/crc32c.cc); without the JIT it runs NumPy lanes chained by a zero-append operator.
`crc32c_naive` is the byte-at-a-time twin both are tested against. LevelDB stores a CRC
"masked" (`mask_crc`, `unmask_crc`) so that a CRC of data holding CRCs stays strong.
"""

from __future__ import annotations

import numba
import numpy as np

def _crc_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1).astype(np.uint32)
    return table


_CRC_TABLE = _crc_table()
_CRC_LIST = _CRC_TABLE.tolist()
_LANE_BYTES = 4096  # bytes per lane in the vectorised crc32c


def crc32c_naive(data: bytes, crc: int = 0) -> int:
    """crc32c of `data`, one byte at a time: the slow twin `crc32c` is tested against."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc = _CRC_LIST[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _zeros_operator(n: int) -> np.ndarray:
    """(4, 256) tables T with raw(state followed by n zero bytes) = T[0][s0] ^ T[1][s1] ^ T[2][s2] ^ T[3][s3],
    s0..s3 the state's bytes: appending zeros is linear over GF(2) in the (un-inverted) state."""
    tables = np.zeros((4, 256), np.uint32)
    for k in range(4):
        state = np.arange(256, dtype=np.uint32) << np.uint32(8 * k)  # every value of byte k, others 0
        for _ in range(n):
            state = _CRC_TABLE[state & 0xFF] ^ (state >> 8)
        tables[k] = state
    return tables


_ZEROS_LANE = None


def _crc32c_lanes(view: np.ndarray) -> int:
    """crc32c in NumPy, for runs without the JIT (NUMBA_DISABLE_JIT=1). The bytes are cut into
    lanes of _LANE_BYTES whose raw CRC states advance together, one NumPy step per byte
    position; the lanes' states are then chained in order with a precomputed 'append a lane of
    zeros' operator (CRC is affine: crc(A + B) = zeros_op(state after A) ^ raw(B))."""
    global _ZEROS_LANE
    lanes = len(view) // _LANE_BYTES
    if lanes < 4:
        return crc32c_naive(bytes(view))
    if _ZEROS_LANE is None:
        _ZEROS_LANE = _zeros_operator(_LANE_BYTES)
    block = view[: lanes * _LANE_BYTES].reshape(lanes, _LANE_BYTES)  # (lanes, bytes)
    states = np.zeros(lanes, np.uint32)  # raw states from 0: each lane's own contribution
    for i in range(_LANE_BYTES):
        states = _CRC_TABLE[(states ^ block[:, i]) & 0xFF] ^ (states >> 8)
    zeros = _ZEROS_LANE.tolist()
    crc = 0xFFFFFFFF  # the initial inversion, carried through as the first lane's starting state
    for lane_state in states.tolist():
        crc = (zeros[0][crc & 0xFF] ^ zeros[1][(crc >> 8) & 0xFF] ^ zeros[2][(crc >> 16) & 0xFF]
               ^ zeros[3][crc >> 24] ^ lane_state)
    return crc32c_naive(bytes(view[lanes * _LANE_BYTES:]), crc ^ 0xFFFFFFFF)


def _slicing_tables() -> np.ndarray:
    """(4, 256): T[k][b] is the state after byte b followed by k zero bytes, for 4 bytes a step."""
    tables = np.empty((4, 256), np.uint32)
    tables[0] = _CRC_TABLE
    for k in range(1, 4):
        tables[k] = (tables[k - 1] >> 8) ^ _CRC_TABLE[tables[k - 1] & 0xFF]
    return tables


_SLICING_TABLES = _slicing_tables()


@numba.njit(cache=True, nogil=True)
def _crc32c_kernel(data, tables):  # (bytes,) uint8, (4, 256) uint32 -> the crc32c
    crc = np.uint32(0xFFFFFFFF)
    n4 = len(data) // 4 * 4
    for i in range(0, n4, 4):  # four bytes a step ("slicing by 4")
        crc ^= (np.uint32(data[i]) | (np.uint32(data[i + 1]) << 8) | (np.uint32(data[i + 2]) << 16)
                | (np.uint32(data[i + 3]) << 24))
        crc = (tables[3, crc & 0xFF] ^ tables[2, (crc >> 8) & 0xFF] ^ tables[1, (crc >> 16) & 0xFF]
               ^ tables[0, crc >> 24])
    for i in range(n4, len(data)):
        crc = tables[0, (crc ^ data[i]) & 0xFF] ^ (crc >> 8)
    return crc ^ np.uint32(0xFFFFFFFF)


def crc32c(data) -> int:
    """crc32c of a bytes-like `data`: the compiled loop, or the NumPy lanes without the JIT."""
    view = np.frombuffer(data, np.uint8)
    if numba.config.DISABLE_JIT:
        return _crc32c_lanes(view)
    return int(_crc32c_kernel(view, _SLICING_TABLES))


def unmask_crc(masked: int) -> int:
    """LevelDB stores crc32c 'masked' (rotated and offset) so that CRCs of CRCs stay strong."""
    rotated = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rotated >> 17) | (rotated << 15)) & 0xFFFFFFFF


def mask_crc(crc: int) -> int:
    """The masked form LevelDB stores (the inverse of `unmask_crc`)."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
