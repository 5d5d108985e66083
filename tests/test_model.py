"""The model's contract beyond parity: strict loading, input checks, no torch at import."""

import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

import npconvnext
from npconvnext.params import random_state_dict
from tests.support import DATA


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
    with pytest.warns(UserWarning):
        c = npconvnext.create_model("convnext_atto", seed=4)
    x = np.ones((1, 3, 32, 32), np.float32)
    np.testing.assert_array_equal(a(x), b(x))
    assert np.abs(a(x) - c(x)).max() > 0.1 * np.abs(a(x)).max()  # the seed is used


def test_state_dict_gives_back_the_weights_it_was_built_from_in_timm_layouts():
    import timm
    import torch

    state = random_state_dict(npconvnext.get_config("convnextv2_atto"), seed=1)
    model = npconvnext.create_model("convnextv2_atto", weights=state)
    out = model.state_dict()
    assert list(out) == list(state)
    for name, value in state.items():
        np.testing.assert_array_equal(out[name], value, err_msg=name)
    # and timm, given those arrays, computes what the model computes
    net = timm.create_model("convnextv2_atto", pretrained=False).eval()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in out.items()})
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model(x), expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_state_dict_returns_copies(atto_state):
    model = npconvnext.create_model("convnext_atto", weights=atto_state)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    before = model(x)
    for array in model.state_dict().values():
        array[...] = 0
    np.testing.assert_array_equal(model(x), before)


def test_params_are_read_only_and_load_state_dict_replaces_every_weight(atto_state):
    model = npconvnext.create_model("convnext_atto", weights=atto_state)
    with pytest.raises(TypeError):
        model.params["head.fc.bias"] = np.zeros(1000, np.float32)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    other = random_state_dict(npconvnext.get_config("convnext_atto"), seed=9)
    expected = npconvnext.create_model("convnext_atto", weights=other)(x)
    for name in ("stages.0.blocks.0.conv_dw.weight", "head.fc.bias"):  # a block entry and a head entry
        changed = dict(atto_state, **{name: other[name]})
        model.load_state_dict(changed)
        np.testing.assert_array_equal(model(x), npconvnext.create_model("convnext_atto", weights=changed)(x))
    model.load_state_dict(other)
    np.testing.assert_array_equal(model(x), expected)
    with pytest.raises(npconvnext.CheckpointError, match="1 missing"):
        model.load_state_dict({k: v for k, v in other.items() if k != "stem.0.bias"})


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.dtype("float64"), "float32"])
def test_dtype_may_be_a_numpy_type_or_its_name(atto_state, dtype):
    model = npconvnext.create_model("convnext_atto", weights=atto_state, dtype=dtype)
    assert model.dtype == np.dtype(dtype)
    assert model(np.zeros((1, 3, 32, 32), np.float32)).dtype == np.dtype(dtype)


@pytest.mark.parametrize("dtype", ["float16", np.int32, None, "nonsense"])
def test_other_dtypes_are_refused(atto_state, dtype):
    with pytest.raises(npconvnext.InputError, match="dtype must be"):
        npconvnext.create_model("convnext_atto", weights=atto_state, dtype=dtype)


def test_a_tagged_name_with_weights_uses_the_weights_and_downloads_nothing(atto_state, monkeypatch):
    import npconvnext.hub

    monkeypatch.setattr(npconvnext.hub, "download_weights", lambda *a, **k: pytest.fail("downloaded"))
    model = npconvnext.create_model("convnext_atto.d2_in1k", weights=atto_state)
    x = np.ones((1, 3, 32, 32), np.float32)
    np.testing.assert_array_equal(model(x), npconvnext.create_model("convnext_atto", weights=atto_state)(x))


