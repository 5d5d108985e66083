"""What a model takes and gives: its input's layout, channel order and pixel range, the
normalisation it applies itself, and whether it ends in a softmax.

timm's weights take normalised NCHW RGB images: the caller normalises (`npconvnext.preprocess`).
Other frameworks build the normalisation into the model file: a Keras ConvNeXt's Normalization
layer takes 0-255 RGB NHWC pixels; an Open Model Zoo IR takes 0-255 BGR NCHW and subtracts
its mean and divides by its scale inside. A model loaded from such a file keeps that
convention, so the caller feeds npconvnext what it fed the framework and gets its numbers;
that includes the output, probabilities where the file's model ends in a softmax.
`to_network_input`, `to_outputs`, `with_convention` and `describe_input` apply a convention;
the model calls them at its boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .errors import InputError

LAYOUTS = ("NCHW", "NHWC")
CHANNEL_ORDERS = ("RGB", "BGR")
PIXEL_SCALES = ("unit", "255")
OUTPUTS = ("logits", "probabilities")


@dataclass(frozen=True)
class Convention:
    layout: str = "NCHW"         # "NCHW" (timm, OpenVINO) or "NHWC" (Keras, TF-Hub)
    channel_order: str = "RGB"   # "BGR": the model reverses the channels before anything else
    scale: str = "unit"          # pixels the caller passes: "unit" [0, 1] based, or "255" (0-255)
    mean: tuple[float, float, float] | None = None  # in-model normalisation (x - mean) / std, in the
    std: tuple[float, float, float] | None = None   # input's units and RGB order; None: none inside
    outputs: str = "logits"      # "probabilities": the model ends in a softmax, as keras.applications' does
    source: str = "timm"         # where this convention comes from, for the model summary

    def __post_init__(self):
        problems = []
        if self.layout not in LAYOUTS:
            problems.append(f"layout must be one of {LAYOUTS}, not {self.layout!r}")
        if self.channel_order not in CHANNEL_ORDERS:
            problems.append(f"channel_order must be one of {CHANNEL_ORDERS}, not {self.channel_order!r}")
        if self.scale not in PIXEL_SCALES:
            problems.append(f"scale must be one of {PIXEL_SCALES}, not {self.scale!r}")
        if self.outputs not in OUTPUTS:
            problems.append(f"outputs must be one of {OUTPUTS}, not {self.outputs!r}")
        if (self.mean is None) != (self.std is None):
            problems.append("mean and std go together: give both or neither")
        if self.mean is not None and (len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0):
            problems.append(f"mean and std must be 3 values each, std positive; got {self.mean}, {self.std}")
        if problems:
            raise InputError("; ".join(problems))

    @property
    def normalises_inside(self) -> bool:
        return self.mean is not None


TIMM = Convention()


# ---- applying a convention ---------------------------------------------------------------------


def to_network_input(x: np.ndarray, convention: Convention) -> np.ndarray:
    """Channels-last images as `convention` says the caller gives them, as the network takes
    them: RGB and normalised. (N, H, W, 3) -> (N, H, W, 3) in x's dtype"""
    if convention.channel_order == "BGR":
        x = x[..., ::-1]
    if convention.normalises_inside:
        x = (x - np.asarray(convention.mean, x.dtype)) / np.asarray(convention.std, x.dtype)
    return np.ascontiguousarray(x)


def to_outputs(logits: np.ndarray, convention: Convention) -> np.ndarray:
    """The network's logits as `convention` says the model gives them: as they are, or the
    softmax of each row. (N, num_classes) -> (N, num_classes)"""
    if convention.outputs == "probabilities":
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)
    return logits


def with_convention(data_config, convention: Convention):
    """The preprocessing (a `preprocessing.DataConfig`) that gives a model of this convention
    its input: the convention's layout, channel order and pixel range, and mean and std only
    where the model does not normalise inside."""
    inside = convention.normalises_inside
    return replace(data_config, layout=convention.layout, channel_order=convention.channel_order,
                   scale=convention.scale, mean=None if inside else data_config.mean,
                   std=None if inside else data_config.std)


def describe_input(convention: Convention, data_config, data_config_source: str) -> list[str]:
    """Two lines for a model's summary: what it takes and gives, and the preprocessing
    (a `preprocessing.DataConfig`) that gives it that, with where each comes from."""
    conv, data = convention, data_config
    inside = (f"normalised inside the model: (x - {list(conv.mean)}) / {list(conv.std)}" if conv.normalises_inside
              else f"normalised by the caller: mean {list(data.mean)}, std {list(data.std)} on [0, 1] pixels")
    return [
        f"input: {conv.layout} {conv.channel_order}, {'0-255' if conv.scale == '255' else '0-1'} pixels, "
        f"{inside}; outputs {conv.outputs} (convention of {conv.source})",
        f"preprocessing: {data.input_size[0]}x{data.input_size[1]}, crop_pct {data.crop_pct}, {data.crop_mode}, "
        f"{data.interpolation} (from {data_config_source})",
    ]
