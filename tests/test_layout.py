"""The package's layout rules (docs/architecture.md): no import cycles, lazy imports included; no private name
imported across modules; subpackages that import nothing themselves.

The import graph is read from the source with :mod:`ast`, so a cycle closed by an import inside a function (which
Python tolerates until the day the order changes) or by a type hint's import fails here as well.
``get_backend``'s ``import_module`` counts as an import of every backend.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dpo_xpu"
BACKENDS = ("dpo_xpu.models.backends.native", "dpo_xpu.models.backends.ipex_llm")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, tree: ast.Module, known: set[str]) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in the module, at any depth: inside functions and
    under ``if TYPE_CHECKING:`` too (a type hint's import still ties the two modules together)."""
    out: list[tuple[str, list[str]]] = []
    package = name if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists() else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("dpo_xpu")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("dpo_xpu"):
                continue
            for alias in node.names:  # `from dpo_xpu.x import y` imports the submodule y where there is one
                sub = f"{base}.{alias.name}"
                out.append((sub, []) if sub in known else (base, [alias.name]))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "import_module":
            out += [(b, []) for b in BACKENDS] if name == "dpo_xpu.models.backends" else []
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, tree in modules.items():
        for target, _ in _imports(name, tree, known):
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target != name and name != "dpo_xpu":  # the top-level lazy API imports everything by design
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle() -> None:
    graph = _graph()
    assert "dpo_xpu.models.backends.native" in graph["dpo_xpu.models.backends"]  # the dynamic import is seen
    assert _cycles(graph) == []


def test_the_checker_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_checker_sees_lazy_and_type_checking_imports() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dpo_xpu.recipes import Recipe\n"
        "def f():\n    from dpo_xpu.pipeline import run_training\n"
    )
    assert sorted(_imports("dpo_xpu.x", tree, {"dpo_xpu.recipes", "dpo_xpu.pipeline"})) == [
        ("dpo_xpu.pipeline", ["run_training"]),
        ("dpo_xpu.recipes", ["Recipe"]),
    ]


def test_no_private_name_is_imported_across_modules() -> None:
    modules = _modules()
    offenders = [
        f"{name} imports {target}.{n}"
        for name, tree in modules.items()
        for target, names in _imports(name, tree, set(modules))
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert offenders == []


@pytest.mark.parametrize("package", ["data", "models", "train", "callbacks", "outputs", "eval"])
def test_subpackages_import_nothing_themselves(package: str) -> None:
    """``import dpo_xpu.train.losses`` must not load the whole trainer: the subpackages' ``__init__`` files hold a
    docstring only (the public names are re-exported lazily by ``dpo_xpu``)."""
    tree = ast.parse((PACKAGE / package / "__init__.py").read_text(encoding="utf-8"))
    assert [type(node).__name__ for node in tree.body] == ["Expr"]
