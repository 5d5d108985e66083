"""What loading a model keeps in memory: a bfloat16 model made from a float32 file keeps none
of the file's float32 linears (mapped or copied) and never held them all at once; a bfloat16
file's linears are never widened; a caller's dict and arrays (np.memmap too) are left as they
were. The peaks are measured in fresh processes, against the weights' float32 bytes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

import npconvnext
from npconvnext import layers
from npconvnext.formats import read_checkpoint, read_safetensors, read_weight_file
from npconvnext.formats.mapped import mapping_of
from npconvnext.model import ConvNeXt, HandedOver
from npconvnext.params import random_state_dict
from tests.support import STARTING_ENVIRON
from tests.support.memory import LINUX_PROC, resident_kb
from tests.support.weight_files import write_bfloat16_safetensors

FC1 = "stages.3.blocks.0.mlp.fc1.weight"


def _linears(state) -> list[str]:
    """The blocks' fc1 and fc2 weights: what a bfloat16 model keeps as bfloat16."""
    return [name for name in state if ".mlp.fc" in name and name.endswith("weight")]


@pytest.fixture(scope="module")
def atto_state():
    return random_state_dict(npconvnext.get_config("convnext_atto"), seed=4)


@LINUX_PROC
def test_a_float32_file_leaves_only_the_weights_used_in_place_mapped(atto_state, tmp_path):
    path = tmp_path / "atto.safetensors"
    save_file(atto_state, str(path))
    linears = sum(atto_state[name].nbytes for name in _linears(atto_state))
    model = npconvnext.create_model("convnext_atto", weights=path, dtype="bfloat16")
    assert resident_kb(path) * 1024 < linears / 10  # rounded, and their pages given back
    again = npconvnext.create_model("convnext_atto", weights=atto_state, dtype="bfloat16")
    for name in atto_state:
        np.testing.assert_array_equal(model.params[name], again.params[name], err_msg=name)
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(model(x), again(x))
    float32 = npconvnext.create_model("convnext_atto", weights=path)
    float32(x)
    assert resident_kb(path) * 1024 >= linears  # a float32 model's linears, mapped in by its forward


