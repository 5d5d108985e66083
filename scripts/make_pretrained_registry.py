"""Regenerate npconvnext/data/pretrained.json from timm's pretrained configs.

An entry for every `arch.tag` in `timm.list_pretrained("convnext*")`: the classifiers, the
headless backbones (num_classes 0: the DINOv3 and EUPE distilled ConvNeXts, the ConvNeXt-V2
FCMAE pre-trains), the CLIP image towers (their head an embedding projection, 640 to 1024 wide)
and the tags of architectures npconvnext does not build yet (tests/support's NOT_BUILT_YET):
they are data, loadable once the architecture is. The fields are those tests/test_hub.py
compares with timm: the hub file, num_classes, the evaluation preprocessing (input_size,
crop_pct, crop_mode, interpolation, mean, std), the licence, and `default`: whether timm loads
this tag for `pretrained=True` (`timm.models.get_pretrained_cfg(arch).tag`).

    PYTHONPATH=. python scripts/make_pretrained_registry.py
"""

import json
import os

import timm
from timm.models import get_pretrained_cfg

OUT = os.path.join(os.path.dirname(__file__), "..", "npconvnext", "data", "pretrained.json")


def entries() -> dict[str, dict]:
    out = {}
    for name in sorted(timm.list_pretrained("convnext*")):
        cfg = get_pretrained_cfg(name)
        default = get_pretrained_cfg(name.split(".")[0])
        out[name] = {"hf_hub_id": cfg.hf_hub_id, "file": cfg.hf_hub_filename or "model.safetensors",
                     "num_classes": cfg.num_classes, "input_size": list(cfg.input_size), "crop_pct": cfg.crop_pct,
                     "crop_mode": cfg.crop_mode, "interpolation": cfg.interpolation, "mean": list(cfg.mean),
                     "std": list(cfg.std), "license": cfg.license, "default": default.tag == cfg.tag}
    return out


if __name__ == "__main__":
    with open(OUT, "w") as f:
        json.dump(entries(), f, indent=1)
        f.write("\n")
    print(f"{OUT}: {len(entries())} entries")
