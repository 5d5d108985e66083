"""Training: every gradient against PyTorch autograd and finite differences; AdamW against torch's."""

import dataclasses

import numpy as np
import pytest
import torch

import npconvnext
from npconvnext import train
from npconvnext.config import ConvNeXtConfig
from npconvnext.formats import read_safetensors
from npconvnext.model import ConvNeXt
from npconvnext.params import random_state_dict
from npconvnext.train.optim import cosine_schedule, layer_decay_scales
from tests.support.timm_reference import numpy_state_dict, random_images, random_timm_model

GRAD_TOLERANCE = {np.float64: 1e-10, np.float32: 1e-4}


def torch_loss_and_grads(net, x, y, label_smoothing):
    net.zero_grad()
    logits = net(torch.from_numpy(x))
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y), label_smoothing=label_smoothing)
    loss.backward()
    return float(loss.detach()), {name: p.grad.numpy() for name, p in net.named_parameters()}


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name, size", [("convnext_atto", (35, 45)), ("convnextv2_atto", (64, 33)),
                                        ("convnext_tiny", (32, 40)), ("convnext_atto_ols", (37, 45)),
                                        ("convnext_zepto_rms_ols", (33, 40)), ("convnext_atto_rms", (35, 32)),
                                        ("convnext_tiny_hnf", (32, 40))])
def test_gradients_equal_torch_autograd(name, size, dtype, backend):
    net = random_timm_model(name, seed=11, num_classes=7).to(torch.float64 if dtype == np.float64 else torch.float32)
    net.train()  # timm's ConvNeXt has no batch norm: train mode differs only by drop path, 0 here
    model = npconvnext.create_model(name, weights=numpy_state_dict(net), dtype=dtype.__name__, backend=backend)
    x = random_images((3, 3, *size), dtype, seed=2)
    y = np.array([0, 6, 3])
    expected_loss, expected = torch_loss_and_grads(net, x, y, label_smoothing=0.1)
    loss, grads = train.loss_and_grads(model, x, y, label_smoothing=0.1)
    assert list(grads) == list(model.state_dict())
    assert abs(loss - expected_loss) <= GRAD_TOLERANCE[dtype] * abs(expected_loss)
    worst = 0.0
    for key, g in expected.items():
        assert grads[key].dtype == dtype and grads[key].shape == g.shape, key
        error = np.abs(grads[key] - g).max() / np.abs(g).max()
        worst = max(worst, error)
        assert error <= GRAD_TOLERANCE[dtype], f"{key}: relative error {error:.3g}"
    print(f"{name} {dtype.__name__} {backend}: worst relative gradient error {worst:.2e}")


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_large_mlp_gradients_equal_torch_autograd(backend):
    """convnext_large_mlp's pre-logits head: float32 only, as the model is large."""
    test_gradients_equal_torch_autograd("convnext_large_mlp", (64, 64), np.float32, backend)


TINY = ConvNeXtConfig("tiny_test", depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_classes=5)
# timm's own variants' parts on the tiny sizes: stems, norms and heads
TINY_VARIANTS = [TINY, dataclasses.replace(TINY, use_grn=True, layer_scale=False, conv_mlp=True),
                 dataclasses.replace(TINY, stem_type="overlap_act", norm="simplenorm", head_norm_first=True),
                 dataclasses.replace(TINY, stem_type="overlap_tiered", norm="rmsnorm", head_hidden_size=12)]
TINY_IDS = ["v1", "v2", "ols-simplenorm-hnf", "tiered-rms-mlp"]


@pytest.mark.parametrize("config", TINY_VARIANTS, ids=TINY_IDS)
def test_gradients_equal_finite_differences_with_drop_path_and_dropout(config):
    model = ConvNeXt(config, random_state_dict(config, seed=4), dtype="float64")
    x = random_images((4, 3, 32, 36), np.float64, seed=5)
    y = np.array([1, 4, 0, 2])

    def loss_and_grads():  # the same drop masks every call: a fresh generator with one seed
        return train.loss_and_grads(model, x, y, label_smoothing=0.2, drop_path_rate=0.5, drop_rate=0.3,
                                    rng=np.random.default_rng(8))

    _, grads = loss_and_grads()
    rng = np.random.default_rng(0)
    params = model.trainable_params()
    state = model.state_dict()
    checked = 0
    for name in state:
        timm_view = state[name]
        for _ in range(2):
            index = tuple(int(rng.integers(s)) for s in timm_view.shape)
            h = 1e-5 * max(1.0, abs(float(timm_view[index])))
            losses = []
            for step in (h, -h):
                shifted = dict(state)
                shifted[name] = timm_view.copy()
                shifted[name][index] += step
                model.load_state_dict(shifted)
                losses.append(loss_and_grads()[0])
            model.load_state_dict(state)
            numeric = (losses[0] - losses[1]) / (2 * h)
            assert abs(numeric - grads[name][index]) <= 1e-6 * max(1.0, abs(numeric)), (name, index)
            checked += 1
    assert checked == 2 * len(state) and params is not None


