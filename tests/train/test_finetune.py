"""`finetune`: a folder per class in, timm-loadable weights out; resumable; bad input named."""

import os

import numpy as np
import pytest
from PIL import Image

import npconvnext
from npconvnext.errors import TrainingError
from npconvnext.formats.data_config import data_config_for_weights
from npconvnext.formats import read_safetensors, read_safetensors_with_metadata
from npconvnext.train.finetune import Recipe, finetune

RECIPE = Recipe(epochs=2, batch_size=8, lr=2e-3, img_size=32, drop_path_rate=0.1, val_split=0.25, seed=3)


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """sklearn's 8x8 digits 0, 1 and 7 as 40x40 RGB PNGs, a folder per class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("digits")
    for label, name in ((0, "zero"), (1, "one"), (7, "seven")):
        os.makedirs(root / name)
        for k, image in enumerate(digits.images[digits.target == label][:12]):
            pixels = np.kron(image * 255 / 16, np.ones((5, 5))).astype(np.uint8)
            Image.fromarray(pixels, "L").convert("RGB").save(root / name / f"{k}.png")
    return root


def tensors(path):
    return {k: np.array(v) for k, v in read_safetensors(str(path)).items()}


def test_output_loads_in_timm_with_the_class_names(digits_folder, tmp_path):
    import timm
    import torch

    out = tmp_path / "out.safetensors"
    reports = finetune(str(digits_folder), str(out), "convnext_atto", recipe=RECIPE)
    assert [r.epoch for r in reports] == [1, 2] and all(r.val_top1 is not None for r in reports)
    _, metadata = read_safetensors_with_metadata(str(out))
    assert metadata["class_names"] == '["one", "seven", "zero"]'
    config = data_config_for_weights(str(out))
    assert config.input_size == (32, 32) and config.mean == npconvnext.data_config("convnext_atto").mean
    # the overlay must carry num_classes too: timm drops a classifier whose size differs from its cfg's
    net = timm.create_model("convnext_atto", num_classes=3, pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(out), num_classes=3)).eval()
    model = npconvnext.create_model(None, weights=str(out))
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model(x), expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    assert os.path.exists(tmp_path / "out.checkpoint.safetensors")


def test_a_resumed_run_ends_with_the_uninterrupted_runs_weights(digits_folder, tmp_path):
    straight = tmp_path / "straight.safetensors"
    finetune(str(digits_folder), str(straight), "convnext_atto", recipe=RECIPE)

    class Interrupted(Exception):
        pass

    def stop_after_the_first_checkpoint(message):
        if message.startswith("epoch 1:"):
            raise Interrupted  # as a Ctrl-C would, once epoch 1's checkpoint is written

    resumed = tmp_path / "resumed.safetensors"
    with pytest.raises(Interrupted):
        finetune(str(digits_folder), str(resumed), "convnext_atto", recipe=RECIPE,
                 progress=stop_after_the_first_checkpoint)
    assert not resumed.exists()
    checkpoint = tmp_path / "resumed.checkpoint.safetensors"
    after_epoch_1 = tensors(checkpoint)["model/head.fc.weight"]
    reports = finetune(str(digits_folder), str(resumed), "convnext_atto", recipe=RECIPE, resume=str(checkpoint))
    assert [r.epoch for r in reports] == [2]
    a, b = tensors(straight), tensors(resumed)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)
    assert not np.array_equal(after_epoch_1, a["head.fc.weight"])  # epoch 2 changed the weights


def test_fine_tuning_from_weights_replaces_the_head(digits_folder, tmp_path):
    from safetensors.numpy import save_file

    from npconvnext.params import random_state_dict

    weights = tmp_path / "in1k.safetensors"
    save_file(random_state_dict(npconvnext.get_config("convnext_atto"), seed=1), weights)
    out = tmp_path / "out.safetensors"
    finetune(str(digits_folder), str(out), "convnext_atto", weights=str(weights),
             recipe=Recipe(**{**RECIPE.__dict__, "epochs": 1}))
    assert tensors(out)["head.fc.weight"].shape == (3, 320)


def test_unreadable_images_are_named_and_skipped(digits_folder, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(digits_folder, root)
    (root / "one" / "broken.png").write_bytes(b"not a png")
    warnings = []
    reports = finetune(str(root), str(tmp_path / "o.safetensors"), "convnext_atto",
                       recipe=Recipe(**{**RECIPE.__dict__, "epochs": 1, "val_split": 0.0}), warn=warnings.append)
    assert any("broken.png" in w for w in warnings) and reports[0].skipped == 1


def test_an_empty_class_folder_is_refused(digits_folder, tmp_path):
    os.makedirs(tmp_path / "data" / "a")
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "a" / "x.png")
    os.makedirs(tmp_path / "data" / "b")
    with pytest.raises(TrainingError, match="b: class folder holds no images"):
        finetune(str(tmp_path / "data"), str(tmp_path / "o.safetensors"), "convnext_atto", recipe=RECIPE)


def test_a_checkpoint_of_another_architecture_is_refused(digits_folder, tmp_path):
    finetune(str(digits_folder), str(tmp_path / "a.safetensors"), "convnext_atto",
             recipe=Recipe(**{**RECIPE.__dict__, "epochs": 1}))
    with pytest.raises(TrainingError, match="checkpoint of convnext_atto, not of convnextv2_atto"):
        finetune(str(digits_folder), str(tmp_path / "b.safetensors"), "convnextv2_atto", recipe=RECIPE,
                 resume=str(tmp_path / "a.checkpoint.safetensors"))


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(digits_folder, tmp_path):
    out = tmp_path / "o.safetensors"
    finetune(str(digits_folder), str(out), "convnext_atto", recipe=Recipe(**{**RECIPE.__dict__, "epochs": 1}))
    checkpoint = tmp_path / "o.checkpoint.safetensors"
    before = checkpoint.read_bytes()
    exploding = Recipe(**{**RECIPE.__dict__, "lr": 1e30, "weight_decay": 0.0})
    with pytest.raises(TrainingError, match=r"loss is nan at step \d+ \(epoch 2, batch \d+\).*o.checkpoint.safetensors \(epoch 1\)"):
        finetune(str(digits_folder), str(out), "convnext_atto", recipe=exploding, resume=str(checkpoint))
    assert checkpoint.read_bytes() == before


def test_finetune_command_then_classify_with_the_class_names(digits_folder, tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "digits.safetensors"
    done = subprocess.run([sys.executable, "-m", "npconvnext", "finetune", str(digits_folder), "--model", "convnext_atto",
                           "--epochs", "1", "--batch-size", "8", "--img-size", "32", "--val-split", "0.25", "-o", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "epoch 1: loss" in done.stdout and out.exists()
    image = digits_folder / "seven" / "0.png"
    done = subprocess.run([sys.executable, "-m", "npconvnext", "classify", str(image), "--weights", str(out),
                           "--json", "--top-k", "3"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)
    assert sorted(row["labels"]) == ["one", "seven", "zero"]
    model = npconvnext.create_model(None, weights=str(out))
    x = npconvnext.preprocess(str(image), model.data_config)[None]
    assert row["labels"][0] == model.class_names[int(model(x).argmax())]
