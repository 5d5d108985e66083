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

DATA = os.path.join(os.path.dirname(__file__), "data")


def run(*args, ok=True):
    out = subprocess.run([sys.executable, "-m", "npconvnext", *map(str, args)], capture_output=True, text=True)
    assert (out.returncode == 0) == ok, out.stderr
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


def test_classify_skips_unreadable_files(weights, tmp_path):
    shutil.copy(os.path.join(DATA, "chelsea.png"), tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    out = run("classify", tmp_path, "--weights", weights)
    assert "broken.jpg: cannot read image" in out.stderr and "chelsea.png" in out.stdout


def test_features_records_file_order(weights, tmp_path):
    out_path = tmp_path / "emb.npy"
    run("features", DATA, "--weights", weights, "-o", out_path)
    emb = np.load(out_path)
    assert emb.shape == (3, 320)
    assert (tmp_path / "emb.files.txt").read_text().split()[0].endswith("chelsea.png")


def test_summary_totals_for_convnext_tiny():
    out = run("summary", "convnext_tiny").stdout
    assert "28,589,128 parameters" in out and "4.47 GMACs" in out
    rows = summarize(npconvnext.get_config("convnext_tiny"))
    gflops = 2 * sum(r.macs for r in rows) / 1e9
    assert abs(gflops - 8.9419) / 8.9419 < 1e-3  # the Open Model Zoo card's figure


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


def test_convert_and_errors(weights, tmp_path):
    dst = tmp_path / "out.safetensors"
    run("convert", weights, dst)
    err = run("convert", weights, dst, ok=False).stderr
    assert err.strip() == f"npconvnext convert: error: {dst}: already exists; pass --force (force=True) to overwrite it"
    err = run("classify", tmp_path / "missing.png", "--weights", weights, ok=False).stderr
    assert "missing.png: no such file or directory" in err
    for command in ("classify", "features", "evaluate", "summary", "download", "convert"):
        assert "usage: npconvnext" in run(command, "--help").stdout
