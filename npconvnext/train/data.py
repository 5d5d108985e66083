"""Training data: a folder per class, as torchvision's ImageFolder reads it, and the training
augmentation (random resized crop, horizontal flip) drawn from a seeded numpy Generator.

Validation images go through the evaluation transform (`npconvnext.preprocess`).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import numpy as np

from ..errors import TrainingError
from ..preprocessing import DataConfig, open_image, preprocess

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


class ImageFolder(NamedTuple):
    root: str
    classes: tuple[str, ...]                 # folder names, sorted: class i is classes[i]
    samples: tuple[tuple[str, int], ...]     # (path, class index), in folder then file order


def image_folder(root: str | os.PathLike, classes: tuple[str, ...] | None = None) -> ImageFolder:
    """The images of `root`, one sub-folder per class. `classes` fixes the class order (a
    validation folder must have the training folder's classes)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise TrainingError(f"{root}: not a folder (expected one sub-folder of images per class)")
    found = tuple(sorted(entry.name for entry in os.scandir(root) if entry.is_dir()))
    if not found:
        raise TrainingError(f"{root}: no class folders (expected one sub-folder of images per class)")
    if classes is not None and found != tuple(classes):
        raise TrainingError(f"{root}: its class folders {list(found)} are not the training classes {list(classes)}")
    samples = []
    for index, name in enumerate(found):
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise TrainingError(f"{folder}: class folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        samples += [(os.path.join(folder, f), index) for f in files]
    return ImageFolder(root, found, tuple(samples))


def split(folder: ImageFolder, fraction: float, rng: np.random.Generator) -> tuple[ImageFolder, ImageFolder]:
    """(train, validation): `fraction` of each class, drawn at random, for validation."""
    if not 0.0 < fraction < 1.0:
        raise TrainingError(f"the validation fraction must be between 0 and 1, not {fraction}")
    train, val = [], []
    for index in range(len(folder.classes)):
        members = [s for s in folder.samples if s[1] == index]
        count = max(1, round(fraction * len(members))) if len(members) > 1 else 0
        chosen = set(rng.choice(len(members), count, replace=False).tolist())
        for k, sample in enumerate(members):
            (val if k in chosen else train).append(sample)
    return folder._replace(samples=tuple(train)), folder._replace(samples=tuple(val))


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height): a random area fraction in `scale` and aspect ratio
    in `ratio` (log-uniform), up to ten tries, else the largest centred crop within `ratio`;
    torchvision's RandomResizedCrop draws its box this way."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def training_input(path: str, size: int, config: DataConfig, rng: np.random.Generator) -> np.ndarray:
    """One augmented training image: random resized crop to size x size (bilinear), a coin-flip
    horizontal mirror, then normalised as `config` says. -> (3, size, size) float32"""
    from PIL import Image

    image = open_image(path)
    left, top, w, h = random_resized_crop_box(*image.size, rng)
    image = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # already size x size: the evaluation transform at crop 1.0 only normalises it
    return preprocess(image, DataConfig(input_size=(size, size), crop_pct=1.0, mean=config.mean, std=config.std))


def validation_input(path: str, config: DataConfig) -> np.ndarray:
    """timm's evaluation transform. -> (3, H, W) float32"""
    return preprocess(path, config)
