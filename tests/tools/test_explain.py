"""npconvnext.explain against torch autograd on timm; the figures it draws."""

import warnings

import numpy as np
import pytest
import torch

import npconvnext
from npconvnext.explain import effective_receptive_field, grad_cam, stage_feature_maps, strongest_channels
from npconvnext.errors import InputError
from tests.support.timm_reference import numpy_state_dict, random_images, random_timm_model

TOLERANCE = {"float32": 1e-4, "float64": 1e-8}  # relative to the largest magnitude (the issue's)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def torch_grad_cam(net, x: np.ndarray, target, stage: int) -> np.ndarray:
    """Grad-CAM by its definition, with autograd: a forward hook keeps the stage's output A."""
    kept = {}
    hook = net.stages[stage].register_forward_hook(lambda m, args, out: kept.__setitem__("A", out))
    logits = net(torch.from_numpy(x))
    hook.remove()
    chosen = logits.argmax(dim=1) if target is None else torch.as_tensor(target).expand(len(x))
    (d_a,) = torch.autograd.grad(logits[torch.arange(len(x)), chosen].sum(), kept["A"])
    alpha = d_a.mean(dim=(2, 3), keepdim=True)
    return torch.relu((alpha * kept["A"]).sum(dim=1)).detach().numpy()


def torch_erf(net, x: np.ndarray, stage: int) -> np.ndarray:
    images = torch.from_numpy(x).requires_grad_(True)
    out = net.stem(images)
    for i in range(stage + 1):
        out = net.stages[i](out)
    out[:, :, out.shape[2] // 2, out.shape[3] // 2].sum().backward()
    return images.grad.abs().mean(dim=(0, 1)).numpy()


def pair(name: str, dtype: str, backend: str):
    net = random_timm_model(name, seed=3).to(getattr(torch, dtype))
    model = npconvnext.create_model(name, weights=numpy_state_dict(net), dtype=dtype, backend=backend)
    return net, model


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_femto"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_grad_cam_equals_torch_autograd(name, dtype, backend):
    net, model = pair(name, dtype, backend)
    x = random_images((2, 3, 67, 99), np.dtype(dtype), seed=1)  # odd sizes: the stem drops a remainder
    for layer, target in (("stages.3", None), ("stages.2", 5), ("stages.1", [7, 11])):
        stage = int(layer[-1])
        ours = grad_cam(model, x, target, layer)
        theirs = torch_grad_cam(net, x, target, stage)
        assert ours.shape == theirs.shape == (2, *model.trace(x)[layer].shape[2:])
        assert ours.dtype == np.dtype(dtype)
        assert relative_error(ours, theirs) <= TOLERANCE[dtype], (layer, relative_error(ours, theirs))


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_femto"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_effective_receptive_field_equals_torch_autograd(name, dtype):
    net, model = pair(name, dtype, "numba")
    x = random_images((2, 3, 75, 69), np.dtype(dtype), seed=2)
    for stage in range(4):
        ours = effective_receptive_field(model, stage, images=x)
        theirs = torch_erf(net, x, stage)
        assert ours.shape == theirs.shape == (75, 69)
        assert relative_error(ours, theirs) <= TOLERANCE[dtype], (stage, relative_error(ours, theirs))


def test_erf_grows_stage_by_stage_and_random_images_default():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = npconvnext.create_model("convnext_atto", dtype="float64")
    reach = []
    for stage in range(4):
        erf = effective_receptive_field(model, stage, input_size=64, count=2)
        assert erf.shape == (64, 64)
        reach.append(int((erf > 1e-12 * erf.max()).sum()))
    assert reach == sorted(reach) and reach[0] < reach[-1]


def test_feature_maps_and_bad_input():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = npconvnext.create_model("convnext_atto")
    x = random_images((1, 3, 64, 64))
    maps = stage_feature_maps(model, x[0])
    assert [m.shape for m in maps.values()] == [(40, 16, 16), (80, 8, 8), (160, 4, 4), (320, 2, 2)]
    top = strongest_channels(maps["stages.0"], 5)
    strength = np.abs(maps["stages.0"]).mean(axis=(1, 2))
    assert strength[top[0]] == strength.max() and list(strength[top]) == sorted(strength[top], reverse=True)
    with pytest.raises(InputError, match="stages.0, stages.1"):
        grad_cam(model, x, layer="stages.4")
    with pytest.raises(InputError, match="target"):
        grad_cam(model, x, target=1000)
    with pytest.raises(InputError, match="one image"):
        stage_feature_maps(model, random_images((2, 3, 64, 64)))


# ---- the figures (matplotlib) --------------------------------------------------------------

DARK_RED = (139, 0, 0)  # the random-weights warning's colour


def pixels(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def has_warning(image: np.ndarray) -> bool:
    return bool((np.abs(image.astype(int) - DARK_RED).sum(axis=2) < 30).sum() > 50)


@pytest.fixture(scope="module")
def atto():
    pytest.importorskip("matplotlib")
    from dataclasses import replace

    from npconvnext.explain_cli import load

    model = load("convnext_atto", None)
    model.data_config = replace(model.data_config, input_size=(96, 96))  # small: fast
    return model


def test_explain_command_size_and_target(tmp_path, capsys):
    from npconvnext.cli import main
    from tests.support import DATA

    pytest.importorskip("matplotlib")
    for target in (5, 281):
        argv = ["explain", f"{DATA}/chelsea.png", "--model", "convnext_atto", "--input-size", "96",
                "--target", str(target), "--channels", "4", "-o", str(tmp_path / f"{target}.png")]
        assert main(argv) == 0, capsys.readouterr().err
    first, second = pixels(tmp_path / "5.png"), pixels(tmp_path / "281.png")
    assert first.shape == second.shape == (900, 1200, 3)
    photo_panel = (slice(100, 330), slice(170, 440))  # inside the photo, below its title
    assert (first[photo_panel] != second[photo_panel]).any(axis=2).sum() > 1000  # another class, another map
    assert has_warning(first)
    assert main(["explain", f"{DATA}/chelsea.png", "--model", "convnext_atto", "--layer", "stages.9",
                 "-o", str(tmp_path / "bad.png")]) == 1
    assert "stages.0, stages.1" in capsys.readouterr().err


def test_erf_and_parity_commands(tmp_path, capsys):
    from npconvnext.cli import main

    pytest.importorskip("matplotlib")
    assert main(["erf", "--model", "convnext_atto", "--input-size", "64", "--images", "1", "--size", "800x300",
                 "-o", str(tmp_path / "erf.png")]) == 0
    erf = pixels(tmp_path / "erf.png")
    assert erf.shape == (300, 800, 3) and has_warning(erf)
    assert main(["parity", "--model", "convnext_atto", "--input-size", "64", "--plot", str(tmp_path / "p.png")]) == 0
    assert pixels(tmp_path / "p.png").shape == (600, 1400, 3)
    assert "p.png: the errors in layer order" in capsys.readouterr().out


def test_real_weights_get_no_warning(atto, tmp_path):
    from npconvnext.explain_cli import draw_explanation
    from tests.support import DATA

    atto.source, source = "real.safetensors", atto.source
    try:
        draw_explanation(atto, f"{DATA}/chelsea.png", str(tmp_path / "real.png"), channels=2, size=(600, 500))
    finally:
        atto.source = source
    real = pixels(tmp_path / "real.png")
    assert real.shape == (500, 600, 3) and not has_warning(real)


def test_figures_of_a_drift(atto, tmp_path):
    from npconvnext.explain_cli import draw_parity
    from npconvnext.oracle import compare

    trace = atto.trace(random_images((1, 3, 64, 64)))
    drifted = dict(trace, **{"stages.1.blocks.0.mlp.fc2": trace["stages.1.blocks.0.mlp.fc2"] * 1.01})
    for name, reference in (("same", trace), ("drift", drifted)):
        draw_parity(atto, compare(trace, reference, 1e-4), 1e-4, "itself", str(tmp_path / f"{name}.png"))
    same, drift = pixels(tmp_path / "same.png"), pixels(tmp_path / "drift.png")
    assert same.shape == drift.shape == (600, 1400, 3) and (same != drift).any()
    assert has_warning(same)


def test_missing_matplotlib_names_the_extra(monkeypatch):
    import builtins

    from npconvnext import figures

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(InputError, match=r'pip install -e "\.\[plot\]"'):
        figures.pyplot()