def test_preprocess_is_the_function_and_preprocessing_the_module():
    import types

    assert callable(npconvnext.preprocess) and not isinstance(npconvnext.preprocess, types.ModuleType)
    assert isinstance(npconvnext.preprocessing, types.ModuleType)
    assert npconvnext.preprocessing.preprocess is npconvnext.preprocess


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto"])
def test_trace_has_timms_container_modules(name):
    from npconvnext.oracle import timm_trace

    state = random_state_dict(npconvnext.get_config(name), seed=2)
    model = npconvnext.create_model(name, weights=state, dtype="float64")
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64))
    trace = model.trace(x)
    containers = ["stem"] + [f"stages.{i}" for i in range(4)]
    expected = timm_trace(model, x, containers)
    assert sorted(expected) == sorted(containers)  # timm has these modules and hooked them
    for c in containers:
        np.testing.assert_allclose(trace[c], expected[c], rtol=0, atol=1e-10 * np.abs(expected[c]).max(), err_msg=c)
    features = model.forward_features(x)  # the fused engine's last stage
    np.testing.assert_allclose(trace["stages.3"], features, rtol=0, atol=1e-10 * np.abs(features).max())


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
    with pytest.raises(npconvnext.errors.InputError, match="dtype must be"):
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


def test_nhwc_models_take_channels_last_input_as_it_is(atto_state):
    from npconvnext.convention import Convention
    from npconvnext.model import ConvNeXt

    nchw = npconvnext.create_model("convnext_atto", weights=atto_state)
    nhwc = ConvNeXt(nchw.config, atto_state, convention=Convention(layout="NHWC"))
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 32)).astype(np.float32)
    np.testing.assert_array_equal(nhwc(x.transpose(0, 2, 3, 1)), nchw(x))
    assert nhwc.data_config.layout == "NHWC"
    with pytest.raises(npconvnext.InputError, match=r"\(N, H, W, 3\) \(NHWC\)"):
        nhwc(x)


def test_a_model_that_normalises_inside_takes_what_its_framework_took(atto_state):
    from npconvnext.convention import Convention
    from npconvnext.model import ConvNeXt

    timm_style = npconvnext.create_model("convnext_atto", weights=atto_state)
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    open_model_zoo_style = ConvNeXt(timm_style.config, atto_state, convention=Convention(
        channel_order="BGR", scale="255", mean=mean, std=std, source="test"))
    config = open_model_zoo_style.data_config
    assert (config.channel_order, config.scale, config.mean, config.std) == ("BGR", "255", None, None)
    photo = os.path.join(DATA, "chelsea.png")
    bgr = npconvnext.preprocess(photo, config)                         # (3, H, W) raw BGR 0-255
    assert bgr.max() > 200 and bgr.min() >= 0                          # not normalised by preprocess
    expected = timm_style(npconvnext.preprocess(photo, timm_style.data_config)[None])
    actual = open_model_zoo_style(bgr[None])
    assert np.abs(actual - expected).max() <= 1e-4 * np.abs(expected).max()


def test_models_carry_the_preprocessing_of_their_source(atto_state, tmp_path):
    tiny = random_state_dict(npconvnext.get_config("convnext_tiny"), seed=0)
    tagged = npconvnext.create_model("convnext_tiny.fb_in22k_ft_in1k_384", weights=tiny)
    assert tagged.data_config == npconvnext.data_config("convnext_tiny.fb_in22k_ft_in1k_384")
    assert (tagged.data_config.input_size, tagged.data_config.crop_mode) == ((384, 384), "squash")
    assert "convnext_tiny.fb_in22k_ft_in1k_384" in tagged.describe()

    from npconvnext.model import ConvNeXt
    from npconvnext.train.finetune import write_weights

    path = tmp_path / "ft.safetensors"
    config = npconvnext.DataConfig(input_size=(288, 288), crop_pct=1.0, crop_mode="squash")
    write_weights(str(path), ConvNeXt(npconvnext.get_config("convnext_atto"), atto_state), ("a",), config)
    from_file = npconvnext.create_model(None, weights=path)
    assert from_file.data_config == config
    assert str(path) in from_file.describe() and "288x288" in from_file.describe()
    assert npconvnext.create_model("convnext_atto", weights=atto_state).data_config == npconvnext.data_config("convnext_atto")
