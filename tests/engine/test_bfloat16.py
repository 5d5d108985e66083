"""bfloat16: rounding, the pair tile on both its paths against its exact twin, the MLP against
the reference, and a bfloat16 model against the float32 one.

The pair tile (engine/gemm_bf16.py) has two paths: vdpbf16ps where the CPU has AVX512_BF16,
widening to float32 everywhere. Both are held to `gemm_bf16.pair_product`, the plain NumPy
twin, bit for bit; the widening path on every CPU, the dot-product path where the CPU has it.
"""

import fractions
import json
import warnings

import numba
import numpy as np
import pytest

import npconvnext
from npconvnext import layers
from npconvnext.engine import bfloat16, block, gemm, mlp
from npconvnext.engine.gemm_bf16 import (AMX_PAIRS, AMX_ROWS, dot_product_pays, has_amx, has_dot_product, pair_path,
                                         pair_product)
from npconvnext.errors import InputError
from npconvnext.formats.mapped import mapping_of
from npconvnext.network import BlockWeights
from npconvnext.network import block as reference_block
from tests.engine.conftest import BFLOAT16_LOOPS
from tests.support.timm_reference import numpy_state_dict, random_images, random_timm_model
from tests.support.weight_files import write_bfloat16_safetensors

MR, NR = gemm.TILES[np.dtype(np.uint16)]
PATHS = ["widening", pytest.param("dot", marks=pytest.mark.skipif(not has_dot_product(),
                                                                  reason="the CPU has no AVX512_BF16"))]
AMX = pytest.mark.skipif(not has_amx(), reason="the CPU (or the OS) gives no AMX-BF16")


# ---- rounding -------------------------------------------------------------------------------------


def _nearest_even(value: fractions.Fraction | float, negative_zero=False) -> int:
    """bfloat16 bits nearest `value` (exact rational), ties to the even one: found by search,
    independently of the bit trick layers.to_bfloat16 uses. Finite values only."""
    value = fractions.Fraction(value)
    sign = 0x8000 if value < 0 or (value == 0 and negative_zero) else 0
    magnitude = abs(value)
    best = None
    for bits in _candidates(magnitude):
        candidate = fractions.Fraction(float(layers.from_bfloat16(np.uint16(bits))))
        key = (abs(candidate - magnitude), bits & 1)  # nearer first, then the even one
        if best is None or key < best[0]:
            best = (key, bits)
    return best[1] | sign


def _candidates(magnitude):
    # the bfloat16 values around a magnitude: below and above its float32 truncation (0x7f80 inf)
    single = np.float32(float(magnitude))
    top = int(single.view(np.uint32)) >> 16
    return list(range(max(0, top - 1), min(0x7F7F, top + 2) + 1))


def _float32_cases():
    one = 0x3F800000
    return np.array([one, one | 0x8000, one | 0x18000, one | 0x8001, one | 0x7FFF, 0x00008000, 0x00018000,
                     0x00000001, 0x007FFFFF, 0x00800000, 0x80008000, 0x7F7FFFFF, 0x7F7F7FFF, 0x7F7F8000,
                     0x7F7F8001, 0x80000000, 0], np.uint32).view(np.float32)


def test_rounding_is_to_nearest_even_for_float32():
    rng = np.random.default_rng(0)
    cases = np.concatenate([_float32_cases(), rng.integers(0, 2**32, 3000, dtype=np.uint32).view(np.float32)])
    cases = cases[np.isfinite(cases)]
    got = layers.to_bfloat16(cases)
    for value, bits in zip(cases, got):
        if abs(float(value)) >= float(np.uint32(0x7F7F8000).view(np.float32)):   # halfway to infinity and up
            assert bits == (0xFF80 if value < 0 else 0x7F80), value
        else:
            assert bits == _nearest_even(float(value), np.signbit(value)), (value, hex(bits))


