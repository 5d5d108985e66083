"""Keras ConvNeXt files (legacy .h5, .weights.h5, .keras), written by Keras itself from
re-randomised weights, give Keras' own outputs in npconvnext, with no Keras imported by it."""

import os
import shutil
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")  # this test process's Keras runs on torch

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import npconvnext  # noqa: E402
import npconvnext.convert  # noqa: E402
from npconvnext.convention import Convention  # noqa: E402
from tests.support.keras_models import build, save_all  # noqa: E402

# Keras' torch backend hands numpy arrays through an old __array__ signature; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def keras_outputs(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


@pytest.fixture(scope="module", params=["tiny", "small-logits-no-preprocessing"])
def keras_files(request, tmp_path_factory):
    model = build(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    files = {what: Path(p) for what, p in save_all(model, folder, "model").items()}
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    if request.param.startswith("small"):
        x = (x - 128) / 64  # no Normalization layer: the caller normalises
    yield request.param, files, x, keras_outputs(model, x)
    shutil.rmtree(folder)  # each model's three files take hundreds of megabytes


@pytest.mark.parametrize("container", ["legacy h5", "weights.h5", "keras"])
def test_npconvnext_gives_keras_outputs(keras_files, container):
    name, files, x, expected = keras_files
    path = files[container]
    override = None
    if container == "weights.h5" and name.startswith("small"):
        # a bare weights file cannot tell that this model has no Normalization layer and no
        # softmax: the reader assumes keras.applications' defaults, and the caller says otherwise
        assumed = npconvnext.formats.convention_of(path)
        assert assumed.outputs == "probabilities" and "weights only" in assumed.source
        override = Convention(layout="NHWC", source="the caller")
    model = npconvnext.create_model(None, weights=path, dtype="float64", convention_override=override)
    assert model.config.name == ("convnext_tiny" if name == "tiny" else "convnext_small")
    assert model.data_config.layout == "NHWC" and "keras" in model.describe()
    actual = model(x)
    error = np.abs(actual - expected).max() / np.abs(expected).max()
    print(f"{name} {container}: max relative error {error:.2e} ({model.convention.outputs})")
    assert error <= 1e-4
    assert model.convention.outputs == ("probabilities" if name == "tiny" else "logits")


def test_keras_files_convert_to_timm_safetensors(keras_files, tmp_path):
    import timm
    import torch

    # the converted file holds the network; Keras' normalisation and softmax are done here, as
    # timm users do them outside the model
    name, files, x, expected = keras_files
    out = tmp_path / "converted.safetensors"
    metadata = npconvnext.convert.convert(files["keras"], out)
    arch, classes = metadata["architecture"], int(metadata["num_classes"])
    net = timm.create_model(arch, pretrained=True, num_classes=classes,
                            pretrained_cfg_overlay=dict(file=str(out), num_classes=classes)).eval()
    convention = npconvnext.formats.convention_of(files["keras"])
    if convention.normalises_inside:
        x = (x - np.float32(convention.mean)) / np.float32(convention.std)
    with torch.no_grad():
        outputs = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    if convention.outputs == "probabilities":
        outputs = np.exp(outputs - outputs.max(1, keepdims=True))
        outputs /= outputs.sum(1, keepdims=True)
    assert np.abs(outputs - expected).max() <= 1e-4 * np.abs(expected).max()


def test_a_keras_h5_of_another_network_is_refused(tmp_path):
    other = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="dense_a")])
    path = tmp_path / "other.weights.h5"
    other.save_weights(path)
    with pytest.raises(npconvnext.CheckpointError, match="not a Keras ConvNeXt"):
        npconvnext.create_model(None, weights=path)


