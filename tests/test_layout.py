"""The package's layout rules (docs/architecture.md): the layers of the data flow, held by import-linter's contracts
in pyproject.toml (imports inside functions and under ``TYPE_CHECKING`` count); no private name imported across
modules; subpackages that import nothing themselves; no module over 400 lines.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dpo_xpu"


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
    return out


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """import-linter's contracts of pyproject.toml, on the package found under ``root``."""
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
            "--config",
            str(PACKAGE.parent / "pyproject.toml"),
            "--no-cache",
        ],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_layers_hold() -> None:
    """Every import runs from a later step of the data flow to an earlier one (lazy imports included), and no two
    modules of a step import each other in a cycle (docs/architecture.md)."""
    result = _lint_imports(PACKAGE.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "2 kept, 0 broken" in result.stdout


def test_a_backward_import_breaks_the_layers(tmp_path: Path) -> None:
    """A lazy import of the pipeline planted in the data step (a copy of the package) fails the contract."""
    shutil.copytree(PACKAGE, tmp_path / "dpo_xpu", ignore=shutil.ignore_patterns("__pycache__"))
    planted = tmp_path / "dpo_xpu" / "data" / "truncation.py"
    planted.write_text(planted.read_text() + "\n\ndef _planted():\n    from dpo_xpu.pipeline import run_training\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "dpo_xpu.data.truncation -> dpo_xpu.pipeline" in result.stdout


#: The most functions the recipe may reach from ``run_training`` (docs/architecture.md; #23 asks for 30).
RECIPE_STOPS = 30


def _layer(name: str, layers: list[str]) -> int:
    """The index of the layer of ``name`` (a module or a qualified function) in pyproject.toml's layers contract (0
    is the top)."""
    return next(i for i, layer in enumerate(layers) for m in layer.split(" | ") if f"{name}.".startswith(f"{m}."))


def test_the_recipe_reaches_few_places_and_never_climbs_back() -> None:
    """``scripts/recipe_stops.py`` follows ``recipe`` from ``run_training``: at most :data:`RECIPE_STOPS` functions,
    and each hand-over goes to the caller's layer or one below it (never back up the data flow, trampolines such as
    ``on_rank_zero(fn, recipe)`` included)."""
    import tomllib

    spec = importlib.util.spec_from_file_location("recipe_stops", PACKAGE.parent / "scripts" / "recipe_stops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    edges = module.recipe_stops()
    stops = {stop for _, stop in edges}
    assert "dpo_xpu.train.trl_config.dpo_config_kwargs" in stops  # the walk reaches TRL's config
    assert len(edges) + 1 <= RECIPE_STOPS, "\n".join(f"{a} -> {b}" for a, b in edges)
    pyproject = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8"))
    layers = next(c["layers"] for c in pyproject["tool"]["importlinter"]["contracts"] if c["type"] == "layers")
    assert _layer("dpo_xpu.train.factory.build_trainer", layers) > _layer("dpo_xpu.pipeline._build", layers)
    assert [(a, b) for a, b in edges if _layer(b, layers) < _layer(a, layers)] == []


#: The most lines a module may have (#23): a reader takes in one module at a time.
MODULE_LINES = 400


def test_no_module_is_over_400_lines() -> None:
    sizes = {
        p.relative_to(PACKAGE.parent): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")
    }
    assert {path: n for path, n in sizes.items() if n > MODULE_LINES} == {}


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