def test_rounding_from_float64_is_not_a_double_rounding():
    # just above a tie in float64, exactly a tie once rounded to float32: up, not to even
    above_tie = 1 + 2**-8 + 2**-40
    assert layers.to_bfloat16(np.float32(above_tie)) == 0x3F80          # float32 rounding made it a tie
    assert layers.to_bfloat16(np.float64(above_tie)) == 0x3F81
    rng = np.random.default_rng(1)
    cases = np.concatenate([rng.standard_normal(500) * 10.0 ** rng.integers(-40, 38, 500),
                            1 + (rng.integers(0, 2**16, 300) * 2.0 ** -24 + 2.0 ** -40), [2.0**-140, -(2.0**-133) * 3]])
    for value, bits in zip(cases, layers.to_bfloat16(cases)):
        assert bits == _nearest_even(float(value), value < 0), (value, hex(bits))


def test_nan_and_infinity_survive_rounding():
    values = np.array([np.inf, -np.inf, np.nan, -np.nan, np.float32(3.4e38), -np.float32(3.4e38)], np.float32)
    bits = np.concatenate([values.view(np.uint32), [0x7F800001, 0xFFFFFFFF]]).astype(np.uint32).view(np.float32)
    with np.errstate(invalid="ignore"):  # NaN payloads cast to float64
        wide = bits.astype(np.float64)
    for source in (bits, wide):
        got = layers.from_bfloat16(layers.to_bfloat16(source))
        assert list(got[:2]) == [np.inf, -np.inf] and list(got[4:6]) == [np.inf, -np.inf]
        assert np.isnan(got[[2, 3, 6, 7]]).all()
        assert list(np.signbit(got[[2, 3]])) == list(np.signbit(source[[2, 3]]))


@numba.njit
def _round_compiled(x):
    out = np.empty(x.shape, np.uint16)
    for i in range(x.size):
        out[i] = bfloat16.round_to_bfloat16(x[i])
    return out


def test_the_kernels_rounding_is_the_references():
    rng = np.random.default_rng(2)
    bits = np.concatenate([_float32_cases().view(np.uint32), [0x7F800000, 0x7F800001, 0xFFC00000, 0x7FBFFFFF],
                           rng.integers(0, 2**32, 20000, dtype=np.uint32)]).astype(np.uint32)
    x = bits.view(np.float32)
    np.testing.assert_array_equal(_round_compiled(x), layers.to_bfloat16(x))
    plain_round = getattr(bfloat16.round_to_bfloat16, "py_func", bfloat16.round_to_bfloat16)  # NUMBA_DISABLE_JIT's
    plain = np.array([plain_round(v) for v in x[:200]], np.uint16)
    np.testing.assert_array_equal(plain, layers.to_bfloat16(x[:200]))


