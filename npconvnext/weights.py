"""The network's weights, typed: one NamedTuple per module (stem, downsample, block, head, and
the overlapping stems and head_norm_first's norm_pre of timm's own variants).

Each field is a row of `params.TABLE`, which gives its timm name, shape and layout; the arrays
here are in compute layout (see params.py). C is the stage's width, 4C the MLP's hidden width.
`tests/test_config.py` checks that these fields are the table's, row for row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from .config import ConvNeXtConfig
from .errors import InputError
from .params import PREFIXES, STEMS, rows


class StemWeights(NamedTuple):
    conv_weight: np.ndarray   # (4 * 4 * 3, C0) patchify kernel
    conv_bias: np.ndarray     # (C0,)
    norm_weight: np.ndarray   # (C0,)
    norm_bias: np.ndarray | None  # (C0,) LayerNorm only: RMS and simple norms have no bias


class OverlapStemWeights(NamedTuple):
    """The overlapping stems ("overlap", "overlap_tiered", "overlap_act"): two 3x3 stride-2 convs."""
    conv1_weight: np.ndarray  # (3 * 3 * 3, mid) kernel of the first conv, patchify layout
    conv1_bias: np.ndarray    # (mid,)
    conv_weight: np.ndarray   # (3 * 3 * mid, C0) the second conv's
    conv_bias: np.ndarray     # (C0,)
    norm_weight: np.ndarray   # (C0,)
    norm_bias: np.ndarray | None  # (C0,) LayerNorm only


class NormWeights(NamedTuple):
    """head_norm_first's norm of the last feature map (timm's norm_pre)."""
    norm_weight: np.ndarray          # (C_last,)
    norm_bias: np.ndarray | None     # (C_last,) LayerNorm only


class DownsampleWeights(NamedTuple):
    norm_weight: np.ndarray   # (C_prev,)
    norm_bias: np.ndarray | None  # (C_prev,) LayerNorm only
    conv_weight: np.ndarray   # (2 * 2 * C_prev, C) patchify kernel
    conv_bias: np.ndarray     # (C,)


class BlockWeights(NamedTuple):
    conv_dw_weight: np.ndarray      # (7, 7, C)
    conv_dw_bias: np.ndarray        # (C,)
    norm_weight: np.ndarray         # (C,)
    norm_bias: np.ndarray | None    # (C,) LayerNorm only
    fc1_weight: np.ndarray          # (C, 4C)
    fc1_bias: np.ndarray            # (4C,)
    grn_weight: np.ndarray | None   # (4C,) V2 only
    grn_bias: np.ndarray | None     # (4C,) V2 only
    fc2_weight: np.ndarray          # (4C, C)
    fc2_bias: np.ndarray            # (C,)
    gamma: np.ndarray | None        # (C,) V1 only: layer scale


class StageWeights(NamedTuple):
    downsample: DownsampleWeights | None   # None in stage 0: the stem already downsampled
    blocks: tuple[BlockWeights, ...]


class HeadWeights(NamedTuple):
    norm_weight: np.ndarray | None   # (C_last,) None with head_norm_first (norm_pre norms instead)
    norm_bias: np.ndarray | None     # (C_last,) LayerNorm only
    fc_weight: np.ndarray | None   # (D, num_classes), D = C_last or the pre-logits width; None: num_classes 0
    fc_bias: np.ndarray | None     # (num_classes,)
    pre_fc_weight: np.ndarray | None = None   # (C_last, D) the pre-logits fc (head_hidden_size)
    pre_fc_bias: np.ndarray | None = None     # (D,)


TYPES = {"stem": StemWeights, "stem_overlap": OverlapStemWeights, "stem_overlap_act": OverlapStemWeights,
         "downsample": DownsampleWeights, "block": BlockWeights, "norm_pre": NormWeights, "head": HeadWeights}


class NetworkWeights(NamedTuple):
    stem: StemWeights | OverlapStemWeights
    stages: tuple[StageWeights, ...]
    head: HeadWeights
    norm_pre: NormWeights | None = None   # head_norm_first only
    stem_kind: str = "stem"               # the stem's module in the parameter table (params.STEMS)

    @classmethod
    def from_params(cls, p: Mapping[str, np.ndarray], config: ConvNeXtConfig) -> NetworkWeights:
        """The typed weights from compute-layout arrays under timm's names. KeyError for a
        missing weight; only those the table marks optional (V1's gamma, V2's GRN, the classifier,
        ...) may be absent."""
        def typed(kind, prefix):
            return TYPES[kind](**{r.field: p.get(prefix + r.timm) if r.only_if else p[prefix + r.timm]
                                  for r in rows(kind)})

        stages = tuple(
            StageWeights(typed("downsample", PREFIXES["downsample"].format(i=i)) if i > 0 else None,
                         tuple(typed("block", PREFIXES["block"].format(i=i, j=j)) for j in range(depth)))
            for i, depth in enumerate(config.depths))
        stem = STEMS[config.stem_type]
        norm_pre = typed("norm_pre", PREFIXES["norm_pre"]) if config.head_norm_first else None
        return cls(typed(stem, PREFIXES[stem]), stages, typed("head", PREFIXES["head"]), norm_pre, stem)

    def named(self) -> dict[str, np.ndarray]:
        """The arrays by timm name, the inverse of `from_params` (fields that are None left out)."""
        def named(kind, weights, prefix):
            return {prefix + r.timm: getattr(weights, r.field) for r in rows(kind)
                    if getattr(weights, r.field) is not None}

        out = named(self.stem_kind, self.stem, PREFIXES[self.stem_kind])
        for i, stage in enumerate(self.stages):
            if stage.downsample is not None:
                out.update(named("downsample", stage.downsample, PREFIXES["downsample"].format(i=i)))
            for j, block in enumerate(stage.blocks):
                out.update(named("block", block, PREFIXES["block"].format(i=i, j=j)))
        if self.norm_pre is not None:
            out.update(named("norm_pre", self.norm_pre, PREFIXES["norm_pre"]))
        out.update(named("head", self.head, PREFIXES["head"]))
        return out


# ---- what training changes: writable weights, and those it leaves alone --------------------------


def owned(params: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """Writable copies of read-only (memory-mapped) weights, the others as they are, for an
    optimizer to update in place; None if every weight is writable already."""
    if all(a.flags.writeable for a in params.values()):
        return None
    return {name: a if a.flags.writeable else np.array(a, order="K") for name, a in params.items()}


def frozen_after(frozen: set[str], names: list[str], prefix: str, requires_grad: bool) -> set[str]:
    """The frozen timm names once those starting with `prefix` are frozen (requires_grad False)
    or unfrozen; InputError when no name starts with it."""
    matching = {name for name in names if name.startswith(prefix)}
    if not matching:
        raise InputError(f"no weight's name starts with {prefix!r}")
    return frozen - matching if requires_grad else frozen | matching
