"""The package's shape: no import circle, the layering the folders promise, and the stated public surface.

The import graph is read from the source (every ``import`` statement, those inside functions included), so a
lazy import cannot hide a circle: module A imports B when A names B, or names something B defines (``from B
import x``; ``from package import submodule`` is an edge to the submodule).
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import warnings
from pathlib import Path

import pytest

import nbmerge

ROOT = Path(nbmerge.__file__).resolve().parent.parent
PACKAGES = ("nbmerge", "nbmerge_plugins")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def imported_modules(name: str) -> set[str]:
    """The project modules that module ``name`` imports anywhere in its source."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source)
    return {module for module in found if module in MODULES and module != name}


GRAPH = {name: imported_modules(name) for name in MODULES}


def test_the_graph_is_read_from_every_module():
    assert {"nbmerge.api", "nbmerge.engine.stream", "nbmerge.io.sources", "nbmerge_plugins.arithmetic.ties"} <= set(GRAPH)
    assert "nbmerge.engine.run" in GRAPH["nbmerge.api"]
    assert "nbmerge.module_merge" in GRAPH["nbmerge.api"]  # an import inside a function counts


def test_no_import_circle():
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for other in sorted(GRAPH[module]):
            if state.get(other) == "open":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(other):] + [other]))
            if other not in state:
                visit(other)
        path.pop()
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def imports_of(prefix: str) -> dict[str, set[str]]:
    return {name: targets for name, targets in GRAPH.items() if name == prefix or name.startswith(prefix + ".")}


def within(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("layer, forbidden", [
    ("nbmerge.io", ("nbmerge.engine", "nbmerge.workbench", "nbmerge.notebook", "nbmerge.api", "nbmerge.plugins")),
    ("nbmerge.engine", ("nbmerge.workbench", "nbmerge.notebook", "nbmerge.api", "nbmerge.module_merge")),
    ("nbmerge.workbench", ("nbmerge.notebook",)),
    ("nbmerge.api", ("nbmerge.workbench", "nbmerge.notebook")),
    ("nbmerge.module_merge", ("nbmerge.api", "nbmerge.workbench", "nbmerge.notebook")),
    ("nbmerge.results", ("nbmerge.api", "nbmerge.engine", "nbmerge.io", "nbmerge.workbench", "nbmerge.notebook")),
    ("nbmerge_plugins", ("nbmerge.api", "nbmerge.engine", "nbmerge.io", "nbmerge.notebook")),
])
def test_layers_import_only_downwards(layer, forbidden):
    upward = {f"{name} -> {target}" for name, targets in imports_of(layer).items() for target in targets
              if within(target, *forbidden)}
    assert not upward


def test_nothing_imports_the_notebook_layer_but_the_package_face():
    outside = {f"{name} -> {target}" for name, targets in GRAPH.items() for target in targets
               if within(target, "nbmerge.notebook") and not within(name, "nbmerge.notebook")
               and not (name == "nbmerge" and target == "nbmerge.notebook")}
    assert not outside


def test_the_contract_imports_only_the_contract():
    contract = ("nbmerge.hookspecs", "nbmerge.errors", "nbmerge.taskpool", "nbmerge.method", "nbmerge.version")
    for name, targets in GRAPH.items():
        if within(name, *contract):
            assert all(within(target, *contract) for target in targets), (name, targets)


def test_no_module_imports_the_package_face():
    """The face (``nbmerge/__init__.py``) loads modules lazily; a module importing it would make a circle that
    only the laziness hides (``__version__`` has its own module for that reason)."""
    assert not {name for name, targets in GRAPH.items() if "nbmerge" in targets and within(name, "nbmerge")
                and name != "nbmerge"}


def test_only_task_pool_plugins_import_the_workbench():
    """A method receives tensors (or modules) and returns one; building a task pool's models is the workbench's."""
    assert {name for name, targets in imports_of("nbmerge_plugins").items()
            if any(within(t, "nbmerge.workbench") for t in targets)} == {"nbmerge_plugins.task_pools"}


def method_of(module: str) -> str | None:
    """The method module (``nbmerge_plugins.<family>.<method>``) that ``module`` belongs to; None for a shared
    step (any ``_``-prefixed part, ``native``) or a family package."""
    parts = module.split(".")
    if any(part.startswith("_") for part in parts[1:]) or parts[1:2] == ["native"] or len(parts) < 3:
        return None
    return ".".join(parts[:3])


def test_no_method_imports_another_method():
    """Methods compose the shared steps (``_task_vectors``, ``_selection``, a family's ``_``-modules, ``native``);
    none imports a sibling method, in its family or another."""
    for name, targets in imports_of("nbmerge_plugins").items():
        own = method_of(name)
        siblings = {t for t in targets if t.startswith("nbmerge_plugins.") and method_of(t) not in (None, own)}
        assert not siblings, (name, siblings)


def test_methods_are_grouped_by_family_and_no_plugin_folder_grows_past_thirty_files():
    methods = [entry.value for entry in importlib.metadata.entry_points(group="nbmerge") if entry.name != "task_pools"]
    assert methods and all(method_of(module) == module for module in methods), methods
    root = ROOT / "nbmerge_plugins"
    for folder in [root, *(path for path in root.rglob("*") if path.is_dir() and path.name != "__pycache__")]:
        assert len([path for path in folder.iterdir() if path.name != "__pycache__"]) <= 30, folder


@pytest.mark.parametrize("module", ["nbmerge", "nbmerge.method", "nbmerge.io", "nbmerge.engine", "nbmerge.workbench"])
def test_every_public_name_resolves(module):
    imported = importlib.import_module(module)
    for name in imported.__all__:
        assert getattr(imported, name) is not None, f"{module}.{name}"


@pytest.mark.parametrize("old, new", sorted(nbmerge.MOVED_MODULES.items()))
def test_the_old_module_paths_still_import_the_moved_modules(old, new):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        moved = importlib.import_module(f"nbmerge.{old}")
    assert moved is importlib.import_module(f"nbmerge.{new}")
    assert moved.__spec__.name == f"nbmerge.{new}"
    assert getattr(nbmerge, old) is moved


def test_every_module_says_what_it_is():
    assert not [name for name, path in MODULES.items() if ast.get_docstring(ast.parse(path.read_text())) is None]