def test_pair_panels_are_their_twin():
    rng = np.random.default_rng(3)
    for m, k in ((1, 1), (NR + 3, 7), (3 * NR, 40), (5, 2)):
        x = rng.standard_normal((m, k)).astype(np.float32)
        x.flat[:: max(1, x.size // 3)] = [np.inf, -np.nan, 1 + 2**-8][: len(x.flat[:: max(1, x.size // 3)])]
        np.testing.assert_array_equal(bfloat16.to_pair_panels(x), bfloat16.pair_panels(x, NR))


# ---- the pair tile ----------------------------------------------------------------------------------


@numba.njit
def _tile_widening(weight, first_row, rows, panel, pixels):
    tile = np.full((MR, NR), np.nan, np.float32)
    gemm.tile_product_widening(weight, first_row, rows, panel, tile, pixels)
    return tile


@numba.njit
def _tile_dot(weight, first_row, rows, panel, pixels):
    tile = np.full((MR, NR), np.nan, np.float32)
    gemm.tile_product_dot(weight, first_row, rows, panel, tile, pixels)
    return tile


@numba.njit
def _tile_amx(weight, first_row, rows, panel, pixels):
    tile = np.full((MR, NR), np.nan, np.float32)
    gemm.tile_product_amx(weight, first_row, rows, panel, tile, pixels)
    return tile


@numba.njit
def _tile_chosen(weight, first_row, rows, panel, pixels, transposed):
    # the path the model's kernels run, through gemm's generic names
    if transposed:
        tile = np.full((NR, MR), np.nan, np.float32)
        gemm.tile_product_transposed(weight, first_row, rows, panel, tile, pixels)
        return tile.T.copy()
    tile = np.full((MR, NR), np.nan, np.float32)
    gemm.tile_product(weight, first_row, rows, panel, tile, pixels)
    return tile


TILE = {"widening": _tile_widening, "dot": _tile_dot}


def _expected(weight, first_row, rows, panel):
    picked = np.minimum(np.arange(first_row, first_row + MR), first_row + rows - 1)  # past the end: the last row
    return pair_product(weight[picked], panel)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("seed", range(6))
def test_the_pair_tile_is_its_twin_bit_for_bit(path, seed):
    rng = np.random.default_rng(seed)
    depth = int(rng.integers(1, 300))                     # K, odd ones too: padded with a zero channel
    channels = int(rng.integers(1, 40))
    first_row = int(rng.integers(0, channels))
    rows = min(MR, channels - first_row)                  # fewer than MR at the weight's end
    scale = 10.0 ** rng.integers(-3, 3)
    weight = bfloat16.pair_rows(layers.to_bfloat16(rng.standard_normal((depth, channels)) * scale))  # (N, K even)
    x = rng.standard_normal((NR, depth)).astype(np.float32)
    panel = bfloat16.pair_panels(x, NR)[0]                # (K2, NR, 2)
    expected = _expected(weight, first_row, rows, panel)
    for pixels in (NR, 1, NR // 2 + 1):
        tile = TILE[path](weight, first_row, rows, panel, pixels)
        np.testing.assert_array_equal(tile[:, :pixels], expected[:, :pixels])
    if pair_path() != "amx":  # AMX sums in its own order: test_the_amx_tile_is_the_product below
        for transposed in (False, True):
            np.testing.assert_array_equal(_tile_chosen(weight, first_row, rows, panel, NR, transposed), expected)
    plain = np.empty((MR, NR), np.float32)
    gemm.tile_product(weight, first_row, rows, panel, plain, NR)  # the plain twin NUMBA_DISABLE_JIT runs
    np.testing.assert_array_equal(plain, expected)


def _exact(weight, first_row, rows, panel):
    """The tile's sums in float64 (exact products, rounding only at 53 bits), and the sums of
    their magnitudes: float32 sums of K products differ from it by at most K * 2**-24 of that."""
    picked = np.minimum(np.arange(first_row, first_row + MR), first_row + rows - 1)
    w = layers.from_bfloat16(weight[picked]).astype(np.float64)                     # (MR, K)
    x = layers.from_bfloat16(panel).transpose(0, 2, 1).reshape(-1, NR).astype(np.float64)  # (K, NR)
    return w @ x, np.abs(w) @ np.abs(x)


@AMX
@pytest.mark.parametrize("seed", range(4))
def test_the_amx_tile_is_the_product(seed):
    # whole tiles (16 rows, K a multiple of 32) on AMX; others on the vector path, bit for bit
    rng = np.random.default_rng(seed)
    depth = int(rng.integers(1, 8)) * 2 * AMX_PAIRS + (0 if seed % 2 == 0 else 6)
    channels = AMX_ROWS * int(rng.integers(1, 4)) + (0 if seed < 2 else 5)
    weight = bfloat16.pair_rows(layers.to_bfloat16(rng.standard_normal((depth, channels))))
    panel = bfloat16.pair_panels(rng.standard_normal((NR, depth)).astype(np.float32), NR)[0]
    assert MR == AMX_ROWS
    for first_row in range(0, channels, MR):
        rows = min(MR, channels - first_row)
        tile = _tile_amx(weight, first_row, rows, panel, NR)
        for transposed in (False, True):  # the model's path: AMX on this CPU
            np.testing.assert_array_equal(_tile_chosen(weight, first_row, rows, panel, NR, transposed), tile)
        if rows < AMX_ROWS or depth % (2 * AMX_PAIRS):
            np.testing.assert_array_equal(tile, _expected(weight, first_row, rows, panel))
            continue
        exact, scale = _exact(weight, first_row, rows, panel)
        assert np.all(np.abs(tile - exact) <= depth * 2.0**-24 * scale)
        assert not np.isnan(tile).any()


def _pairs(values):
    # one pixel's pairs (K2, NR, 2) from its channel values, every pixel the same
    bits = layers.to_bfloat16(np.asarray(values, np.float32))
    return np.ascontiguousarray(np.broadcast_to(bits.reshape(-1, 1, 2), (len(values) // 2, NR, 2)))


@pytest.mark.parametrize("path", PATHS)
def test_the_pair_tile_adds_the_odd_channels_product_first(path):
    # pair 0 sums 2**24 (odd channel); pair 1: odd first, 2**24 + 1 rounds to 2**24, then
    # - 2**24 gives 0; even first would give (2**24 - 2**24) + 1 = 1. The SDM's order: odd first.
    weight = bfloat16.pair_rows(layers.to_bfloat16(np.array([[0.0, 2.0**12, -(2.0**12), 1.0]]).T))  # (1, 4)
    panel = _pairs([0.0, 2.0**12, 2.0**12, 1.0])
    tile = TILE[path](weight, 0, 1, panel, NR)
    assert (tile == 0.0).all()
    np.testing.assert_array_equal(tile, pair_product(np.repeat(weight, MR, axis=0), panel))


@pytest.mark.parametrize("path", PATHS)
def test_subnormals_change_the_sums_by_less_than_the_smallest_normal_scaled(path):
    # vdpbf16ps reads subnormal inputs and sums as zero; the widening path keeps them: where
    # values that small occur, the paths may differ, by 2**-126 (the smallest normal float32)
    # times the other factor for a subnormal input, by 2**-126 for a subnormal product or sum
    tiny = 2.0**-70
    values_w, values_x = [tiny, tiny, 2.0**-130, 1.0], [tiny, tiny, 2.0**10, 0.0]
    weight = bfloat16.pair_rows(layers.to_bfloat16(np.array([values_w]).T))
    panel = _pairs(values_x)
    tile = TILE[path](weight, 0, 1, panel, NR)
    exact = pair_product(np.repeat(weight, MR, axis=0), panel)
    assert exact[0, 0] > 0
    bound = 2.0**-126 * (len(values_w) + np.abs(values_w).sum() + np.abs(values_x).sum())
    assert np.abs(tile - exact).max() <= bound
    if path == "widening":
        np.testing.assert_array_equal(tile, exact)


def test_the_dot_product_path_is_chosen_where_the_cpu_has_it_at_full_rate():
    features = numba.config.CPU_FEATURES or __import__("llvmlite.binding").binding.get_host_cpu_features().flatten()
    assert has_dot_product() == ("+avx512bf16" in features.split(",") and "+avx512f" in features.split(","))
    assert dot_product_pays("znver4") and dot_product_pays("znver5")
    assert not dot_product_pays("sapphirerapids") and not dot_product_pays("emeraldrapids")
    cpu = numba.config.CPU_NAME or __import__("llvmlite.binding").binding.get_host_cpu_name()
    if not has_amx():
        assert (pair_path() == "dot") == (has_dot_product() and cpu.startswith("znver"))


# ---- the MLP and the block against the reference ----------------------------------------------------


def _bf16_case(rng, m, c, d):
    r = lambda *s, scale=1.0: (rng.standard_normal(s) * scale).astype(np.float32)
    y, shortcut = r(m, c), r(m, c)
    fc1 = np.asfortranarray(layers.to_bfloat16(r(c, d, scale=c**-0.5)))    # (in, out) as the model keeps it
    fc2 = np.asfortranarray(layers.to_bfloat16(r(d, c, scale=d**-0.5)))
    return y, shortcut, fc1, r(d, scale=0.2), fc2, r(c, scale=0.2), r(c)


def _within_a_rounding(actual, expected, hidden, fc2, gamma):
    """The fast MLP against the reference: their float32 sums of fc1 run in another order, so a
    hidden activation may round to the neighbouring bfloat16 (2**-7 of it at most); bound the
    output's difference by that through fc2, plus float32's own."""
    bound = 2.0**-7 * (np.abs(hidden) @ np.abs(layers.from_bfloat16(fc2))) * np.abs(gamma)
    assert np.all(np.abs(actual - expected) <= bound + 1e-5 * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("m, c, d", [(1, 8, 32), (NR + 5, 9, 13), (200, 40, 160), (3 * NR, 24, 96)])
def test_the_bfloat16_mlp_matches_the_reference(m, c, d, kernel_threads):
    rng = np.random.default_rng(m + c)
    y, shortcut, fc1, b1, fc2, b2, gamma = _bf16_case(rng, m, c, d)
    hidden = layers.gelu(layers.linear_bfloat16(y, fc1, b1))                           # (M, D)
    expected = shortcut + gamma * layers.linear_bfloat16(hidden, fc2, b2)
    for panels_per_thread in (0, 1 << 40):  # panel by panel, and weight-stationary
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(mlp, "_PANELS_PER_THREAD", panels_per_thread)
            _within_a_rounding(mlp.mlp_residual(y, fc1, b1, fc2, b2, gamma, shortcut), expected, hidden, fc2, gamma)
    if numba.get_num_threads() > 1:  # the panels of a weight-stationary linear are packed on one thread
        assert BFLOAT16_LOOPS - {"_to_pair_panels"} <= set().union(*kernel_threads)


def test_the_bfloat16_block_matches_the_reference_block(kernel_threads):
    rng = np.random.default_rng(5)
    n, h, w, c = 2, 7, 9, 16
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    _, _, fc1, b1, fc2, b2, gamma = _bf16_case(rng, 1, c, 4 * c)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)
    for grn in (False, True):
        weights = BlockWeights(r(7, 7, c), r(c), r(c), r(c), fc1, b1, r(4 * c) if grn else None,
                               r(4 * c) if grn else None, fc2, b2, None if grn else gamma)
        expected = reference_block(x, weights, 1e-6, 1e-6)
        actual = block.convnext_block(x, weights, 1e-6, 1e-6)
        assert actual.dtype == np.float32
        assert np.abs(actual - expected).max() <= 1e-2 * np.abs(expected).max()
    if numba.get_num_threads() > 1:  # GRN's output packed into pairs for fc2
        assert "_to_pair_panels" in set().union(*kernel_threads)


# ---- the model ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def atto():
    """A re-randomised convnext_atto's weights, and float32 logits of it on random images."""
    state = numpy_state_dict(random_timm_model("convnext_atto", seed=7))
    x = random_images((8, 3, 64, 64))
    return state, x, npconvnext.create_model("convnext_atto", weights=state)(x)


LOGIT_TOL = 2e-2  # bfloat16 logits against float32's, relative to the largest logit


def test_a_bfloat16_model_is_close_to_float32_and_agrees_on_top_1(atto):
    state, x, logits32 = atto
    scale = np.abs(logits32).max()
    for backend in ("numba", "numpy"):
        model = npconvnext.create_model("convnext_atto", weights=state, dtype="bfloat16", backend=backend)
        logits = model(x)
        assert logits.dtype == np.float32 and model.dtype == "bfloat16" and str(model.dtype) == "bfloat16"
        assert np.abs(logits - logits32).max() <= LOGIT_TOL * scale
        top2 = np.sort(logits32, axis=1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 2 * LOGIT_TOL * scale  # a margin the error cannot cross
        assert clear.sum() >= 4
        np.testing.assert_array_equal(logits.argmax(1)[clear], logits32.argmax(1)[clear])
        features = model.forward_features(x)
        assert features.dtype == np.float32 and features.shape == (8, 320, 2, 2)


def test_a_bfloat16_model_is_not_the_float32_one(atto):
    # the linears really run in bfloat16: the logits move, by more than float32's noise
    state, x, logits32 = atto
    logits = npconvnext.create_model("convnext_atto", weights=state, dtype="bfloat16")(x)
    assert np.abs(logits - logits32).max() > 1e-4 * np.abs(logits32).max()


def test_the_linears_take_half_the_bytes(atto):
    state, _, _ = atto
    models = {d: npconvnext.create_model("convnext_atto", weights=state, dtype=d) for d in ("float32", "bfloat16")}
    linears = [k for k in state if ".mlp.fc" in k and k.endswith("weight")]
    assert len(linears) == 2 * 12
    for name in linears:
        assert models["bfloat16"].params[name].dtype == np.uint16
        assert models["bfloat16"].params[name].nbytes * 2 == models["float32"].params[name].nbytes
    others = [k for k in state if k not in linears]
    assert all(models["bfloat16"].params[k].dtype == np.float32 for k in others)
    # the state dict widens the bits back: the rounded values, exactly
    back = models["bfloat16"].state_dict()[linears[0]]
    np.testing.assert_array_equal(back, layers.from_bfloat16(layers.to_bfloat16(state[linears[0]])))


def test_training_a_bfloat16_model_is_refused(atto):
    state, x, _ = atto
    model = npconvnext.create_model("convnext_atto", weights=state, dtype="bfloat16")
    with pytest.raises(InputError, match="training stays float32"):
        model.trainable_params()
    from npconvnext.train import loss_and_grads

    with pytest.raises(InputError, match="create a float32 model"):
        loss_and_grads(model, x[:1], np.array([0]))


def test_a_bfloat16_file_is_used_in_place(atto, tmp_path):
    state, x, _ = atto
    path = tmp_path / "atto_bf16.safetensors"
    write_bfloat16_safetensors(path, state)
    model = npconvnext.create_model("convnext_atto", weights=path, dtype="bfloat16")
    name = "stages.1.blocks.0.mlp.fc1.weight"
    stored = model.params[name]
    assert stored.dtype == np.uint16 and mapping_of(stored) is not None and not stored.flags.writeable
    np.testing.assert_array_equal(stored.T.reshape(state[name].shape), layers.to_bfloat16(state[name]))
    assert mapping_of(bfloat16.pair_rows(stored)) is not None  # the tile reads the file's bits
    # the same weights from floats give the same model, weight for weight, in either dtype
    widened = {k: layers.from_bfloat16(layers.to_bfloat16(v)) for k, v in state.items()}
    for dtype in ("bfloat16", "float32"):
        from_file = model if dtype == "bfloat16" else npconvnext.create_model("convnext_atto", weights=path)
        again = npconvnext.create_model("convnext_atto", weights=widened, dtype=dtype)
        for k in state:
            assert from_file.params[k].dtype == again.params[k].dtype, k
            np.testing.assert_array_equal(from_file.params[k], again.params[k], err_msg=k)
        np.testing.assert_array_equal(from_file(x[:2]), again(x[:2]))


def test_the_dtype_reads_bfloat16_and_acts_as_float32():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = npconvnext.create_model("convnext_atto", dtype="bfloat16")
    assert model.dtype == "bfloat16" and model.dtype.name == "bfloat16" and repr(model.dtype) == "bfloat16"
    assert model.dtype != np.float32 and np.zeros(2).astype(model.dtype).dtype == np.float32
    assert "bfloat16" in repr(model) and "bfloat16" in model.describe()
    with pytest.raises(InputError, match="bfloat16"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        npconvnext.create_model("convnext_atto", dtype="float16")


@pytest.mark.parametrize("command", ["classify", "features", "evaluate", "benchmark"])
def test_the_commands_that_run_a_model_take_bfloat16(command):
    from npconvnext.cli.parser import build_parser

    rest = {"classify": ["x.png"], "features": ["x.png", "-o", "x.npy"], "evaluate": ["dir"]}.get(command, [])
    assert build_parser().parse_args([command, "--dtype", "bfloat16", *rest]).dtype == "bfloat16"


def test_classify_runs_a_bfloat16_model(atto, tmp_path, capsys):
    from npconvnext.cli import main

    state, _, _ = atto
    path = tmp_path / "atto_bf16.safetensors"
    write_bfloat16_safetensors(path, state)
    image = str(__import__("pathlib").Path(__file__).parent.parent / "data" / "chelsea.png")
    tops = {}
    for dtype in ("float32", "bfloat16"):
        assert main(["classify", "--weights", str(path), "--dtype", dtype, "--top-k", "1", "--json", image]) == 0
        tops[dtype] = json.loads(capsys.readouterr().out)
    assert tops["float32"].keys() == tops["bfloat16"].keys()
    for key, value in tops["float32"].items():
        if isinstance(value, list) and value and isinstance(value[0], float):  # probabilities
            np.testing.assert_allclose(tops["bfloat16"][key], value, rtol=0.05)
        else:
            assert tops["bfloat16"][key] == value, key


# ---- the widening path on AVX2 --------------------------------------------------------------------------

_AVX2_RUN = """
import sys
import numpy as np
import npconvnext
from npconvnext import layers
from npconvnext.engine import bfloat16, gemm
from npconvnext.engine.gemm_bf16 import pair_path, pair_product
from npconvnext.params import random_state_dict
from npconvnext.config import get_config

assert pair_path() == "widening", pair_path()
mr, nr = gemm.TILES[np.dtype(np.uint16)]
rng = np.random.default_rng(0)
weight = bfloat16.pair_rows(layers.to_bfloat16(rng.standard_normal((37, 2 * mr + 3))))
panel = bfloat16.pair_panels(rng.standard_normal((nr, 37)).astype(np.float32), nr)[0]
tile = np.empty((mr, nr), np.float32)
import numba
@numba.njit
def run(weight, first, rows, panel, tile):
    gemm.tile_product(weight, first, rows, panel, tile, panel.shape[1])
for first in range(0, weight.shape[0], mr):
    rows = min(mr, weight.shape[0] - first)
    run(weight, first, rows, panel, tile)
    picked = np.minimum(np.arange(first, first + mr), first + rows - 1)
    np.testing.assert_array_equal(tile, pair_product(weight[picked], panel))
model = npconvnext.create_model("convnext_atto", weights=random_state_dict(get_config("convnext_atto"), seed=2),
                                dtype="bfloat16")
x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
np.savez(sys.argv[1], tiles=np.array([mr, nr]), logits=model(x))
"""


@pytest.mark.skipif(not __import__("llvmlite.binding").binding.get_host_cpu_features().get("avx512f"),
                    reason="the host has no AVX-512: the tile tests above ran its AVX2 code already")
def test_avx2_runs_the_widening_path(tmp_path):
    import os
    import subprocess
    import sys

    from npconvnext.config import get_config
    from npconvnext.params import random_state_dict
    from tests.engine.test_isa import _avx2_features

    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES=_avx2_features(),
               NUMBA_CACHE_DIR=str(tmp_path / "jit"))
    subprocess.run([sys.executable, "-c", _AVX2_RUN, str(tmp_path / "avx2.npz")], check=True, env=env, timeout=900)
    child = dict(np.load(tmp_path / "avx2.npz"))
    assert child["tiles"].tolist() == [6, 16]  # compiled for AVX2
    state = random_state_dict(get_config("convnext_atto"), seed=2)
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    reference = npconvnext.create_model("convnext_atto", weights=state, dtype="bfloat16", backend="numpy")(x)
    assert np.abs(child["logits"] - reference).max() <= LOGIT_TOL * np.abs(reference).max()


def test_the_kernels_as_plain_python_give_the_same_model():
    """NUMBA_DISABLE_JIT=1 runs the bfloat16 kernels' bodies as Python: the same model, within
    the model tolerance of the numpy reference (V1 panel by panel, V2 through GRN)."""
    import os
    import subprocess
    import sys

    code = ("import warnings, numpy as np, npconvnext; warnings.simplefilter('ignore')\n"
            "for name in ('convnext_atto', 'convnextv2_atto'):\n"
            "    m = npconvnext.create_model(name, dtype='bfloat16')\n"
            "    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32); a = m(x)\n"
            "    m.backend = 'numpy'; b = m(x)\n"
            f"    assert np.abs(a - b).max() <= {LOGIT_TOL} * np.abs(b).max(), (name, np.abs(a - b).max())\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, NUMBA_DISABLE_JIT="1"), timeout=900)
