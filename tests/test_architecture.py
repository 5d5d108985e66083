"""The package's imports (docs/architecture.md), read from every module's syntax tree: they run
one way between layers, form no circle anywhere (inside a package too), and never take another
module's private names.

Every import statement counts, at module level or inside a function (a function's import runs
too, only later); an `if TYPE_CHECKING:` import never runs, so circles ignore it. Relative
imports are resolved inside their package, and `from P import m` where m is a module of
package P is an import of that module.
"""

import ast
import pathlib
import sys
from collections.abc import Iterator
from typing import NamedTuple

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "npconvnext"

# layers from the bottom up; a module may import only from lower layers, or from its own layer
# where ALLOWED_SIDEWAYS says so. A row names a top-level module or a whole package (its
# modules and subpackages share its row), so a module added inside a package needs no row.
LAYERS = [
    {"errors"},
    {"config", "convention", "layers", "atomic", "labels", "hub", "preprocessing", "progress"},
    {"params"},
    {"weights"},                                   # the typed weights built from params' table
    {"formats", "network", "engine"},
    {"model"},
    {"factory"},
    {"convert", "summary", "oracle", "train", "batch", "benchmark", "__init__"},
    {"distributed", "evaluate"},                   # over batch: many images on Dask; top-1/top-5
    {"explain", "figures"},                        # over train and oracle: what the network sees
    {"explain_cli"},                               # the drawing commands, for cli
    {"cli"},
    {"__main__"},
]
LAYER = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
ALLOWED_SIDEWAYS = {("engine", "network"), ("preprocessing", "hub"), ("__init__", "train")}
FRAMEWORKS = ("torch", "tensorflow", "keras", "openvino", "timm", "transformers", "jax")


class Import(NamedTuple):
    module: str          # the importing module, dotted below npconvnext ("__init__": the package itself)
    target: str | None   # the imported module of the package, None for one outside it
    names: tuple[str, ...]  # what `from target import ...` takes that is not a module; () for `import`
    text: str            # the statement, for messages (outside: the imported module's name)
    runs: bool           # False under `if TYPE_CHECKING:`


def unit(module: str) -> str:
    """The layer unit of a dotted module name: its first component (formats.x -> formats);
    "" and "__init__" (the package itself) are __init__."""
    return module.split(".")[0] or "__init__"


