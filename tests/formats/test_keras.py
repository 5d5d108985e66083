"""Keras ConvNeXt files (legacy .h5, .weights.h5, .keras), written by Keras itself from
re-randomised weights, give Keras' own outputs in npconvnext, with no Keras imported by it."""

import os
import shutil

os.environ.setdefault("KERAS_BACKEND", "torch")  # this test process's Keras runs on torch

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import npconvnext  # noqa: E402
import npconvnext.convert  # noqa: E402
from npconvnext.convention import Convention  # noqa: E402

# Keras' torch backend hands numpy arrays through an old __array__ signature; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def randomise(model, seed):
    """Every variable off its init: layer scale 0.1-1 (not 1e-6), norms around 1, biases a few tenths."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        shape, name = tuple(v.shape), v.path
        if "layer_scale" in name:
            value = rng.uniform(0.1, 1.0, shape)
        elif "layernorm" in name and name.endswith("gamma"):
            value = rng.uniform(0.5, 1.5, shape)
        elif len(shape) == 1:
            value = 0.2 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        v.assign(value.astype("float32"))


def keras_outputs(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


MODELS = {
    "tiny": lambda: keras.applications.ConvNeXtTiny(weights=None, input_shape=(64, 64, 3)),
    "small-logits-no-preprocessing": lambda: keras.applications.ConvNeXtSmall(
        weights=None, input_shape=(64, 64, 3), include_preprocessing=False, classifier_activation=None, classes=10),
}


@pytest.fixture(scope="module", params=list(MODELS))
def keras_files(request, tmp_path_factory):
    model = MODELS[request.param]()
    randomise(model, seed=len(request.param))
    folder = tmp_path_factory.mktemp(request.param)
    files = {"legacy h5": folder / "model.h5", "weights.h5": folder / "model.weights.h5", "keras": folder / "model.keras"}
    model.save(files["legacy h5"])
    model.save_weights(files["weights.h5"])
    model.save(files["keras"])
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
