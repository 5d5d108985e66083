"""The command line, run as a user runs it, on the shipped photos with a checkpoint written here."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

import npconvnext
from npconvnext.params import random_state_dict
from npconvnext.summary import summarize

from tests.support import DATA


def run(*args, ok=True, env=None, status=None):
    """The command's output; it must succeed (ok), fail (not ok), or exit with `status`."""
    out = subprocess.run([sys.executable, "-m", "npconvnext", *map(str, args)], capture_output=True, text=True,
                         env=env)
    assert out.returncode == status if status is not None else (out.returncode == 0) == ok, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "atto.safetensors"
    save_file(random_state_dict(npconvnext.get_config("convnext_atto")), path)
    return path


def test_classify_json_matches_the_library(weights):
    out = run("classify", DATA, "--weights", weights, "--json", "--top-k", "3")
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [os.path.basename(r["file"]) for r in rows] == ["chelsea.png", "coffee.png", "rocket.jpg"]
    model = npconvnext.create_model(None, weights=weights)
    x = npconvnext.preprocess(os.path.join(DATA, "chelsea.png"), npconvnext.data_config("convnext_atto"))
    logits = model(x[None])[0]
    assert rows[0]["indices"] == [int(i) for i in np.argsort(-logits)[:3]]
    assert rows[0]["labels"][0] == npconvnext.imagenet_labels()[rows[0]["indices"][0]]


