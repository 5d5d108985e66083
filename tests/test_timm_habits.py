"""timm's habits: num_classes 0 (a headless backbone giving the pooled, normed features), a head
of another class count, reset_classifier, pretrained=True, the feature API (forward_intermediates,
features_only with feature_info), and a file of another architecture named in one line."""

import re
import warnings

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import npconvnext
from npconvnext.errors import CheckpointError, InputError
from tests.support.timm_reference import numpy_state_dict, random_images, random_timm_model, run_timm

HEAD_FC = ("head.fc.weight", "head.fc.bias")


@pytest.fixture(scope="module")
def atto():
    model = random_timm_model("convnext_atto", seed=3)
    return model, numpy_state_dict(model)


@pytest.mark.parametrize("arch,dtype", [("convnext_atto", np.float32), ("convnextv2_atto", np.float64),
                                        ("convnext_tiny", np.float32)])
def test_num_classes_0_gives_timms_features(arch, dtype, assert_matches):
    timm_model = random_timm_model(arch, seed=4, num_classes=0)
    assert not any(k.startswith("head.fc") for k in timm_model.state_dict())
    state = numpy_state_dict(timm_model)
    x = random_images((2, 3, 64, 64), dtype)
    expected = run_timm(timm_model, x)["logits"]  # timm's head with an Identity fc: pooled, normed
    for backend in ("numba", "numpy"):
        model = npconvnext.create_model(arch, weights=state, num_classes=0, dtype=dtype, backend=backend)
        assert model.config.num_classes == 0 and not any(k.startswith("head.fc") for k in model.state_dict())
        assert model(x).shape == (2, model.config.num_features)
        assert_matches(model(x), expected, f"{arch} {backend} headless")
    # a headless file (a timm backbone: no head.fc) loads as such, named or not
    for name in (arch, None):
        model = npconvnext.create_model(name, weights=state, dtype=dtype)
        assert model.config.num_classes == 0
        assert_matches(model(x), expected, f"{arch} backbone file")


def test_headless_safetensors_file_and_random_headless(tmp_path, atto, assert_matches):
    timm_model, state = atto
    path = tmp_path / "backbone.safetensors"
    save_file({k: v for k, v in state.items() if k not in HEAD_FC}, path)
    x = random_images((2, 3, 64, 64))
    model = npconvnext.create_model("convnext_atto", weights=path)
    assert_matches(model(x), run_timm(timm_model, x)["pre_logits"], "backbone file")
    with pytest.warns(UserWarning, match="random weights"):
        random = npconvnext.create_model("convnext_atto", num_classes=0)
    assert random(x).shape == (2, 320) and random.num_params() == model.num_params()


