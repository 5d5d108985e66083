"""keras.applications' ConvNeXts with re-randomised weights, and the Keras files they make, for
tests/formats/test_keras.py, tests/support/tf_writer.py and scripts/fuzz_readers.py. Keras is
imported only by the builders, so a TensorFlow process (tf_writer.py) and a torch one can both
use `randomise`. Run as a script, it writes Keras' three files of each model named:

    KERAS_BACKEND=torch python -m tests.support.keras_models OUT_DIR NAME ...

OUT_DIR/<name>.h5 (legacy model.save), <name>.weights.h5 (save_weights), <name>.keras (model.save).
"""

import os
import sys

import numpy as np


def randomise(model, seed, layer_scales=()):
    """Every variable off its init: layer scale 0.1-1 (not 1e-6), norms' scales around 1, biases
    a few tenths, kernels of unit fan-in variance. `layer_scales`: variables the model does not
    list as weights (the TF-Hub port's raw gamma) that are layer scales."""
    rng = np.random.default_rng(seed)
    named = {id(v): (getattr(v, "path", None) or v.name, v) for v in model.weights}  # Keras 2 has no path
    named.update({id(v): ("layer_scale", v) for v in layer_scales})
    for name, v in named.values():
        shape, name = tuple(v.shape), name.split(":")[0]
        if "layer_scale" in name:
            value = rng.uniform(0.1, 1.0, shape)
        elif name.endswith("gamma"):
            value = rng.uniform(0.5, 1.5, shape)
        elif len(shape) == 1:
            value = 0.2 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        v.assign(value.astype("float32"))


def _applications():
    import keras

    return keras.applications


def _atto(**kwargs):
    """convnext_atto's shapes in keras.applications' ConvNeXt (Keras has no atto of its own):
    the smallest ConvNeXt npconvnext knows with Keras' layers, small files for the fuzzer."""
    from keras.src.applications.convnext import ConvNeXt

    return ConvNeXt(depths=[2, 2, 6, 2], projection_dims=[40, 80, 160, 320], name="convnext_atto",
                    weights=None, input_shape=(32, 32, 3), **kwargs)


MODELS = {  # name -> a builder of the model with Keras' initial weights
    "tiny": lambda: _applications().ConvNeXtTiny(weights=None, input_shape=(64, 64, 3)),
    "small-logits-no-preprocessing": lambda: _applications().ConvNeXtSmall(
        weights=None, input_shape=(64, 64, 3), include_preprocessing=False, classifier_activation=None, classes=10),
    "atto": lambda: _atto(classes=3),
    "atto-logits-no-preprocessing": lambda: _atto(classes=5, include_preprocessing=False,
                                                  classifier_activation=None),
}
CONTAINERS = {"legacy h5": ".h5", "weights.h5": ".weights.h5", "keras": ".keras"}  # what -> file suffix


def build(name):
    """The model `name` of MODELS with its weights randomised."""
    model = MODELS[name]()
    randomise(model, seed=len(name))
    return model


def save_all(model, out_dir, name) -> dict:
    """The model in Keras' three files: {container: path}."""
    paths = {what: os.path.join(out_dir, name + suffix) for what, suffix in CONTAINERS.items()}
    model.save(paths["legacy h5"])
    model.save_weights(paths["weights.h5"])
    model.save(paths["keras"])
    return paths


if __name__ == "__main__":
    for model_name in sys.argv[2:]:
        save_all(build(model_name), sys.argv[1], model_name)
