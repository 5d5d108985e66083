"""The pretrained registry equals timm's pretrained configs; weights come from huggingface-hub's
cache, and offline the answer (the file, or a clear error) comes at once."""

import importlib.util
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

import npconvnext
from npconvnext.errors import CheckpointError
from npconvnext.hub import download_weights, registry
from npconvnext.preprocessing import DataConfig
from tests.support import NOT_BUILT_YET
from tests.support.timm_reference import numpy_state_dict, random_timm_model, run_timm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_registry_matches_timm():
    import timm.data
    from timm.models import get_pretrained_cfg

    for name, entry in registry().items():
        cfg = get_pretrained_cfg(name)
        assert (entry["hf_hub_id"], entry["file"], entry["num_classes"], entry["license"]) == (
            cfg.hf_hub_id, cfg.hf_hub_filename or "model.safetensors", cfg.num_classes, cfg.license), name
        # every field timm's eval transform reads, as timm resolves them for this tag
        timm_data = timm.data.resolve_data_config({}, pretrained_cfg=cfg.to_dict())
        ours = npconvnext.data_config(name)
        assert ours == DataConfig(input_size=timm_data["input_size"][1:], crop_pct=timm_data["crop_pct"],
                                  crop_mode=timm_data["crop_mode"], interpolation=timm_data["interpolation"],
                                  mean=timm_data["mean"], std=timm_data["std"]), name
    squash = [n for n, e in registry().items() if e["crop_mode"] == "squash"]
    assert "convnext_tiny.fb_in22k_ft_in1k_384" in squash and "convnextv2_huge.fcmae_ft_in22k_in1k_512" in squash


def test_registry_lists_every_timm_tag():
    """The registry is what scripts/make_pretrained_registry.py makes from the installed timm, and
    holds every tag timm publishes: a tag timm adds shows up here as a failure."""
    import timm
    from timm.models import get_pretrained_cfg

    spec = importlib.util.spec_from_file_location("make_registry", os.path.join(ROOT, "scripts",
                                                                                "make_pretrained_registry.py"))
    make_registry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_registry)
    assert make_registry.entries() == registry()
    assert sorted(registry()) == sorted(timm.list_pretrained("convnext*"))
    for name in ("convnext_tiny.fb_in1k", "convnext_tiny.in12k_ft_in1k", "convnextv2_tiny.fcmae_ft_in1k",
                 "convnext_base.clip_laion2b_augreg_ft_in1k", "convnextv2_tiny.fcmae", "convnext_base.clip_laion2b",
                 "convnext_tiny.dinov3_lvd1689m", "convnext_small.eupe_lvd1689m"):
        assert name in registry()
    headless = {n for n, e in registry().items() if e["num_classes"] == 0}
    assert {"convnextv2_atto.fcmae", "convnext_large.dinov3_lvd1689m", "convnext_base.eupe_lvd1689m"} <= headless
    for arch in {n.split(".")[0] for n in registry()}:  # timm's pretrained=True choice
        assert [n for n in npconvnext.list_pretrained(arch) if registry()[n]["default"]] == [
            f"{arch}.{get_pretrained_cfg(arch).tag}"], arch


def test_list_models_and_list_pretrained_filter_as_timm():
    import timm

    assert set(NOT_BUILT_YET) == set(timm.list_models("convnext*")) - set(npconvnext.list_models())
    for kwargs in ({}, {"filter": "convnext_t*"}, {"filter": "convnextv2_*", "pretrained": True},
                   {"filter": ["*atto*", "*huge"]}, {"filter": "convnext_tiny", "pretrained": True},
                   {"pretrained": True, "exclude_filters": "*v2*"}, {"filter": "*nano*", "include_tags": True}):
        expected = {n for n in timm.list_models(**kwargs)
                    if n.startswith("convnext") and n.split(".")[0] not in NOT_BUILT_YET}
        assert set(npconvnext.list_models(**kwargs)) == expected, kwargs
    assert npconvnext.list_models()[:2] == ["convnext_atto", "convnext_femto"]  # the table's order, as before
    for pattern in ("convnext_tiny.*", "*dinov3*", "convnextv2_?ico.*"):
        expected = sorted(n for n in timm.list_pretrained(pattern) if n.startswith("convnext"))
        assert npconvnext.list_pretrained(pattern) == expected, pattern
    assert npconvnext.list_pretrained("convnext_tiny") == sorted(timm.list_pretrained("convnext_tiny.*"))


@pytest.mark.parametrize("name", sorted(registry()))
def test_every_tag_builds_as_timm(name):
    """Every published tag's architecture and head, as timm builds it (on torch's meta device:
    shapes only), has the parameters npconvnext expects."""
    import timm
    import torch

    from npconvnext.params import expected_shapes

    arch = name.split(".")[0]
    if arch in NOT_BUILT_YET:
        pytest.skip(f"{arch}: {NOT_BUILT_YET[arch]}")
    with torch.device("meta"):
        model = timm.create_model(arch, num_classes=registry()[name]["num_classes"])
    timm_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    config = npconvnext.get_config(arch, num_classes=registry()[name]["num_classes"])
    assert expected_shapes(config) == timm_shapes, name


