"""Every Python snippet in the README and docs/ runs as written.

Each runs in a fresh process in a folder of its own that holds what the snippets name: weight
files with seeded random weights (`convnext_tiny.safetensors`, `convnext_atto.safetensors`), the
repository's photos under `tests/data/`, and `my_photos/`, a folder of images per class. The
hub is never reached (HF_HUB_OFFLINE).
"""

import glob
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

import npconvnext
from tests.support import DATA, ROOT

PAGES = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
SNIPPET = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def snippets() -> list:
    """Every ```python block of the pages, as a test parameter named page#number (a list:
    pytest no longer takes a generator)."""
    return [pytest.param(match.group(1), id=f"{os.path.relpath(page, ROOT)}#{number}")
            for page in PAGES
            for number, match in enumerate(SNIPPET.finditer(open(page, encoding="utf-8").read()), 1)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with every file the snippets name."""
    folder = tmp_path_factory.mktemp("snippets")
    for arch in ("convnext_tiny", "convnext_atto"):
        with pytest.warns(UserWarning, match="seeded random weights"):  # as the snippets' files are meant to be
            model = npconvnext.create_model(arch, seed=0)
        save_file({name: np.ascontiguousarray(a) for name, a in model.state_dict().items()},
                  str(folder / f"{arch}.safetensors"))
    shutil.copytree(DATA, folder / "tests" / "data")
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (folder / "my_photos" / label).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "my_photos" / label / f"{i}.png")
    return folder


def test_the_pages_have_snippets():
    assert len(list(snippets())) >= 3


@pytest.mark.parametrize("code", snippets())
def test_snippet_runs_as_written(code, workdir, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(workdir, folder, symlinks=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
