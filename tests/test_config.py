"""Every row of the variant table against the architecture timm builds under the same name, and
the parameter table (params.TABLE) against the typed weights it names."""

import numpy as np
import pytest
import timm
import torch

import npconvnext
from npconvnext.params import TABLE, expected_shapes, layout_kind, param_of, rows, timm_name
from npconvnext.weights import TYPES, NetworkWeights

TIMM_NAMES = sorted(n for n in timm.list_models("convnext*")
                    if n.count("_") == 1 and not n.startswith("convnext_tiny_hnf"))


def test_list_models_covers_timm_classic_layout():
    # timm's other convnext* names are different stems (_ols), norms (_rms) or heads (_mlp, _hnf)
    assert sorted(npconvnext.list_models()) == TIMM_NAMES


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
    assert config.patch_size == model.stem[0].stride[0]
    for norm in (model.stem[1], block.norm, model.stages[1].downsample[0], model.head.norm):
        assert config.norm_eps == norm.eps
    if config.use_grn:
        assert config.grn_eps == block.mlp.grn.eps
    # every parameter: the same names, shapes and order as timm's state dict
    timm_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(expected_shapes(config).items()) == list(timm_shapes.items())


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown ConvNeXt architecture 'convnext_huge'.*convnext_tiny"):
        npconvnext.get_config("convnext_huge")


def test_tag_suffix_names_the_architecture():
    assert npconvnext.get_config("convnext_tiny.fb_in1k") is npconvnext.VARIANTS["convnext_tiny"]


def test_the_typed_weights_have_the_parameter_tables_fields():
    for module, kind in TYPES.items():
        assert sorted(kind._fields) == sorted(r.field for r in rows(module)), module
    assert sorted(TYPES) == sorted({r.module for r in TABLE})


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto", "convnext_tiny", "convnextv2_tiny"])
def test_every_timm_name_goes_through_the_typed_weights_and_back(name):
    shapes = expected_shapes(npconvnext.get_config(name))
    state = {k: np.zeros(1) for k in shapes}  # only the names matter here
    weights = NetworkWeights.from_params(state, npconvnext.get_config(name))
    assert sorted(weights.named()) == sorted(shapes)
    for k in shapes:
        assert param_of(k).layout == layout_kind(k)
        assert timm_name(param_of(k).module, param_of(k).field, int(k.split(".")[1]) if k.startswith("stages") else 0,
                         int(k.split(".")[3]) if ".blocks." in k else 0) == k
    assert param_of("stages.0.blocks.0.mlp.fc3.weight") is None and param_of("stages.x") is None
