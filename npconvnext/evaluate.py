"""Top-1 and top-5 accuracy over an ImageNet-style folder: one sub-folder of images per
WordNet id (n01440764/, n01443537/, ...), as ImageNet's validation set is usually laid out.

`class_folders` maps each folder to its ImageNet-1k class, `balanced_subset` draws a limited
evaluation that is spread over the classes, and `accuracy` counts the hits of a model over
batches of images (the command's batches, which warn about and skip unreadable images).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .batch import list_images, shown
from .errors import InputError
from .labels import imagenet_classes
from .model import ConvNeXt


@dataclass(frozen=True)
class Accuracy:
    images: int   # images classified
    top1: int     # of which the true class came first
    top5: int     # of which the true class was among the first five

    def report(self, model: str | None, weights: str | None) -> dict:
        """The JSON report of `npconvnext evaluate --report`, in percent."""
        return {"model": model, "weights": weights, "images": self.images,
                "top1": round(100 * self.top1 / self.images, 3), "top5": round(100 * self.top5 / self.images, 3)}


def class_folders(directory: str) -> dict[int, list[str]]:
    """{ImageNet-1k class index: its images} for each sub-folder of `directory`, which must be
    named by a WordNet id. Raises InputError for another name or for no class folders at all."""
    index_of = {c.wnid: c.index for c in imagenet_classes()}
    by_class: dict[int, list[str]] = {}
    for wnid in sorted(os.listdir(directory)):
        folder = os.path.join(directory, wnid)
        if os.path.isdir(folder):
            if wnid not in index_of:
                raise InputError(f"{shown(folder)}: folder name is not an ImageNet-1k WordNet id")
            by_class[index_of[wnid]] = list_images([folder])
    if not by_class:
        raise InputError(f"{shown(directory)}: no class folders (one per WordNet id) with images")
    return by_class


def balanced_subset(by_class: dict[int, list[str]], limit: int, seed: int) -> dict[int, list[str]]:
    """`limit` of the files, as evenly spread over the classes as `limit` allows, drawn at
    random with `seed`: classes are visited in a shuffled order, one file from each per round,
    each class's files in a shuffled order. Not the first `limit` files, which would be the
    first classes only."""
    rng = np.random.default_rng(seed)
    classes = sorted(by_class)
    queues = {c: [by_class[c][i] for i in rng.permutation(len(by_class[c]))] for c in classes}
    order = [classes[i] for i in rng.permutation(len(classes))]
    picked: dict[int, list[str]] = {}
    taken = 0
    while taken < limit and any(queues.values()):
        for c in order:
            if queues[c] and taken < limit:
                picked.setdefault(c, []).append(queues[c].pop())
                taken += 1
    return {c: sorted(picked[c]) for c in classes if c in picked}


def ground_truth(by_class: dict[int, list[str]]) -> dict[str, int]:
    """{image path: its class index}, class by class."""
    return {path: index for index, paths in by_class.items() for path in paths}


def accuracy(model: ConvNeXt, batches: Iterable[tuple[list[str], np.ndarray]], truth: dict[str, int]) -> Accuracy:
    """Top-1 and top-5 hits of `model` over `batches` of (paths, inputs (N, 3, H, W))."""
    top1 = top5 = total = 0
    for paths, x in batches:
        ranked = np.argsort(-model(x), axis=-1)[:, :5]
        for path, row in zip(paths, ranked):
            total += 1
            top1 += int(row[0] == truth[path])
            top5 += int(truth[path] in row)
    return Accuracy(total, top1, top5)