def test_broken_keras_files_name_the_file_and_the_problem(keras_files, tmp_path):
    _, files, _, _ = keras_files
    data = files["legacy h5"].read_bytes()
    cases = {"truncated.h5": data[: len(data) // 3], "garbage.h5": data[:8] + b"\x00" * 4096,
             "no-weights.keras": _zip({"config.json": b"{}"}), "bad-config.keras": _zip(
                 {"config.json": b"{not json", "model.weights.h5": files["weights.h5"].read_bytes()})}
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(npconvnext.CheckpointError, match=str(path)):
            model = npconvnext.create_model(None, weights=path)
            model(np.zeros((1, 64, 64, 3), np.float32))


def _zip(members):
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def test_fine_tuning_from_a_keras_file_trains_it_as_a_timm_model(keras_files, tmp_path):
    from PIL import Image

    from npconvnext.train.finetune import Recipe, finetune

    _, files, _, _ = keras_files
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        os.makedirs(tmp_path / "data" / label)
        for k in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "data" / label / f"{k}.png")
    out = tmp_path / "out.safetensors"
    reports = finetune(str(tmp_path / "data"), str(out), weights=str(files["keras"]), model_name=None,
                       recipe=Recipe(epochs=1, batch_size=4, img_size=32, val_split=0.25, drop_path_rate=0.0))
    assert reports[0].val_top1 is not None
    model = npconvnext.create_model(None, weights=out)
    assert model.convention == npconvnext.Convention() and model.class_names == ("a", "b")


# ---- hostile Keras files, built with h5py and zipfile (issue 25) ---------------------------------

import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import zipfile  # noqa: E402

import h5py  # noqa: E402

from npconvnext.config import get_config  # noqa: E402
from npconvnext.params import expected_shapes  # noqa: E402
from tests.formats.test_hostile_weights import read_in_child  # noqa: E402

_TOP = {"stem.0": "stem_conv", "stem.1": "stem_layernorm", "head.norm": "head_layernorm", "head.fc": "head_dense"}
_BLOCK = {"conv_dw": "depthwise_conv", "norm": "layernorm", "mlp.fc1": "pointwise_conv_1",
          "mlp.fc2": "pointwise_conv_2", "gamma": "layer_scale"}


def keras_weight(name, shape, model="convnext_atto"):
    """(Keras layer, weight name, Keras shape) of a timm parameter, as keras.applications names it."""
    module, leaf = (name, "") if name.endswith(".gamma") else name.rsplit(".", 1)
    block = re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", module)
    down = re.fullmatch(r"stages\.(\d+)\.downsample\.(\d)", module)
    if block:
        layer = f"stage_{block[1]}_block_{block[2]}_{_BLOCK[block[3]]}"
    elif down:
        layer = f"downsampling_{('layernorm', 'conv')[int(down[2])]}_{int(down[1]) - 1}"
    else:
        layer = _TOP[module]
    conv = layer.endswith(("conv", "_1", "_2", "dense"))
    weight = {"": "Variable", "weight": "kernel" if conv else "gamma", "bias": "bias" if conv else "beta"}[leaf]
    if leaf == "weight" and ("fc" in module or module == "head.fc"):
        shape = (shape[1], shape[0])  # dense (in, out)
    elif leaf == "weight" and len(shape) == 4:
        shape = (shape[2], shape[3], shape[1], shape[0])  # (kh, kw, in, out)
    return f"{model}_{layer}", f"{weight}:0", shape


def write_keras_h5(target, hostile=None):
    """A legacy Keras .h5 of convnext_atto (every weight 0.01); `hostile(group, name, shape)`
    may write one weight itself (and return True)."""
    with h5py.File(target, "w") as f:
        layers = {}
        for name, shape in expected_shapes(get_config("convnext_atto")).items():
            layer, weight, shape = keras_weight(name, shape)
            layers.setdefault(layer, []).append((f"{layer}/{weight}", shape))
        f.attrs["layer_names"] = [layer.encode() for layer in layers]
        for layer, weights in layers.items():
            group = f.create_group(layer)
            group.attrs["weight_names"] = [w.encode() for w, _ in weights]
            for weight, shape in weights:
                if not (hostile and hostile(group, weight, shape)):
                    group.create_dataset(weight, data=np.full(shape, 0.01, np.float32))


def _hostile_h5(tmp_path, hostile, name="hostile.h5"):
    path = tmp_path / name
    write_keras_h5(path, hostile)
    return path


def _one(weight_name, make):
    """A hostile writer that makes the weight whose name ends with `weight_name` by `make(group, name, shape)`."""

    def hostile(group, name, shape):
        if not name.endswith(weight_name):
            return False
        make(group, name, shape)
        return True
    return hostile


def test_a_clean_synthetic_keras_h5_loads(tmp_path):
    path = _hostile_h5(tmp_path, None, "clean.h5")
    state = npconvnext.load_state_dict(path)
    assert state["stages.3.blocks.1.mlp.fc2.weight"].shape == (320, 1280, 1, 1)
    assert npconvnext.create_model(None, weights=path).config.name == "convnext_atto"


