"""The ConvNeXt variant table.

Every row is an architecture that timm registers under the same name (timm/models/convnext.py,
the `convnext_*` and `convnextv2_*` factories). Sizes follow the ConvNeXt paper (Liu et al.,
"A ConvNet for the 2020s", 2022, table 9) and the ConvNeXt-V2 paper (Woo et al., 2023).
`tests/test_config.py` checks every row against timm, so the table cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ConvNeXtConfig:
    name: str
    depths: tuple[int, int, int, int]  # blocks per stage; the paper's 3:3:9:3 stage ratio for tiny
    dims: tuple[int, int, int, int]    # channels per stage, doubling at every downsample
    conv_mlp: bool = False      # timm stores the MLP as 1x1 convs (out, in, 1, 1), not linears (out, in)
    use_grn: bool = False       # ConvNeXt-V2: global response norm after the GELU
    layer_scale: bool = True    # learnable per-channel gamma on the residual branch (V1 only)
    norm_eps: float = 1e-6      # every LayerNorm in the net: stem, downsamples, blocks, head
    num_classes: int = 1000     # logits out of the head
    in_chans: int = 3           # RGB
    patch_size: int = 4         # stem: non-overlapping 4x4 patches, stride 4
    kernel_size: int = 7        # depthwise conv in every block, padding 3
    mlp_ratio: int = 4          # inverted bottleneck: C -> 4C -> C
    grn_eps: float = 1e-6       # added to the mean channel norm inside GRN

    @property
    def num_features(self) -> int:
        """Width of the pooled embedding that the classifier reads."""
        return self.dims[-1]

    @property
    def reduction(self) -> int:
        """Total spatial stride from the input to `forward_features`: 4 * 2 * 2 * 2."""
        return self.patch_size * 2 ** (len(self.dims) - 1)


_V1_SMALL = dict(conv_mlp=True)
_V2 = dict(use_grn=True, layer_scale=False)

#: name -> config; the order is the order of `list_models()`.
VARIANTS: dict[str, ConvNeXtConfig] = {
    c.name: c
    for c in (
        ConvNeXtConfig("convnext_atto", (2, 2, 6, 2), (40, 80, 160, 320), **_V1_SMALL),
        ConvNeXtConfig("convnext_femto", (2, 2, 6, 2), (48, 96, 192, 384), **_V1_SMALL),
        ConvNeXtConfig("convnext_pico", (2, 2, 6, 2), (64, 128, 256, 512), **_V1_SMALL),
        ConvNeXtConfig("convnext_nano", (2, 2, 8, 2), (80, 160, 320, 640), **_V1_SMALL),
        ConvNeXtConfig("convnext_tiny", (3, 3, 9, 3), (96, 192, 384, 768)),
        ConvNeXtConfig("convnext_small", (3, 3, 27, 3), (96, 192, 384, 768)),
        ConvNeXtConfig("convnext_base", (3, 3, 27, 3), (128, 256, 512, 1024)),
        ConvNeXtConfig("convnext_large", (3, 3, 27, 3), (192, 384, 768, 1536)),
        ConvNeXtConfig("convnext_xlarge", (3, 3, 27, 3), (256, 512, 1024, 2048)),
        ConvNeXtConfig("convnext_xxlarge", (3, 4, 30, 3), (384, 768, 1536, 3072), norm_eps=1e-5),
        ConvNeXtConfig("convnextv2_atto", (2, 2, 6, 2), (40, 80, 160, 320), **_V1_SMALL, **_V2),
        ConvNeXtConfig("convnextv2_femto", (2, 2, 6, 2), (48, 96, 192, 384), **_V1_SMALL, **_V2),
        ConvNeXtConfig("convnextv2_pico", (2, 2, 6, 2), (64, 128, 256, 512), **_V1_SMALL, **_V2),
        ConvNeXtConfig("convnextv2_nano", (2, 2, 8, 2), (80, 160, 320, 640), **_V1_SMALL, **_V2),
        ConvNeXtConfig("convnextv2_tiny", (3, 3, 9, 3), (96, 192, 384, 768), **_V2),
        ConvNeXtConfig("convnextv2_small", (3, 3, 27, 3), (96, 192, 384, 768), **_V2),
        ConvNeXtConfig("convnextv2_base", (3, 3, 27, 3), (128, 256, 512, 1024), **_V2),
        ConvNeXtConfig("convnextv2_large", (3, 3, 27, 3), (192, 384, 768, 1536), **_V2),
        ConvNeXtConfig("convnextv2_huge", (3, 3, 27, 3), (352, 704, 1408, 2816), **_V2),
    )
}


def list_models() -> list[str]:
    """Names of every architecture npconvnext builds, as timm spells them."""
    return list(VARIANTS)


def get_config(name: str, **overrides) -> ConvNeXtConfig:
    """The config of architecture `name`; `overrides` replace fields (e.g. num_classes=21841)."""
    arch = name.split(".", 1)[0]  # "convnext_tiny.fb_in1k" names the architecture convnext_tiny
    if arch not in VARIANTS:
        known = ", ".join(VARIANTS)
        raise ValueError(f"unknown ConvNeXt architecture {name!r}; known: {known}")
    config = VARIANTS[arch]
    return replace(config, **overrides) if overrides else config