@pytest.mark.parametrize("config", TINY_VARIANTS, ids=TINY_IDS)
def test_both_backends_agree_with_drop_path_and_dropout(config):
    # the numba backend's fused training block (train/fused.py) against the readable one, with
    # the drop-path and dropout masks drawn from one seed
    x = random_images((4, 3, 35, 39), np.float64, seed=5)
    y = np.array([1, 4, 0, 2])
    results = {}
    for backend in ("numpy", "numba"):
        model = ConvNeXt(config, random_state_dict(config, seed=4), dtype="float64", backend=backend)
        results[backend] = train.loss_and_grads(model, x, y, label_smoothing=0.1, drop_path_rate=0.5,
                                                drop_rate=0.3, rng=np.random.default_rng(8))
    (loss, grads), (expected_loss, expected) = results["numba"], results["numpy"]
    assert abs(loss - expected_loss) <= 1e-12 * abs(expected_loss)
    for name, g in expected.items():
        assert np.abs(grads[name] - g).max() <= 1e-12 * np.abs(g).max(), name


def test_drop_path_drops_whole_images_and_is_seeded():
    model = ConvNeXt(TINY, random_state_dict(TINY, seed=4), dtype="float64")
    x = random_images((8, 3, 32, 32), np.float64, seed=5)
    y = np.arange(8) % 5
    plain, _ = train.loss_and_grads(model, x, y)
    a, grads_a = train.loss_and_grads(model, x, y, drop_path_rate=0.9, rng=np.random.default_rng(1))
    b, grads_b = train.loss_and_grads(model, x, y, drop_path_rate=0.9, rng=np.random.default_rng(1))
    c, _ = train.loss_and_grads(model, x, y, drop_path_rate=0.9, rng=np.random.default_rng(2))
    assert a == b and a != c and a != plain
    for key in grads_a:
        np.testing.assert_array_equal(grads_a[key], grads_b[key])


def test_labels_out_of_range_are_refused():
    model = ConvNeXt(TINY, random_state_dict(TINY), dtype="float64")
    with pytest.raises(npconvnext.errors.InputError, match="0 .. 4"):
        train.loss_and_grads(model, np.zeros((1, 3, 32, 32)), np.array([5]))


def test_adamw_steps_equal_torch_with_schedule_and_layer_decay():
    net = random_timm_model("convnext_atto", seed=3, num_classes=4).double().train()
    initial = {k: v.copy() for k, v in numpy_state_dict(net).items()}
    model = npconvnext.create_model("convnext_atto", weights=initial, dtype="float64")
    x = random_images((2, 3, 32, 32), np.float64, seed=1)
    y = np.array([1, 3])
    scales = layer_decay_scales(model.config, 0.7)
    groups = [{"params": [p], "weight_decay": 0.0 if p.ndim <= 1 else 0.05, "lr_scale": scales[n], "name": n}
              for n, p in net.named_parameters()]
    torch_opt = torch.optim.AdamW(groups, lr=2e-3, betas=(0.9, 0.999), eps=1e-8)
    opt = train.AdamW(model, lr=2e-3, weight_decay=0.05, lr_scales=scales)
    for step in range(4):
        lr = cosine_schedule(step, 4, 2e-3, warmup_steps=2, warmup_start_lr=1e-4)
        for group in torch_opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        opt.lr = lr
        torch_loss_and_grads(net, x, y, label_smoothing=0.1)
        torch_opt.step()
        _, grads = train.loss_and_grads(model, x, y, label_smoothing=0.1)
        opt.step(grads)
    for name, value in model.state_dict().items():
        expected = net.state_dict()[name].numpy()
        assert np.abs(expected - initial[name]).max() > 0, name  # every weight was updated
        assert np.abs(value - expected).max() <= 1e-10 * np.abs(expected).max(), name


