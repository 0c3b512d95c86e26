"""Run the four tutorial notebooks in order with papermill; executed copies go to <output_dir>/notebooks/.

    .venv/bin/python scripts/run_notebooks.py --recipe recipes/cpu_demo.yaml  # SmolLM2-135M-Instruct on CPU (make demo)
    .venv/bin/python scripts/run_notebooks.py --recipe recipes/cpu_tiny.yaml  # a tiny random model built offline
    .venv/bin/python scripts/run_notebooks.py --param max_steps=50 --param output_dir=../runs/mine
    .venv/bin/python scripts/run_notebooks.py --recipe recipes/cpu_demo.yaml --only 03 04 --overwrite

`--recipe` sets the notebooks' `recipe_file` (theirs: recipes/arc_16gb_qwen2.5_1.5b.yaml); each notebook gets only
the parameters its `parameters` cell declares; values are read as YAML scalars (`5e-4`, `true`, `null`). Relative
paths in --param are relative to notebooks/, where the notebooks run. Before anything runs or moves,
notebook 03's recipe is made as it will make it (dpo_xpu.notebook_recipe, which also readies a demo's model): a bad
parameter stops here, in one line, with the earlier run in place. Then an earlier run in output_dir is moved to the
first free <output_dir>.previous, .previous-2, ... (every earlier run is kept), unless --overwrite is given (then
notebook 03 moves its files aside). A folder that is not a dpo_xpu run is never moved: choose another output_dir.
The kernel is `python3`, which jupyter_client starts with this interpreter (sys.executable), over an encrypted
(CurveZMQ) connection where pyzmq and the kernel support it.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = ROOT / "notebooks"
NOTEBOOKS = (
    "01_environment_check.ipynb",
    "02_preference_data.ipynb",
    "03_dpo_training.ipynb",
    "04_evaluation_and_export.ipynb",
)
#: Notebook 03's parameters that are not recipe keys.
NOT_RECIPE_KEYS = ("recipe_file", "recipe_overrides", "overwrite", "resume")


def notebook_parameters(path: Path) -> dict[str, Any]:
    """The names and literal values assigned in the notebook's cell tagged ``parameters``.

    Raises:
        ValueError: not exactly one such cell, or it holds something other than ``name = literal`` lines.
    """
    import nbformat

    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path.name}: expected exactly one cell tagged 'parameters', found {len(cells)}")
    values = {}
    for node in ast.parse(cells[0].source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ValueError(
                f"{path.name}: the parameters cell may hold only `name = literal` lines: {ast.unparse(node)}"
            )
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def kernel_config() -> Any:
    """Config for the kernel papermill starts: CurveZMQ transport encryption (``transport_encryption="auto"``,
    provisioned when the kernelspec declares support, as ipykernel's does), which also removes ipykernel's
    "Kernel is running over TCP without encryption" warning at its cause. Empty where pyzmq lacks CurveZMQ or
    jupyter_client predates the option: the kernel then runs as before."""
    import zmq
    from jupyter_client import KernelManager
    from traitlets.config import Config

    if zmq.has("curve") and "transport_encryption" in KernelManager.class_trait_names():
        return Config({"KernelManager": {"transport_encryption": "auto"}})
    return Config()


def parse_params(items: list[str]) -> dict[str, Any]:
    import yaml

    values = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"run_notebooks: --param expects key=value, found {item!r}")
        values[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return values


def notebook_recipe(declared: dict[str, Any], values: dict[str, Any]) -> Any:
    """The recipe notebook 03 makes from its declared parameters and ``values`` (:func:`dpo_xpu.notebook_recipe`,
    seen from notebooks/), so that a bad parameter fails before anything runs.

    Raises:
        DpoXpuError: a bad parameter (``RecipeError``: a missing recipe file, a value of the wrong type or out of
            range; ``ModelLoadError``: the demo's model package is not installed).
    """
    from dpo_xpu.demo import notebook_recipe as make

    given = {**declared, **{key: value for key, value in values.items() if key in declared}}
    keys = {key: given[key] for key in declared if key not in NOT_RECIPE_KEYS}
    if keys.get("output_dir") is not None:  # relative to notebooks/, where the notebook runs
        keys["output_dir"] = str(NOTEBOOKS_DIR / str(keys["output_dir"]))
    return make(NOTEBOOKS_DIR / given["recipe_file"], given.get("recipe_overrides"), **keys)


def check_run_folder(output_dir: Path) -> None:
    """Stop when ``output_dir`` is not a dpo_xpu run folder (:func:`dpo_xpu.outputs.run_folder.refuse_foreign`).

    Raises:
        SystemExit: it holds files dpo_xpu did not write (one line naming them); nothing is moved or written.
    """
    from dpo_xpu.errors import RunFolderError
    from dpo_xpu.outputs.run_folder import refuse_foreign

    try:
        refuse_foreign(output_dir)
    except RunFolderError as exc:
        raise SystemExit(f"run_notebooks: error: {exc}") from None


def move_earlier_run(output_dir: Path) -> Path:
    """Rename ``output_dir`` (an earlier dpo_xpu run) to the first free ``<output_dir>.previous``, ``.previous-2``,
    ...; return that name. Earlier ones are never replaced.

    Raises:
        SystemExit: ``output_dir`` holds files dpo_xpu did not write (:func:`check_run_folder`: it is not moved).
    """
    from dpo_xpu.outputs.run_folder import aside_name

    check_run_folder(output_dir)
    previous = aside_name(output_dir)
    output_dir.rename(previous)
    return previous


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, help="the notebooks' recipe_file (default: theirs)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="override (repeatable)")
    parser.add_argument("--only", nargs="+", metavar="NN", help="run only these notebooks (01 02 03 04)")
    parser.add_argument("--overwrite", action="store_true", help="let notebook 03 replace a run in output_dir")
    args = parser.parse_args(argv)

    declared = {name: notebook_parameters(NOTEBOOKS_DIR / name) for name in NOTEBOOKS}
    values = parse_params(args.param)
    if args.recipe:  # given from here, passed as seen from notebooks/
        values["recipe_file"] = os.path.relpath(args.recipe.resolve(), NOTEBOOKS_DIR)
    unknown = sorted(set(values) - set().union(*declared.values()))
    if unknown:
        raise SystemExit(f"run_notebooks: no notebook has the parameter(s) {', '.join(unknown)}")
    if args.overwrite:
        values["overwrite"] = True
    selected = [n for n in NOTEBOOKS if not args.only or n[:2] in {o.zfill(2) for o in args.only}]

    from dpo_xpu.errors import DpoXpuError

    try:
        output_dir = Path(notebook_recipe(declared[NOTEBOOKS[2]], values).output_dir).resolve()
    except DpoXpuError as exc:
        raise SystemExit(
            f"run_notebooks: error: notebook {NOTEBOOKS[2]}'s parameters: {exc} (nothing was run or moved)"
        ) from None

    import papermill
    from jupyter_client.kernelspec import KernelSpecManager

    argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
    if argv0 not in ("python", "python3", sys.executable):
        raise SystemExit(
            f"run_notebooks: the 'python3' kernel starts {argv0}, not this interpreter ({sys.executable}). "
            f"Fix: {sys.executable} -m ipykernel install --sys-prefix"
        )
    if NOTEBOOKS[2] in selected and output_dir.exists() and any(output_dir.iterdir()):
        if args.overwrite:  # notebook 03 moves the run's files aside; a folder of the user's is refused now
            check_run_folder(output_dir)
        else:
            previous = move_earlier_run(output_dir)
            print(f"the earlier run in {output_dir} was moved to {previous} (earlier ones are kept)")
    executed_dir = output_dir / "notebooks"
    executed_dir.mkdir(parents=True, exist_ok=True)

    config = kernel_config()
    start = time.perf_counter()
    for name in selected:
        params = {k: v for k, v in values.items() if k in declared[name]}
        began = time.perf_counter()
        print(f"{name} {params}", flush=True)
        papermill.execute_notebook(
            str(NOTEBOOKS_DIR / name),
            str(executed_dir / name),
            parameters=params,
            kernel_name="python3",
            cwd=str(NOTEBOOKS_DIR),
            progress_bar=False,
            config=config,
        )
        print(f"  done in {time.perf_counter() - began:.1f} s -> {executed_dir / name}", flush=True)
    print(f"all {len(selected)} notebook(s) in {time.perf_counter() - start:.1f} s; run folder: {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
