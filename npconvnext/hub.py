"""Published ConvNeXt weights: which exist, where they live, how they were evaluated; download.

The registry (data/pretrained.json) lists, for every `arch.tag` timm publishes with a classifier,
the Hugging Face hub repo and file, the number of classes and the evaluation preprocessing
(input size, crop_pct, interpolation, mean, std) and licence. `tests/test_hub.py` checks it
against timm's pretrained configs. Downloads go through huggingface-hub's cache, so offline
(HF_HUB_OFFLINE=1 or no network) a file fetched once is found again.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=None)
def registry() -> dict[str, dict]:
    """`arch.tag` -> hub repo, file, num_classes, preprocessing and licence."""
    return json.loads(resources.files(__package__).joinpath("data/pretrained.json").read_text())


def list_pretrained(arch: str | None = None) -> list[str]:
    """Every `arch.tag` with published weights, or those of one architecture."""
    return [n for n in registry() if arch is None or n.split(".", 1)[0] == arch]


def pretrained_entry(name: str) -> dict:
    """The registry entry of `arch.tag`; a bare architecture name means its first tag."""
    if "." not in name:
        tags = list_pretrained(name)
        if not tags:
            raise ValueError(f"no published weights for {name!r}")
        name = tags[0] if f"{name}.fb_in1k" not in registry() else f"{name}.fb_in1k"
    if name not in registry():
        arch = name.split(".", 1)[0]
        known = ", ".join(list_pretrained(arch)) or "none"
        raise ValueError(f"unknown pretrained weights {name!r}; published for {arch}: {known}")
    return dict(registry()[name], name=name)


def download_weights(name: str, cache_dir: str | None = None) -> str:
    """Local path of the weight file of `arch.tag`, downloading it into huggingface-hub's cache
    if it is not there yet."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    entry = pretrained_entry(name)
    try:
        return hf_hub_download(entry["hf_hub_id"], entry["file"], cache_dir=cache_dir)
    except LocalEntryNotFoundError as exc:
        raise RuntimeError(
            f"cannot get {entry['name']}: {entry['file']} of hub repo {entry['hf_hub_id']} is not in the "
            f"huggingface-hub cache and the hub cannot be reached ({exc.__class__.__name__}). On a machine "
            f"with internet run `npconvnext download {entry['name']}` (or `huggingface-cli download "
            f"{entry['hf_hub_id']} {entry['file']}`), or pass a local file: "
            f"create_model('{entry['name'].split('.')[0]}', weights='path/to/{entry['file']}')."
        ) from None
