"""Regenerate npconvnext/data/pretrained.json from timm's pretrained configs.

An entry for every `arch.tag` timm publishes for an architecture npconvnext builds, with a
classifier and its weights in timm's own hub repos (timm/...). Not classifiers: the
self-supervised backbones (num_classes 0) and the bare CLIP image towers, whose head is an
embedding projection (their fine-tunes, `clip_*_ft_*`, are classifiers and are listed). The fields are those
tests/test_hub.py compares with timm: the hub file, num_classes, the evaluation preprocessing
(input_size, crop_pct, crop_mode, interpolation, mean, std) and the licence.

    PYTHONPATH=. python scripts/make_pretrained_registry.py
"""

import json
import os

import timm
from timm.models import get_pretrained_cfg

import npconvnext

OUT = os.path.join(os.path.dirname(__file__), "..", "npconvnext", "data", "pretrained.json")


def entries() -> dict[str, dict]:
    out = {}
    archs = set(npconvnext.list_models())
    for name in sorted(timm.list_pretrained("convnext*")):
        cfg = get_pretrained_cfg(name)
        clip_tower = cfg.tag.startswith("clip") and "_ft_" not in cfg.tag
        if (name.split(".")[0] not in archs or not cfg.num_classes or clip_tower
                or not (cfg.hf_hub_id or "").startswith("timm/")):
            continue
        out[name] = {"hf_hub_id": cfg.hf_hub_id, "file": cfg.hf_hub_filename or "model.safetensors",
                     "num_classes": cfg.num_classes, "input_size": list(cfg.input_size), "crop_pct": cfg.crop_pct,
                     "crop_mode": cfg.crop_mode, "interpolation": cfg.interpolation, "mean": list(cfg.mean),
                     "std": list(cfg.std), "license": cfg.license}
    return out


if __name__ == "__main__":
    with open(OUT, "w") as f:
        json.dump(entries(), f, indent=1)
        f.write("\n")
    print(f"{OUT}: {len(entries())} entries")