def test_adamw_resumes_from_its_state_and_leaves_frozen_and_mapped_weights_alone(tmp_path):
    from safetensors.numpy import save_file

    state = random_state_dict(TINY, seed=1)
    path = tmp_path / "w.safetensors"
    save_file(state, path)
    mapped = read_safetensors(str(path))  # read-only views of the file
    x = random_images((2, 3, 32, 32), np.float32, seed=1)
    y = np.array([0, 1])

    def run(model, opt, steps):
        for _ in range(steps):
            opt.step(train.loss_and_grads(model, x, y)[1])

    straight = ConvNeXt(TINY, mapped)
    straight.requires_grad_("stem", False)
    opt = train.AdamW(straight, lr=1e-2)
    run(straight, opt, 3)
    np.testing.assert_array_equal(mapped["head.fc.bias"], state["head.fc.bias"])  # the file is untouched
    np.testing.assert_array_equal(straight.state_dict()["stem.0.weight"], state["stem.0.weight"])  # frozen
    assert not np.array_equal(straight.state_dict()["head.fc.bias"], state["head.fc.bias"])

    first = ConvNeXt(TINY, mapped)
    first.requires_grad_("stem", False)
    opt_first = train.AdamW(first, lr=1e-2)
    run(first, opt_first, 1)
    resumed = ConvNeXt(TINY, first.state_dict())
    resumed.requires_grad_("stem", False)
    opt_resumed = train.AdamW(resumed, lr=0.5)
    opt_resumed.load_state_dict(opt_first.state_dict())
    run(resumed, opt_resumed, 2)
    for name, value in straight.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[name], value, err_msg=name)


def test_reset_classifier_gives_a_fresh_head_of_the_new_size():
    model = ConvNeXt(TINY, random_state_dict(TINY))
    before = model.state_dict()
    model.reset_classifier(3, seed=1)
    after = model.state_dict()
    assert model.config.num_classes == 3 and after["head.fc.weight"].shape == (3, 32)
    assert 0.01 < after["head.fc.weight"].std() < 0.03 and not after["head.fc.bias"].any()
    assert all(np.array_equal(after[k], before[k]) for k in before if not k.startswith("head.fc"))


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto"])
def test_init_follows_timms_training_init(name):
    import timm

    net = timm.create_model(name, pretrained=False)
    reference = {k: v.numpy() for k, v in net.state_dict().items()}
    ours = npconvnext.params.init_state_dict(npconvnext.get_config(name))
    assert list(ours) == list(reference)
    for name, value in reference.items():
        if value.std() == 0:  # constants: ones, zeros, layer scale
            np.testing.assert_array_equal(ours[name], value, err_msg=name)
        else:
            assert abs(ours[name].std() / value.std() - 1) < 0.25 and ours[name].std() > 0, name


def test_cosine_schedule_and_layer_decay_groups():
    assert cosine_schedule(0, 10, 1.0, warmup_steps=2, warmup_start_lr=0.1) == pytest.approx(0.1)
    assert cosine_schedule(2, 10, 1.0, warmup_steps=2) == pytest.approx(1.0)
    assert cosine_schedule(6, 10, 1.0, warmup_steps=2) == pytest.approx(0.5)
    assert cosine_schedule(10, 10, 1.0, warmup_steps=2, final_lr=0.01) == pytest.approx(0.01)
    scales = layer_decay_scales(npconvnext.get_config("convnext_small"), 0.5)
    assert scales["head.fc.weight"] == 1.0
    assert scales["stem.0.weight"] == 0.5 ** 13
    assert scales["stages.2.blocks.26.norm.weight"] == 0.5 ** 2  # the 12 groups of the official recipe
    assert scales["stages.3.downsample.1.weight"] == scales["stages.3.blocks.0.gamma"] == 0.5


def test_training_on_digits_learns():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.repeat(np.repeat(digits.images / 8.0 - 1.0, 4, axis=1), 4, axis=2)  # (N, 32, 32)
    x = np.repeat(images[:, None], 3, axis=1).astype(np.float32)                    # (N, 3, 32, 32)
    y = digits.target
    order = np.random.default_rng(0).permutation(len(y))
    train_idx, val_idx = order[:1400], order[1400:]
    config = dataclasses.replace(TINY, num_classes=10)
    model = ConvNeXt(config, random_state_dict(config, seed=0))
    steps = 120
    opt = train.AdamW(model, lr=2e-3, weight_decay=0.05)
    rng = np.random.default_rng(1)
    for step in range(steps):
        batch = rng.choice(train_idx, 32, replace=False)
        opt.lr = cosine_schedule(step, steps, 2e-3, warmup_steps=10)
        opt.step(train.loss_and_grads(model, x[batch], y[batch], label_smoothing=0.1)[1])
    accuracy = float((model(x[val_idx]).argmax(axis=1) == y[val_idx]).mean())
    print(f"digits, tiny test config, {steps} steps of 32: validation top-1 {accuracy:.3f}")
    assert accuracy > 0.5  # chance is 0.1