_HEAD = "convnext_atto_head_dense/kernel:0"
_FC1 = "convnext_atto_stage_2_block_5_pointwise_conv_1/kernel:0"


@pytest.mark.parametrize("make, match", [
    # declares 13 GB of never-written chunks: refused by the bound, not read
    (_one("stem_conv/kernel:0", lambda g, n, s: g.create_dataset(n, (4, 4, 3, 1 << 26), "f4", chunks=(4, 4, 3, 64))),
     "not a float tensor a ConvNeXt could hold"),
    # 336 MB declared where the architecture has 0.1 MB: refused before anything is read
    (_one(_FC1, lambda g, n, s: g.create_dataset(n, (160, 1 << 19), "f4", chunks=(16, 4096))),
     r"convnext_atto has \(640, 160, 1, 1\)"),
    # the right shape, its chunks never written: it would load as the fill value
    (_one(_HEAD, lambda g, n, s: g.create_dataset(n, s, "f4", chunks=(32, 100), fillvalue=0.5)), "never written"),
    # contiguous storage never allocated
    (_one(_HEAD, lambda g, n, s: g.create_dataset(n, s, "f4")), "stores 0 of its 1280000 bytes"),
])
def test_keras_h5_datasets_are_checked_before_they_are_read(tmp_path, make, match):
    path = _hostile_h5(tmp_path, make)
    assert path.stat().st_size < 20 << 20
    result = read_in_child(path, budget=256 << 20)
    assert result["outcome"] == "CheckpointError" and str(path) in result["message"], result
    assert re.search(match, result["message"]), result["message"]
    assert result["grew_mb"] < 128 and result["seconds"] < 10, result


def _external(tmp_path):
    raw = tmp_path / "other-file.bin"
    raw.write_bytes(np.full(320 * 1000, 0.25, np.float32).tobytes())
    return lambda g, n, s: g.create_dataset(n, s, "f4", external=[(str(raw), 0, 320 * 1000 * 4)])


def _virtual(tmp_path):
    def make(group, name, shape):
        layout = h5py.VirtualLayout(shape, "f4")
        layout[:] = h5py.VirtualSource(str(tmp_path / "missing.h5"), "data", shape)
        group.create_virtual_dataset(name, layout, fillvalue=0)
    return make


def _soft(tmp_path):
    def make(group, name, shape):
        group.file.create_dataset("elsewhere", data=np.full(shape, 0.25, np.float32))
        group[name] = h5py.SoftLink("/elsewhere")
    return make


