"""Follow ``recipe`` from an entry point through the package: every function it is handed to, transitively.

A *stop* is a function (or a method that reads ``self.recipe``) that receives the run's recipe: called with a
variable named ``recipe``, constructed with it, or handed it together with the function that will get it
(``on_rank_zero(fn, recipe)``). The walk is static (:mod:`ast`): it resolves names through each module's
``dpo_xpu`` imports and follows nothing else, so it counts the places a reader must visit to know what a recipe
value does. ``tests/test_layout.py`` holds the count under the limit docs/architecture.md states.

    python scripts/recipe_stops.py            # the stops from dpo_xpu.pipeline.run_training, one edge a line
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dpo_xpu"
ENTRY = "dpo_xpu.pipeline.run_training"


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _index(package: Path) -> tuple[dict[str, tuple[ast.AST, str]], dict[str, dict[str, str]], set[str]]:
    """Every top-level function, class and method by qualified name; each module's imported dpo_xpu names."""
    functions: dict[str, tuple[ast.AST, str]] = {}
    imports: dict[str, dict[str, str]] = {}
    classes: set[str] = set()
    for path in sorted(package.rglob("*.py")):
        module = _module_name(path, package)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dpo_xpu"):
                names.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
            elif isinstance(node, ast.Import):
                names.update({a.asname or a.name: a.name for a in node.names if a.name.startswith("dpo_xpu")})
        imports[module] = names
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions[f"{module}.{node.name}"] = (node, module)
            elif isinstance(node, ast.ClassDef):
                classes.add(f"{module}.{node.name}")
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        functions[f"{module}.{node.name}.{item.name}"] = (item, module)
    return functions, imports, classes


def recipe_stops(entry: str = ENTRY, package: Path = PACKAGE) -> list[tuple[str, str]]:
    """The edges ``(caller, stop)`` of the walk from ``entry``, in the order found (breadth first)."""
    functions, imports, classes = _index(package)

    def resolve(target: ast.expr, module: str) -> str | None:
        if isinstance(target, ast.Name):
            name = imports[module].get(target.id, f"{module}.{target.id}")
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
            base = imports[module].get(target.value.id)
            name = f"{base}.{target.attr}" if base else ""
        else:
            return None
        return f"{name}.__init__" if name in classes else name if name in functions else None

    seen, queue, edges = {entry}, [entry], []

    def reach(caller: str, stop: str) -> None:
        if stop not in seen:
            seen.add(stop)
            queue.append(stop)
            edges.append((caller, stop))

    while queue:
        caller = queue.pop(0)
        if caller not in functions:
            continue
        node, module = functions[caller]
        for call in ast.walk(node):
            if not isinstance(call, ast.Call):
                continue
            if isinstance(call.func, ast.Name) and call.func.id in ("isinstance", "issubclass"):
                continue  # a type check hands the recipe to no function (its class is not called)
            values = list(call.args) + [k.value for k in call.keywords]
            if not any(isinstance(v, ast.Name) and v.id == "recipe" for v in values):
                continue
            for target in [call.func, *values]:
                stop = resolve(target, module)
                if stop is None:
                    continue
                if stop.endswith(".__init__"):  # the methods that read the recipe it stored
                    owner = stop.removesuffix(".__init__") + "."
                    for name, (method, _) in functions.items():
                        if name.startswith(owner) and "self.recipe" in ast.unparse(method):
                            reach(caller, name)
                    if stop not in functions:
                        continue
                reach(caller, stop)
    return edges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entry", default=ENTRY, help=f"the function to start from (default {ENTRY})")
    args = parser.parse_args()
    edges = recipe_stops(args.entry)
    for caller, stop in edges:
        print(f"{caller} -> {stop}")
    modules = {stop.rsplit(".", 1)[0] for _, stop in edges}
    print(f"{len(edges) + 1} stops (the entry included) in {len(modules | {args.entry.rsplit('.', 1)[0]})} modules")


if __name__ == "__main__":
    main()
