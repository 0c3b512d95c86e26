"""The four notebooks: committed clean, one literal `parameters` cell each, and run in order with papermill.

The run (marker `notebook`, a few minutes on 2 CPU cores) uses the real inputs in ../shared: stories260K and 64
of the 284 orca rows, 12 steps, then asserts on what the notebooks recorded in the run folder. The live-plot
callback itself is unit-tested outside Jupyter in test_plotting_callbacks.py. The `preset` cell of each notebook is
run here without a kernel with `preset = "tiny"` (the tests' own: the tiny random model, recipes/cpu_tiny.yaml;
`preset = "demo"` trains SmolLM2 for `make demo`); test_demo.py runs notebook 03 with it under papermill. Each notebook
is paired (jupytext.toml) with a py:percent text file holding the same cells, checked here without running
anything: scripts/sync_notebooks.py syncs the pairs and its --check mode finds a pair out of sync.
"""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
from helpers import run_notebooks

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
CLEAR = "python scripts/sync_notebooks.py"  # syncs the pairs and clears the outputs
SYNC = ROOT / "scripts" / "sync_notebooks.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

#: Parameters each notebook must declare (its step's inputs), beyond its own extras.
REQUIRED = {
    "01": {"device", "backend"},
    "02": {"model_name_or_path", "dataset_name_or_path", "limit", "seed", "max_length", "max_prompt_length"},
    "03": {"model_name_or_path", "dataset_name_or_path", "output_dir", "max_steps", "device", "backend", "limit"}
    | {"eval_fraction", "seed", "max_length", "max_prompt_length", "learning_rate", "beta", "bf16"},
    # 04 reads the run's recipe.yaml: only where the run is and how to evaluate it
    "04": {"output_dir", "device", "split", "max_eval_pairs", "batch_size", "num_samples", "max_new_tokens"}
    | {"merge_rtol"},
}
RUN = {"limit": 64, "eval_fraction": 0.125, "max_steps": 12, "num_samples": 2, "max_new_tokens": 24}
DEMO_RECIPE = ROOT / "recipes" / "cpu_tiny.yaml"
#: What preset = "tiny" sets beyond recipes/cpu_tiny.yaml (dpo_xpu.presets.PRESET_EXTRAS["tiny"], written out here).
DEMO_EXTRAS = {"eval_fraction": 0.1, "num_samples": 3, "max_new_tokens": 48}
DEMO_PATHS = ("model_name_or_path", "dataset_name_or_path", "output_dir")


def _parameters(path: Path) -> dict:
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{path.name}: {len(cells)} cells tagged 'parameters', expected exactly one"
    values = {}
    for node in ast.parse(cells[0].source).body:
        assert isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name), (
            f"{path.name}: the parameters cell may hold only `name = literal` lines, found {ast.unparse(node)!r}"
        )
        values[node.targets[0].id] = ast.literal_eval(node.value)  # raises on anything but a literal
    return values


