"""Images to model inputs, equal to timm's evaluation transform in float32.

timm's eval pipeline (timm.data.transforms_factory.transforms_imagenet_eval), with
scale = floor(input_size / crop_pct) per side:
    1. resize, PIL bicubic (or the config's interpolation), by the config's crop_mode:
       'center': the shorter side to scale (square input) and the longer side to
                 int(scale * long / short), truncated, as torchvision's Resize(int) does; for a
                 non-square input both sides divided by min(h / scale_h, w / scale_w), rounded,
                 as timm's ResizeKeepRatio does
       'squash': both sides to scale, the aspect ratio not kept (timm's *_384 fine-tunes)
    2. center crop input_size; the offset is round((size - crop) / 2) as torchvision rounds it;
       an image smaller than the crop is zero-padded first, as torchvision pads it
    3. to float32 in [0, 1], then (x - mean) / std per channel
Step 1 uses PIL's own resampling, as torchvision does for PIL images, so the pixels are the same.
timm's third mode, 'border', is used by no ConvNeXt weights and is refused.

Image modes become RGB by this rule: L, RGB, CMYK, YCbCr and palette images through PIL's
convert('RGB'); alpha (LA, RGBA, PA, palettes with transparency) is dropped, not composited,
as timm's loader drops it; 16-bit and 32-bit integer grey (I;16, I) are scaled to 8 bits
(value / 257 for 16-bit) and replicated; float grey (F) is clipped to [0, 255].

Limits against hostile files: only regular files are opened (a FIFO or a device would block or
never end); PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) bounds the decoded image;
DataConfig.max_resized_pixels bounds the resized one, which an extreme aspect ratio makes huge
(a 1 x 20000 image resized to a short side of 256 would be 256 x 5120000). Every failure to
read or size an image is an ImageError naming the file.
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from .errors import ImageError, InputError

# Pillow is imported where images are handled, not at module level: `import npconvnext` for
# inference on arrays does not pay for it.
if TYPE_CHECKING:
    from PIL import Image
_INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")  # PIL's filters
CROP_MODES = ("center", "squash")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The default bound on the resized image: aspect ratios up to 512:1 at a 256-pixel short side.
MAX_RESIZED_PIXELS = 1 << 25


@dataclass(frozen=True)
class DataConfig:
    input_size: tuple[int, int] = (224, 224)    # (H, W) of the model input
    crop_pct: float = 0.875                      # crop / resized short side
    crop_mode: str = "center"                    # "center" (keep the aspect) or "squash" (both sides)
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] | None = IMAGENET_MEAN   # RGB, on [0, 1] pixels; None: not
    std: tuple[float, float, float] | None = IMAGENET_STD     # normalised (the model does it inside)
    layout: str = "NCHW"      # "NCHW" (timm, OpenVINO) or "NHWC" (Keras, TF-Hub channels_last)
    channel_order: str = "RGB"  # or "BGR" (OpenVINO's converted model)
    scale: str = "unit"       # "unit": pixels in [0, 1] before mean/std; "255": OpenVINO's 0-255
                              # convention, mean*255 and std*255 (123.675, ... / 58.395, ...)
    exif_transpose: bool = False  # apply the EXIF orientation tag (timm does not)
    max_resized_pixels: int = MAX_RESIZED_PIXELS  # refuse an image whose resized form is larger


# The fields of timm's pretrained config that its eval transform reads, as DataConfig names them.
TIMM_FIELDS = ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")


def from_timm_cfg(cfg: dict) -> DataConfig:
    """DataConfig from the eval fields of a timm pretrained config; absent ones keep timm's defaults."""
    values = {k: cfg[k] for k in TIMM_FIELDS if cfg.get(k) is not None}
    if "input_size" in values:
        channels, *size = values["input_size"]
        if channels != 3 or len(size) != 2:
            raise InputError(f"input_size {values['input_size']} is not [3, H, W]")
        values["input_size"] = tuple(size)
    for key in ("mean", "std"):
        if key in values:
            values[key] = tuple(values[key])
    config = DataConfig(**values)
    if not (all(isinstance(s, int) and s > 0 for s in config.input_size) and 0 < config.crop_pct <= 1
            and config.crop_mode in CROP_MODES and config.interpolation in _INTERPOLATIONS
            and len(config.mean) == 3 and len(config.std) == 3 and all(s > 0 for s in config.std)):
        raise InputError(f"unusable preprocessing {values}")
    return config


def data_config(name: str = "convnext_tiny.fb_in1k", **overrides) -> DataConfig:
    """The evaluation preprocessing of pretrained weights `arch.tag`, from the weights registry."""
    from .hub import pretrained_entry

    return replace(from_timm_cfg(pretrained_entry(name)), **overrides)


