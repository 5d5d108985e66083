"""jit.py's settings at work: the JIT cache from a read-only install, and the compile notice."""

import os
import subprocess
import sys

from tests.support import DATA


# Run in a fresh process against a copy of the package (argv[1]): the model once, then how many
# kernel signatures Numba compiled and how many it loaded from its cache, as JSON.
_CACHE_RUN = """
import json, os, sys, warnings
import numba, numpy as np
import npconvnext
from npconvnext.engine import block, depthwise, erf, grn, layernorm, linear, mlp
assert npconvnext.__file__.startswith(sys.argv[1]), npconvnext.__file__
try:  # this process must not be able to write into the package, as users of an installed one
    open(os.path.join(os.path.dirname(block.__file__), "probe"), "w")
    sys.exit("the package copy is writable")
except PermissionError:
    pass
warnings.simplefilter("ignore")
npconvnext.create_model("convnextv2_atto")(np.zeros((1, 3, 32, 32), np.float32))
stats = [f.stats for m in (depthwise, erf, grn, layernorm, linear, mlp) for f in vars(m).values()
         if isinstance(f, numba.core.dispatcher.Dispatcher) and f.py_func.__module__ == m.__name__]
print(json.dumps({"compiled": sum(sum(s.cache_misses.values()) for s in stats),
                  "loaded": sum(sum(s.cache_hits.values()) for s in stats)}))
"""


def _without_root_write_override():
    # For root, read-only modes do not hold (CAP_DAC_OVERRIDE): drop that capability from the
    # bounding set (prctl PR_CAPBSET_DROP) so the process exec'd next meets them as a user does.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(24, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE)")


def test_jit_cache_works_from_a_read_only_package(tmp_path):
    """Installed read-only, the package's kernels are compiled once into Numba's per-user cache
    directory, and a second process loads them from there instead of compiling."""
    import json
    import shutil

    import npconvnext

    site = tmp_path / "site"
    package = site / "npconvnext"
    shutil.copytree(os.path.dirname(npconvnext.__file__), package, ignore=shutil.ignore_patterns("__pycache__"))
    for path in [package, *package.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)  # read-only, as a system-wide install
    before = sorted((str(p), p.stat().st_mtime_ns) for p in package.rglob("*"))
    user_cache = tmp_path / "user-cache"  # where Numba falls back to: $XDG_CACHE_HOME/numba
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(user_cache), PYTHONPATH=str(site))
    probe = package / "probe"
    try:
        probe.touch()
        probe.unlink()
        preexec = _without_root_write_override  # we are root: the modes alone do not hold
    except PermissionError:
        preexec = None

    def run():
        result = subprocess.run([sys.executable, "-c", _CACHE_RUN, str(site)], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=300, preexec_fn=preexec)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.splitlines()[-1])

    try:
        first = run()
        assert first["compiled"] > 0 and first["loaded"] == 0, first
        assert any(user_cache.rglob("*.nbc")) and any(user_cache.rglob("*.nbi")), "nothing cached"
        second = run()
        assert second["compiled"] == 0 and second["loaded"] > 0, second
        assert sorted((str(p), p.stat().st_mtime_ns) for p in package.rglob("*")) == before
    finally:
        for path in [package, *package.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)  # so that pytest can remove it


_LIBRARY_RUN = """
import json, logging, sys, warnings
import numpy as np
import npconvnext

records = []
handler = logging.Handler()
handler.emit = records.append
logging.getLogger().addHandler(handler)  # collects, prints nothing
logging.getLogger().setLevel(logging.INFO)
warnings.simplefilter("ignore")
npconvnext.create_model("convnext_atto", weights=sys.argv[1])(np.zeros((2, 3, 32, 32), np.float32))
print(json.dumps([[r.name, r.levelname, r.getMessage()] for r in records]))
"""


def test_a_cold_jit_cache_is_told_once_by_the_cli_and_logged_by_the_library(tmp_path):
    """Compiling the kernels takes seconds: the first run on a cold cache says so (the CLI on
    stderr; the library as an INFO record, never printed), and a warm run says nothing."""
    import json

    from safetensors.numpy import save_file

    import npconvnext
    from npconvnext.engine.jit import COMPILE_NOTICE
    from npconvnext.params import random_state_dict

    weights = tmp_path / "atto.safetensors"
    save_file(random_state_dict(npconvnext.get_config("convnext_atto")), weights)
    image = os.path.join(DATA, "chelsea.png")

    def run(args, cache):
        env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / cache))
        result = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    cold = run(["-m", "npconvnext", "classify", image, "--weights", str(weights)], "cli-cache")
    assert cold.stderr.count(f"npconvnext: {COMPILE_NOTICE}") == 1, cold.stderr
    warm = run(["-m", "npconvnext", "classify", image, "--weights", str(weights)], "cli-cache")
    assert COMPILE_NOTICE not in warm.stderr and warm.stdout == cold.stdout
    library = run(["-c", _LIBRARY_RUN, str(weights)], "library-cache")
    assert json.loads(library.stdout) == [["npconvnext", "INFO", COMPILE_NOTICE]]
    assert COMPILE_NOTICE not in library.stderr


def test_the_suite_drops_cached_kernels_older_than_a_numba_module(tmp_path):
    """conftest's guard against Numba's cache, which checks only a kernel's own file: a kernel
    with an index or a data file older than any module that imports numba goes, whole; a newer
    one stays. (A new signature rewrites the index and leaves the older data files.)"""
    from tests.conftest import _drop_stale_kernels

    cache = tmp_path / "pkg" / "__pycache__"
    cache.mkdir(parents=True)
    (tmp_path / "pkg" / "callee.py").write_text("import numba\n")
    (tmp_path / "pkg" / "notes.py").write_text("NOTE = 1\n")  # no numba: never makes a kernel stale
    stems = ("caller.run-3.py311", "caller.other-9.py311", "caller.grown-20.py311")
    for stem in stems:
        for name in (f"{stem}.nbi", f"{stem}.1.nbc", f"{stem}.2.nbc"):
            (cache / name).write_bytes(b"")
            os.utime(cache / name, (3, 3))
    os.utime(tmp_path / "pkg" / "callee.py", (2, 2))
    os.utime(tmp_path / "pkg" / "notes.py", (5, 5))
    os.utime(cache / "caller.run-3.py311.nbi", (1, 1))       # compiled before the edit
    os.utime(cache / "caller.grown-20.py311.1.nbc", (1, 1))  # index rewritten since, this one not
    assert sorted(_drop_stale_kernels(str(tmp_path / "pkg"))) == sorted(
        str(cache / f"{stem}.nbi") for stem in ("caller.run-3.py311", "caller.grown-20.py311"))
    assert sorted(p.name for p in cache.iterdir()) == [
        "caller.other-9.py311.1.nbc", "caller.other-9.py311.2.nbc", "caller.other-9.py311.nbi"]
