"""convert and verify, and the atomic writer under them: exact output, nothing left behind by an
error or a kill, the umask left alone, errors that name the destination."""

import hashlib
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from npconvnext import atomic, progress
from npconvnext.convert import convert, verify
from npconvnext.errors import CheckpointError
from tests.support.timm_reference import numpy_state_dict, random_timm_model

WRITE_PATHS = ["O_TMPFILE", "named temporary"]


@pytest.fixture(scope="module")
def atto():
    model = random_timm_model("convnext_atto", seed=5)
    return model, numpy_state_dict(model)


@pytest.fixture
def src(tmp_path, atto):
    path = tmp_path / "src.safetensors"
    save_file(atto[1], path)
    return path


@pytest.fixture(params=WRITE_PATHS)
def write_path(request, monkeypatch):
    """Run the test through each of the atomic writer's two ways of making its temporary file."""
    if request.param == "O_TMPFILE" and not atomic._USE_TMPFILE:
        pytest.fail("this Linux has no O_TMPFILE or /proc: the path every Linux user takes is untested")
    monkeypatch.setattr(atomic, "_USE_TMPFILE", request.param == "O_TMPFILE")
    return request.param


def cli(*args, ok=True, env=None):
    out = subprocess.run([sys.executable, "-m", "npconvnext", *map(str, args)], capture_output=True,
                         text=True, env=env)
    assert (out.returncode == 0) == ok, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    return out


def test_convert_round_trip_with_metadata(tmp_path, atto):
    model, state = atto
    src = tmp_path / "pytorch_model.bin"
    torch.save(model.state_dict(), src)
    dst = tmp_path / "atto.safetensors"
    meta = convert(src, dst)
    assert meta == {"architecture": "convnext_atto", "num_classes": "1000",
                    "source_sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
                    "source_format": "torch-zip/timm", "source_file": "pytorch_model.bin",
                    "format": "pt", "converted_by": "npconvnext"}
    # read back with the safetensors library itself: timm's tensors, bit for bit, and the metadata
    with safe_open(str(dst), "np") as f:
        assert f.metadata() == meta
    loaded = load_file(dst)
    assert list(loaded) == list(state)  # timm's order
    for name, value in state.items():
        assert loaded[name].dtype == np.float32
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)
    with pytest.raises(FileExistsError, match=f"{dst}: already exists; pass --force"):
        convert(src, dst)
    dst.write_bytes(b"old")
    convert(src, dst, force=True)
    assert load_file(dst).keys() == state.keys()


def test_converting_twice_gives_identical_bytes(tmp_path, src):
    convert(src, tmp_path / "a.safetensors")
    convert(src, tmp_path / "b.safetensors")
    cli("convert", src, tmp_path / "c.safetensors")  # another process: no per-process hash seed either
    a = (tmp_path / "a.safetensors").read_bytes()
    assert a == (tmp_path / "b.safetensors").read_bytes() == (tmp_path / "c.safetensors").read_bytes()


def test_safetensors_writer_is_read_back_by_safetensors(tmp_path):
    """Every dtype the readers know, 0-d, empty and non-contiguous arrays, metadata in any order."""
    from safetensors.numpy import load

    from npconvnext.formats.safetensors_writer import safetensors_chunks

    rng = np.random.default_rng(0)
    tensors = {"scalar": np.float32(3.5).reshape(()), "empty": np.zeros((0, 3)), "strided": np.arange(12.0)[::3],
               "transposed": rng.standard_normal((3, 4)).T, **{f"t{i}": (rng.standard_normal(5) * 9).astype(t)
               for i, t in enumerate((np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_))}}
    metadata = {"zeta": "1", "alpha": "2", "mid": "3"}
    data = b"".join(bytes(c) for c in safetensors_chunks(tensors, metadata))
    assert data == b"".join(bytes(c) for c in safetensors_chunks(tensors, dict(reversed(metadata.items()))))
    loaded = load(data)
    assert loaded.keys() == tensors.keys()
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape, name
        np.testing.assert_array_equal(loaded[name], value)
    (tmp_path / "x.safetensors").write_bytes(data)
    with safe_open(str(tmp_path / "x.safetensors"), "np") as f:
        assert f.metadata() == metadata


