"""The 1000 ImageNet-1k classes in the order of the classifier's outputs: WordNet id and names.

Data: data/imagenet1k_classes.tsv, one class per line, `wnid<TAB>comma-separated names`, in
the standard sorted-wnid order that timm's ImageNet info files and the ILSVRC devkit use.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import NamedTuple


class ImageNetClass(NamedTuple):
    index: int
    wnid: str    # WordNet synset id, e.g. n02123045; also the folder name in ImageNet-style data sets
    names: str   # e.g. "tabby, tabby cat"

    @property
    def name(self) -> str:
        """The first, shortest-to-read name: 'tabby'."""
        return self.names.split(",")[0]


@lru_cache(maxsize=None)
def imagenet_classes() -> tuple[ImageNetClass, ...]:
    text = resources.files(__package__).joinpath("data/imagenet1k_classes.tsv").read_text()
    rows = [line.split("\t") for line in text.splitlines() if line]
    return tuple(ImageNetClass(i, wnid, names) for i, (wnid, names) in enumerate(rows))


def imagenet_labels() -> list[str]:
    """Class names by output index: imagenet_labels()[281] == 'tabby, tabby cat'."""
    return [c.names for c in imagenet_classes()]
