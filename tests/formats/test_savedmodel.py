"""TensorFlow SavedModels of ConvNeXt (keras.applications' and the TF-Hub port's layouts), written
by TensorFlow itself from re-randomised weights, give TensorFlow's own outputs in npconvnext,
with no TensorFlow imported by it; broken and hostile SavedModels get a CheckpointError naming
the path.

TensorFlow runs in a subprocess (tests/support/tf_writer.py): it crashes beside OpenVINO, which other
tests import, and this process's Keras runs on torch.
"""

import os
import shutil
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest

import npconvnext
import npconvnext.convert
import npconvnext.formats.crc32c as crc32c_module
from npconvnext.formats import tf_bundle
from npconvnext.formats.crc32c import crc32c, crc32c_naive, mask_crc, unmask_crc
from npconvnext.formats.protobuf import varint
from npconvnext.formats.tf_bundle import read_table
from tests.support import TESTS

WRITER = os.path.join(TESTS, "support", "tf_writer.py")
NO_TENSORFLOW, NO_TF_KERAS = 3, 4  # tf_writer.py's exit status without TensorFlow, without tf_keras
MODELS = {  # name in tf_writer.py -> (architecture, outputs, convention source mentions)
    "keras_tiny": ("convnext_tiny", "probabilities", "keras.applications"),
    "keras_small_logits": ("convnext_small", "logits", "keras.applications"),
    "hub_tiny": ("convnext_tiny", "logits", "TF-Hub"),
    "hub_small": ("convnext_small", "logits", "TF-Hub"),
}


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("savedmodels")
    env = dict(os.environ, KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, WRITER, str(folder), *MODELS, "other", "hub_export"],
                         capture_output=True, text=True, env=env, timeout=900)
    _check_writer(out)
    yield folder
    shutil.rmtree(folder)  # about a gigabyte: pytest would keep it for three runs


def _check_writer(out):
    # TensorFlow and tf-keras are in the test extra: missing, they fail these tests rather than skip them
    missing = {NO_TENSORFLOW: "tensorflow", NO_TF_KERAS: "tf-keras"}.get(out.returncode)
    assert missing is None, f"{missing} is not installed: pip install -e '.[test]'"
    assert out.returncode == 0, out.stderr[-4000:]


def _outputs(folder, name):
    data = np.load(folder / f"{name}.npz")
    return data["x"], data["y"]


@pytest.mark.parametrize("name", list(MODELS))
def test_npconvnext_gives_tensorflows_outputs(saved_models, name):
    arch, outputs, source = MODELS[name]
    x, expected = _outputs(saved_models, name)
    model = npconvnext.create_model(None, weights=saved_models / name)
    assert model.config.name == arch and model.convention.outputs == outputs
    assert model.data_config.layout == "NHWC" and source in model.convention.source
    assert "tf-savedmodel" in model.describe() and source in model.describe()
    actual = model(x)
    error = np.abs(actual - expected).max() / np.abs(expected).max()
    print(f"{name}: max relative error {error:.2e} ({outputs})")
    assert error <= 1e-4


KERAS2_MODELS = {"hub_tiny_keras2": ("TF-Hub", "logits"), "keras_tiny_keras2": ("keras.applications", "probabilities")}


@pytest.fixture(scope="module")
def keras2_saved_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keras2")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, WRITER, str(folder), *KERAS2_MODELS], capture_output=True, text=True,
                         env=env, timeout=900)
    _check_writer(out)
    yield folder
    shutil.rmtree(folder)


@pytest.mark.parametrize("name", list(KERAS2_MODELS))
def test_saved_models_written_by_keras_2(keras2_saved_models, name):
    # The TF-Hub ConvNeXt modules were written by Keras 2's model.save: the port's variables
    # name no stem or downsampling block there, so the reader places them by layer order
    source, outputs = KERAS2_MODELS[name]
    x, expected = _outputs(keras2_saved_models, name)
    model = npconvnext.create_model(None, weights=keras2_saved_models / name)
    assert model.config.name == "convnext_tiny" and source in model.convention.source
    assert model.convention.outputs == outputs
    error = np.abs(model(x) - expected).max() / np.abs(expected).max()
    print(f"{name}: max relative error {error:.2e}")
    assert error <= 1e-4