def test_interrupted_write_leaves_nothing(tmp_path, src, write_path, monkeypatch):
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"precious")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        convert(src, dst, force=True)
    assert dst.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "src.safetensors"]
    assert not _open_files_in(os.getpid(), tmp_path)


def _open_files_in(pid, directory):
    """{descriptor: file} of the files process `pid` holds open in `directory`, named or not
    ("#12 (deleted)" for an unnamed one)."""
    held = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            held[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return {fd: target for fd, target in held.items() if os.path.dirname(target) == str(directory)}


def test_data_then_directory_are_synced(tmp_path, write_path, monkeypatch):
    """Durable: the file's data is fsynced before the rename, and the directory after it."""
    real_fsync, synced = os.fsync, []

    def record(fd):
        info = os.fstat(fd)
        synced.append("directory" if stat.S_ISDIR(info.st_mode) else f"file of {info.st_size} bytes")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    atomic.atomic_write(tmp_path / "out.bin", b"abcdefg")
    assert synced == ["file of 7 bytes", "directory"]


def test_killed_conversion_leaves_no_file(tmp_path, src):
    """SIGKILL while the converted file is being written: the directory is as it was."""
    dst = tmp_path / "out.safetensors"
    script = textwrap.dedent(f"""
        import os, time
        from npconvnext.convert import convert

        def stall(fd):  # the data is all written; sync never returns
            print("written", flush=True)
            time.sleep(120)

        os.fsync = stall
        convert({str(src)!r}, {str(dst)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "written\n"
        # the child holds the whole file open, under no name in the directory
        held = _open_files_in(proc.pid, tmp_path)
        sizes = [os.stat(f"/proc/{proc.pid}/fd/{fd}").st_size for fd in held]
        assert sorted(os.listdir(tmp_path)) == ["src.safetensors"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert sorted(os.listdir(tmp_path)) == ["src.safetensors"]
    (tmp_path / "ref").mkdir()
    convert(src, tmp_path / "ref" / "out.safetensors")
    assert sizes == [os.path.getsize(tmp_path / "ref" / "out.safetensors")]


@pytest.mark.parametrize("umask, mode", [(0o077, 0o600), (0o022, 0o644), (0o002, 0o664)],
                         ids=["umask077", "umask022", "umask002"])
@pytest.mark.parametrize("tmpfile", [True, False], ids=WRITE_PATHS)
def test_mode_follows_the_umask_which_is_left_alone(tmp_path, umask, mode, tmpfile):
    """The file gets 0o666 less the umask, as open() gives; the umask is never changed, not even
    for a moment (another thread could create a file meanwhile)."""
    dst = tmp_path / "out.bin"
    script = textwrap.dedent(f"""
        import os
        from npconvnext import atomic, progress

        atomic._USE_TMPFILE = {tmpfile}
        os.umask({umask:#o})

        def refuse(mask):
            raise AssertionError("the umask was changed")

        os.umask = refuse
        atomic.atomic_write({str(dst)!r}, b"data")
        print(oct(os.stat({str(dst)!r}).st_mode & 0o777))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == oct(mode)
    assert dst.read_bytes() == b"data"


def test_errors_name_the_destination(tmp_path, src, write_path, monkeypatch):
    missing = tmp_path / "no-such-dir" / "out.safetensors"
    with pytest.raises(FileNotFoundError) as err:
        convert(src, missing)
    assert f"cannot write {missing}" in str(err.value) and ".tmp" not in str(err.value)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    dst = tmp_path / "out.safetensors"
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError) as err:
        convert(src, dst)
    assert str(err.value) == f"[Errno 28] cannot write {dst}: No space left on device"
    assert sorted(os.listdir(tmp_path)) == ["src.safetensors"]


def test_cli_write_error_is_one_line(tmp_path, src):
    missing = tmp_path / "no-such-dir" / "out.safetensors"
    err = cli("convert", src, missing, ok=False).stderr
    assert err == f"npconvnext convert: error: cannot write {missing}: No such file or directory\n"


def _holds(path) -> bool:
    """Whether this process has `path` memory-mapped or open."""
    with open("/proc/self/maps") as f:
        if str(path) in f.read():
            return True
    return str(path) in _open_files_in("self", path.parent).values()


def _bad_zip(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/notes.txt", "a zip, but no data.pkl")


@pytest.mark.parametrize("make, arch, message", [
    (None, "convnext_tiny", "wrong shape"),                                  # a good file, the wrong arch
    (lambda p: p.write_bytes((5).to_bytes(8, "little") + b"{nope"), None, "not valid JSON"),
    (_bad_zip, None, "not a PyTorch checkpoint"),
], ids=["wrong-arch", "bad-safetensors-header", "zip-without-pickle"])
def test_a_failed_conversion_keeps_nothing_open(tmp_path, src, make, arch, message):
    """The error must not keep the source mapped or open (holding its pages and, on some
    systems, stopping it from being replaced) for as long as the caller keeps the error."""
    if make:
        make(src)
    with pytest.raises(CheckpointError, match=message) as err:
        convert(src, tmp_path / "out.safetensors", arch=arch)
    assert str(err.value).startswith(f"{src}: ")
    assert not _holds(src)
    assert sorted(os.listdir(tmp_path)) == ["src.safetensors"]


def test_a_checkpoint_without_head_converts_as_a_headless_backbone(tmp_path):
    # timm's num_classes=0 backbones (DINOv3, FCMAE, ...) have no head.fc: a backbone, not a defect
    headless = {k: v for k, v in numpy_state_dict(random_timm_model("convnext_atto", num_classes=0)).items()}
    assert not any(k.startswith("head.fc") for k in headless)
    path = tmp_path / "backbone.safetensors"
    save_file(headless, path)
    out = tmp_path / "out.safetensors"
    convert(path, out)  # the architecture read off the weights: num_classes 0
    assert set(load_file(out)) == set(headless)
    # with --arch too: the same headless backbone, the same bytes, as create_model reads one
    named = tmp_path / "named.safetensors"
    assert convert(path, named, arch="convnext_atto")["num_classes"] == "0"
    assert named.read_bytes() == out.read_bytes()
    assert cli("convert", path, tmp_path / "cli.safetensors", "--arch", "convnext_atto").returncode == 0
    assert (tmp_path / "cli.safetensors").read_bytes() == out.read_bytes()
    # a headless file of another architecture is still refused
    with pytest.raises(CheckpointError, match="wrong shape"):
        convert(path, tmp_path / "other.safetensors", arch="convnext_tiny")
    assert not (tmp_path / "other.safetensors").exists()


# ---- progress -----------------------------------------------------------------------------------


@pytest.fixture
def bars(monkeypatch):
    """Every tqdm bar progress.py makes, kept to read its total and count after the work."""
    made = []

    class Recorded(progress.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(progress, "tqdm", Recorded)
    return made


def test_convert_counts_the_source_the_tensors_and_the_written_bytes(tmp_path, src, bars, monkeypatch, capsys,
                                                                     caplog):
    monkeypatch.setenv("NPCONVNEXT_PROGRESS", "1")  # as on a terminal
    out = tmp_path / "out.safetensors"
    with caplog.at_level(logging.INFO, logger="npconvnext"):
        convert(src, out)
    counted = {bar.desc.split()[0]: (bar.unit, bar.total, bar.n) for bar in bars}
    assert counted == {"reading": ("B", src.stat().st_size, src.stat().st_size),
                       "checking": ("tensor", len(load_file(out)), len(load_file(out))),
                       "writing": ("B", out.stat().st_size, out.stat().st_size)}
    err = capsys.readouterr().err
    assert "reading src.safetensors" in err and "writing out.safetensors" in err
    [record] = [r for r in caplog.records if r.name == "npconvnext.convert"]
    assert record.getMessage().startswith(f"{out}: convnext_atto (1000 classes) from safetensors/timm")

    quiet, piped = tmp_path / "quiet.safetensors", tmp_path / "piped.safetensors"
    convert(src, quiet, quiet=True)
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("NPCONVNEXT_PROGRESS")  # stderr is not a terminal under pytest
    convert(src, piped)
    assert capsys.readouterr().err == ""
    assert quiet.read_bytes() == piped.read_bytes() == out.read_bytes()


def test_convert_and_verify_commands_show_bars_unless_quiet_or_piped(tmp_path, src):
    shown = dict(os.environ, NPCONVNEXT_PROGRESS="1")
    out = cli("convert", src, tmp_path / "bar.safetensors", env=shown)
    assert "writing bar.safetensors" in out.stderr and out.stdout.startswith(f"{tmp_path / 'bar.safetensors'}: ")
    assert cli("convert", "-q", src, tmp_path / "quiet.safetensors", env=shown).stderr == ""
    assert cli("convert", src, tmp_path / "piped.safetensors").stderr == ""
    assert (tmp_path / "bar.safetensors").read_bytes() == (tmp_path / "piped.safetensors").read_bytes()
    assert "reading src.safetensors" in cli("verify", tmp_path / "bar.safetensors", src, env=shown).stderr
    assert cli("verify", "--quiet", tmp_path / "bar.safetensors", src, env=shown).stderr == ""


# ---- verify -------------------------------------------------------------------------------------


def _tamper(path, name):
    """Flip one bit of tensor `name`'s first value in place (the header stays as it was)."""
    with safe_open(str(path), "np") as f:
        first = f.get_tensor(name).reshape(-1)[0]
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start = 8 + header_len + json.loads(data[8 : 8 + header_len])[name]["data_offsets"][0]
    assert data[start : start + 4] == first.tobytes()
    data[start] ^= 1
    path.write_bytes(bytes(data))


def test_verify_a_match_a_different_source_and_a_tampered_file(tmp_path, src):
    dst = tmp_path / "converted.safetensors"
    convert(src, dst)
    assert verify(dst, src)["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    out = cli("verify", dst, src).stdout
    assert out.startswith(f"{dst}: OK: convnext_atto converted from {src}")

    other = tmp_path / "other.safetensors"
    save_file(numpy_state_dict(random_timm_model("convnext_atto", seed=9)), other)
    with pytest.raises(CheckpointError, match=f"{dst}: was converted from a file with sha256 .*{other} has sha256"):
        verify(dst, other)
    err = cli("verify", dst, other, ok=False).stderr
    assert err.startswith(f"npconvnext verify: error: {dst}: was converted from") and len(err.splitlines()) == 1

    _tamper(dst, "stages.2.blocks.1.mlp.fc1.weight")
    with pytest.raises(CheckpointError, match=r"stages\.2\.blocks\.1\.mlp\.fc1\.weight: 1 of \d+ values differ"):
        verify(dst, src)
    err = cli("verify", dst, src, ok=False).stderr
    assert "does not match a fresh conversion" in err and "stages.2.blocks.1.mlp.fc1.weight" in err

    with pytest.raises(CheckpointError, match="not written by `npconvnext convert`"):
        verify(src, src)  # a file with no record of its source

    # right tensors and hash, but metadata claiming another architecture
    from npconvnext.formats.safetensors_writer import safetensors_chunks

    with safe_open(str(dst), "np") as f:
        metadata = dict(f.metadata(), architecture="convnext_femto")
    relabelled = tmp_path / "relabelled.safetensors"
    relabelled.write_bytes(b"".join(bytes(c) for c in safetensors_chunks(load_file(src), metadata)))
    with pytest.raises(CheckpointError, match="metadata architecture: 'convnext_femto', a fresh conversion "
                                              "gives 'convnext_atto'"):
        verify(relabelled, src)