def test_num_classes_0_drops_the_files_head_quietly(atto, assert_matches):
    timm_model, state = atto
    x = random_images((2, 3, 64, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = npconvnext.create_model("convnext_atto", weights=state, num_classes=0)
    assert_matches(model(x), run_timm(timm_model, x)["pre_logits"], "head dropped")


def test_another_class_count_gives_a_fresh_seeded_head_in_one_warning(atto, assert_matches):
    timm_model, state = atto
    x = random_images((2, 3, 64, 64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = npconvnext.create_model("convnext_atto", weights=state, num_classes=10, seed=7)
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert "1000-class classifier" in str(caught[0].message) and "10 classes" in str(caught[0].message)
    assert model(x).shape == (2, 10)
    assert_matches(model.forward_head(model.forward_features(x), pre_logits=True),
                   run_timm(timm_model, x)["pre_logits"], "every other weight kept")
    new = model.state_dict()
    assert not np.any(new["head.fc.bias"]) and 0.01 < new["head.fc.weight"].std() < 0.03  # timm's init
    with pytest.warns(UserWarning):
        again = npconvnext.create_model("convnext_atto", weights=state, num_classes=10, seed=7)
    assert np.array_equal(again.state_dict()["head.fc.weight"], new["head.fc.weight"])  # seeded
    backbone = {k: v for k, v in state.items() if k not in HEAD_FC}
    with pytest.warns(UserWarning, match="no classifier: head.fc is new for 5 classes"):
        assert npconvnext.create_model("convnext_atto", weights=backbone, num_classes=5)(x).shape == (2, 5)


def test_reset_classifier_0_drops_the_head(atto, assert_matches):
    timm_model, state = atto
    x = random_images((2, 3, 64, 64))
    model = npconvnext.create_model("convnext_atto", weights=state)
    model.reset_classifier(0)
    assert model.config.num_classes == 0 and "head.fc.weight" not in model.params
    timm_model = random_timm_model("convnext_atto", seed=3)
    timm_model.reset_classifier(0)
    assert_matches(model(x), run_timm(timm_model, x)["logits"], "reset_classifier(0)")
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)


def test_pretrained_true_is_timms_default_tag(monkeypatch, atto):
    from timm.models import get_pretrained_cfg

    import npconvnext.hub

    asked = []

    def download(name, cache_dir=None):
        asked.append(name)
        raise CheckpointError("offline in this test")

    monkeypatch.setattr(npconvnext.hub, "download_weights", download)
    for arch in ("convnext_tiny", "convnextv2_atto", "convnext_xxlarge"):
        with pytest.raises(CheckpointError, match="offline in this test"):
            npconvnext.create_model(arch, pretrained=True)
        assert asked[-1] == f"{arch}.{get_pretrained_cfg(arch).tag}"
    assert asked[0] == "convnext_tiny.in12k_ft_in1k"
    with pytest.warns(UserWarning, match="random weights"):
        npconvnext.create_model("convnext_atto", pretrained=False)
    assert npconvnext.hub.default_tag("convnext_atto") == "d2_in1k"


def test_a_file_of_another_architecture_is_named_in_one_line(tmp_path, atto):
    _, state = atto
    path = tmp_path / "atto.safetensors"
    save_file(state, path)
    for name in ("convnext_femto", "convnextv2_atto"):
        with pytest.raises(CheckpointError) as caught:
            npconvnext.create_model(name, weights=path)
        message = str(caught.value)
        assert "\n" not in message and f"holds convnext_atto weights, not {name}" in message
        assert "create_model('convnext_atto'" in message and "--model convnext_atto" in message
    broken = dict(state)
    del broken["stages.0.blocks.0.mlp.fc1.bias"]
    with pytest.raises(CheckpointError, match="1 missing"):  # its own architecture: the strict list
        npconvnext.create_model("convnext_atto", weights=broken)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_intermediates_equals_timms(dtype, atto, assert_matches):
    timm_model = random_timm_model("convnext_atto", seed=3).to(torch.float64 if dtype == np.float64 else torch.float32)
    model = npconvnext.create_model("convnext_atto", weights=atto[1], dtype=dtype)
    x = random_images((2, 3, 64, 96), dtype)
    cases = [dict(), dict(indices=2), dict(indices=[0, 2]), dict(indices=(-1,), norm=True),
             dict(indices=[1], stop_early=True), dict(indices=[0, -2], intermediates_only=True),
             dict(indices=1, stop_early=True, intermediates_only=True)]
    for kwargs in cases:
        with torch.no_grad():
            expected = timm_model.forward_intermediates(torch.from_numpy(x), **kwargs)
        ours = model.forward_intermediates(x, **kwargs)
        if not kwargs.get("intermediates_only"):
            assert_matches(ours[0], expected[0].numpy(), f"{kwargs} final")
            ours, expected = ours[1], expected[1]
        assert len(ours) == len(expected), kwargs
        for a, b in zip(ours, expected):
            assert_matches(a, b.numpy(), f"{kwargs}")
    with pytest.raises(InputError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(InputError, match="out of range"):
        model.forward_intermediates(x, indices=5)


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 3), (2,)])
def test_features_only_equals_timms(out_indices, atto, assert_matches):
    import timm

    with torch.device("meta"):
        timm_features = timm.create_model("convnext_atto", features_only=True, out_indices=out_indices)
    timm_features = timm_features.to_empty(device="cpu")
    # timm's FeatureListNet flattens the first level of module names (stem.0 -> stem_0) and drops
    # the stages after the last taken
    loaded = timm_features.load_state_dict({re.sub(r"^(stem|stages)\.(\d+)", r"\1_\2", k): torch.from_numpy(v)
                                            for k, v in atto[1].items() if not k.startswith("head")}, strict=False)
    assert not loaded.missing_keys
    features = npconvnext.create_model("convnext_atto", weights=atto[1], features_only=True, out_indices=out_indices)
    assert features.feature_info.channels() == timm_features.feature_info.channels()
    assert features.feature_info.reduction() == timm_features.feature_info.reduction()
    assert features.feature_info.module_name() == timm_features.feature_info.module_name()
    x = random_images((2, 3, 64, 64))
    with torch.no_grad():
        expected = timm_features.eval()(torch.from_numpy(x))
    ours = features(x)
    assert isinstance(ours, list) and len(ours) == len(expected)
    for a, b in zip(ours, expected):
        assert_matches(a, b.numpy(), f"features_only {out_indices}")
