"""Run the four tutorial notebooks in order with papermill; executed copies go to <output_dir>/notebooks/.

    .venv/bin/python scripts/run_notebooks.py --preset demo         # SmolLM2-135M-Instruct on CPU (`make demo`)
    .venv/bin/python scripts/run_notebooks.py --preset tiny         # the tiny random model built offline (tests)
    .venv/bin/python scripts/run_notebooks.py --preset shared       # stories260K + the 284 orca rows in ../shared
    .venv/bin/python scripts/run_notebooks.py --param max_steps=50 --param output_dir=../runs/mine
    .venv/bin/python scripts/run_notebooks.py --preset demo --only 03 04 --overwrite

Each notebook gets only the parameters its `parameters` cell declares; values are read as YAML scalars
(`5e-4`, `true`, `null`). Relative paths are relative to notebooks/, where the notebooks run. `--preset demo`
passes the notebooks' own `preset = "demo"`: each takes recipes/cpu_demo.yaml's values for the parameters not
given with --param (and links the demo's model when missing); `--preset tiny` likewise with recipes/cpu_tiny.yaml.
Before anything runs or moves, notebook 03's parameters are checked as its recipe (dpo_xpu.make_recipe): a bad one
stops here, in one line, with the earlier run in place. Then an earlier run in output_dir is moved to the first free
<output_dir>.previous, .previous-2, ... (every earlier run is kept), unless --overwrite is given (then notebook 03
moves its files aside). A folder that is not a dpo_xpu run is never moved: choose another output_dir.
The kernel is `python3`, which jupyter_client starts with this interpreter (sys.executable), over an encrypted
(CurveZMQ) connection where pyzmq and the kernel support it.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
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
SHARED = Path(os.environ.get("DPO_XPU_SHARED", ROOT.parent / "shared")).resolve()

CPU_TRAINING = {
    "bf16": False,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "warmup_steps": 3,
    "gradient_checkpointing": False,
    "learning_rate": 5e-4,
    "eval_fraction": 0.1,
    "num_samples": 3,
    "max_new_tokens": 48,
}
RECIPES_DIR = ROOT / "recipes"

PRESETS: dict[str, dict[str, Any]] = {
    # the embedded default: the notebooks' own preset, the tiny ChatML model built offline + the shipped sample
    # with recipes/cpu_demo.yaml's values, so `make demo` and `dpo-xpu train --recipe recipes/cpu_demo.yaml` train
    # the same way
    "demo": {"preset": "demo"},
    "tiny": {"preset": "tiny"},  # the same with recipes/cpu_tiny.yaml: the tiny random model, seconds per step
    "shared": {  # real inputs from ../shared: stories260K (no ChatML tokens) and 64 of the 284 orca rows
        **CPU_TRAINING,
        "model_name_or_path": str(SHARED / "models" / "stories260K"),
        "dataset_name_or_path": str(SHARED / "data" / "orca_dpo_pairs" / "sample-284.jsonl"),
        "output_dir": str(ROOT / "runs" / "shared"),
        "limit": 64,
        "eval_fraction": 0.125,
        # any recipe key reaches notebook 03 this way: here, evaluation of the held-out pairs during training,
        # with each pair run as one sequence (prefix sharing) in training and evaluation
        "recipe_overrides": {"eval_steps": 6, "eval_samples": False, "prefix_sharing": True},
        "max_length": 1024,
        "max_prompt_length": 512,
        "max_steps": 12,
    },
}


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
    """The recipe notebook 03 builds from its declared parameters and ``values`` (its preset applied, then
    ``make_recipe`` of its recipe keys and ``recipe_overrides``), so a bad parameter fails before anything runs.

    Raises:
        DpoXpuError: a bad parameter (``RecipeError``: an unknown preset, a value of the wrong type or out of range).
    """
    from dpo_xpu.presets import PRESET_RECIPES, apply_preset, preset_recipe
    from dpo_xpu.recipes import make_recipe, recipe_keys

    namespace = {**declared, **{key: value for key, value in values.items() if key in declared}}
    keys = [key for key in declared if key in recipe_keys()]
    preset = namespace.get("preset")
    recipe_path = preset_recipe(preset, RECIPES_DIR) if preset in PRESET_RECIPES else None
    with contextlib.redirect_stdout(io.StringIO()):  # notebook 03 prints its own "preset demo: ..." line
        apply_preset(preset, {key: declared[key] for key in keys}, namespace, recipe_path=recipe_path)
    return make_recipe({**{key: namespace[key] for key in keys}, **(namespace.get("recipe_overrides") or {})})


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
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a set of parameter values (default: none)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="override (repeatable)")
    parser.add_argument("--only", nargs="+", metavar="NN", help="run only these notebooks (01 02 03 04)")
    parser.add_argument("--overwrite", action="store_true", help="let notebook 03 replace a run in output_dir")
    args = parser.parse_args(argv)

    declared = {name: notebook_parameters(NOTEBOOKS_DIR / name) for name in NOTEBOOKS}
    values = {**PRESETS.get(args.preset, {}), **parse_params(args.param)}
    unknown = sorted(set(values) - set().union(*declared.values()))
    if unknown:
        raise SystemExit(f"run_notebooks: no notebook has the parameter(s) {', '.join(unknown)}")
    if args.overwrite:
        values["overwrite"] = True
    selected = [n for n in NOTEBOOKS if not args.only or n[:2] in {o.zfill(2) for o in args.only}]

    if "output_dir" in values:
        output_dir = (NOTEBOOKS_DIR / values["output_dir"]).resolve()
    elif values.get("preset") in ("demo", "tiny"):  # where the notebooks' preset puts the run
        from dpo_xpu.presets import preset_recipe
        from dpo_xpu.recipes import load_recipe

        output_dir = (ROOT / load_recipe(preset_recipe(values["preset"], RECIPES_DIR)).output_dir).resolve()
    else:
        output_dir = (NOTEBOOKS_DIR / declared[NOTEBOOKS[2]]["output_dir"]).resolve()
    if NOTEBOOKS[2] in selected:
        from dpo_xpu.errors import DpoXpuError

        try:
            notebook_recipe(declared[NOTEBOOKS[2]], values)
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
