"""npconvnext against timm on the same random-but-realistic weights and inputs.

Tolerances (see conftest.TOLERANCE): errors scaled by the reference's largest magnitude must
be <= 1e-10 in float64 (timm run in float64) and <= 1e-4 in float32, where the top-5 classes
must also come out in the same order. Every architecture timm registers is checked, logits and
every intermediate `model.trace` records: a new timm architecture fails here until it is built
or listed in NOT_BUILT with the reason.
"""

import gc

import numpy as np
import pytest
import timm
import torch

import npconvnext
from npconvnext.model import BACKENDS
from tests.support.timm_reference import numpy_state_dict, random_images, random_timm_model, run_timm

DTYPES = (np.float32, np.float64)

#: timm architectures npconvnext does not build yet, each with the reason
NOT_BUILT: dict[str, str] = {}
TIMM_ARCHITECTURES = timm.list_models("convnext*")


def top5(logits):
    return np.argsort(-logits, axis=-1)[:, :5]


def timm_references(name, seed, shape, trace=False):
    """timm's outputs (run_timm) on random images of `shape` in both dtypes, float32 first, and
    its state dict and parameter count. timm's model is dropped before npconvnext's are built:
    the widest variants hold a float64 copy of every weight on each side otherwise."""
    timm_model = random_timm_model(name, seed=seed)
    state = numpy_state_dict(timm_model)  # float32: keeps timm's float32 weights alive, nothing more
    num_params = sum(p.numel() for p in timm_model.parameters())
    references = {}
    for dtype in DTYPES:
        x = random_images(shape, dtype)
        references[dtype] = (x, run_timm(timm_model, x, record_modules=trace))
    del timm_model
    gc.collect()
    return references, state, num_params


def check_parity(name, seed, shape, assert_matches, backends=BACKENDS, trace=False):
    """All three outputs, both dtypes, every backend, and with `trace` every intermediate
    activation; returns the logits errors for the record."""
    references, state, num_params = timm_references(name, seed, shape, trace)
    errors = {}
    for dtype, (x, ref) in references.items():
        model = npconvnext.create_model(name, weights=state, dtype=np.dtype(dtype).name)
        assert model.num_params() == num_params
        for backend in backends:
            model.backend = backend
            features = model.forward_features(x)
            what = f"{name} {np.dtype(dtype).name} {backend} {shape}"
            assert_matches(features, ref["features"], f"{what} features")
            assert_matches(model.forward_head(features, pre_logits=True), ref["pre_logits"], f"{what} pre_logits")
            logits = model(x)
            relative = assert_matches(logits, ref["logits"], f"{what} logits")
            errors[what] = (relative, float(np.abs(logits.astype(np.float64) - ref["logits"]).max()))
            if dtype == np.float32:
                np.testing.assert_array_equal(top5(logits), top5(ref["logits"]), err_msg=what)
        if trace:
            check_trace(model, x, ref["modules"], assert_matches, f"{name} {np.dtype(dtype).name}")
        del model, ref
        gc.collect()
    return errors


def check_trace(model, x, timm_modules, assert_matches, what):
    """Every activation model.trace records against the output of timm's module of that name."""
    trace = model.trace(x)
    names = [n for n in trace if n != "input" and not n.endswith(".layer_scale")]
    assert not set(names) - set(timm_modules), f"{what}: timm has no module {set(names) - set(timm_modules)}"
    for n in names:
        ours, ref = trace[n], timm_modules[n]
        if ours.ndim != ref.ndim:  # pooled: (N, C, 1, 1) here where timm's pool flattens
            assert ours.size == ref.size, f"{what} {n}: shape {ours.shape}, timm's {ref.shape}"
            ours = ours.reshape(ref.shape)
        assert ours.shape == ref.shape, f"{what} {n}: shape {ours.shape}, timm's {ref.shape}"
        assert_matches(ours, ref, f"{what} trace {n}")


def test_npconvnext_builds_every_timm_architecture():
    assert sorted(set(TIMM_ARCHITECTURES) - set(NOT_BUILT)) == sorted(npconvnext.list_models())
    assert set(NOT_BUILT) <= set(TIMM_ARCHITECTURES), "NOT_BUILT names an architecture timm no longer has"


def _input_side(name):
    # the widest variants at the smallest input timm accepts, to keep the suite fast
    return 32 if npconvnext.get_config(name).dims[0] >= 192 else 64


@pytest.mark.parametrize("name", TIMM_ARCHITECTURES)
def test_every_variant_matches_timm(name, assert_matches):
    if name in NOT_BUILT:
        pytest.skip(f"not built yet: {NOT_BUILT[name]}")
    side = _input_side(name)
    errors = check_parity(name, 1, (2, 3, side, side), assert_matches, trace=True)
    for what, (relative, absolute) in errors.items():
        print(f"PARITY {what}: relative {relative:.3e}, abs {absolute:.3e}")


def test_convnext_tiny_headline(assert_matches):
    """The headline model at its native resolution, batch 1, both dtypes."""
    with torch.device("meta"):  # check_parity holds npconvnext's count to timm's
        assert sum(p.numel() for p in timm.create_model("convnext_tiny").parameters()) == 28_589_128
    errors = check_parity("convnext_tiny", 2, (1, 3, 224, 224), assert_matches)
    for what, (relative, absolute) in errors.items():
        print(f"PARITY {what}: relative {relative:.3e}, abs {absolute:.3e}")


@pytest.mark.parametrize("name", ["convnext_atto", "convnext_tiny", "convnextv2_atto"])
@pytest.mark.parametrize("shape", [(1, 3, 97, 161), (3, 3, 64, 250), (2, 3, 33, 47)],
                         ids=["b1-97x161", "b3-64x250", "b2-33x47"])
def test_odd_sizes_and_batches(name, shape, assert_matches):
    """Non-square inputs, sides that are not multiples of 32 (timm's convs drop the remainder)."""
    check_parity(name, 3, shape, assert_matches)


def test_batch_items_are_independent():
    model = npconvnext.create_model("convnext_atto", weights=numpy_state_dict(random_timm_model("convnext_atto")),
                                    dtype="float64")
    x = random_images((3, 3, 64, 64), np.float64)
    batched = model(x)
    for i in range(3):
        np.testing.assert_allclose(model(x[i : i + 1])[0], batched[i], rtol=0, atol=1e-12)


def test_random_weights_are_not_identity_blocks():
    """The re-randomised timm model is one where a wrong block would show: dropping any
    block's residual branch changes the logits by far more than the tolerance."""
    timm_model = random_timm_model("convnext_atto", seed=4)
    state = numpy_state_dict(timm_model)
    x = random_images((1, 3, 64, 64), np.float64)
    full = npconvnext.create_model("convnext_atto", weights=state, dtype="float64")(x)
    for block in ("stages.0.blocks.0", "stages.3.blocks.1"):
        broken = dict(state, **{f"{block}.gamma": np.zeros_like(state[f"{block}.gamma"])})
        out = npconvnext.create_model("convnext_atto", weights=broken, dtype="float64")(x)
        assert np.abs(out - full).max() > 1e-3 * np.abs(full).max(), block
