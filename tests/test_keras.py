"""Keras ConvNeXt files (legacy .h5, .weights.h5, .keras), written by Keras itself from
re-randomised weights, give Keras' own outputs in npconvnext, with no Keras imported by it."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # this test process's Keras runs on torch

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import npconvnext  # noqa: E402
from npconvnext.formats.keras import read_keras_h5, read_keras_zip  # noqa: E402
from npconvnext.model import ConvNeXt  # noqa: E402
from npconvnext.params import detect_architecture  # noqa: E402


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
    return request.param, files, x, keras_outputs(model, x)


@pytest.mark.parametrize("container", ["legacy h5", "weights.h5", "keras"])
def test_npconvnext_gives_keras_outputs(keras_files, container):
    name, files, x, expected = keras_files
    path = str(files[container])
    reader = read_keras_zip if container == "keras" else read_keras_h5
    state, convention = reader(path)
    config = detect_architecture(state)
    assert config.name == ("convnext_tiny" if name == "tiny" else "convnext_small")
    if container == "weights.h5" and name.startswith("small"):
        # a bare weights file cannot tell that this model has no Normalization layer and no softmax:
        # the reader assumes keras.applications' defaults, which the caller then corrects
        assert convention.outputs == "probabilities" and "weights only" in convention.source
        return
    model = ConvNeXt(config, state, dtype="float64", convention=convention)
    assert model.data_config.layout == "NHWC"
    actual = model(x)
    error = np.abs(actual - expected).max() / np.abs(expected).max()
    print(f"{name} {container}: max relative error {error:.2e} ({convention.outputs})")
    assert error <= 1e-4
    assert convention.outputs == ("probabilities" if name == "tiny" else "logits")


def test_a_keras_h5_of_another_network_is_refused(tmp_path):
    other = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="dense_a")])
    path = tmp_path / "other.weights.h5"
    other.save_weights(path)
    with pytest.raises(npconvnext.CheckpointError, match="not a Keras ConvNeXt"):
        read_keras_h5(str(path))