def test_the_command_shares_a_batch_out_image_by_image(weights):
    # a library leaves BLAS's thread count alone unless handed it; the command is the program and does
    code = ("import sys; from npconvnext import cli; from npconvnext.engine import threads; "
            f"cli.main(['classify', {DATA!r}, '--weights', {str(weights)!r}, '--batch-size', '3']); "
            "print(threads._blas_handed_over)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "True"


def test_classify_skips_unreadable_files(weights, tmp_path):
    shutil.copy(os.path.join(DATA, "chelsea.png"), tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    out = run("classify", tmp_path, "--weights", weights, status=3)  # done, one input skipped
    assert "broken.jpg: cannot read image" in out.stderr and "chelsea.png" in out.stdout


def test_classify_goes_on_past_any_error_in_one_image(weights, tmp_path, monkeypatch, capsys):
    """Not only ValueError: an image too big for memory, or an I/O error, skips that image only."""
    from npconvnext import cli, preprocessing

    for name in ("a.png", "b.png", "c.png"):
        shutil.copy(os.path.join(DATA, "chelsea.png"), tmp_path / name)
    real = preprocessing.preprocess
    failures = {"a.png": MemoryError(), "b.png": OSError(5, "Input/output error")}

    def preprocess(path, config=None):
        if os.path.basename(path) in failures:
            raise failures[os.path.basename(path)]
        return real(path, config)

    monkeypatch.setattr(preprocessing, "preprocess", preprocess)
    assert cli.main(["classify", str(tmp_path), "--weights", str(weights), "--json"]) == cli.EXIT_SKIPPED
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert [os.path.basename(row["file"]) for row in rows] == ["a.png", "b.png", "c.png"]  # one per input
    assert rows[0] == {"file": str(tmp_path / "a.png"), "error": f"{tmp_path / 'a.png'}: out of memory"}
    assert rows[1] == {"file": str(tmp_path / "b.png"), "error": f"{tmp_path / 'b.png'}: Input/output error"}
    assert "error" not in rows[2] and len(rows[2]["labels"]) == 5
    assert f"warning: skipped {tmp_path / 'a.png'}: out of memory" in err
    assert f"warning: skipped {tmp_path / 'b.png'}: Input/output error" in err


def test_undecodable_file_names_print_on_a_strict_utf8_stdout(weights, tmp_path):
    raw_name = os.fsdecode(b"\xff\xfe-cat.png")  # not UTF-8: Python keeps the bytes as surrogates
    shutil.copy(os.path.join(DATA, "chelsea.png"), os.path.join(tmp_path, raw_name))
    env = dict(os.environ, PYTHONIOENCODING="utf-8:strict", LC_ALL="C.UTF-8")
    text = run("classify", tmp_path, "--weights", weights, "--top-k", "1", env=env).stdout
    assert text.splitlines()[0] == os.path.join(str(tmp_path), "\\xff\\xfe-cat.png")
    lines = run("classify", tmp_path, "--weights", weights, "--json", env=env).stdout.splitlines()
    assert json.loads(lines[0])["file"] == os.path.join(str(tmp_path), "\\xff\\xfe-cat.png")
    out = tmp_path / "emb.npy"
    run("features", tmp_path, "--weights", weights, "-o", out, env=env)
    assert (tmp_path / "emb.files.txt").read_bytes() == os.fsencode(os.path.join(tmp_path, raw_name)) + b"\n"


def test_features_equal_the_library_embeddings_in_file_order(weights, tmp_path):
    out_path = tmp_path / "emb.npy"
    run("features", DATA, "--weights", weights, "-o", out_path)
    files = (tmp_path / "emb.files.txt").read_text().splitlines()
    assert [os.path.basename(f) for f in files] == ["chelsea.png", "coffee.png", "rocket.jpg"]
    model = npconvnext.create_model(None, weights=weights)
    config = npconvnext.data_config("convnext_atto")
    x = np.stack([npconvnext.preprocess(f, config) for f in files])
    expected = model.forward_head(model.forward_features(x), pre_logits=True)
    emb = np.load(out_path)
    assert emb.dtype == np.float32 and emb.shape == expected.shape == (3, 320)
    np.testing.assert_allclose(emb, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_no_readable_image_is_a_clear_error(weights, tmp_path):
    (tmp_path / "n01440764").mkdir()
    (tmp_path / "n01440764" / "broken.jpg").write_bytes(b"not a jpeg")
    err = run("classify", tmp_path, "--weights", weights, ok=False).stderr
    assert err.splitlines()[-1] == "npconvnext classify: error: none of the images could be read " \
        "(see the warnings above)"
    err = run("features", tmp_path, "--weights", weights, "-o", tmp_path / "e.npy", ok=False).stderr
    assert err.splitlines()[-1] == "npconvnext features: error: none of the images could be read " \
        "(see the warnings above); nothing written"
    assert not (tmp_path / "e.npy").exists()
    err = run("evaluate", tmp_path, "--weights", weights, ok=False).stderr
    assert err.splitlines()[-1] == f"npconvnext evaluate: error: {tmp_path}: none of the 1 images could be read " \
        "(see the warnings above)"


def timm_macs(name, size):
    """MACs of every Conv2d and Linear of timm's model, counted by forward hooks on the meta
    device: (input values per output element + 1 for a bias) x output elements."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(name)
    macs = {}

    def count(module_name):
        def hook(module, args, out):
            per_output = module.weight[0].numel() if isinstance(module, torch.nn.Conv2d) else module.in_features
            macs[module_name] = out.numel() * (per_output + (module.bias is not None))
        return hook

    for module_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.register_forward_hook(count(module_name))
    with torch.no_grad():
        model(torch.empty(1, 3, size, size, device="meta"))
    return macs


@pytest.mark.parametrize("name, size", [("convnext_tiny", 224), ("convnextv2_atto", 100)])
def test_summary_macs_equal_a_count_on_timms_modules(name, size):
    macs = timm_macs(name, size)
    rows = summarize(npconvnext.get_config(name), (size, size))
    for row in rows:
        assert row.macs == sum(m for k, m in macs.items() if k == row.name or k.startswith(row.name + ".")), row.name
    assert sum(r.macs for r in rows) == sum(macs.values())


def test_summary_output_and_docstring_agree_with_the_count():
    total = sum(timm_macs("convnext_tiny", 224).values())
    out = run("summary", "convnext_tiny").stdout
    last = out.splitlines()[-1]
    assert "28,589,128 parameters" in last
    assert f"{total:,} MACs" in last and f"{2 * total / 1e9:.4f} GFLOPs" in last
    doc = " ".join(npconvnext.summary.__doc__.split())
    assert f"{total:,} MACs, {2 * total / 1e9:.4f} GFLOPs" in doc


def test_summary_refuses_inputs_below_the_stride():
    err = run("summary", "convnext_tiny", "--input-size", "16", ok=False).stderr
    assert err == "npconvnext summary: error: input size 16x16 is smaller than convnext_tiny's total stride 32: " \
        "every side must be at least 32\n"
    out = run("summary", "convnext_tiny", "--input-size", "32").stdout
    assert out.count("(768, 1, 1)") == 4  # stage 3's downsample and 3 blocks
    assert all(min(r.output_shape) > 0 for r in summarize(npconvnext.get_config("convnext_tiny"), (32, 32)))


def test_summary_params_equal_timm_for_every_variant():
    import timm
    import torch

    for name in npconvnext.list_models():
        with torch.device("meta"):
            model = timm.create_model(name)
        assert sum(r.params for r in summarize(npconvnext.get_config(name))) == \
            sum(p.numel() for p in model.parameters()), name


def test_evaluate_on_a_labelled_folder(weights, tmp_path):
    """Two classes; each folder holds a photo whose top-1 under these weights we know, so the
    expected accuracy is computed independently of the command."""
    model = npconvnext.create_model(None, weights=weights)
    config = npconvnext.data_config("convnext_atto")
    labels = npconvnext.imagenet_classes()
    top1 = {p: int(np.argmax(model(npconvnext.preprocess(os.path.join(DATA, p), config)[None])))
            for p in ("chelsea.png", "coffee.png")}
    right = tmp_path / labels[top1["chelsea.png"]].wnid
    wrong = tmp_path / labels[(top1["coffee.png"] + 500) % 1000].wnid
    right.mkdir()
    wrong.mkdir()
    shutil.copy(os.path.join(DATA, "chelsea.png"), right)
    shutil.copy(os.path.join(DATA, "coffee.png"), wrong)
    report = tmp_path / "report.json"
    run("evaluate", tmp_path, "--weights", weights, "--report", report)
    assert json.loads(report.read_text())["top1"] == 50.0

    # two more copies in each: --limit 2 must take one image per class, not the first folder's two
    for folder in (right, wrong):
        (only,) = os.listdir(folder)
        for k in (1, 2):
            shutil.copy(folder / only, folder / f"copy{k}{os.path.splitext(only)[1]}")
    for seed in (0, 1, 2):
        run("evaluate", tmp_path, "--weights", weights, "--report", report, "--limit", "2", "--seed", seed)
        assert json.loads(report.read_text())["images"] == 2
        assert json.loads(report.read_text())["top1"] == 50.0
    assert "balanced over the classes" in run("evaluate", "--help").stdout


def test_balanced_subset_is_seeded_and_even():
    from npconvnext.evaluate import balanced_subset

    by_class = {c: [f"{c}/{i}" for i in range(n)] for c, n in [(3, 10), (7, 2), (9, 10), (11, 10)]}
    subsets = [balanced_subset(by_class, 9, seed) for seed in range(5)]
    for subset in subsets:
        counts = sorted(len(v) for v in subset.values())
        assert counts == [2, 2, 2, 3] and all(set(v) <= set(by_class[c]) for c, v in subset.items())
    assert subsets[0] == balanced_subset(by_class, 9, 0)  # seeded: the same subset again
    assert len({str(s) for s in subsets}) > 1            # and a different one for other seeds
    assert balanced_subset(by_class, 100, 0) == {c: sorted(v) for c, v in by_class.items()}


def test_convert_and_errors(weights, tmp_path):
    dst = tmp_path / "out.safetensors"
    run("convert", weights, dst)
    err = run("convert", weights, dst, ok=False).stderr
    assert err.strip() == f"npconvnext convert: error: {dst}: already exists; pass --force (force=True) to overwrite it"
    err = run("classify", tmp_path / "missing.png", "--weights", weights, ok=False).stderr
    assert "missing.png: no such file or directory" in err
    for command in ("classify", "features", "evaluate", "summary", "download", "convert", "verify"):
        assert "usage: npconvnext" in run(command, "--help").stdout


@pytest.mark.parametrize("args, message", [
    (["classify", DATA, "--weights", "{tmp}/garbage.bin"], "{tmp}/garbage.bin: not a weight file npconvnext reads"),
    (["convert", "{tmp}/garbage.bin", "{tmp}/out.safetensors"], "{tmp}/garbage.bin: not a weight file"),
    (["convert", "{tmp}/missing.pth", "{tmp}/out.safetensors"], "{tmp}/missing.pth: no such file"),
    (["verify", "{tmp}/garbage.bin", "{tmp}/garbage.bin"], "{tmp}/garbage.bin: "),
    (["summary", "convnext_huge"], "unknown ConvNeXt architecture 'convnext_huge'"),
    (["features", DATA, "--weights", "{tmp}/garbage.bin", "-o", "{tmp}/x.npy"], "{tmp}/garbage.bin: "),
    (["evaluate", "{tmp}/missing-dir", "--weights", "{weights}"], "{tmp}/missing-dir: No such file or directory"),
], ids=["classify-garbage-weights", "convert-garbage", "convert-missing", "verify-garbage", "summary-unknown",
        "features-garbage-weights", "evaluate-missing-dir"])
def test_bad_input_is_one_line_and_no_traceback(weights, tmp_path, args, message):
    (tmp_path / "garbage.bin").write_bytes(b"this is not a checkpoint")
    args = [a.format(tmp=tmp_path, weights=weights) for a in args]
    err = run(*args, ok=False).stderr
    assert len(err.splitlines()) == 1 and err.startswith(f"npconvnext {args[0]}: error: "), err
    assert message.format(tmp=tmp_path) in err, err


def test_counts_must_be_positive():
    for option in ("--limit", "--batch-size"):
        err = run("evaluate", DATA, option, "0", ok=False).stderr
        assert f"npconvnext evaluate: error: argument {option}: must be at least 1, not 0" in err
    assert "argument --top-k: must be at least 1, not -1" in run("classify", DATA, "--top-k", "-1", ok=False).stderr


def test_weights_with_their_own_preprocessing_are_classified_at_their_size(tmp_path):
    # a fine-tune at 288 px, squash: the command must preprocess as the file says, not at 224
    from npconvnext.model import ConvNeXt
    from npconvnext.train.finetune import write_weights

    path = tmp_path / "ft288.safetensors"
    config = npconvnext.DataConfig(input_size=(288, 288), crop_pct=1.0, crop_mode="squash")
    model = ConvNeXt(npconvnext.get_config("convnext_atto"), random_state_dict(npconvnext.get_config("convnext_atto")))
    write_weights(str(path), model, tuple(f"c{i}" for i in range(1000)), config)
    photo = os.path.join(DATA, "chelsea.png")
    row = json.loads(run("classify", photo, "--weights", path, "--json", "--top-k", "1").stdout)
    x = npconvnext.preprocess(photo, config)[None]
    assert x.shape[-1] == 288
    assert row["labels"] == [f"c{int(model(x).argmax())}"]
    probabilities = np.exp(model(x) - model(x).max())
    assert row["probabilities"][0] == round(float(probabilities.max() / probabilities.sum()), 6)