def test_saved_model_pb_names_its_directory(saved_models):
    path = saved_models / "hub_tiny" / "saved_model.pb"
    x, expected = _outputs(saved_models, "hub_tiny")
    model = npconvnext.create_model("convnext_tiny", weights=path)
    assert np.abs(model(x) - expected).max() <= 1e-4 * np.abs(expected).max()


def test_saved_models_convert_to_timm_safetensors_and_verify(saved_models, tmp_path):
    src = saved_models / "keras_small_logits"
    state = npconvnext.load_state_dict(src)
    out = tmp_path / "converted.safetensors"
    from npconvnext.cli import main

    main(["convert", str(src), str(out)])
    metadata = npconvnext.convert.verify(out, src)
    assert metadata["source_format"].startswith("tf-savedmodel") and metadata["architecture"] == "convnext_small"
    converted = npconvnext.formats.load_state_dict(out)
    assert set(converted) == set(state) and all(np.array_equal(converted[k], state[k]) for k in state)
    x, expected = _outputs(saved_models, "keras_small_logits")
    model = npconvnext.create_model(None, weights=out)  # timm's convention: NCHW in
    actual = model(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    assert np.abs(actual - expected).max() <= 1e-4 * np.abs(expected).max()


def test_cli_takes_a_saved_model_directory(saved_models, tmp_path, capsys):
    import json

    from PIL import Image

    from npconvnext.cli import main

    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 90, 3), dtype=np.uint8)).save(image)
    main(["classify", str(image), "--weights", str(saved_models / "keras_tiny"), "--input-size", "64",
          "--top-k", "2", "--json"])
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    assert len(result["indices"]) == 2 and 0 < sum(result["probabilities"]) <= 1 + 1e-6


# ---- broken and hostile SavedModels ---------------------------------------------------------------

def _copy(saved_models, tmp_path, name="keras_small_logits", shard=False):
    """A copy to break; the data shard is linked to the original unless `shard` (it is large)."""
    dst = tmp_path / "model"

    def copy(src, dst):
        if shard or ".data-" not in os.path.basename(src):
            return shutil.copy2(src, dst)
        os.symlink(src, dst)

    shutil.copytree(saved_models / name, dst, copy_function=copy)
    return dst


def _refused(path, match=None):
    with pytest.raises(npconvnext.CheckpointError, match=match) as error:
        npconvnext.create_model(None, weights=path)
    assert str(path) in str(error.value)
    return str(error.value)


def test_a_saved_model_without_variables_is_refused(saved_models, tmp_path):
    model = _copy(saved_models, tmp_path)
    shutil.rmtree(model / "variables")
    _refused(model, "without variables")


def test_a_directory_that_is_no_saved_model_keeps_the_old_message(tmp_path):
    _refused(tmp_path, "pass the weight file inside it")