def _open_regular_file(path: str):
    """A binary file object, refusing what is not a regular file before reading a byte."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot open ({exc.strerror or exc})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
        raise ImageError(f"{path}: is {kind}, not an image file")
    if hasattr(os, "O_NONBLOCK"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def open_image(path: str | os.PathLike, exif_transpose: bool = False, config: DataConfig | None = None) -> Image.Image:
    """An RGB PIL image; every failure (missing, special file, unreadable, truncated,
    decompression bomb, out of memory) is an ImageError naming the file.

    config: when given, an image whose resize under it would pass config.max_resized_pixels is
    refused from its header, before it is decoded.
    """
    from PIL import Image, ImageOps

    path = os.fspath(path)
    with _open_regular_file(path) as f:
        try:
            with Image.open(f) as image:
                if config is not None:
                    width, height = image.size
                    _checked_resize(width, height, config, path)
                    if exif_transpose:  # the EXIF orientation may swap the sides
                        _checked_resize(height, width, config, path)
                image.load()
                if exif_transpose:
                    image = ImageOps.exif_transpose(image)
                return to_rgb(image)
        except ImageError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageError(f"{path}: refused as a possible decompression bomb ({exc})") from None
        except MemoryError:
            raise ImageError(f"{path}: too large to decode in the memory available") from None
        except Image.UnidentifiedImageError:  # Pillow's own text names a file descriptor, not the file
            raise ImageError(f"{path}: cannot read image (not an image format Pillow recognises)") from None
        except Exception as exc:  # Pillow's decoders raise many types on corrupt files; all mean the same
            raise ImageError(f"{path}: cannot read image ({exc.__class__.__name__}: {exc})") from None


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


def _resized_size(width: int, height: int, config: DataConfig) -> tuple[int, int]:
    """(W, H) of step 1 of the module docstring."""
    scale_h, scale_w = (math.floor(s / config.crop_pct) for s in config.input_size)
    if config.crop_mode == "squash":
        return scale_w, scale_h
    if config.crop_mode != "center":
        raise InputError(f"crop_mode must be one of {', '.join(CROP_MODES)}, not {config.crop_mode!r}")
    if scale_h == scale_w:
        short, long = sorted((width, height))
        new_long = int(scale_h * long / short)
        return (scale_h, new_long) if width <= height else (new_long, scale_h)
    ratio = min(height / scale_h, width / scale_w)
    return round(width / ratio), round(height / ratio)


def _checked_resize(width: int, height: int, config: DataConfig, name: str) -> tuple[int, int]:
    """_resized_size, refusing a result past config.max_resized_pixels."""
    new_w, new_h = _resized_size(width, height, config)
    if new_w * new_h > config.max_resized_pixels:
        raise ImageError(f"{name}: a {width}x{height} image would be resized to {new_w}x{new_h}, "
                         f"past the limit of {config.max_resized_pixels} pixels "
                         f"(DataConfig.max_resized_pixels; raise it to accept such aspect ratios)")
    return new_w, new_h


def _resize(image: Image.Image, config: DataConfig, name: str) -> Image.Image:
    if config.interpolation not in _INTERPOLATIONS:
        raise InputError(f"interpolation must be one of {', '.join(_INTERPOLATIONS)}, not {config.interpolation!r}")
    new_w, new_h = _checked_resize(*image.size, config, name)  # before PIL allocates anything
    from PIL import Image

    return image.resize((new_w, new_h), Image.Resampling[config.interpolation.upper()])


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
    Raises ImageError (naming the file) for an image that cannot be read or is past the limits.
    """
    config = config or DataConfig()
    name = "image"
    if isinstance(image, (str, os.PathLike)):
        name = os.fspath(image)
        image = open_image(image, config.exif_transpose, config)
    elif isinstance(image, np.ndarray):
        from PIL import Image

        image = Image.fromarray(image)
    image = to_rgb(image)
    crop_h, crop_w = config.input_size
    try:
        resized = _resize(image, config, name)
    except MemoryError:
        raise ImageError(f"{name}: too large to resize in the memory available") from None
    pixels = _center_crop(np.asarray(resized), crop_h, crop_w)                # (H, W, 3) uint8
    if config.scale not in ("unit", "255"):
        raise InputError(f"scale must be 'unit' or '255', not {config.scale!r}")
    x = pixels.astype(np.float32)
    if config.scale == "unit":
        x = x / np.float32(255)
    if config.mean is not None:  # None: the model normalises inside (a Keras or OpenVINO model)
        mean = np.asarray(config.mean, np.float32)
        std = np.asarray(config.std, np.float32)
        if config.scale == "255":
            mean, std = mean * np.float32(255), std * np.float32(255)
        x = (x - mean) / std
    if config.channel_order == "BGR":
        x = x[..., ::-1]
    elif config.channel_order != "RGB":
        raise InputError(f"channel_order must be 'RGB' or 'BGR', not {config.channel_order!r}")
    if config.layout == "NCHW":
        return np.ascontiguousarray(x.transpose(2, 0, 1))                     # (3, H, W)
    if config.layout == "NHWC":
        return np.ascontiguousarray(x)                                         # (H, W, 3)
    raise InputError(f"layout must be 'NCHW' or 'NHWC', not {config.layout!r}")
