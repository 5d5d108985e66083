"""The ConvNeXt variant table.

Every row is an architecture that timm registers under the same name (timm/models/convnext.py,
the `convnext_*` and `convnextv2_*` factories). Sizes follow the ConvNeXt paper (Liu et al.,
"A ConvNet for the 2020s", 2022, table 9) and the ConvNeXt-V2 paper (Woo et al., 2023).
`tests/test_config.py` checks every row against timm, so the table cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import InputError


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
    stem_type: str = "patch"    # "patch": one 4x4 stride-4 conv; "overlap": two 3x3 stride-2 convs,
                                # "overlap_tiered" the first half as wide, "overlap_act" a GELU between
    norm: str = "layernorm"     # every norm in the net: "layernorm", "rmsnorm" (no centring, no bias)
                                # or "simplenorm" (scaled by the unbiased variance, no centring, no bias)
    head_norm_first: bool = False       # norm -> pool -> fc (timm's norm_pre), not pool -> norm -> fc
    head_hidden_size: int | None = None  # the head's pre-logits fc + GELU to this width (None: none)

    @property
    def num_features(self) -> int:
        """Width of the pooled embedding that the classifier reads."""
        return self.dims[-1]

    @property
    def stem_mid(self) -> int:
        """Width between an overlapping stem's two convs: C0, or C0 / 2 rounded to a multiple of
        8 for the tiered stem (timm's make_divisible)."""
        if "tiered" not in self.stem_type:
            return self.dims[0]
        half = self.dims[0] // 2
        rounded = max(8, int(half + 4) // 8 * 8)
        return rounded + 8 if rounded < 0.9 * half else rounded

    @property
    def norm_bias(self) -> bool:
        """Whether the norms have a bias (LayerNorm); RMS and simple norms scale only."""
        return self.norm == "layernorm"

    @property
    def head_pool_first(self) -> bool:
        """The default ConvNeXt head: pool, then the head's own norm (timm's head.norm)."""
        return not self.head_norm_first

    @property
    def head_norm_bias(self) -> bool:
        """Whether the head has a norm with a bias: pool-first, with LayerNorm."""
        return self.head_pool_first and self.norm_bias

    @property
    def head_features(self) -> int:
        """Width the classifier reads: the pre-logits fc's if the head has one."""
        return self.head_hidden_size or self.num_features

    @property
    def reduction(self) -> int:
        """Total spatial stride from the input to `forward_features`: 4 * 2 * 2 * 2."""
        return self.patch_size * 2 ** (len(self.dims) - 1)


_V1_SMALL = dict(conv_mlp=True)
_V2 = dict(use_grn=True, layer_scale=False)
_ZEPTO = dict(depths=(2, 2, 4, 2), dims=(32, 64, 128, 256), conv_mlp=True, norm="simplenorm")
_ATTO, _FEMTO = ((2, 2, 6, 2), (40, 80, 160, 320)), ((2, 2, 6, 2), (48, 96, 192, 384))
_PICO, _NANO = ((2, 2, 6, 2), (64, 128, 256, 512)), ((2, 2, 8, 2), (80, 160, 320, 640))
_TIERED = dict(_V1_SMALL, stem_type="overlap_tiered")

#: name -> config; the order is the order of `list_models()`.
VARIANTS: dict[str, ConvNeXtConfig] = {
    c.name: c
    for c in (
        ConvNeXtConfig("convnext_atto", *_ATTO, **_V1_SMALL),
        ConvNeXtConfig("convnext_femto", *_FEMTO, **_V1_SMALL),
        ConvNeXtConfig("convnext_pico", *_PICO, **_V1_SMALL),
        ConvNeXtConfig("convnext_nano", *_NANO, **_V1_SMALL),
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
        # timm's own variants: other stems, norms and heads on the sizes above
        ConvNeXtConfig("convnext_zepto_rms", **_ZEPTO),
        ConvNeXtConfig("convnext_zepto_rms_ols", **_ZEPTO, stem_type="overlap_act"),
        ConvNeXtConfig("convnext_atto_ols", *_ATTO, **_TIERED),
        ConvNeXtConfig("convnext_atto_rms", *_ATTO, **_V1_SMALL, norm="rmsnorm"),
        ConvNeXtConfig("convnext_femto_ols", *_FEMTO, **_TIERED),
        ConvNeXtConfig("convnext_pico_ols", *_PICO, **_TIERED),
        ConvNeXtConfig("convnext_nano_ols", *_NANO, **_V1_SMALL, stem_type="overlap"),
        ConvNeXtConfig("convnext_tiny_hnf", (3, 3, 9, 3), (96, 192, 384, 768), **_V1_SMALL, head_norm_first=True),
        ConvNeXtConfig("convnext_large_mlp", (3, 3, 27, 3), (192, 384, 768, 1536), head_hidden_size=1536),
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
        raise InputError(f"unknown ConvNeXt architecture {name!r}; known: {known}")
    config = VARIANTS[arch]
    return replace(config, **overrides) if overrides else config