def _preset_cell(path: Path) -> str:
    """The code cell right after the parameters cell."""
    nb = nbformat.read(path, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    return nb.cells[index + 1].source


def _run_preset_cell(path: Path, monkeypatch, **given) -> tuple[dict, list]:
    """Run the preset cell as Jupyter would (cwd notebooks/), after the parameters and what papermill injects;
    build_demo_model is recorded, not run. Returns the notebook's variables and the folders it would build."""
    import dpo_xpu

    built: list = []
    monkeypatch.setattr(dpo_xpu, "build_demo_model", lambda dest, **kwargs: built.append(str(dest)) or Path(dest))
    monkeypatch.chdir(ROOT / "notebooks")
    namespace = {**_parameters(path), **given}
    exec(compile(_preset_cell(path), f"{path.name}:preset", "exec"), namespace)
    return namespace, built


def test_the_four_notebooks_exist():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name} has outputs in cells {dirty}. Fix: {CLEAR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_one_literal_parameters_cell_with_the_step_inputs(path):
    values = _parameters(path)
    missing = REQUIRED[path.name[:2]] - set(values)
    assert not missing, f"{path.name}: the parameters cell lacks {sorted(missing)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_has_a_preset_parameter_and_cell(path):
    values = _parameters(path)
    assert "preset" in values, f"{path.name}: the parameters cell lacks `preset`"
    assert values["preset"] is None, "the default must stay the real user's GPU run"
    cell = _preset_cell(path)
    assert "changed = apply_preset(preset, defaults, globals())" in cell  # the package does the work
    # the defaults the cell compares with are the parameters cell's own, so only untouched values are replaced
    node = next(n for n in ast.parse(cell).body if isinstance(n, ast.Assign) and n.targets[0].id == "defaults")
    defaults = {keyword.arg: ast.literal_eval(keyword.value) for keyword in node.value.keywords}
    assert {"model_name_or_path", "output_dir"} & set(defaults)
    assert {name: values[name] for name in defaults} == defaults


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_preset_tiny_takes_the_tiny_recipes_values(path, monkeypatch):
    from dpo_xpu import load_recipe

    demo = {**load_recipe(DEMO_RECIPE).to_dict(), **DEMO_EXTRAS}
    for key in DEMO_PATHS:
        demo[key] = str((ROOT / demo[key]).resolve())
    declared = _parameters(path)
    values, built = _run_preset_cell(path, monkeypatch, preset="tiny")
    covered = [name for name in declared if name in demo]
    assert covered
    for name in covered:
        assert values[name] == demo[name], (path.name, name, values[name], demo[name])
    expected = [demo["model_name_or_path"]] if "model_name_or_path" in declared else []
    assert built == expected, "the demo model is built (or reused) where the preset points"
    for name in set(declared) - set(demo) - {"preset"}:  # the notebook's own extras keep their defaults
        assert values[name] == declared[name], name


def test_preset_tiny_in_notebook_03_is_the_cpu_tiny_training(monkeypatch):
    from dpo_xpu import load_recipe

    demo = load_recipe(DEMO_RECIPE)
    path = ROOT / "notebooks" / "03_dpo_training.ipynb"
    declared = _parameters(path)
    values, _ = _run_preset_cell(path, monkeypatch, preset="tiny")
    assert values["learning_rate"] == demo.learning_rate != declared["learning_rate"]
    assert values["max_steps"] == demo.max_steps != declared["max_steps"]
    assert values["bf16"] is False and values["eval_fraction"] == DEMO_EXTRAS["eval_fraction"]
    assert Path(values["model_name_or_path"]) == ROOT / "runs" / "demo-model"


def test_preset_tiny_keeps_the_values_you_changed(monkeypatch):
    path = ROOT / "notebooks" / "03_dpo_training.ipynb"
    values, built = _run_preset_cell(path, monkeypatch, preset="tiny", max_steps=7, model_name_or_path="mine")
    assert values["max_steps"] == 7 and values["model_name_or_path"] == "mine"
    assert built == [], "no demo model is built for a model you chose"
    assert values["learning_rate"] != _parameters(path)["learning_rate"], "the untouched values still change"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_preset_none_changes_nothing_and_an_unknown_preset_is_refused(path, monkeypatch):
    declared = _parameters(path)
    values, built = _run_preset_cell(path, monkeypatch)
    assert {name: values[name] for name in declared} == declared and built == []
    with pytest.raises(ValueError, match="preset = 'gpu'"):
        _run_preset_cell(path, monkeypatch, preset="gpu")


def test_notebook_03_shows_a_model_it_cannot_load_as_one_line(tmp_path, capsys):
    """Offline, a hub id fails in the loading cell: the cell shows the error's message alone, no traceback."""
    from IPython.core.interactiveshell import InteractiveShell

    from dpo_xpu import DpoXpuError, ModelLoadError, load_tokenizer

    nb = nbformat.read(ROOT / "notebooks" / "03_dpo_training.ipynb", as_version=4)
    cell = next(c.source for c in nb.cells if "load_tokenizer(recipe.model_name_or_path)" in c.source)
    shell = InteractiveShell.instance()
    try:
        recipe = SimpleNamespace(model_name_or_path=str(tmp_path / "missing-model"))
        shell.user_ns.update(recipe=recipe, DpoXpuError=DpoXpuError, load_tokenizer=load_tokenizer)
        result = shell.run_cell(cell)
    finally:
        InteractiveShell.clear_instance()
    assert isinstance(result.error_in_exec, ModelLoadError)
    shown = capsys.readouterr()
    lines = [line for line in (shown.out + shown.err).splitlines() if line.strip()]
    assert lines == [f"ModelLoadError: {result.error_in_exec}"]


def test_shared_parameters_have_the_same_defaults_everywhere():
    seen: dict[str, tuple[str, object]] = {}
    for path in NOTEBOOKS:
        for name, value in _parameters(path).items():
            first = seen.setdefault(name, (path.name, value))
            assert first[1] == value, f"{name}: {first[1]!r} in {first[0]} but {value!r} in {path.name}"


def _cells(nb) -> list[tuple[str, str, list[str]]]:
    return [(c.cell_type, c.source, list(c.metadata.get("tags", []))) for c in nb.cells]


def _sync(*args: str, folder: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SYNC), *args, *(["--dir", str(folder)] if folder else [])]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def _copy_pairs(tmp_path: Path) -> Path:
    """A copy of the project's notebooks and jupytext.toml (the pairing), to edit in a test."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "jupytext.toml").write_bytes((ROOT / "jupytext.toml").read_bytes())
    folder = tmp_path / "notebooks"
    folder.mkdir()
    for path in (ROOT / "notebooks").glob("[0-9][0-9]_*.*"):
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def test_jupytext_pairs_each_notebook_with_a_py_percent_file():
    from jupytext.config import load_jupytext_config

    config = load_jupytext_config(str(ROOT / "notebooks"))
    assert config is not None, "no jupytext configuration found for notebooks/ (jupytext.toml at the project root)"
    for path in NOTEBOOKS:
        assert config.default_formats(f"notebooks/{path.name}") == "ipynb,py:percent", path.name
    texts = sorted((ROOT / "notebooks").glob("*.py"))
    assert [p.stem for p in texts] == [p.stem for p in NOTEBOOKS], "every notebook has one paired .py, and only them"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_paired_py_file_holds_the_notebooks_cells(path):
    import jupytext

    text = path.with_suffix(".py")
    assert text.is_file(), f"{text.name} is missing. Fix: {CLEAR}"
    assert text.read_text(encoding="utf-8").startswith("# ---\n# jupyter:\n"), "the jupytext header comes first"
    paired = jupytext.read(text)
    assert paired.metadata["jupytext"]["text_representation"]["format_name"] == "percent"
    nb = nbformat.read(path, as_version=4)
    assert _cells(paired) == _cells(nb), f"{text.name} and {path.name} differ. Fix: {CLEAR}"
    assert [tags for _, _, tags in _cells(paired)].count(["parameters"]) == 1
    assert not [c for c in nb.cells if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]


def test_sync_check_passes_on_the_committed_notebooks():
    result = _sync("--check")
    assert result.returncode == 0, result.stderr


def test_sync_check_finds_an_edited_text_file_and_sync_carries_the_edit(tmp_path):
    folder = _copy_pairs(tmp_path)
    text = folder / "02_preference_data.py"
    edited = text.read_text(encoding="utf-8").replace("# # 2. Preference data", "# # 2. Preference data (edited)")
    assert edited != text.read_text(encoding="utf-8")
    text.write_text(edited, encoding="utf-8")
    result = _sync("--check", folder=folder)
    assert result.returncode == 1
    assert "02_preference_data" in result.stderr and "01_environment_check" not in result.stderr, result.stderr
    assert text.read_text(encoding="utf-8") == edited, "--check changed the file"

    os.utime(text, (time.time() + 10, time.time() + 10))  # the text file is the newer one: its cells win
    synced = _sync(folder=folder)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    assert _sync("--check", folder=folder).returncode == 0
    nb = nbformat.read(folder / "02_preference_data.ipynb", as_version=4)
    original = nbformat.read(ROOT / "notebooks" / "02_preference_data.ipynb", as_version=4)
    assert nb.cells[0].source.startswith("# 2. Preference data (edited)")
    assert [c.id for c in nb.cells] == [c.id for c in original.cells], "syncing keeps the cell ids"
    for name in ("01_environment_check.ipynb", "03_dpo_training.ipynb"):
        assert (folder / name).read_bytes() == (ROOT / "notebooks" / name).read_bytes(), f"{name} was rewritten"


def test_sync_check_finds_outputs_and_sync_clears_them(tmp_path):
    folder = _copy_pairs(tmp_path)
    path = folder / "03_dpo_training.ipynb"
    nb = nbformat.read(path, as_version=4)
    code = next(c for c in nb.cells if c.cell_type == "code")
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hello\n")]
    code.execution_count = 1
    nbformat.write(nb, path)
    result = _sync("--check", folder=folder)
    assert result.returncode == 1 and "03_dpo_training.ipynb has outputs" in result.stderr, result.stderr
    synced = _sync(folder=folder)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    assert path.read_bytes() == (ROOT / "notebooks" / path.name).read_bytes(), "the cleared notebook is the original"


def test_sync_check_finds_a_missing_text_file_and_a_second_parameters_cell(tmp_path):
    folder = _copy_pairs(tmp_path)
    (folder / "04_evaluation_and_export.py").unlink()
    result = _sync("--check", folder=folder)
    assert result.returncode == 1 and "04_evaluation_and_export.py is missing" in result.stderr, result.stderr

    folder = _copy_pairs(tmp_path / "second")
    text = folder / "01_environment_check.py"
    text.write_text(text.read_text(encoding="utf-8").replace("# %%\n", '# %% tags=["parameters"]\n', 1))
    result = _sync("--check", folder=folder)
    assert result.returncode == 1 and "01_environment_check.ipynb and 01_environment_check.py hold different" in (
        result.stderr
    ), result.stderr
    os.utime(text, (time.time() + 10, time.time() + 10))
    result = _sync(folder=folder)  # the second tag reaches the .ipynb, and the check after the sync refuses it
    assert result.returncode == 1, result.stdout + result.stderr
    assert "01_environment_check.ipynb has 2 cells tagged 'parameters', expected exactly one" in result.stderr


def test_run_notebooks_presets_name_declared_parameters():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import run_notebooks
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    declared = set().union(*(_parameters(p) for p in NOTEBOOKS))
    for preset, values in run_notebooks.PRESETS.items():
        assert set(values) <= declared, f"preset {preset}: unknown {sorted(set(values) - declared)}"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, stories260k_path, orca_rows_path):
    out = tmp_path_factory.mktemp("notebooks") / "run"
    params = {
        **RUN,
        "model_name_or_path": stories260k_path,
        "dataset_name_or_path": orca_rows_path,
        "output_dir": out,
    }
    result = run_notebooks(params, "--preset", "shared", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out


@pytest.mark.notebook
def test_every_notebook_ran_without_errors(run_dir):
    for path in NOTEBOOKS:
        executed = nbformat.read(run_dir / "notebooks" / path.name, as_version=4)
        errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, f"{path.name}: {errors}"


@pytest.mark.notebook
def test_metrics_start_at_ln2_and_stay_finite(run_dir):
    all_rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in all_rows if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, RUN["max_steps"] + 1))
    assert abs(rows[0]["loss"] - math.log(2)) < 0.01
    # the shared preset's recipe_overrides turn on evaluation every 6 steps (and at step 0) in notebook 03, and
    # prefix sharing: the loss still starts at ln 2 in training and evaluation
    assert "prefix_sharing: true" in (run_dir / "recipe.yaml").read_text()
    evals = [r for r in all_rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert abs(evals[0]["eval/loss"] - math.log(2)) < 0.01 and math.isfinite(evals[-1]["eval/rewards/margins"])
    for row in rows:
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (key, row)


@pytest.mark.notebook
def test_reward_curves_png_and_live_image_in_the_training_cell(run_dir):
    assert (run_dir / "reward_curves.png").read_bytes()[:8] == PNG_MAGIC
    executed = nbformat.read(run_dir / "notebooks" / "03_dpo_training.ipynb", as_version=4)
    train_cell = next(c for c in executed.cells if "trainer.train(" in c.source)
    images = [o for o in train_cell.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1, "the live curves should be one display, updated in place"


@pytest.mark.notebook
def test_run_folder_holds_the_training_record(run_dir):
    for name in ("recipe.yaml", "environment.json", "adapter/adapter_config.json", "merged/config.json"):
        assert (run_dir / name).exists(), name


@pytest.mark.notebook
def test_evaluation_json_has_finite_figures_and_a_matching_merge(run_dir):
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["n_pairs"] == math.ceil(RUN["limit"] * RUN["eval_fraction"])
    assert 0.0 <= evaluation["reward_accuracy"] <= 1.0
    for key in ("mean_margin", "mean_chosen_reward", "mean_rejected_reward", "drift_chosen_logratio"):
        assert math.isfinite(evaluation[key]), key
    merge = evaluation["merge"]
    assert merge["matches"] and merge["max_abs_diff"] <= 0.02 * merge["max_abs_logit"]
    assert merge["max_abs_diff"] < merge["adapter_effect"], "the merge lost the adapter's update"


@pytest.mark.notebook
def test_samples_answer_held_out_prompts_with_policy_and_reference(run_dir):
    from dpo_xpu import load_recipe, load_run_data, load_tokenizer

    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == RUN["num_samples"]
    assert all(isinstance(s["policy"], str) and isinstance(s["reference"], str) for s in samples)
    assert any(s["policy"] or s["reference"] for s in samples)
    recipe = load_recipe(run_dir / "recipe.yaml")
    train, heldout = load_run_data(recipe, load_tokenizer(recipe.model_name_or_path))
    prompts = {s["prompt"] for s in samples}
    assert prompts <= set(heldout["prompt"]) and not prompts & set(train["prompt"])
