"""Training a headless backbone (num_classes 0: DINOv3, FCMAE): refused in one clear line as it is,
trained as any classifier once it has a head (reset_classifier, or finetune on a folder of classes)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

import npconvnext
from npconvnext import train
from npconvnext.errors import InputError
from npconvnext.formats import read_safetensors_with_metadata
from npconvnext.train.finetune import Recipe, finetune
from tests.support.timm_reference import numpy_state_dict, random_images, random_timm_model
from tests.train.test_train import GRAD_TOLERANCE, torch_loss_and_grads


def headless_weights(name, seed=3):
    net = random_timm_model(name, seed=seed, num_classes=0)
    state = numpy_state_dict(net)
    assert not any(k.startswith("head.fc") for k in state)
    return net, state


def test_a_training_step_on_a_headless_model_says_to_give_it_a_head():
    model = npconvnext.create_model("convnext_atto", weights=headless_weights("convnext_atto")[1])
    assert model.config.num_classes == 0
    with pytest.raises(InputError, match=r"no classifier.*reset_classifier"):
        train.loss_and_grads(model, random_images((2, 3, 32, 32)), np.array([0, 1]))


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto"])
def test_a_headless_model_given_a_head_has_timms_gradients(name):
    net, state = headless_weights(name)
    net = net.double().train()  # no batch norm: train mode differs only by drop path, 0 here
    model = npconvnext.create_model(name, weights=state, dtype="float64", backend="numpy")
    model.reset_classifier(4, seed=1)
    net.reset_classifier(4)
    head = model.state_dict()
    with torch.no_grad():  # the same fresh head on both sides
        net.head.fc.weight.copy_(torch.from_numpy(head["head.fc.weight"]))
        net.head.fc.bias.copy_(torch.from_numpy(head["head.fc.bias"]))
    x, y = random_images((3, 3, 32, 40), np.float64, seed=2), np.array([0, 3, 1])
    expected_loss, expected = torch_loss_and_grads(net, x, y, label_smoothing=0.1)
    loss, grads = train.loss_and_grads(model, x, y, label_smoothing=0.1)
    assert set(grads) == set(expected) and "head.fc.weight" in grads
    assert abs(loss - expected_loss) <= GRAD_TOLERANCE[np.float64] * abs(expected_loss)
    for key, g in expected.items():
        error = np.abs(grads[key] - g).max() / np.abs(g).max()
        assert error <= GRAD_TOLERANCE[np.float64], f"{key}: relative error {error:.3g}"


def test_finetune_from_a_headless_file_gives_it_a_head(tmp_path):
    from safetensors.numpy import save_file

    _, state = headless_weights("convnext_atto")
    backbone = tmp_path / "backbone.safetensors"
    save_file(state, backbone)
    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        os.makedirs(tmp_path / "data" / name)
        for k in range(4):
            pixels = rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{k}.png")
    out = tmp_path / "out.safetensors"
    recipe = Recipe(epochs=1, batch_size=4, img_size=32, val_split=0.0, seed=0)
    reports = finetune(str(tmp_path / "data"), str(out), None, weights=str(backbone), recipe=recipe,
                       progress=lambda message: None)
    assert len(reports) == 1 and np.isfinite(reports[0].loss)
    trained, metadata = read_safetensors_with_metadata(str(out))
    assert trained["head.fc.weight"].shape == (2, state["head.norm.weight"].shape[0])
    assert metadata["class_names"] == '["cats", "dogs"]'
    assert not np.array_equal(trained["stem.0.weight"], state["stem.0.weight"])  # the backbone trained too
    assert npconvnext.create_model(None, weights=str(out)).config.num_classes == 2
