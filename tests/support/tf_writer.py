"""Write TensorFlow SavedModels of re-randomised ConvNeXts, and TensorFlow's own outputs, for
tests/formats/test_savedmodel.py. Run in a subprocess of its own (TensorFlow and OpenVINO crash in one
process, and the test process imports Keras on torch):

    python tests/support/tf_writer.py OUT_DIR [MODEL ...]

For each model, OUT_DIR/<model>/ holds the SavedModel (saved_model.pb, variables/) and
OUT_DIR/<model>.npz the inputs `x` and TensorFlow's outputs `y` for them.

Two layouts: keras.applications' ConvNeXt, and the TF-Hub ConvNeXt port (sayakpaul/ConvNeXt-TF,
models/convnext_tf.py), rebuilt here with the same layer names and variable structure: a `stem`
Sequential (conv, layer norm), `downsampling_block_i` Sequentials (layer norm, conv),
`convnext_stage_i` Sequentials of `convnext_block_i_j` blocks, each a model holding a depthwise
conv, a layer norm, two dense layers and a raw tf.Variable `gamma`, then global pooling, an
unnamed layer norm and a dense `classification_head` giving logits (left out in TF-Hub's
feature-vector twins, which give the normed, pooled features).
"""

import os
import sys

os.environ["KERAS_BACKEND"] = "tensorflow"  # this process's Keras runs on TensorFlow
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

try:
    import tensorflow as tf
except ImportError:
    sys.exit(3)  # NO_TENSORFLOW in tests/formats/test_savedmodel.py
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras_models import randomise  # noqa: E402  (beside this script)

SIZE = 64  # input pixels: small, to keep the test fast


def hub_port(depths, dims, num_classes, name, k=keras):
    """The TF-Hub port's layout (see the module docstring), built with Keras module `k`: Keras 3,
    or tf_keras (Keras 2, with which the TF-Hub modules were written)."""

    class Block(k.Model):
        """The port's ConvNeXt block: depthwise conv, layer norm, two dense layers, gamma."""

        def __init__(self, dim, **kwargs):
            super().__init__(**kwargs)
            self.gamma = tf.Variable(1e-6 * tf.ones((dim,)))  # the port's raw variable, no Keras name
            self.dw_conv_1 = k.layers.Conv2D(filters=dim, kernel_size=7, padding="same", groups=dim)
            self.layer_norm = k.layers.LayerNormalization(epsilon=1e-6)
            self.pw_conv_1 = k.layers.Dense(4 * dim)
            self.act_fn = k.layers.Activation("gelu")
            self.pw_conv_2 = k.layers.Dense(dim)

        def call(self, inputs):
            x = self.pw_conv_2(self.act_fn(self.pw_conv_1(self.layer_norm(self.dw_conv_1(inputs)))))
            return inputs + self.gamma * x

    inputs = k.layers.Input((SIZE, SIZE, 3))
    downsample = [k.Sequential([k.layers.Conv2D(dims[0], kernel_size=4, strides=4),
                                k.layers.LayerNormalization(epsilon=1e-6)], name="stem")]
    for i in range(3):
        downsample.append(k.Sequential([k.layers.LayerNormalization(epsilon=1e-6),
                                        k.layers.Conv2D(dims[i + 1], kernel_size=2, strides=2)],
                                       name=f"downsampling_block_{i}"))
    x = inputs
    for i in range(4):
        x = downsample[i](x)
        x = k.Sequential([Block(dims[i], name=f"convnext_block_{i}_{j}") for j in range(depths[i])],
                         name=f"convnext_stage_{i}")(x)
    x = k.layers.GlobalAveragePooling2D()(x)
    x = k.layers.LayerNormalization(epsilon=1e-6)(x)
    # num_classes 0: TF-Hub's feature-vector twin, the classifier cut before its classification_head
    outputs = k.layers.Dense(num_classes, name="classification_head")(x) if num_classes else x
    return k.Model(inputs, outputs, name=name)


def keras2():
    """tf_keras (Keras 2), or exit NO_TF_KERAS."""
    try:
        import tf_keras
    except ImportError:
        sys.exit(NO_TF_KERAS)
    return tf_keras


NO_TF_KERAS = 4
MODELS = {  # name -> (builder, how TensorFlow writes it)
    "keras_tiny": (lambda: keras.applications.ConvNeXtTiny(weights=None, input_shape=(SIZE, SIZE, 3), classes=7),
                   "export"),
    "keras_small_logits": (lambda: keras.applications.ConvNeXtSmall(
        weights=None, input_shape=(SIZE, SIZE, 3), classes=5, include_preprocessing=False,
        classifier_activation=None), "tf.saved_model.save"),
    "hub_tiny": (lambda: hub_port([3, 3, 9, 3], [96, 192, 384, 768], 6, "convnext_tiny_1k"), "tf.saved_model.save"),
    "hub_small": (lambda: hub_port([3, 3, 27, 3], [96, 192, 384, 768], 4, "convnext_small_1k"),
                  "tf.saved_model.save"),
    # as the TF-Hub modules were written: Keras 2's model.save to a directory
    "hub_tiny_keras2": (lambda: hub_port([3, 3, 9, 3], [96, 192, 384, 768], 5, "convnext_tiny_1k_224", keras2()),
                        "keras2 model.save"),
    "hub_tiny_features_keras2": (lambda: hub_port([3, 3, 9, 3], [96, 192, 384, 768], 0,
                                                  "convnext_tiny_1k_224_fe", keras2()), "keras2 model.save"),
    "keras_tiny_keras2": (lambda: keras2().applications.ConvNeXtTiny(weights=None, input_shape=(SIZE, SIZE, 3),
                                                                      classes=7), "keras2 model.save"),
    # Keras 3's export lists the port's raw gamma variables apart from their blocks: refused
    "hub_export": (lambda: hub_port([1, 1, 1, 1], [8, 16, 32, 64], 3, "convnext_port_export"), "export"),
    "other": (lambda: keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="dense_a")]),
              "tf.saved_model.save"),
    "keras_tiny_1000": (lambda: keras.applications.ConvNeXtTiny(weights=None, input_shape=(224, 224, 3)), "export"),
}


def port_gammas(model):
    """The TF-Hub port's raw gamma variables, which Keras does not list among the model's weights."""
    return [layer.gamma for layer in model._flatten_layers()
            if isinstance(getattr(layer, "gamma", None), tf.Variable) and "Block" in type(layer).__name__]


def write(out_dir, name):
    build, how = MODELS[name]
    model = build()
    randomise(model, seed=len(name), layer_scales=port_gammas(model))
    shape = model.input_shape[1:]
    x = np.random.default_rng(1).uniform(0, 255, (2, *shape)).astype(np.float32)
    if not name.startswith("keras_tiny"):
        x = (x - 128) / 64  # no Normalization layer inside: the caller normalises
    y = np.asarray(model(x, training=False))
    path = os.path.join(out_dir, name)
    if how == "export":
        model.export(path, verbose=False)
    elif how == "keras2 model.save":
        model.save(path)  # a path without an extension: Keras 2 writes a SavedModel
    else:
        tf.saved_model.save(model, path)
    np.savez(os.path.join(out_dir, name + ".npz"), x=x, y=y)


if __name__ == "__main__":
    out_dir, names = sys.argv[1], sys.argv[2:] or [n for n in MODELS if not n.endswith("1000")]
    for name in names:  # tf_keras last: without it, the others are written before the exit
        write(out_dir, name)