def test_truncated_index_and_shard_are_refused(saved_models, tmp_path):
    model = _copy(saved_models, tmp_path, shard=True)
    index = model / "variables" / "variables.index"
    data = index.read_bytes()
    index.write_bytes(data[: len(data) // 2])
    _refused(model)
    index.write_bytes(data)
    shard = model / "variables" / "variables.data-00000-of-00001"
    shard.write_bytes(shard.read_bytes()[:-1000])
    _refused(model, "beyond")
    shutil.rmtree(model)  # a large copy


def test_a_flipped_byte_in_a_shard_fails_its_crc(saved_models, tmp_path):
    model = _copy(saved_models, tmp_path, shard=True)
    shard = model / "variables" / "variables.data-00000-of-00001"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    _refused(model, "crc32c")
    shutil.rmtree(model)  # a large copy


def _encode_varint(value):
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _block(pairs):
    """A table block of (key, value) pairs, every key written whole (no shared prefix)."""
    body = b"".join(_encode_varint(0) + _encode_varint(len(k)) + _encode_varint(len(v)) + k + v for k, v in pairs)
    return body + struct.pack("<II", 0, 1)


def _write_table(entries, mentions=1, data=None):
    """An SSTable as TensorFlow's table builder lays it out: one data block (`data` if given, its
    last key at most max(entries)), one index block (which names the data block `mentions`
    times: once, unless testing a hostile index)."""
    def with_trailer(contents):
        crc = crc32c_naive(contents + b"\x00")
        masked = mask_crc(crc)
        assert unmask_crc(masked) == crc
        return contents + b"\x00" + struct.pack("<I", masked)

    data = _block(sorted(entries.items())) if data is None else data
    index = _block([(max(entries) + b"~" * i, _encode_varint(0) + _encode_varint(len(data))) for i in range(mentions)])
    body = with_trailer(data)
    footer = _encode_varint(len(body)) + _encode_varint(0)  # metaindex: empty, unread
    footer += _encode_varint(len(body)) + _encode_varint(len(index))
    return body + with_trailer(index) + footer.ljust(40, b"\x00") + struct.pack("<Q", tf_bundle.TABLE_MAGIC)


def test_an_index_naming_one_data_block_twice_is_refused():
    # each mention would be read and checksummed again: a small index could cost its size many times
    entries = {b"": b"", b"a": b"x"}
    assert read_table(_write_table(entries)) == {"": b"", "a": b"x"}
    with pytest.raises(npconvnext.CheckpointError, match="overlaps or repeats"):
        read_table(_write_table(entries, mentions=3))


def test_index_keys_growing_with_the_square_of_the_block_are_refused():
    # each key shares the whole previous key and adds a byte: 4 bytes of block per entry, but
    # the keys restored in full would total the square of that (issue #25, item 1)
    n = 6000
    growing = b"".join(_encode_varint(i) + _encode_varint(1) + _encode_varint(0) + b"a" for i in range(n))
    data = growing + struct.pack("<II", 0, 1)
    few = b"".join(_encode_varint(i) + _encode_varint(1) + _encode_varint(0) + b"a" for i in range(50))
    assert len(read_table(_write_table({b"b": b""}, data=few + struct.pack("<II", 0, 1)))) == 50
    with pytest.raises(npconvnext.CheckpointError, match="restores keys of"):
        read_table(_write_table({b"b": b""}, data=data))


def _rewrite_entry(model, edit, key=None):
    """Rewrite the index with `edit(entry bytes) -> entry bytes` applied to the entry at `key`
    (default: the stem kernel's)."""
    index = model / "variables" / "variables.index"
    table = {k.encode(): v for k, v in read_table(index.read_bytes()).items()}
    if key is None:
        bundle = tf_bundle.Bundle(str(model / "variables" / "variables"))
        key = next(k for k, e in bundle.entries.items() if len(e.shape) == 4 and e.shape[:2] == (4, 4))
    table[key.encode()] = edit(table[key.encode()])
    index.write_bytes(_write_table(table))


def _field(number, wire, payload):
    return _encode_varint(number << 3 | wire) + payload


def test_rewritten_tables_still_load(saved_models, tmp_path):
    # the table writer above is faithful: an unchanged rewrite loads
    model = _copy(saved_models, tmp_path)
    _rewrite_entry(model, lambda entry: entry)
    npconvnext.load_state_dict(model)


@pytest.mark.parametrize("case", ["offset outside the shard", "huge shape", "overlong varint", "shard 7",
                                  "string dtype"])
def test_hostile_bundle_entries_are_refused(saved_models, tmp_path, case):
    model = _copy(saved_models, tmp_path)
    edits = {
        "offset outside the shard": lambda e: e + _field(4, 0, _encode_varint(1 << 40)),
        "huge shape": lambda e: e + _field(2, 2, _sized(_field(2, 2, _sized(_field(1, 0, _encode_varint((1 << 39))))))),
        "overlong varint": lambda e: e + _field(4, 0, b"\xff" * 11 + b"\x01"),
        "shard 7": lambda e: e + _field(3, 0, _encode_varint(7)),
        "string dtype": lambda e: e + _field(1, 0, _encode_varint(7)),
    }
    _rewrite_entry(model, edits[case])  # a later field overrides an earlier one, as in protobuf
    _refused(model)


def test_two_copies_of_a_variable_that_differ_are_refused(saved_models, tmp_path):
    # Keras 3's model.export stores every variable twice; the index's record of the copy read
    # (under _all_variables/, first in key order) is changed to differ from the other's
    model = _copy(saved_models, tmp_path, "keras_tiny")
    _rewrite_entry(model, lambda e: e + _field(6, 5, struct.pack("<I", 12345)))
    _refused(model, "two copies")


def _sized(payload):
    return _encode_varint(len(payload)) + payload


def test_a_saved_model_of_another_network_is_refused(saved_models):
    _refused(saved_models / "other", "not a ConvNeXt SavedModel")


def test_a_port_whose_variables_cannot_be_placed_is_refused(saved_models):
    # Keras 3's model.export of the port's layout: a block's two biases share one full name and
    # the object graph names no sub-layer, so the reader refuses rather than guess
    _refused(saved_models / "hub_export", "does not name its sub-layers|belong to no layer")


def test_snappy_blocks_are_refused_clearly(saved_models, tmp_path):
    model = _copy(saved_models, tmp_path)
    index = model / "variables" / "variables.index"
    data = bytearray(index.read_bytes())
    handle_at = len(data) - tf_bundle.FOOTER_SIZE
    _, pos = varint(bytes(data), handle_at, len(data))
    _, pos = varint(bytes(data), pos, len(data))
    offset, pos = varint(bytes(data), pos, len(data))
    size, _ = varint(bytes(data), pos, len(data))
    data[offset + size] = 1  # the index block's compression type
    index.write_bytes(bytes(data))
    _refused(model, "snappy")


def test_crc32c_matches_its_naive_twin():
    assert crc32c_naive(b"123456789") == 0xE3069283  # the CRC-32C check value
    rng = np.random.default_rng(0)
    for size in (0, 1, 4095, 4096 * 4, 4096 * 4 + 17, 100_003):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        expected = crc32c_naive(data)
        assert crc32c(data) == expected, size
        assert crc32c_module._crc32c_lanes(np.frombuffer(data, np.uint8)) == expected, size  # the no-JIT path


@pytest.mark.parametrize("shard", ["missing", "a FIFO"])
def test_shards_the_header_claims_must_be_regular_files(saved_models, tmp_path, shard):
    # a header claiming 2 shards where only shard 0 exists (issue #25, item 8): shard 1 missing
    # or a FIFO is refused by the reader and never listed to hash, so nothing opens or blocks
    model = _copy(saved_models, tmp_path)
    _rewrite_entry(model, lambda header: header + _field(1, 0, _encode_varint(2)), key="")
    variables = model / "variables"
    os.rename(variables / "variables.data-00000-of-00001", variables / "variables.data-00000-of-00002")
    second = variables / "variables.data-00001-of-00002"
    if shard == "a FIFO":
        os.mkfifo(second)
    problem = "no such file" if shard == "missing" else "not a regular file"
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("blocked on the FIFO"))
    signal.alarm(60)
    try:
        _refused(model, problem)
        for call in (npconvnext.formats.weight_files, npconvnext.formats.sha256_of,
                     lambda m: npconvnext.convert.convert(m, tmp_path / "out.safetensors")):
            with pytest.raises(npconvnext.CheckpointError, match=problem):
                call(model)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_truncated_graph_is_refused(saved_models, tmp_path):
    # cut to 4096 bytes, saved_model.pb still named the Normalization layer to a search of its
    # bytes, and the model loaded with another convention (issue #25, item 9): it must parse
    model = _copy(saved_models, tmp_path, "keras_tiny")
    graph = model / "saved_model.pb"
    data = graph.read_bytes()
    for cut in (4096, len(data) // 2, len(data) - 1):
        graph.write_bytes(data[:cut])
        _refused(model, "saved_model.pb does not parse")
    graph.write_bytes(data[:2])  # the schema version alone: parses, and holds no graph
    _refused(model, "no graph")
