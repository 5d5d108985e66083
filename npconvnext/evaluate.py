"""Top-1 and top-5 accuracy over a folder of class folders: one sub-folder of images per class,
named by the model's class names: ImageNet's WordNet ids (n01440764/, n01443537/, ...), as
ImageNet's validation set is usually laid out, or the class names a fine-tuned weights file
carries (the folder names `finetune` trained on).

`class_folders` maps each folder to its class, `balanced_subset` draws a limited evaluation that
is spread over the classes, and `accuracy` counts the hits of a model over batches of images
(the command's batches, which skip unreadable images), per class and in a confusion matrix.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

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
    per_class: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # class: (images, top1, top5)
    confusion: Counter = field(default_factory=Counter)  # (true class, top-1 class): images

    def report(self, model: str | None, weights: str | None, names: Sequence[str] | None = None) -> dict:
        """The JSON report of `npconvnext evaluate --report`, in percent: the totals, each
        class's, and the confusion matrix (rows: true class, columns: top-1 prediction, over
        every class that is either)."""
        name = (lambda i: names[i]) if names else (lambda i: f"class {i}")
        classes = sorted({c for pair in self.confusion for c in pair} | set(self.per_class))
        return {"model": model, "weights": weights, "images": self.images,
                "top1": percent(self.top1, self.images), "top5": percent(self.top5, self.images),
                "per_class": [{"class": name(c), "index": c, "images": n, "top1": percent(t1, n),
                               "top5": percent(t5, n)} for c, (n, t1, t5) in sorted(self.per_class.items())],
                "confusion": {"labels": [name(c) for c in classes], "indices": classes,
                              "matrix": [[self.confusion[(t, p)] for p in classes] for t in classes]}}


def percent(part: int, whole: int) -> float:
    return round(100 * part / whole, 3) if whole else 0.0


def class_table(report: dict) -> str:
    """The per-class rows of a report as a text table."""
    width = max([5] + [len(row["class"]) for row in report["per_class"]])
    lines = [f"{'class':<{width}}  {'images':>6}  {'top-1 %':>7}  {'top-5 %':>7}"]
    lines += [f"{row['class']:<{width}}  {row['images']:>6}  {row['top1']:>7.2f}  {row['top5']:>7.2f}"
              for row in report["per_class"]]
    return "\n".join(lines)


def class_folders(directory: str, names: Sequence[str] | None = None) -> dict[int, list[str]]:
    """{class index: its images} for each sub-folder of `directory`, which must be named by one
    of `names` (the model's class names), or without names by an ImageNet-1k WordNet id.
    Raises InputError for another name or for no class folders at all."""
    if names:
        index_of = {name: i for i, name in enumerate(names)}
        what = "one of the model's class names (" + ", ".join(list(names)[:5]) + (", ...)" if len(names) > 5 else ")")
    else:
        index_of = {c.wnid: c.index for c in imagenet_classes()}
        what = "an ImageNet-1k WordNet id"
    by_class: dict[int, list[str]] = {}
    for folder_name in sorted(os.listdir(directory)):
        folder = os.path.join(directory, folder_name)
        if os.path.isdir(folder):
            if folder_name not in index_of:
                raise InputError(f"{shown(folder)}: folder name is not {what}")
            by_class[index_of[folder_name]] = list_images([folder])
    if not by_class:
        raise InputError(f"{shown(directory)}: no class folders (one per class, named as the model's "
                         "classes) with images")
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
    """Top-1 and top-5 hits of `model` over `batches` of (paths, inputs (N, 3, H, W)), in all,
    per class, and as (true class, top-1 class) pairs."""
    per_class: dict[int, list[int]] = {}
    confusion: Counter = Counter()
    for paths, x in batches:
        ranked = np.argsort(-model(x), axis=-1)[:, :5]
        for path, row in zip(paths, ranked):
            counts = per_class.setdefault(truth[path], [0, 0, 0])
            counts[0] += 1
            counts[1] += int(row[0] == truth[path])
            counts[2] += int(truth[path] in row)
            confusion[(truth[path], int(row[0]))] += 1
    total, top1, top5 = (sum(c[k] for c in per_class.values()) for k in range(3))
    return Accuracy(total, top1, top5, {c: tuple(v) for c, v in per_class.items()}, confusion)
