"""Images to model inputs, equal to timm's evaluation transform in float32.

timm's eval pipeline (timm.data.create_transform with is_training=False, crop_mode 'center'):
    1. resize the shorter side to floor(input_size / crop_pct), PIL bicubic (or the config's
       interpolation); the longer side becomes int(short * long / short_side), truncated
    2. center crop input_size; the offset is round((size - crop) / 2) as torchvision rounds it;
       an image smaller than the crop is zero-padded first, as torchvision pads it
    3. to float32 in [0, 1], then (x - mean) / std per channel
Step 1 uses PIL's own resampling, as torchvision does for PIL images, so the pixels are the same.

Image modes become RGB by this rule: L, RGB, CMYK, YCbCr and palette images through PIL's
convert('RGB'); alpha (LA, RGBA, PA, palettes with transparency) is dropped, not composited,
as timm's loader drops it; 16-bit and 32-bit integer grey (I;16, I) are scaled to 8 bits
(value / 257 for 16-bit) and replicated; float grey (F) is clipped to [0, 255].
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

# Pillow is imported where images are handled, not at module level: `import npconvnext` for
# inference on arrays does not pay for it.
if TYPE_CHECKING:
    from PIL import Image
_INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")  # PIL's filters
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataConfig:
    input_size: tuple[int, int] = (224, 224)    # (H, W) of the model input
    crop_pct: float = 0.875                      # crop / resized short side
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN   # RGB, on [0, 1] pixels
    std: tuple[float, float, float] = IMAGENET_STD
    layout: str = "NCHW"      # "NCHW" (timm, OpenVINO) or "NHWC" (Keras, TF-Hub channels_last)
    channel_order: str = "RGB"  # or "BGR" (OpenVINO's converted model)
    scale: str = "unit"       # "unit": pixels in [0, 1] before mean/std; "255": OpenVINO's 0-255
                              # convention, mean*255 and std*255 (123.675, ... / 58.395, ...)
    exif_transpose: bool = False  # apply the EXIF orientation tag (timm does not)


def data_config(name: str = "convnext_tiny.fb_in1k", **overrides) -> DataConfig:
    """The evaluation preprocessing of pretrained weights `arch.tag`, from the weights registry."""
    from .hub import pretrained_entry

    entry = pretrained_entry(name)
    config = DataConfig(input_size=tuple(entry["input_size"][1:]), crop_pct=entry["crop_pct"],
                        interpolation=entry["interpolation"], mean=tuple(entry["mean"]), std=tuple(entry["std"]))
    return replace(config, **overrides)


def open_image(path: str | os.PathLike, exif_transpose: bool = False) -> Image.Image:
    """An RGB PIL image; errors name the file (unreadable, truncated, decompression bomb)."""
    from PIL import Image, ImageOps

    path = os.fspath(path)
    try:
        with Image.open(path) as image:
            image.load()
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{path}: refused as a possible decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read image ({exc})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB by the rule in the module docstring."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        grey = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or grey.max() > 255 else 255.0
        grey = np.clip(np.rint(grey * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL's supported route for palette transparency
    return image.convert("RGB")


def _resize_shorter_side(image: Image.Image, size: int, interpolation: str) -> Image.Image:
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(_INTERPOLATIONS)}, not {interpolation!r}")
    from PIL import Image

    return image.resize((new_w, new_h), Image.Resampling[interpolation.upper()])


def _center_crop(pixels: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (crop_h, crop_w, 3), zero-padding first where the image is smaller."""
    h, w = pixels.shape[:2]
    if crop_h > h or crop_w > w:
        pad_h, pad_w = max(crop_h - h, 0), max(crop_w - w, 0)
        pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        h, w = pixels.shape[:2]
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return pixels[top : top + crop_h, left : left + crop_w]


def preprocess(image: Image.Image | str | os.PathLike | np.ndarray, config: DataConfig | None = None) -> np.ndarray:
    """One image -> (3, H, W) float32 (or (H, W, 3) with layout NHWC), ready to stack into a batch.

    image: a PIL image, a path, or an (H, W, 3) uint8 RGB array.
    """
    config = config or DataConfig()
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image, config.exif_transpose)
    elif isinstance(image, np.ndarray):
        from PIL import Image

        image = Image.fromarray(image)
    image = to_rgb(image)
    crop_h, crop_w = config.input_size
    scale_h, scale_w = (math.floor(s / config.crop_pct) for s in config.input_size)
    if scale_h != scale_w:
        raise ValueError("non-square input sizes are not supported by the center-crop transform")
    image = _resize_shorter_side(image, scale_h, config.interpolation)
    pixels = _center_crop(np.asarray(image), crop_h, crop_w)                  # (H, W, 3) uint8
    mean = np.asarray(config.mean, np.float32)
    std = np.asarray(config.std, np.float32)
    if config.scale == "255":
        x = pixels.astype(np.float32)
        mean, std = mean * np.float32(255), std * np.float32(255)
    elif config.scale == "unit":
        x = pixels.astype(np.float32) / np.float32(255)
    else:
        raise ValueError(f"scale must be 'unit' or '255', not {config.scale!r}")
    x = (x - mean) / std
    if config.channel_order == "BGR":
        x = x[..., ::-1]
    elif config.channel_order != "RGB":
        raise ValueError(f"channel_order must be 'RGB' or 'BGR', not {config.channel_order!r}")
    if config.layout == "NCHW":
        return np.ascontiguousarray(x.transpose(2, 0, 1))                     # (3, H, W)
    if config.layout == "NHWC":
        return np.ascontiguousarray(x)                                         # (H, W, 3)
    raise ValueError(f"layout must be 'NCHW' or 'NHWC', not {config.layout!r}")