@pytest.fixture(scope="module")
def atto():
    model = random_timm_model("convnext_atto", seed=5)
    return model, numpy_state_dict(model)


def prepopulated_cache(root, state):
    """A huggingface-hub cache laid out as the hub leaves it, holding timm/convnext_atto.d2_in1k."""
    repo = root / "models--timm--convnext_atto.d2_in1k"
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    save_file(state, repo / "snapshots" / COMMIT / "model.safetensors")
    return root


def test_pretrained_from_a_prepopulated_offline_cache(tmp_path, atto, assert_matches):
    """The real hf_hub_download code path, HF_HUB_OFFLINE=1, a cache laid out as the hub leaves it:
    the model built from it gives the logits of the weights put there."""
    timm_model, state = atto
    cache = prepopulated_cache(tmp_path / "hub", state)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, numpy as np, npconvnext;"
            "m = npconvnext.create_model('convnext_atto.d2_in1k');"
            "np.save(sys.argv[1] + '/logits.npy', m(np.load(sys.argv[1] + '/x.npy')));"
            "print(m.config.name)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["convnext_atto"]
    assert_matches(np.load(tmp_path / "logits.npy"), run_timm(timm_model, x)["logits"], "cached weights")
    code = "import npconvnext; npconvnext.create_model('convnext_tiny', pretrained='fb_in1k')"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "CheckpointError" in out.stderr and "offline: HF_HUB_OFFLINE is set" in out.stderr
    assert "timm/convnext_tiny.fb_in1k" in out.stderr and "weights='path/to/model.safetensors'" in out.stderr
    assert "`hf download timm/convnext_tiny.fb_in1k model.safetensors`" in out.stderr  # the CLI hf-hub installs
    assert "--weights FILE" in out.stderr and "huggingface-cli" not in out.stderr


def test_download_prints_the_path_and_how_to_take_it_offline(tmp_path, atto):
    """`npconvnext download`: the file's path alone on stdout; on stderr where the cache is and
    how to copy the file or the cache to a machine without internet. Offline and not cached: an
    error naming `hf download` and --weights, not the command just run."""
    cache = prepopulated_cache(tmp_path / "hub", atto[1])
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    done = subprocess.run([sys.executable, "-m", "npconvnext", "download", "convnext_atto.d2_in1k"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    path = str(cache / "models--timm--convnext_atto.d2_in1k" / "snapshots" / COMMIT / "model.safetensors")
    assert done.stdout == path + "\n"
    assert f"convnext_atto.d2_in1k is in the huggingface-hub cache {cache}." in done.stderr
    assert f"cp -L {path} convnext_atto.d2_in1k.safetensors" in done.stderr
    assert "--weights convnext_atto.d2_in1k.safetensors" in done.stderr and f"rsync -a {cache}/" in done.stderr
    quiet = subprocess.run([sys.executable, "-m", "npconvnext", "download", "convnext_atto.d2_in1k", "--quiet"],
                           env=env, capture_output=True, text=True)
    assert quiet.stdout == path + "\n" and quiet.stderr == ""
    done = subprocess.run([sys.executable, "-m", "npconvnext", "download", "convnext_tiny.fb_in1k"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith("npconvnext download: error: cannot get convnext_tiny.fb_in1k: ")
    assert "`hf download timm/convnext_tiny.fb_in1k model.safetensors`" in done.stderr
    assert "--weights FILE" in done.stderr and "npconvnext download" not in done.stderr.partition(": error: ")[2]
    assert f"whole hub cache ({cache})" in done.stderr


@pytest.fixture
def unresolvable_hub(monkeypatch):
    """The hub's endpoint on a host that cannot resolve (.invalid is reserved for that), as
    HF_ENDPOINT would set it when huggingface-hub is imported; offline mode not set."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)


def test_unresolvable_hub_fails_at_once(tmp_path, unresolvable_hub):
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"cannot get convnext_atto.d2_in1k: model.safetensors of hub repo "
                                              r"timm/convnext_atto.d2_in1k is not in the huggingface-hub cache "
                                              r"and offline: the hub's host hub.invalid cannot be resolved"):
        download_weights("convnext_atto.d2_in1k", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 2


def test_unresolvable_hub_still_finds_the_cache(tmp_path, atto, unresolvable_hub):
    cache = prepopulated_cache(tmp_path, atto[1])
    path = download_weights("convnext_atto.d2_in1k", cache_dir=str(cache))
    assert path == str(cache / "models--timm--convnext_atto.d2_in1k" / "snapshots" / COMMIT / "model.safetensors")


@pytest.mark.parametrize("name", ["convnext_atto_rms", "convnext_tiny.no_such_tag"])
def test_weights_that_are_not_published_are_a_checkpoint_error(name):
    # convnext_atto_rms: an architecture timm has no weights for; then an unknown tag
    assert not npconvnext.list_pretrained("convnext_atto_rms")
    with pytest.raises(CheckpointError, match="published"):
        npconvnext.data_config(name)
