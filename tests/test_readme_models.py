"""README.md's model list is generated (scripts/make_readme_models.py): it fails here when stale."""

import importlib.util
import os

from tests.support import ROOT


def test_readme_model_list_is_the_scripts():
    spec = importlib.util.spec_from_file_location("make_readme_models",
                                                  os.path.join(ROOT, "scripts", "make_readme_models.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert script.rewrite(readme) == readme, "README.md's model list is stale: run scripts/make_readme_models.py"