def _external_link(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as other:
        other.create_dataset("data", data=np.full((320, 1000), 0.25, np.float32))
    return lambda g, n, s: g.__setitem__(n, h5py.ExternalLink(str(tmp_path / "other.h5"), "/data"))


@pytest.mark.parametrize("make, match", [(_external, "external storage"), (_virtual, "virtual dataset"),
                                         (_soft, "is a soft link"), (_external_link, "is an external link")])
def test_keras_h5_weights_that_read_other_files_are_refused(tmp_path, make, match):
    path = _hostile_h5(tmp_path, _one(_HEAD, make(tmp_path)))
    with pytest.raises(npconvnext.CheckpointError, match=match) as error:
        npconvnext.load_state_dict(path)
    assert str(path) in str(error.value)


def keras_zip(weights: bytes, config: dict | None = None, compression=zipfile.ZIP_STORED) -> bytes:
    """A .keras archive as Keras writes one: metadata.json, config.json, model.weights.h5."""
    return _zip_in_order({"metadata.json": b"{}", "config.json": json.dumps(config or {}).encode(),
                          "model.weights.h5": weights}, compression)


def _zip_in_order(members, compression):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def test_a_keras_zip_bomb_is_decompressed_only_up_to_the_bound(tmp_path, monkeypatch):
    from npconvnext.formats import keras as keras_format

    bound = 1 << 20
    monkeypatch.setattr(keras_format, "MAX_WEIGHTS_BYTES", bound, raising=False)
    read = []
    original = zipfile.ZipExtFile.read
    monkeypatch.setattr(zipfile.ZipExtFile, "read", lambda self, n=-1: read.append(len(r := original(self, n))) or r)
    path = tmp_path / "bomb.keras"
    path.write_bytes(keras_zip(HDF5_BYTES + b"\0" * (64 << 20), compression=zipfile.ZIP_DEFLATED))
    assert path.stat().st_size < 1 << 20
    with pytest.raises(npconvnext.CheckpointError, match=f"{path}: .*more than (the largest ConvNeXt's )?{bound}"):
        npconvnext.load_state_dict(path)
    assert sum(read) <= 3 * bound  # never decompressed much past the bound (the member holds 64 MB)


HDF5_BYTES = b"\x89HDF\r\n\x1a\n"


def _normalization_config(mean, variance):
    return {"config": {"layers": [
        {"class_name": "Normalization", "name": "convnext_atto_prestem_normalization",
         "config": {"mean": mean, "variance": variance}},
        {"class_name": "Dense", "name": "convnext_atto_head_dense", "config": {"activation": "softmax"}}]}}


@pytest.mark.parametrize("mean, variance", [([float("nan")] * 3, [1.0] * 3), ([1.0] * 3, [float("inf")] * 3),
                                            ([1.0, float("-inf"), 1.0], [1.0] * 3)])
def test_nonfinite_normalization_in_a_keras_config_is_refused(tmp_path, mean, variance):
    clean = _hostile_h5(tmp_path, None, "weights.h5").read_bytes()
    good = tmp_path / "good.keras"
    good.write_bytes(keras_zip(clean, _normalization_config([1.0, 2.0, 3.0], [4.0] * 3)))
    assert npconvnext.formats.convention_of(good).mean == (1.0, 2.0, 3.0)
    path = tmp_path / "nonfinite.keras"
    path.write_bytes(keras_zip(clean, _normalization_config(mean, variance)))
    with pytest.raises(npconvnext.CheckpointError, match=f"{path}: .*NaN or Inf"):
        npconvnext.create_model(None, weights=path)


def test_a_truncated_keras_file_is_reported_as_keras(tmp_path):
    clean = _hostile_h5(tmp_path, None, "weights.h5").read_bytes()
    data = keras_zip(clean, _normalization_config([1.0] * 3, [1.0] * 3))
    path = tmp_path / "truncated.keras"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(npconvnext.CheckpointError, match=f"{path}: truncated or corrupted Keras .keras file") as error:
        npconvnext.load_state_dict(path)
    assert "PyTorch" not in str(error.value)


def test_a_keras_file_whose_classifier_lost_its_weights_is_refused(tmp_path):
    # keras.applications' head has its layer norm and its dense layer, or neither (include_top):
    # a norm without the dense lost the classifier's weights, and must not load as a backbone
    path = _hostile_h5(tmp_path, None, "lost-head.h5")
    with h5py.File(path, "r+") as f:
        del f["convnext_atto_head_dense"].attrs["weight_names"]
    with pytest.raises(npconvnext.CheckpointError, match=f"{path}: .*head_dense"):
        npconvnext.load_state_dict(path)


def test_a_keras_file_without_its_weights_member_is_reported_as_keras(tmp_path):
    # Keras' metadata.json and config.json say Keras: the file is not called a PyTorch zip
    path = tmp_path / "no-weights.keras"
    path.write_bytes(_zip_in_order({"metadata.json": b"{}", "config.json": b"{}"}, zipfile.ZIP_STORED))
    with pytest.raises(npconvnext.CheckpointError, match=f"{path}: .keras archive without model.weights.h5"):
        npconvnext.load_state_dict(path)


@pytest.mark.parametrize("config, match", [
    (b"[" * 100_000 + b"]" * 100_000, "config.json nests too deeply to be a Keras model's config"),
    (b"{not json", "config.json is not valid JSON"),
])
def test_a_keras_config_that_is_not_json_says_so(tmp_path, config, match):
    # json's parser recurses per level: a deep config must be our error, not a RecursionError
    clean = _hostile_h5(tmp_path, None, "weights.h5").read_bytes()
    path = tmp_path / "config.keras"
    path.write_bytes(_zip_in_order({"metadata.json": b"{}", "config.json": config, "model.weights.h5": clean},
                                   zipfile.ZIP_STORED))
    with pytest.raises(npconvnext.CheckpointError, match=f"{path}: {match}"):
        npconvnext.load_state_dict(path)
