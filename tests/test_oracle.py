"""trace() against timm's forward hooks; golden files; the parity command."""

import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

import npconvnext
from npconvnext.oracle import TOLERANCE, compare, read_golden, timm_trace, write_golden
from timm_reference import numpy_state_dict, random_images, random_timm_model


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


def test_golden_round_trip_and_parity_against_it(tmp_path):
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
    tensors["stages.1.blocks.0.mlp.fc2"] = perturbed
    bad = tmp_path / "bad.safetensors"
    write_golden(tensors, str(bad), meta)
    out = cli("parity", "--against", bad, ok=False)
    assert "first past it: stages.1.blocks.0.mlp.fc2" in out.stdout
    assert "parity failed: 1 tensors past tolerance" in out.stderr


def test_golden_from_a_photo_with_weights(tmp_path):
    weights = tmp_path / "w.safetensors"
    save_file(numpy_state_dict(random_timm_model("convnext_atto")), weights)
    photo = os.path.join(os.path.dirname(__file__), "data", "chelsea.png")
    cli("golden", "--weights", weights, "--image", photo, "-o", tmp_path / "g.safetensors")
    tensors, meta = read_golden(str(tmp_path / "g.safetensors"))
    np.testing.assert_array_equal(tensors["input"][0], npconvnext.preprocess(photo))
    assert len(meta["weights_sha256"]) == 64 and "crop_pct" in meta["preprocessing"]


def test_parity_against_timm_command():
    out = cli("parity", "--model", "convnextv2_atto", "--input-size", "64")
    assert "against timm" in out.stdout and "mlp.grn" in out.stdout and "all within" in out.stdout
