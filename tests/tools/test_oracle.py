"""trace() against timm's forward hooks; golden files; the parity command."""

import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

import npconvnext
from npconvnext.oracle import TOLERANCE, compare, read_golden, timm_trace, write_golden
from tests.support.timm_reference import numpy_state_dict, random_images, random_timm_model
from tests.support import DATA


@pytest.mark.parametrize("name", ["convnext_atto", "convnext_tiny", "convnextv2_atto", "convnextv2_tiny"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_trace_equals_timm_hooks(name, dtype):
    timm_model = random_timm_model(name, seed=7)
    model = npconvnext.create_model(name, weights=numpy_state_dict(timm_model), dtype=dtype)
    x = random_images((2, 3, 64, 96), np.dtype(dtype))
    ours = model.trace(x)
    theirs = timm_trace(model, x, list(ours))
    assert list(theirs) == list(ours)  # every name has a timm counterpart, same order
    steps = {k.rsplit(".", 1)[-1] for k in ours}
    assert {"conv_dw", "norm", "fc1", "act", "fc2", "layer_scale", "global_pool", "fc"} <= steps
    if "v2" in name:
        assert "grn" in steps
    rows = compare(ours, theirs, TOLERANCE[dtype])
    assert all(r.ok for r in rows), [r for r in rows if not r.ok][:3]
    model.backend = "numpy"  # trace runs the reference path: the same numbers as its forward
    np.testing.assert_array_equal(ours["head.fc"], model(x))


def test_trace_layouts_follow_timm():
    model = npconvnext.create_model("convnext_tiny", weights=numpy_state_dict(random_timm_model("convnext_tiny")))
    t = model.trace(random_images((1, 3, 64, 64)))
    assert t["stages.0.blocks.0.conv_dw"].shape == (1, 96, 16, 16)
    assert t["stages.0.blocks.0.mlp.fc1"].shape == (1, 16, 16, 384)  # timm permutes to channels-last
    assert t["head.global_pool"].shape == (1, 768, 1, 1) and t["head.fc"].shape == (1, 1000)
    atto = npconvnext.create_model("convnext_atto", weights=numpy_state_dict(random_timm_model("convnext_atto")))
    assert atto.trace(random_images((1, 3, 64, 64)))["stages.0.blocks.0.mlp.fc1"].shape == (1, 160, 16, 16)


def cli(*args, ok=True):
    out = subprocess.run([sys.executable, "-m", "npconvnext", *map(str, args)], capture_output=True, text=True)
    assert (out.returncode == 0) == ok, out.stdout + out.stderr
    return out


def parity(*args, capsys):
    """`npconvnext parity` in this process (faster than a subprocess): exit status, stdout, stderr."""
    from npconvnext.cli import main

    status = main(["parity", *map(str, args)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out, err


def test_golden_round_trip_and_parity_against_it(tmp_path, capsys):
    golden = tmp_path / "ref.safetensors"
    out = cli("golden", "--model", "convnext_atto", "--input-size", "64", "--float64", "-o", golden)
    assert "tensors" in out.stdout
    tensors, meta = read_golden(str(golden))
    assert meta["architecture"] == "convnext_atto" and meta["dtype"] == "float64"
    assert tensors["input"].shape == (1, 3, 64, 64) and tensors["input"].dtype == np.float64
    assert "stages.2.blocks.5.mlp.act" in tensors
    report = cli("parity", "--against", golden).stdout
    assert "all within" in report

    # one perturbed tensor: the command fails and names that layer
    perturbed = tensors["stages.1.blocks.0.mlp.fc2"].copy()  # read: read-only views of the file
    perturbed[0, 0, 0, 0] += 1.0
    bad = tmp_path / "bad.safetensors"
    write_golden(dict(tensors, **{"stages.1.blocks.0.mlp.fc2": perturbed}), str(bad), meta)
    status, out, err = parity("--against", bad, capsys=capsys)
    assert status == 1 and "first past it: stages.1.blocks.0.mlp.fc2" in out
    assert "parity failed: 1 tensors past tolerance" in err

    # a change far below the float64 tolerance passes by default, and fails --tolerance 0
    nudged = tensors["head.fc"] * (1 + 1e-13)
    assert not np.array_equal(nudged, tensors["head.fc"])
    near = tmp_path / "near.safetensors"
    write_golden(dict(tensors, **{"head.fc": nudged}), str(near), meta)
    assert parity("--against", near, capsys=capsys)[0] == 0
    status, out, err = parity("--against", near, "--tolerance", "0", capsys=capsys)
    assert status == 1 and "first past it: head.fc" in out and "past tolerance 0" in err


def test_parity_uses_the_golden_files_weights(tmp_path, capsys):
    """A golden made with other random weights is compared with those (its metadata says which);
    one whose tensors come from weights other than its metadata claims fails."""
    seeded = tmp_path / "seed3.safetensors"
    cli("golden", "--model", "convnext_atto", "--input-size", "64", "--float64", "--weight-seed", "3", "-o", seeded)
    tensors, meta = read_golden(str(seeded))
    assert meta["weight_seed"] == "3"
    status, out, _ = parity("--against", seeded, capsys=capsys)
    assert status == 0 and "all within" in out
    status, _, err = parity("--against", seeded, "--weight-seed", "0", capsys=capsys)
    assert status == 1 and "was made with random-weights seed 3, not --weight-seed 0" in err

    lying = tmp_path / "claims-seed0.safetensors"
    write_golden(tensors, str(lying), dict(meta, weights="npconvnext random_state_dict seed 0", weight_seed="0"))
    status, out, err = parity("--against", lying, capsys=capsys)
    assert status == 1 and "first past it: stem.0" in out and "parity failed" in err


def test_parity_against_a_golden_from_timms_own_trace(tmp_path, capsys):
    """Written by timm's forward hooks from a weight file: passes with that file, and refuses
    other weights or none, by the sha256 in the golden's metadata."""
    from npconvnext.formats import sha256_of

    weights, other = tmp_path / "w.safetensors", tmp_path / "other.safetensors"
    save_file(numpy_state_dict(random_timm_model("convnext_atto", seed=11)), weights)
    save_file(numpy_state_dict(random_timm_model("convnext_atto", seed=12)), other)
    model = npconvnext.create_model(None, weights=weights, dtype="float64")
    x = random_images((1, 3, 64, 64), np.float64)
    golden = tmp_path / "timm.safetensors"
    write_golden(timm_trace(model, x, list(model.trace(x))), str(golden),
                 {"architecture": "convnext_atto", "dtype": "float64", "weights_sha256": sha256_of(weights)})
    status, out, _ = parity("--against", golden, "--weights", weights, capsys=capsys)
    assert status == 0 and "all within" in out and "stages.3.blocks.1.layer_scale" in out
    status, _, err = parity("--against", golden, "--weights", other, capsys=capsys)
    assert status == 1 and f"{other}: sha256 {sha256_of(other)} is not that of the weights" in err
    status, _, err = parity("--against", golden, capsys=capsys)
    assert status == 1 and "pass that file with --weights" in err

    # the check is not only the hash: timm's tensors for other weights, labelled with these
    model_other = npconvnext.create_model(None, weights=other, dtype="float64")
    mislabelled = tmp_path / "mislabelled.safetensors"
    write_golden(timm_trace(model_other, x, list(model_other.trace(x))), str(mislabelled),
                 {"architecture": "convnext_atto", "dtype": "float64", "weights_sha256": sha256_of(weights)})
    status, out, _ = parity("--against", mislabelled, "--weights", weights, capsys=capsys)
    assert status == 1 and "first past it: stem.0" in out


def test_golden_from_a_photo_with_weights(tmp_path):
    weights = tmp_path / "w.safetensors"
    save_file(numpy_state_dict(random_timm_model("convnext_atto")), weights)
    photo = os.path.join(DATA, "chelsea.png")
    cli("golden", "--weights", weights, "--image", photo, "-o", tmp_path / "g.safetensors")
    tensors, meta = read_golden(str(tmp_path / "g.safetensors"))
    np.testing.assert_array_equal(tensors["input"][0], npconvnext.preprocess(photo))
    assert len(meta["weights_sha256"]) == 64 and "crop_pct" in meta["preprocessing"]


def test_parity_against_timm_command():
    out = cli("parity", "--model", "convnextv2_atto", "--input-size", "64")
    assert "against timm" in out.stdout and "mlp.grn" in out.stdout and "all within" in out.stdout


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_parity_passes_on_a_timm_initialised_model(dtype):
    """timm's own init: layer scale 1e-6, GRN zero. The layer_scale reference is timm's module
    output, not block output minus input (which lost every digit there and failed 18 rows)."""
    import timm
    import torch

    torch.manual_seed(0)
    timm_model = timm.create_model("convnext_atto", pretrained=False).eval()
    state = numpy_state_dict(timm_model)
    assert np.allclose(state["stages.0.blocks.0.gamma"], 1e-6)
    model = npconvnext.create_model("convnext_atto", weights=state, dtype=dtype)
    x = random_images((1, 3, 64, 64), np.dtype(dtype))
    ours = model.trace(x)
    theirs = timm_trace(model, x, list(ours))
    assert list(theirs) == list(ours)
    rows = compare(ours, theirs, TOLERANCE[dtype])
    assert sum(r.name.endswith("layer_scale") for r in rows) == 12
    assert all(r.ok for r in rows), [r for r in rows if not r.ok][:3]
