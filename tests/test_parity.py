"""npconvnext against timm on the same random-but-realistic weights and inputs.

Tolerances (see conftest.TOLERANCE): errors scaled by the reference's largest magnitude must
be <= 1e-10 in float64 (timm run in float64) and <= 1e-4 in float32, where the top-5 classes
must also come out in the same order.
"""

import gc

import numpy as np
import pytest

import npconvnext
from npconvnext.model import BACKENDS
from tests.support.timm_reference import numpy_state_dict, random_images, random_timm_model, run_timm

DTYPES = (np.float32, np.float64)


def top5(logits):
    return np.argsort(-logits, axis=-1)[:, :5]


def check_parity(timm_model, state, shape, assert_matches, backends=BACKENDS, name=""):
    """All three outputs, both dtypes, every backend; returns the logits errors for the record."""
    errors = {}
    for dtype in DTYPES:
        x = random_images(shape, dtype)
        ref = run_timm(timm_model, x)
        model = npconvnext.create_model(name, weights=state, dtype=np.dtype(dtype).name)
        if dtype == np.float32:
            assert model.num_params() == sum(p.numel() for p in timm_model.parameters())
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
        del model, ref
        gc.collect()
    return errors


def _input_side(name):
    # the widest variants at the smallest input timm accepts, to keep the suite fast
    return 32 if npconvnext.get_config(name).dims[0] >= 192 else 64


@pytest.mark.parametrize("name", npconvnext.list_models())
def test_every_variant_matches_timm(name, assert_matches):
    timm_model = random_timm_model(name, seed=1)
    state = numpy_state_dict(timm_model)
    side = _input_side(name)
    errors = check_parity(timm_model, state, (2, 3, side, side), assert_matches, name=name)
    for what, (relative, absolute) in errors.items():
        print(f"PARITY {what}: relative {relative:.3e}, abs {absolute:.3e}")


def test_convnext_tiny_headline(assert_matches):
    """The headline model at its native resolution, batch 1, both dtypes."""
    timm_model = random_timm_model("convnext_tiny", seed=2)
    state = numpy_state_dict(timm_model)
    assert npconvnext.create_model("convnext_tiny", weights=state).num_params() == 28_589_128
    errors = check_parity(timm_model, state, (1, 3, 224, 224), assert_matches, name="convnext_tiny")
    for what, (relative, absolute) in errors.items():
        print(f"PARITY {what}: relative {relative:.3e}, abs {absolute:.3e}")


@pytest.mark.parametrize("name", ["convnext_atto", "convnext_tiny", "convnextv2_atto"])
@pytest.mark.parametrize("shape", [(1, 3, 97, 161), (3, 3, 64, 250), (2, 3, 33, 47)],
                         ids=["b1-97x161", "b3-64x250", "b2-33x47"])
def test_odd_sizes_and_batches(name, shape, assert_matches):
    """Non-square inputs, sides that are not multiples of 32 (timm's convs drop the remainder)."""
    timm_model = random_timm_model(name, seed=3)
    check_parity(timm_model, numpy_state_dict(timm_model), shape, assert_matches, name=name)


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
