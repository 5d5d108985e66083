"""What a model takes and gives: its input's layout, channel order and pixel range, the
normalisation it applies itself, and whether it ends in a softmax.

timm's weights take normalised NCHW RGB images: the caller normalises (`npconvnext.preprocess`).
Other frameworks build the normalisation into the model file: a Keras ConvNeXt's Normalization
layer takes 0-255 RGB NHWC pixels; an Open Model Zoo IR takes 0-255 BGR NCHW and subtracts
its mean and divides by its scale inside. A model loaded from such a file keeps that
convention, so the caller feeds npconvnext what it fed the framework and gets its numbers;
that includes the output, probabilities where the file's model ends in a softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

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
