"""Every checkpoint source loads and gives timm's numbers; every bad input gets a clear error."""

import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import npconvnext
from npconvnext.errors import CheckpointError
from npconvnext.params import detect_architecture
from npconvnext.convert import convert
from tests.support.timm_reference import numpy_state_dict, random_images, random_timm_model, run_timm


@pytest.fixture(scope="module")
def atto():
    model = random_timm_model("convnext_atto", seed=5)
    return model, numpy_state_dict(model)


@pytest.fixture(scope="module")
def v2_atto():
    model = random_timm_model("convnextv2_atto", seed=6)
    return model, numpy_state_dict(model)


def assert_loads_like_timm(path, timm_model, assert_matches, arch=None):
    x = random_images((2, 3, 64, 64), np.float64)
    expected = run_timm(timm_model, x)["logits"]
    model = npconvnext.create_model(arch, weights=path, dtype="float64")
    assert_matches(model(x), expected, str(path))
    return model


def official_state(timm_state):
    """The facebookresearch/ConvNeXt naming, written out by hand: linears (out, in), GRN (1, 1, 1, C)."""
    out = {}
    for name, value in timm_state.items():
        parts = name.split(".")
        if parts[0] == "stem":
            new = f"downsample_layers.0.{parts[1]}.{parts[2]}"
        elif parts[0] == "head":
            new = ("norm." if parts[1] == "norm" else "head.") + parts[2]
        elif parts[2] == "downsample":
            new = f"downsample_layers.{parts[1]}.{parts[3]}.{parts[4]}"
        else:
            i, j, rest = parts[1], parts[3], parts[4:]
            leaf = {"conv_dw": "dwconv", "norm": "norm", "gamma": "gamma"}.get(rest[0])
            if rest[0] == "mlp":
                leaf = {"fc1": "pwconv1", "fc2": "pwconv2"}.get(rest[1]) or {"weight": "grn.gamma", "bias": "grn.beta"}[rest[2]]
                rest = rest[2:] if rest[1] != "grn" else []
                if value.ndim == 4:
                    value = value[:, :, 0, 0]
                if leaf.startswith("grn"):
                    value = value.reshape(1, 1, 1, -1)
            else:
                rest = rest[1:]
            new = ".".join([f"stages.{i}.{j}.{leaf}", *rest])
        out[new] = torch.from_numpy(np.ascontiguousarray(value))
    return out


def test_timm_torch_save(tmp_path, atto, assert_matches):
    model, state = atto
    path = tmp_path / "pytorch_model.bin"
    torch.save(model.state_dict(), path)
    assert_loads_like_timm(path, model, assert_matches, arch="convnext_atto")


def test_timm_safetensors_and_half_precision(tmp_path, atto, assert_matches):
    model, state = atto
    save_file(state, tmp_path / "model.safetensors")
    assert_loads_like_timm(tmp_path / "model.safetensors", model, assert_matches)
    for dtype in (torch.float16, torch.bfloat16):  # stored narrow, widened exactly on load
        torch.save({k: v.to(dtype) for k, v in model.state_dict().items()}, tmp_path / "narrow.pth")
        loaded = npconvnext.load_state_dict(tmp_path / "narrow.pth")
        expected = model.state_dict()["stem.0.weight"].to(dtype).float().numpy()
        np.testing.assert_array_equal(loaded["stem.0.weight"].astype(np.float32), expected)


@pytest.mark.parametrize("which", ["atto", "v2_atto"])
def test_official_checkpoint(tmp_path, which, request, assert_matches):
    model, state = request.getfixturevalue(which)
    path = tmp_path / "convnext_official_ema.pth"
    torch.save({"model": official_state(state)}, path)
    assert_loads_like_timm(path, model, assert_matches)  # architecture read off the shapes


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_transformers_save_pretrained(tmp_path, version, safe, assert_matches):
    import transformers as tr

    cfg_cls, model_cls = ((tr.ConvNextConfig, tr.ConvNextForImageClassification) if version == 1
                          else (tr.ConvNextV2Config, tr.ConvNextV2ForImageClassification))
    # transformers' final LayerNorm defaults to eps 1e-12 where timm and the paper use 1e-6: set
    # timm's, so that float64 can hold both to 1e-10
    config = cfg_cls(depths=[2, 2, 6, 2], hidden_sizes=[40, 80, 160, 320], num_labels=1000, layer_norm_eps=1e-6)
    hf = model_cls(config).eval()
    gen = torch.Generator().manual_seed(version)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=gen) if "layer_scale" in name or "layernorm.weight" in name
                    else torch.randn(p.shape, generator=gen) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.2))
    hf.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    if not safe:  # transformers 5 writes only safetensors; older ones wrote torch.save'd pytorch_model.bin
        weights = tmp_path / "pytorch_model.bin"
        torch.save(hf.state_dict(), weights)
    x = random_images((2, 3, 64, 64), np.float64)
    with torch.no_grad():
        expected = hf.double()(torch.from_numpy(x)).logits.numpy()
    model = npconvnext.create_model(None, weights=weights, dtype="float64")
    assert model.config.name == ("convnext_atto" if version == 1 else "convnextv2_atto")
    assert_matches(model(x), expected, str(weights))


