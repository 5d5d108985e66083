"""gemm.py's micro-kernel and pixel panels against NumPy's matmul, on seeded random shapes."""

import numba
import numpy as np
import pytest

from npconvnext.engine import gemm, llvm

TOL = {np.float32: 1e-5, np.float64: 1e-13}  # relative to the sum of |products|: another summing order


@numba.njit
def _tiles(weight, first_row, rows, panel, transposed, pixels):
    mr, nr = gemm.tile_shape(weight)
    if transposed:
        tile = np.empty((nr, mr), weight.dtype)
        gemm.tile_product_transposed(weight, first_row, rows, panel, tile, pixels)
        return tile.T.copy()
    tile = np.empty((mr, nr), weight.dtype)
    gemm.tile_product(weight, first_row, rows, panel, tile, pixels)
    return tile


def _expected(weight, first_row, rows, panel, mr):
    picked = np.minimum(np.arange(first_row, first_row + mr), first_row + rows - 1)  # past the end: the last row
    exact = weight[picked].astype(np.float64) @ panel.astype(np.float64)
    scale = np.abs(weight[picked]).astype(np.float64) @ np.abs(panel).astype(np.float64)
    return exact, scale


@pytest.mark.parametrize("share", [1.0, 0.5, 0.51, 0.01], ids=["full", "half", "over-half", "one"])
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "columns"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("depth, channels, first_row", [(1, 12, 0), (7, 30, 24), (96, 40, 36), (385, 100, 96),
                                                       (3, 5, 0)])
def test_the_micro_kernel_is_a_matrix_product(depth, channels, first_row, dtype, transposed, share):
    rng = np.random.default_rng(depth)
    mr, nr = gemm.TILES[np.dtype(dtype)]
    pixels = max(1, int(share * nr))  # the columns in use: the rest of the tile is undefined
    weight = rng.standard_normal((channels, depth)).astype(dtype)   # (N, K)
    panel = rng.standard_normal((depth, nr)).astype(dtype)          # (K, NR)
    rows = min(mr, channels - first_row)
    tile = _tiles(weight, first_row, rows, panel, transposed, pixels)[:, :pixels]
    exact, scale = _expected(weight, first_row, rows, panel[:, :pixels], mr)
    assert np.all(np.abs(tile - exact) <= TOL[dtype] * scale + np.finfo(dtype).tiny)
    # the same bits whatever part of the panel is in use
    np.testing.assert_array_equal(tile, _tiles(weight, first_row, rows, panel, transposed, nr)[:, :pixels])
    # the plain-Python twin, which NUMBA_DISABLE_JIT=1 runs
    plain = np.empty((nr, mr) if transposed else (mr, nr), dtype)
    (gemm.tile_product_transposed if transposed else gemm.tile_product)(weight, first_row, rows, panel, plain,
                                                                           pixels)
    plain = (plain.T if transposed else plain)[:, :pixels]
    assert np.all(np.abs(plain - exact) <= TOL[dtype] * scale + np.finfo(dtype).tiny)


def test_the_micro_kernel_reads_a_weight_with_a_row_stride():
    # a C-ordered view of every other row of a larger weight: rows apart by twice the depth
    rng = np.random.default_rng(0)
    mr, nr = gemm.TILES[np.dtype(np.float64)]
    wide = rng.standard_normal((mr, 2 * 9))
    weight = wide[:, :9]  # not contiguous: the kernel takes C-contiguous weights only
    with pytest.raises(numba.TypingError):
        _tiles(weight, 0, mr, rng.standard_normal((9, nr)), False, nr)
    tile = _tiles(np.ascontiguousarray(weight), 0, mr, np.ones((9, nr)), False, nr)
    np.testing.assert_allclose(tile, np.repeat(weight.sum(axis=1, keepdims=True), nr, axis=1), rtol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pixels", [1, 31, 32, 33, 100])
def test_pixel_panels_round_trip(pixels, dtype):
    x = np.random.default_rng(pixels).standard_normal((pixels, 5)).astype(dtype)
    panels = gemm.to_panels(x)
    nr = gemm.panel_pixels(dtype)
    assert panels.shape == (-(-pixels // nr), 5, nr) and panels.flags.c_contiguous
    np.testing.assert_array_equal(gemm.from_panels(panels, pixels), x)
    assert not panels.transpose(0, 2, 1).reshape(-1, 5)[pixels:].any()  # padded with zeros
    np.testing.assert_array_equal(panels[0, :, 0], x[0])  # a panel holds a pixel per column


def test_no_pixels_make_no_panels():
    assert gemm.to_panels(np.zeros((0, 5), np.float32)).shape == (0, 5, gemm.panel_pixels(np.float32))


def test_tiles_fit_the_vector_registers():
    vector_bytes, registers = llvm.vector_registers()
    for dtype, (mr, nr) in gemm.TILES.items():
        lanes = vector_bytes // dtype.itemsize
        assert nr % lanes == 0
        # MR x NR running sums, the NR pixels loaded, one broadcast weight
        assert mr * (nr // lanes) + nr // lanes + 1 <= registers
