"""Layer-by-layer table of a ConvNeXt: output shapes, parameters and multiply-accumulates.

What is counted: the multiply-accumulates of the convolutions and linears only. Each costs
(input values per output element) MACs per output element, plus one per output element for
its bias; norms, GELU, GRN, layer scale, residual adds and pooling count nothing. GFLOPs are
2 x MACs. For convnext_tiny at 224 this is 4,468,966,888 MACs, 8.9379 GFLOPs; model cards that
count other operations too print other figures.
"""

from __future__ import annotations

from typing import NamedTuple

from .config import ConvNeXtConfig
from .errors import InputError
from .params import expected_shapes


class Row(NamedTuple):
    name: str
    output_shape: tuple[int, ...]  # (C, H, W) or (features,), batch excluded
    params: int
    macs: int


def summarize(config: ConvNeXtConfig, input_size: tuple[int, int] = (224, 224)) -> list[Row]:
    """One row per layer (a block is one row) for an (H, W) input; MACs as the module docstring says."""
    if min(input_size) < config.reduction:
        raise InputError(f"input size {input_size[0]}x{input_size[1]} is smaller than {config.name}'s total "
                         f"stride {config.reduction}: every side must be at least {config.reduction}")
    shapes = expected_shapes(config)

    def params(prefix):
        return sum(int(_prod(s)) for k, s in shapes.items() if k == prefix or k.startswith(prefix + "."))

    rows, (h, w) = _stem_rows(config, input_size, params)
    c = config.dims[0]
    for i, (depth, dim) in enumerate(zip(config.depths, config.dims)):
        if i > 0:
            prev, h, w = c, h // 2, w // 2
            rows.append(Row(f"stages.{i}.downsample.0", (prev, h * 2, w * 2), params(f"stages.{i}.downsample.0"), 0))
            rows.append(Row(f"stages.{i}.downsample.1", (dim, h, w), params(f"stages.{i}.downsample.1"),
                            h * w * dim * (prev * 4 + 1)))
        c = dim
        hidden = config.mlp_ratio * dim
        k2 = config.kernel_size ** 2
        block_macs = h * w * (dim * (k2 + 1) + hidden * (dim + 1) + dim * (hidden + 1))
        for j in range(depth):
            rows.append(Row(f"stages.{i}.blocks.{j}", (dim, h, w), params(f"stages.{i}.blocks.{j}"), block_macs))
    if config.head_norm_first:
        rows.append(Row("norm_pre", (c, h, w), params("norm_pre"), 0))
    else:
        rows.append(Row("head.norm", (c,), params("head.norm"), 0))
    if config.head_hidden_size:
        rows.append(Row("head.pre_logits.fc", (config.head_features,), params("head.pre_logits.fc"),
                        config.head_features * (c + 1)))
    rows.append(Row("head.fc", (config.num_classes,), params("head.fc"),
                    config.num_classes * (config.head_features + 1)))
    return rows


def _stem_rows(config: ConvNeXtConfig, input_size: tuple[int, int], params) -> tuple[list[Row], tuple[int, int]]:
    """The stem's rows and its output's (h, w): one patchify conv, or two 3x3 stride-2 convs
    with padding 1 (each output side ceil(side / 2)), then the norm."""
    c = config.dims[0]
    if config.stem_type == "patch":
        h, w = (s // config.patch_size for s in input_size)
        return [Row("stem.0", (c, h, w), params("stem.0"), h * w * c * (config.in_chans * config.patch_size ** 2 + 1)),
                Row("stem.1", (c, h, w), params("stem.1"), 0)], (h, w)
    mid = config.stem_mid
    h1, w1 = ((s - 1) // 2 + 1 for s in input_size)
    h, w = (h1 - 1) // 2 + 1, (w1 - 1) // 2 + 1
    rows = [Row("stem.0", (mid, h1, w1), params("stem.0"), h1 * w1 * mid * (config.in_chans * 9 + 1))]
    if config.stem_type == "overlap_act":
        rows.append(Row("stem.1", (mid, h1, w1), 0, 0))
    conv = len(rows)
    rows.append(Row(f"stem.{conv}", (c, h, w), params(f"stem.{conv}"), h * w * c * (mid * 9 + 1)))
    rows.append(Row(f"stem.{conv + 1}", (c, h, w), params(f"stem.{conv + 1}"), 0))
    return rows, (h, w)


def _prod(shape):
    out = 1
    for s in shape:
        out *= s
    return out


def format_summary(config: ConvNeXtConfig, input_size: tuple[int, int] = (224, 224)) -> str:
    rows = summarize(config, input_size)
    lines = [f"{config.name} at {input_size[0]}x{input_size[1]}",
             f"{'layer':<26} {'output':>16} {'params':>12} {'MACs':>15}"]
    for r in rows:
        lines.append(f"{r.name:<26} {str(r.output_shape):>16} {r.params:>12,} {r.macs:>15,}")
    params = sum(r.params for r in rows)
    macs = sum(r.macs for r in rows)
    lines.append(f"total: {params:,} parameters ({params / 1e6:.4f} M), {macs:,} MACs of convolutions "
                 f"and linears incl. bias ({macs / 1e9:.2f} GMACs, {2 * macs / 1e9:.4f} GFLOPs)")
    return "\n".join(lines)
