"""Every row of the variant table against the architecture timm builds under the same name, and
the parameter table (params.TABLE) against the typed weights it names."""

import numpy as np
import pytest
import timm
import torch

import npconvnext
from npconvnext.params import TABLE, expected_shapes, layout_kind, param_of, rows, timm_name
from npconvnext.weights import TYPES, NetworkWeights

TIMM_NAMES = sorted(timm.list_models("convnext*"))


def test_list_models_covers_timm():
    # every convnext* name timm registers: its own stems (_ols), norms (_rms) and heads (_mlp, _hnf) too
    assert sorted(npconvnext.list_models()) == TIMM_NAMES


def _stem_type(model) -> str:
    convs = [m for m in model.stem if isinstance(m, torch.nn.Conv2d)]
    if len(convs) == 1:
        return "patch"
    if any(type(m).__name__ == "GELU" for m in model.stem):  # timm's own GELU module, or torch's
        return "overlap_act"
    return "overlap_tiered" if convs[0].out_channels != convs[1].out_channels else "overlap"


_NORMS = {"LayerNorm": "layernorm", "LayerNorm2d": "layernorm", "RmsNorm": "rmsnorm", "RmsNorm2d": "rmsnorm",
          "SimpleNorm": "simplenorm", "SimpleNorm2d": "simplenorm"}


@pytest.mark.parametrize("name", npconvnext.list_models())
def test_row_matches_timm(name):
    config = npconvnext.get_config(name)
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    assert config.depths == tuple(len(s.blocks) for s in model.stages)
    assert config.dims == tuple(s.blocks[0].conv_dw.out_channels for s in model.stages)
    block = model.stages[0].blocks[0]
    assert config.conv_mlp == isinstance(block.mlp.fc1, torch.nn.Conv2d)
    assert config.use_grn == hasattr(block.mlp, "grn")
    assert config.layer_scale == (block.gamma is not None)
    assert config.kernel_size == block.conv_dw.kernel_size[0]
    assert config.stem_type == _stem_type(model)
    if config.stem_type == "patch":
        assert config.patch_size == model.stem[0].stride[0]
    else:
        assert [m.stride[0] for m in model.stem if isinstance(m, torch.nn.Conv2d)] == [2, 2]
        assert config.stem_mid == model.stem[0].out_channels
    assert config.head_norm_first == (not isinstance(model.norm_pre, torch.nn.Identity))
    head_norm = model.norm_pre if config.head_norm_first else model.head.norm
    hidden = getattr(model.head, "pre_logits", None)
    assert config.head_hidden_size == (hidden.fc.out_features if hasattr(hidden, "fc") else None)
    for norm in (model.stem[-1], block.norm, model.stages[1].downsample[0], head_norm):
        assert config.norm_eps == norm.eps
        assert config.norm == _NORMS[type(norm).__name__]
    if config.use_grn:
        assert config.grn_eps == block.mlp.grn.eps
    # every parameter: the same names, shapes and order as timm's state dict
    timm_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(expected_shapes(config).items()) == list(timm_shapes.items())


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(npconvnext.errors.InputError, match="unknown ConvNeXt architecture 'convnext_huge'.*convnext_tiny"):
        npconvnext.get_config("convnext_huge")


def test_tag_suffix_names_the_architecture():
    assert npconvnext.get_config("convnext_tiny.fb_in1k") is npconvnext.VARIANTS["convnext_tiny"]


def test_the_typed_weights_have_the_parameter_tables_fields():
    for module, kind in TYPES.items():
        assert sorted(kind._fields) == sorted(r.field for r in rows(module)), module
    assert sorted(TYPES) == sorted({r.module for r in TABLE})


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto", "convnext_tiny", "convnextv2_tiny",
                                  "convnext_atto_ols", "convnext_zepto_rms_ols", "convnext_atto_rms",
                                  "convnext_tiny_hnf", "convnext_large_mlp"])
def test_every_timm_name_goes_through_the_typed_weights_and_back(name):
    shapes = expected_shapes(npconvnext.get_config(name))
    state = {k: np.zeros(1) for k in shapes}  # only the names matter here
    weights = NetworkWeights.from_params(state, npconvnext.get_config(name))
    assert sorted(weights.named()) == sorted(shapes)
    config = npconvnext.get_config(name)
    for k in shapes:
        assert param_of(k, config).layout == layout_kind(k) or len(shapes[k]) != 4  # rank decides shared names
        assert param_of(k, config).shape(config, int(k.split(".")[1]) if k.startswith("stages") else 3) == shapes[k]
        assert timm_name(param_of(k).module, param_of(k).field, int(k.split(".")[1]) if k.startswith("stages") else 0,
                         int(k.split(".")[3]) if ".blocks." in k else 0) == k
    assert param_of("stages.0.blocks.0.mlp.fc3.weight") is None and param_of("stages.x") is None
