"""The public API (``dpo_xpu._EXPORTS``): every exported function is called by at least one test, with inputs its
docstring allows; this file calls those that no other test does (``drop_long_pairs``, ``plot_token_lengths``,
``start_run``, ``save_adapter``, ``export_merged``), on stories260K, a few seconds each."""

from __future__ import annotations

import ast
import inspect
import re
from importlib import import_module
from pathlib import Path

import pytest

import dpo_xpu

TESTS = Path(__file__).resolve().parent
PACKAGE = Path(dpo_xpu.__file__).resolve().parent


def _is_function(name: str, module: str) -> bool:
    """Whether ``dpo_xpu.<module>.<name>`` is a function: read from the module's top-level definitions, imported
    only for a name that it neither defines nor assigns (a re-export)."""
    tree = ast.parse((PACKAGE / Path(*module.split("."))).with_suffix(".py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return True
        if isinstance(node, ast.ClassDef) and node.name == name:
            return False
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return False
    return inspect.isfunction(getattr(import_module(f"dpo_xpu.{module}"), name))


def exported_functions() -> list[str]:
    """The functions among ``dpo_xpu._EXPORTS``, in their order there."""
    return [name for name, module in dpo_xpu._EXPORTS.items() if _is_function(name, module)]


def calling_files(name: str) -> list[str]:
    """The files ``tests/*.py`` that call ``name`` (``name(``, ``dpo_xpu.name(``, ``module.name(``; not ``def``)."""
    call = re.compile(rf"(?<![\w]){re.escape(name)}\(")
    definition = re.compile(rf"\bdef\s+{re.escape(name)}\(")
    return sorted(
        path.name
        for path in TESTS.glob("*.py")
        if len(call.findall(text := path.read_text(encoding="utf-8"))) > len(definition.findall(text))
    )


def test_the_exports_include_functions_and_resolve():
    functions = exported_functions()
    assert {"run_training", "launch_training", "attach_precomputed_reference"} <= set(functions)
    assert "Recipe" not in functions and "DEMO_SAMPLE_PATH" not in functions and "RecipeError" not in functions
    assert all(callable(getattr(dpo_xpu, name)) for name in functions)


def test_every_exported_function_is_called_by_a_test():
    """A call in any test file counts (``launch_training`` with a dict is called by ``tests/test_recipe_faults.py``
    and ``tests/test_distributed.py``), this file's calls below included; names in text without ``(`` do not."""
    uncalled = [name for name in exported_functions() if not calling_files(name)]
    assert uncalled == [], f"exported functions no test calls: {uncalled}"


@pytest.fixture
def recipe(stories260k_path, orca_rows_path, tmp_path):
    from helpers import short_recipe

    return short_recipe(stories260k_path, orca_rows_path, tmp_path / "run", max_steps=1)


def test_drop_long_pairs_and_plot_token_lengths(recipe, stories):
    from matplotlib.figure import Figure

    from dpo_xpu.errors import PreferenceDataError

    pairs, _ = dpo_xpu.load_run_data(recipe, stories)
    lengths = dpo_xpu.token_lengths(pairs, stories)
    longest = sorted(p + max(c, r) for p, c, r in zip(lengths["prompt"], lengths["chosen"], lengths["rejected"]))
    limit = longest[len(longest) // 2]  # the median pair fits, the longer half does not

    kept, report = dpo_xpu.drop_long_pairs(pairs, stories, max_length=limit)

    assert report["rows"] == len(pairs) == 6 and report["max_length"] == limit
    assert len(kept) == report["kept"] == sum(n <= limit for n in longest) and report["dropped"] == 6 - len(kept)
    assert 0 < report["dropped"] <= sum(report["reasons"].values())
    assert set(kept["prompt"]) <= set(pairs["prompt"])
    with pytest.raises(PreferenceDataError, match="all 6 pairs are longer than max_length=1"):
        dpo_xpu.drop_long_pairs(pairs, stories, max_length=1)

    fig = dpo_xpu.plot_token_lengths(lengths, max_length=limit, max_prompt_length=recipe.max_prompt_length)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    prompts, answers = fig.axes
    assert prompts.get_title() == "Prompt lengths" and answers.get_title() == "Answer lengths"
    assert {t.get_text() for t in prompts.get_legend().get_texts()} == {"max_prompt_length", "max_length"}
    assert dpo_xpu.plot_token_lengths(lengths).axes[0].get_legend() is None  # no limits: nothing marked


def test_start_run_save_adapter_and_export_merged(recipe, stories):
    from helpers import make_trainer

    from dpo_xpu.outputs.run_folder import unlock_run_dir

    run_dir = dpo_xpu.start_run(recipe)
    try:
        assert run_dir == Path(recipe.output_dir)
        assert {"recipe.yaml", "fingerprints.json", "environment.json"} <= {p.name for p in run_dir.iterdir()}
        assert dpo_xpu.load_recipe(run_dir / "recipe.yaml").model_name_or_path == recipe.model_name_or_path
        trainer = make_trainer(recipe, stories)
        trainer.train()  # one step: the adapter moves away from zero

        adapter_dir = dpo_xpu.save_adapter(trainer, stories, run_dir)  # the recipe read from recipe.yaml
        assert adapter_dir == run_dir / "adapter"
        assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {
            p.name for p in adapter_dir.iterdir()
        }

        merged = dpo_xpu.export_merged(recipe, adapter_dir, run_dir, texts=["Once upon a time"])
        assert merged == run_dir / "merged" and (merged / "config.json").is_file()
        assert (run_dir / "merge_check.json").is_file()
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(merged)  # no PEFT, no bitsandbytes
        assert not any("lora_" in name for name, _ in model.named_parameters())
    finally:
        unlock_run_dir(run_dir)


@pytest.mark.parametrize("given", [{"max_steps": 1}, "recipes/cpu_tiny.yaml", None])
def test_run_training_names_the_constructors_when_not_given_a_recipe(given, tmp_path):
    from dpo_xpu.errors import RecipeError

    with pytest.raises(RecipeError, match=f"run_training takes a Recipe, found {type(given).__name__}"):
        dpo_xpu.run_training(given)
    assert list(tmp_path.iterdir()) == []
