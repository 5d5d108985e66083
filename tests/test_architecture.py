"""Imports inside the package run one way (docs/architecture.md): a test reads every import."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "npconvnext"

# module (dotted, below npconvnext) -> layer; a module may import only from lower layers,
# or from its own layer where ALLOWED_SIDEWAYS says so
LAYERS = {
    "errors": 0,
    "config": 1, "convention": 1, "layers": 1, "atomic": 1, "labels": 1, "hub": 1, "preprocessing": 1,
    "params": 2,
    "formats": 3, "network": 3, "engine": 3,
    "model": 4,
    "factory": 5,
    "convert": 6, "summary": 6, "oracle": 6, "train": 6, "__init__": 6,
    "distributed": 6,  # many images on a Dask cluster: over the factory and preprocessing, under the cli
    "cli": 7, "__main__": 8,
}
ALLOWED_SIDEWAYS = {("engine", "network"), ("preprocessing", "hub"), ("__init__", "train")}
FRAMEWORKS = ("torch", "tensorflow", "keras", "openvino", "timm", "transformers", "jax")


def unit(module: str) -> str:
    """The layer unit of a dotted module name: its first component (formats.x -> formats);
    "" (the package itself) is __init__."""
    return module.split(".")[0] or "__init__"


def package_imports():
    """(importing module, imported module or None for outside, the statement's text) for every import."""
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).with_suffix("")
        parts = list(relative.parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        module = ".".join(parts) or "__init__"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = parts if is_package else parts[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                    names = [target] if node.module else [f"{target}.{a.name}".strip(".") for a in node.names]
                    for name in names:
                        yield module, name, ast.unparse(node)
                elif node.module.split(".")[0] == "npconvnext":
                    yield module, node.module.partition(".")[2], ast.unparse(node)
                else:
                    yield module, None, node.module
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "npconvnext":
                        yield module, alias.name.partition(".")[2], ast.unparse(node)
                    else:
                        yield module, None, alias.name


def test_every_module_has_a_layer():
    modules = {unit(m) for m, _, _ in package_imports()}
    assert modules <= set(LAYERS), sorted(modules - set(LAYERS))


def test_imports_run_one_way():
    wrong = []
    for module, target, text in package_imports():
        if target is None or module == "__init__":
            continue
        here, there = unit(module), unit(target)
        if here == there:
            continue  # inside one unit (a package's own modules)
        if LAYERS[there] > LAYERS[here] or (LAYERS[there] == LAYERS[here] and (here, there) not in ALLOWED_SIDEWAYS):
            wrong.append(f"{module}: {text}")
    assert not wrong, "imports against docs/architecture.md:\n" + "\n".join(wrong)


def test_the_reference_network_never_imports_the_engine():
    assert not [t for m, t, _ in package_imports() if unit(m) in ("network", "layers") and t and unit(t) == "engine"]


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_no_framework_at_import_level_in_the_core(framework):
    # oracle.timm_trace imports timm and torch inside the function that needs them, for parity
    offenders = [f"{m}: {t}" for m, t, t_text in package_imports()
                 if t is None and t_text.split(".")[0] == framework and m != "oracle"]
    assert not offenders, offenders


def test_this_test_sees_a_wrong_import(tmp_path, monkeypatch):
    # the checker itself can fail: a fake package where params imports model
    fake = tmp_path / "npconvnext"
    fake.mkdir()
    (fake / "params.py").write_text("from .model import ConvNeXt\n")
    (fake / "model.py").write_text("from .params import expected_shapes\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    with pytest.raises(AssertionError, match="params: from .model import ConvNeXt"):
        test_imports_run_one_way()