def test_detect_architecture_every_variant():
    from npconvnext.params import expected_shapes

    for name in npconvnext.list_models():
        shapes = expected_shapes(npconvnext.get_config(name))
        fake = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
        assert detect_architecture(fake).name == name


# ---- bad input ----------------------------------------------------------------------------------


def safetensors_bytes(header, body=b""):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.parametrize("content, message", [
    (b"\x05\x00", "not a weight file npconvnext reads"),
    (struct.pack("<Q", 1 << 40) + b"{}", "header length"),
    (safetensors_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8), "outside the"),
    (safetensors_bytes({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16), "needs 12"),
    (safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "overlap"),
    (struct.pack("<Q", 5) + b"{nope", "not valid JSON"),
    (b"PK\x03\x04garbage", "corrupted or truncated PyTorch"),
    (b"\x80\x02legacy", "legacy"),
    (b"hello world", "not a weight file npconvnext reads"),
])
def test_bad_files_name_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as err:
        npconvnext.load_state_dict(path)
    assert str(path) in str(err.value)


def test_truncated_real_files(tmp_path, atto):
    model, state = atto
    torch.save(model.state_dict(), tmp_path / "full.pth")
    save_file(state, tmp_path / "full.safetensors")
    for name in ("full.pth", "full.safetensors"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / "cut").write_bytes(data[: len(data) // 2])
        # the message must name the problem; the file's name alone would match "cut"
        with pytest.raises(CheckpointError, match=r"truncated") as err:
            npconvnext.load_state_dict(tmp_path / "cut")
        assert str(tmp_path / "cut") in str(err.value)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_asking_for_os_system_is_refused_and_nothing_runs(tmp_path, atto):
    model, _ = atto
    good = tmp_path / "good.pth"
    torch.save(model.state_dict(), good)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("data.pkl"):
                data = pickle.dumps({"stem.0.weight": _Evil(marker)}, protocol=2)
            dst.writestr(item, data)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle global (posix|os)\.system"):
        npconvnext.load_state_dict(evil)
    assert not marker.exists()


def test_wrong_architecture_names_the_files_architecture(tmp_path, atto):
    _, state = atto
    save_file(state, tmp_path / "atto.safetensors")
    with pytest.raises(CheckpointError, match=r"atto\.safetensors holds convnext_atto weights, not convnext_tiny: "
                                              r"load it with create_model\('convnext_atto'"):
        npconvnext.create_model("convnext_tiny", weights=tmp_path / "atto.safetensors")


def test_timm_names_missing_the_stem_report_the_missing_key(tmp_path, atto):
    _, state = atto
    cut = {k: v for k, v in state.items() if k != "stem.0.weight"}
    save_file(cut, tmp_path / "no_stem.safetensors")
    for weights in (cut, tmp_path / "no_stem.safetensors"):
        with pytest.raises(CheckpointError, match=r"(?s)1 missing:\s+stem\.0\.weight"):
            npconvnext.create_model(None, weights=weights)


def test_nonfinite_weights_are_refused_or_warned(tmp_path, atto):
    _, state = atto
    bad = dict(state, **{"head.fc.bias": np.full(1000, np.nan, np.float32)})
    save_file(bad, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match="NaN or Inf: head.fc.bias"):
        npconvnext.load_state_dict(tmp_path / "nan.safetensors")
    with pytest.warns(UserWarning, match="NaN or Inf"):
        npconvnext.load_state_dict(tmp_path / "nan.safetensors", nonfinite="warn")


def test_directory_and_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        npconvnext.load_state_dict(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        npconvnext.load_state_dict(tmp_path / "nope.safetensors")
