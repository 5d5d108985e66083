"""The commands that draw: `explain` (Grad-CAM, top-5, feature-map strips), `erf` (effective
receptive fields), and the `--plot` of `parity`. cli/parser.py adds them with `add_commands`.

The computing is explain.py's, the drawing figures.py's; this module loads the model and the
photo and names what a figure shows. A model is `arch.tag` (pretrained weights, downloaded as
`classify` does), a weight file (--weights), or a bare architecture: seeded random weights,
which every figure then warns about on its face.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from . import batch, figures
from .explain import effective_receptive_field, grad_cam, stage_feature_maps, stage_index, strongest_channels
from .errors import InputError
from .factory import create_model
from .model import ConvNeXt
from .preprocessing import preprocess

if TYPE_CHECKING:
    from .oracle import LayerError


def is_random(model: ConvNeXt) -> bool:
    """True for npconvnext's seeded random weights (create_model without weights)."""
    return model.source.startswith("random weights")


def load(model: str | None, weights: str | None, seed: int = 0, dtype: str = "float32") -> ConvNeXt:
    """arch.tag: pretrained; --weights: that file; a bare architecture: seeded random weights."""
    if weights or (model and "." in model) or not model:
        return batch.load_model(batch.ModelSpec(model, weights, dtype=dtype))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said on the figure instead
        return create_model(model, dtype=dtype, seed=seed)


def photo_and_input(model: ConvNeXt, path: str) -> tuple[np.ndarray, np.ndarray]:
    """The crop the model sees, as (H, W, 3) pixels in [0, 1], and the model's input (1, ...)."""
    plain = replace(model.data_config, mean=None, std=None, layout="NCHW", channel_order="RGB", scale="unit")
    photo = preprocess(path, plain).transpose(1, 2, 0)
    return photo, preprocess(path, model.data_config)[None].astype(model.dtype)


def draw_explanation(model: ConvNeXt, path: str, output: str, target: int | None = None,
                     layer: str = "stages.3", channels: int = 8, size: tuple[int, int] = (1200, 900)) -> None:
    """One photo's figure: its Grad-CAM for `target` (None: the top-1 class) on `layer`, the
    top-5 classes, and each stage's `channels` strongest channels."""
    photo, x = photo_and_input(model, path)
    if target is not None and not 0 <= target < model.config.num_classes:
        raise InputError(f"--target must lie in 0 .. {model.config.num_classes - 1}; got {target}")
    cam = grad_cam(model, x, target, layer)[0]
    prediction = batch.classify(model, x, 5)[0]
    top5 = list(zip(prediction.names, prediction.probabilities))
    labels = batch.class_labels(model)
    chosen = None if target is None else (labels[target] if labels else f"class {target}")
    maps = stage_feature_maps(model, x)
    strips = {stage: m[strongest_channels(m, channels)] for stage, m in maps.items()}
    title = figures.title_of(model.config.name, model.source, f"image: {os.path.basename(path)}, {layer}")
    figures.explain_figure(output, photo, cam, top5, strips, title, is_random(model), size, chosen)


def draw_erf(model: ConvNeXt, output: str, input_size: int = 224, count: int = 4, seed: int = 0,
             size: tuple[int, int] = (1200, 400)) -> None:
    """Every stage's effective receptive field over `count` random images, side by side."""
    fields = [effective_receptive_field(model, i, input_size, count=count, seed=seed)
              for i in range(len(model.config.depths))]
    title = figures.title_of(model.config.name, model.source,
                             f"{count} standard-normal {input_size}x{input_size} images (seed {seed})")
    figures.erf_figure(output, fields, title, is_random(model), size)


def draw_parity(model: ConvNeXt, rows: list["LayerError"], tolerance: float, against: str, output: str,
                size: tuple[int, int] = (1400, 600)) -> None:
    """The parity table as a plot: `parity --plot FILE` calls this after comparing."""
    title = figures.title_of(model.config.name, model.source, f"{model.dtype.name} against {against}")
    figures.parity_figure(output, rows, tolerance, title, is_random(model), size)


def _size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise InputError(f"--size takes WIDTHxHEIGHT in pixels, e.g. 1200x900; got {text!r}")
    return int(width), int(height)


def cmd_explain(args) -> None:
    model = load(args.model, args.weights, args.weight_seed)
    if args.input_size:
        model.data_config = replace(model.data_config, input_size=(args.input_size, args.input_size))
    stage_index(model, args.layer)  # a bad --layer fails before any image is read
    paths = batch.list_images(args.images)
    stem, ext = os.path.splitext(args.output)
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        output = args.output if len(paths) == 1 else f"{stem}-{name}{ext or '.png'}"
        draw_explanation(model, path, output, args.target, args.layer, args.channels, _size(args.size))
        print(f"{output}: {os.path.basename(path)}" + ("  (random weights)" if is_random(model) else ""))


def cmd_erf(args) -> None:
    model = load(args.model, args.weights, args.weight_seed)
    draw_erf(model, args.output, args.input_size, args.images, args.seed, _size(args.size))
    print(f"{args.output}: effective receptive fields of {model.config.name}")


def add_commands(add) -> None:
    """explain and erf, through cli/parser.py's add(name, run, help) -> the command's parser."""

    def model_options(p, default_size):
        p.add_argument("--model", default=None, help="arch.tag (pretrained), or a bare architecture for seeded "
                       f"random weights (default {batch.DEFAULT_MODEL}; with --weights, read off the file)")
        p.add_argument("--weights", help="a local weight file instead")
        p.add_argument("--weight-seed", type=int, default=0, help="seed of the random weights")
        p.add_argument("--size", default=default_size, help=f"figure size in pixels (default {default_size})")
        p.add_argument("-o", "--output", required=True, help="the PNG to write")

    p = add("explain", cmd_explain, "draw the Grad-CAM, top-5 and feature maps of photos")
    p.add_argument("images", nargs="+", help="image files or folders; several: OUT-<image>.png each")
    model_options(p, "1200x900")
    p.add_argument("--target", type=int, default=None, help="class index (default: each image's top-1)")
    p.add_argument("--layer", default="stages.3", help="the stage whose output the map is on")
    p.add_argument("--channels", type=int, default=8, help="strongest channels drawn per stage")
    p.add_argument("--input-size", type=int, default=None, help="override the crop size")

    p = add("erf", cmd_erf, "draw the effective receptive field of every stage")
    model_options(p, "1200x400")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--images", type=int, default=4, help="random images averaged over")
    p.add_argument("--seed", type=int, default=0, help="seed of the random images")


def add_parity_plot(p) -> None:
    """parity's --plot option."""
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw the errors in layer order")