@pytest.mark.parametrize("mode", ["r+", "c"], ids=["writable", "copy-on-write"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_a_callers_memmapped_weight_and_dict_are_left_as_they_were(atto_state, tmp_path, mode, dtype):
    path = tmp_path / "fc1.bin"
    atto_state[FC1].tofile(path)
    memmap = np.memmap(path, np.float32, mode=mode, shape=atto_state[FC1].shape)
    memmap *= 2  # the caller's edit; in a copy-on-write map it is only in this process's pages
    edited = np.array(memmap)
    weights = {**atto_state, FC1: memmap}
    model = npconvnext.create_model("convnext_atto", weights=weights, dtype=dtype)
    np.testing.assert_array_equal(memmap, edited)
    assert weights.keys() == atto_state.keys() and weights[FC1] is memmap
    expected = layers.from_bfloat16(layers.to_bfloat16(edited)) if dtype == "bfloat16" else edited
    np.testing.assert_array_equal(model.state_dict()[FC1], expected)
    assert not np.shares_memory(model.params[FC1], memmap)  # the caller's later edits never reach it


def test_one_array_handed_over_for_two_weights_is_kept_twice(atto_state):
    # as a file may give it (one constant for two layers): training updates weights in place
    first, second = "stages.3.blocks.0.mlp.fc1.weight", "stages.3.blocks.1.mlp.fc1.weight"
    shared = {name: array.copy() for name, array in atto_state.items()}
    shared[second] = shared[first]
    model = ConvNeXt(npconvnext.get_config("convnext_atto"), HandedOver(shared))
    assert model.params[first].flags.writeable and not np.shares_memory(model.params[first], model.params[second])
    np.testing.assert_array_equal(model.params[first], model.params[second])


def _write_bfloat16(path, state, container):
    if container == "safetensors":
        write_bfloat16_safetensors(path, state)
    else:
        torch = pytest.importorskip("torch")
        torch.save({name: torch.from_numpy(array).bfloat16() for name, array in state.items()}, path)


@pytest.mark.parametrize("container", ["safetensors", "pth"])
def test_bfloat16_tensors_are_bits_only_for_whoever_asks(atto_state, tmp_path, container):
    path = tmp_path / f"atto_bf16.{container}"
    _write_bfloat16(path, atto_state, container)
    bits = {name: layers.to_bfloat16(array) for name, array in atto_state.items()}
    asked = read_weight_file(path, widen=False).state  # as create_model reads it
    for name, b in bits.items():
        assert isinstance(asked[name], layers.BFloat16Bits), name
        assert (mapping_of(asked[name]) is not None) == (container == "safetensors"), name
        np.testing.assert_array_equal(np.asarray(asked[name]), b)
    public = {"read_checkpoint": read_checkpoint(path)[0], "load_state_dict": npconvnext.load_state_dict(path),
              "read_weight_file": read_weight_file(path).state}
    if container == "safetensors":
        public["read_safetensors"] = read_safetensors(path)
    for reader, arrays in public.items():
        for name, b in bits.items():
            assert type(arrays[name]) is np.ndarray and arrays[name].dtype == np.float32, (reader, name)
            np.testing.assert_array_equal(arrays[name], layers.from_bfloat16(b), err_msg=f"{reader} {name}")
    widened = {name: layers.from_bfloat16(b) for name, b in bits.items()}
    for dtype in ("bfloat16", "float32"):
        model = npconvnext.create_model("convnext_atto", weights=path, dtype=dtype)
        again = npconvnext.create_model("convnext_atto", weights=widened, dtype=dtype)
        for name in bits:
            assert model.params[name].dtype == again.params[name].dtype, name
            np.testing.assert_array_equal(model.params[name], again.params[name], err_msg=name)


@pytest.mark.parametrize("container", ["safetensors", "pth"])
@pytest.mark.parametrize("bits, refused", [(0x7FC0, True), (0x7F80, True), (0xFF80, True), (0x7F7F, False)],
                         ids=["NaN", "Inf", "-Inf", "largest finite"])
def test_a_bfloat16_file_with_nan_or_inf_is_refused(atto_state, tmp_path, container, bits, refused):
    # the check reads the bits: an all-ones exponent is Inf or NaN, the largest finite value is not
    value = layers.from_bfloat16(np.array([bits], np.uint16))
    state = dict(atto_state, **{"head.fc.bias": np.concatenate([value, atto_state["head.fc.bias"][1:]])})
    path = tmp_path / f"atto_bf16.{container}"
    _write_bfloat16(path, state, container)
    if refused:
        with pytest.raises(npconvnext.CheckpointError, match=f"{path}: 1 tensors hold NaN or Inf: head.fc.bias"):
            npconvnext.create_model("convnext_atto", weights=path, dtype="bfloat16")
    else:
        model = npconvnext.create_model("convnext_atto", weights=path, dtype="bfloat16")
        assert model.params["head.fc.bias"][0] == value[0]


def test_rounding_a_block_of_rows_at_a_time_rounds_as_a_whole(atto_state, tmp_path, monkeypatch):
    # a block that divides neither the rows nor the elements: 1000 // 320 = 3 rows of fc1 (1280, 320)
    monkeypatch.setattr(npconvnext.model, "_ROUNDED_AT_ONCE", 1000)
    path = tmp_path / "atto.safetensors"
    save_file(atto_state, str(path))
    model = npconvnext.create_model("convnext_atto", weights=path, dtype="bfloat16")
    for name in _linears(atto_state):
        np.testing.assert_array_equal(model.params[name].T.reshape(atto_state[name].shape),
                                      layers.to_bfloat16(atto_state[name]), err_msg=name)


# ---- peaks, in fresh processes --------------------------------------------------------------------

_LOAD = """
import json, sys, warnings
import npconvnext

def status(field):
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1]) * 1024

warnings.simplefilter("ignore")
before = status("VmRSS:")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM counts from here
except OSError as exc:
    print(json.dumps(dict(skip=f"cannot reset VmHWM: {exc}")))
    sys.exit()
model = npconvnext.create_model("convnext_tiny", weights=sys.argv[1], dtype="bfloat16")
print(json.dumps(dict(peak=status("VmHWM:") - before, kept=status("VmRSS:") - before)))
"""

# RSS growth of loading convnext_tiny into bfloat16, at its peak and once loaded, at most these
# fractions of the weights' float32 bytes. Such a model keeps under half of them (its linears'
# bits; what it uses in place stays mapped, unread); holding the file's float32 linears beside
# the bits, as loading once did, takes well over one.
LIMITS = {"float32 safetensors": (1.0, 0.8),
          "bfloat16 safetensors": (0.6, 0.4),
          "float32 .pth": (1.4, 1.0)}  # the reader's floats, freed one by one as the model rounds them


@LINUX_PROC
@pytest.mark.parametrize("source", list(LIMITS))
def test_loading_into_bfloat16_never_holds_the_float32_linears(tmp_path, source):
    state = random_state_dict(npconvnext.get_config("convnext_tiny"), seed=0)
    float32 = sum(a.nbytes for a in state.values())
    path = tmp_path / "weights"
    if source == "float32 safetensors":
        save_file(state, str(path))
    elif source == "bfloat16 safetensors":
        write_bfloat16_safetensors(path, state)
    else:
        torch = pytest.importorskip("torch")
        torch.save({name: torch.from_numpy(array) for name, array in state.items()}, path)
    del state
    env = dict(STARTING_ENVIRON, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", _LOAD, str(path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    grown = json.loads(out.stdout)
    if "skip" in grown:
        pytest.skip(grown["skip"])
    peak, kept = LIMITS[source]
    assert grown["peak"] <= peak * float32, f"peak {grown['peak'] / float32:.2f} of the float32 bytes"
    assert grown["kept"] <= kept * float32, f"kept {grown['kept'] / float32:.2f} of the float32 bytes"
