"""The model's contract beyond parity: strict loading, input checks, no torch at import."""

import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

import npconvnext
from npconvnext.params import random_state_dict


@pytest.fixture(scope="module")
def atto_state():
    return random_state_dict(npconvnext.get_config("convnext_atto"), seed=0)


def test_importing_and_running_never_imports_torch():
    # nor Pillow: inference on arrays does not need it (it is imported when an image is opened)
    code = ("import sys, warnings, numpy as np, npconvnext; warnings.simplefilter('ignore');"
            "m = npconvnext.create_model('convnext_atto'); m(np.zeros((1, 3, 32, 32), np.float32));"
            "bad = [n for n in ('torch', 'timm', 'tensorflow', 'jax', 'PIL') if n in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_strict_loading_reports_every_problem_at_once(atto_state):
    state = dict(atto_state)
    del state["stages.1.blocks.0.norm.bias"]
    state["stages.9.extra"] = np.zeros(3, np.float32)
    state["head.fc.bias"] = np.zeros(999, np.float32)
    state["stem.0.bias"] = state["stem.0.bias"].astype(np.int64)
    with pytest.raises(npconvnext.CheckpointError) as err:
        npconvnext.create_model("convnext_atto", weights=state, num_classes=1000)
    message = str(err.value)
    assert "1 missing" in message and "stages.1.blocks.0.norm.bias" in message
    assert "1 unexpected" in message and "stages.9.extra" in message
    assert "head.fc.bias: got (999,), expected (1000,)" in message
    assert "stem.0.bias: dtype int64" in message


def test_linear_shaped_mlp_weights_are_refused_for_conv_mlp_variants(atto_state):
    state = dict(atto_state)
    state["stages.0.blocks.0.mlp.fc1.weight"] = state["stages.0.blocks.0.mlp.fc1.weight"][:, :, 0, 0]
    with pytest.raises(npconvnext.CheckpointError, match=r"fc1.weight: got \(160, 40\), expected \(160, 40, 1, 1\)"):
        npconvnext.create_model("convnext_atto", weights=state)


def test_num_classes_follows_the_weights(atto_state):
    state = dict(atto_state, **{"head.fc.weight": np.ones((21841, 320), np.float32),
                                "head.fc.bias": np.zeros(21841, np.float32)})
    model = npconvnext.create_model("convnext_atto", weights=state)
    assert model(np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 21841)


def test_random_weights_warn_and_are_seeded():
    with pytest.warns(UserWarning, match="random weights"):
        a = npconvnext.create_model("convnext_atto", seed=3)
    with pytest.warns(UserWarning):
        b = npconvnext.create_model("convnext_atto", seed=3)
    x = np.ones((1, 3, 32, 32), np.float32)
    np.testing.assert_array_equal(a(x), b(x))


def test_state_dict_round_trips_timm_layouts(atto_state):
    model = npconvnext.create_model("convnextv2_atto", weights=random_state_dict(npconvnext.get_config("convnextv2_atto")))
    again = npconvnext.create_model("convnextv2_atto", weights=model.state_dict())
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(again.params[name], model.params[name], err_msg=name)
    assert model.state_dict()["stem.0.weight"].shape == (40, 3, 4, 4)


@pytest.mark.parametrize("x, error", [
    (np.zeros((3, 32, 32), np.float32), "expected input of shape"),
    (np.zeros((1, 32, 32, 3), np.float32), "expected input of shape"),
    (np.zeros((1, 3, 31, 64), np.float32), "smaller than the network's total stride 32"),
    (np.zeros((1, 3, 32, 32), np.uint8), "floating-point"),
])
def test_bad_inputs_say_what_is_wrong(atto_state, x, error):
    model = npconvnext.create_model("convnext_atto", weights=atto_state)
    with pytest.raises((ValueError, TypeError), match=error):
        model(x)


def test_dtype_is_kept_end_to_end(atto_state):
    model = npconvnext.create_model("convnext_atto", weights=atto_state, dtype="float64")
    assert all(a.dtype == np.float64 for a in model.params.values())
    assert model(np.zeros((1, 3, 32, 32), np.float32)).dtype == np.float64
    with pytest.raises(ValueError, match="dtype must be"):
        npconvnext.create_model("convnext_atto", weights=atto_state, dtype="float16")


def test_weights_of_a_safetensors_file_are_used_in_place_and_a_callers_arrays_are_copied(atto_state, tmp_path):
    path = tmp_path / "atto.safetensors"
    save_file(atto_state, path)
    mapped = npconvnext.load_state_dict(path)
    fc1 = "stages.0.blocks.0.mlp.fc1.weight"
    assert not mapped[fc1].flags.writeable
    model = npconvnext.create_model("convnext_atto", weights=mapped)
    assert np.shares_memory(model.params[fc1], mapped[fc1])  # the 1x1-conv weight, not duplicated
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(model(x), npconvnext.create_model("convnext_atto", weights=atto_state)(x))

    state = {name: array.copy() for name, array in atto_state.items()}
    model = npconvnext.create_model("convnext_atto", weights=state)
    assert not any(np.shares_memory(model.params[name], state[name]) for name in state)
    before = model(x)
    for array in state.values():
        array[...] = 0  # the caller reuses its arrays: the model must not see it
    np.testing.assert_array_equal(model(x), before)