def package_modules() -> dict[str, pathlib.Path]:
    """{dotted module name below npconvnext: its file}; a package is named by its folder."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the statements inside `if TYPE_CHECKING:` blocks."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            inside |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return inside


def _normal(name: str) -> str:
    return name or "__init__"


def package_imports() -> Iterator[Import]:
    """Every import statement of every module of the package, resolved."""
    modules = package_modules()
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        here = [] if module == "__init__" else module.split(".")
        tree = ast.parse(path.read_text())
        hidden = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            runs = id(node) not in hidden
            if isinstance(node, ast.ImportFrom):
                text = ast.unparse(node)
                if node.level:
                    base = here if is_package else here[:-1]
                    base = base[: len(base) - (node.level - 1)] + ([node.module] if node.module else [])
                    base_name = ".".join(base)
                elif node.module.split(".")[0] == "npconvnext":
                    base_name = node.module.partition(".")[2]
                else:
                    yield Import(module, None, (), node.module, runs)
                    continue
                names = []
                for alias in node.names:
                    submodule = f"{base_name}.{alias.name}".strip(".")
                    if submodule in modules:
                        yield Import(module, submodule, (), text, runs)
                    else:
                        names.append(alias.name)
                if names:
                    yield Import(module, _normal(base_name), tuple(names), text, runs)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "npconvnext":
                        yield Import(module, _normal(alias.name.partition(".")[2]), (), ast.unparse(node), runs)
                    else:
                        yield Import(module, None, (), alias.name, runs)


def test_every_module_has_a_layer():
    units = {unit(i.module) for i in package_imports()} | {unit(m) for m in package_modules()}
    assert units <= set(LAYER), f"modules without a row in LAYERS: {sorted(units - set(LAYER))}"


def test_imports_run_one_way():
    wrong = []
    for i in package_imports():
        if i.target is None:
            continue
        here, there = unit(i.module), unit(i.target)
        if here == there:
            continue  # inside one unit (a package's own modules): the circle test covers them
        if LAYER[there] > LAYER[here] or (LAYER[there] == LAYER[here] and (here, there) not in ALLOWED_SIDEWAYS):
            wrong.append(f"{i.module}: {i.text}")
    assert not wrong, "imports against docs/architecture.md:\n" + "\n".join(wrong)


def import_circles() -> list[list[str]]:
    """The circles of the module import graph: its strongly connected components of more than
    one module (or one importing itself), each sorted (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {m: set() for m in package_modules()}
    for i in package_imports():
        if i.target is not None and i.runs:
            graph.setdefault(i.module, set()).add(i.target)
            graph.setdefault(i.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(circles)


def test_no_import_circle():
    circles = import_circles()
    lines = []
    for circle in circles:
        members = set(circle)
        lines.append(" <-> ".join(circle) + ":")
        lines += [f"  {i.module}: {i.text}" for i in package_imports()
                  if i.module in members and i.target in members and i.runs]
    assert not circles, "modules that import each other:\n" + "\n".join(lines)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_name_imported_across_modules():
    wrong = [f"{i.module}: {i.text}" for i in package_imports()
             if i.target is not None and i.target != i.module and any(map(_is_private, i.names))]
    assert not wrong, "private names taken from another module:\n" + "\n".join(wrong)


def test_no_private_name_used_through_another_module():
    """`from . import kernels` then `kernels._helper(...)` takes a private name just the same."""
    modules = package_modules()
    wrong = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        is_package = path.name == "__init__.py"
        here = [] if module == "__init__" else module.split(".")
        aliases = {}  # local name -> the package's module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here if is_package else here[:-1]
                    base = ".".join(base[: len(base) - (node.level - 1)] + ([node.module] if node.module else []))
                elif node.module.split(".")[0] == "npconvnext":
                    base = node.module.partition(".")[2]
                else:
                    continue
                for alias in node.names:
                    submodule = f"{base}.{alias.name}".strip(".")
                    if submodule in modules:
                        aliases[alias.asname or alias.name] = submodule
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname and alias.name.split(".")[0] == "npconvnext":
                        aliases[alias.asname] = _normal(alias.name.partition(".")[2])
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and aliases[node.value.id] != module and _is_private(node.attr)):
                wrong.append(f"{module}: {ast.unparse(node)} ({aliases[node.value.id]})")
    assert not wrong, "private names used through another module:\n" + "\n".join(sorted(set(wrong)))


def test_the_reference_network_never_imports_the_engine():
    assert not [i for i in package_imports()
                if unit(i.module) in ("network", "layers", "weights") and i.target and unit(i.target) == "engine"]


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_no_framework_at_import_level_in_the_core(framework):
    # oracle.timm_trace imports timm and torch inside the function that needs them, for parity
    offenders = [f"{i.module}: {i.text}" for i in package_imports()
                 if i.target is None and i.text.split(".")[0] == framework and i.module != "oracle"]
    assert not offenders, offenders


# ---- the checker itself can fail ----------------------------------------------------------------

def _fake_package(tmp_path, monkeypatch, files: dict[str, str]) -> None:
    fake = tmp_path / "npconvnext"
    for name, text in files.items():
        (fake / name).parent.mkdir(parents=True, exist_ok=True)
        (fake / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)


def test_this_test_sees_a_wrong_import(tmp_path, monkeypatch):
    _fake_package(tmp_path, monkeypatch, {"params.py": "from .model import ConvNeXt\n",
                                          "model.py": "from .params import expected_shapes\n"})
    with pytest.raises(AssertionError, match="params: from .model import ConvNeXt"):
        test_imports_run_one_way()


def test_this_test_sees_a_circle_inside_a_package(tmp_path, monkeypatch):
    # the circle distributed/ had: one side at module level, the other inside a function
    _fake_package(tmp_path, monkeypatch, {
        "distributed/__init__.py": "from .jobs import run\n",
        "distributed/cluster.py": "from . import jobs\n",
        "distributed/jobs.py": "def run():\n    from .cluster import prepare_workers\n",
        "distributed/worker.py": "import typing\nif typing.TYPE_CHECKING:\n    from .jobs import run\n",
        "batch.py": "from npconvnext.distributed import worker\n"})
    assert import_circles() == [["distributed.cluster", "distributed.jobs"]]
    with pytest.raises(AssertionError, match="distributed.cluster: from . import jobs"):
        test_no_import_circle()


def test_this_test_sees_a_private_name(tmp_path, monkeypatch):
    _fake_package(tmp_path, monkeypatch, {
        "engine/__init__.py": "",
        "engine/gemm.py": "def _tile(): pass\n",
        "engine/kernels.py": "from .gemm import TILES, _tile\nfrom . import gemm\n\ndef f():\n    return gemm._tile()\n"})
    with pytest.raises(AssertionError, match=r"engine.kernels: from .gemm import TILES, _tile"):
        test_no_private_name_imported_across_modules()
    with pytest.raises(AssertionError, match=r"engine.kernels: gemm._tile \(engine.gemm\)"):
        test_no_private_name_used_through_another_module()
