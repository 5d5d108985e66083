"""A weight file's pages given back (formats/mapped.py): only the package's own read-only
mappings, never a caller's memory, and the values stay what the file holds."""

import numpy as np
import pytest
from safetensors.numpy import save_file

import npconvnext
from npconvnext.formats import read_safetensors
from npconvnext.formats.mapped import mapping_of, release_pages
from npconvnext.params import random_state_dict
from tests.support.memory import LINUX_PROC, resident_kb

FC1 = "stages.3.blocks.0.mlp.fc1.weight"  # 1.6 MB of float32 in convnext_atto


@pytest.fixture
def atto_file(tmp_path):
    """convnext_atto's random weights as a float32 safetensors file, and the weights."""
    state = random_state_dict(npconvnext.get_config("convnext_atto"), seed=1)
    path = tmp_path / "atto.safetensors"
    save_file(state, str(path))
    return path, state


@LINUX_PROC
def test_released_pages_of_a_mapped_file_read_again_as_the_file(atto_file):
    path, state = atto_file
    mapped = read_safetensors(path)
    assert mapping_of(mapped[FC1]) is not None and not mapped[FC1].flags.writeable
    assert np.isfinite(sum(float(a.sum()) for a in mapped.values()))  # every page read
    before = resident_kb(path)
    assert before * 1024 >= sum(a.nbytes for a in state.values())
    release_pages(mapped[FC1])
    assert before - resident_kb(path) >= (state[FC1].nbytes - 2 * 4096) // 1024
    for name, array in state.items():
        np.testing.assert_array_equal(mapped[name], array)  # read again from the file


@LINUX_PROC
def test_checking_a_file_leaves_none_of_it_mapped(atto_file):
    # the finite check reads every tensor, giving each one's pages back: it never holds the file
    path, state = atto_file
    loaded = npconvnext.load_state_dict(path)
    assert resident_kb(path) <= 64
    np.testing.assert_array_equal(loaded[FC1], state[FC1])
    assert resident_kb(path) * 1024 >= state[FC1].nbytes  # what uses a tensor maps it in again


@pytest.mark.parametrize("mode", ["r+", "c"], ids=["writable", "copy-on-write"])
def test_a_callers_memmap_is_never_released(tmp_path, mode):
    # dropping a page of a private (copy-on-write) mapping would discard what was written to it
    path = tmp_path / "weights.bin"
    np.arange(1 << 20, dtype=np.float32).tofile(path)
    memmap = np.memmap(path, dtype=np.float32, mode=mode)
    memmap[:] = -1.0
    assert mapping_of(memmap) is None and mapping_of(memmap[10:]) is None
    release_pages(memmap)
    release_pages(np.asarray(memmap)[5:])
    assert (memmap == -1.0).all()


def test_heap_arrays_are_not_released():
    array = np.ones(1 << 20, np.float32)
    assert mapping_of(array) is None and mapping_of(np.frombuffer(bytes(8), np.float32)) is None
    release_pages(array)
    assert (array == 1.0).all()
