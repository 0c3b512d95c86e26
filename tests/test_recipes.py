"""Recipes: YAML loading, unknown keys, type conversion, and every shipped recipe parses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from dpo_xpu.errors import RecipeError
from dpo_xpu.recipe_files import parse_overrides
from dpo_xpu.recipes import Recipe, load_recipe, make_recipe, recipe_keys

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_issue_keys_are_all_recipe_keys():
    issue_keys = (
        "model_name_or_path dataset_name_or_path output_dir backend quantization reference lora_r lora_alpha "
        "lora_dropout lora_target_modules beta learning_rate lr_scheduler_type warmup_steps max_steps "
        "num_train_epochs per_device_train_batch_size gradient_accumulation_steps max_length max_prompt_length "
        "logging_steps save_steps seed device limit"
    ).split()
    assert set(issue_keys) <= set(recipe_keys())


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_parses(path):
    raw = yaml.safe_load(path.read_text())
    recipe = load_recipe(path)
    assert set(raw) <= set(recipe_keys())
    assert recipe.learning_rate == float(raw["learning_rate"])
    assert recipe.max_prompt_length is None or recipe.max_prompt_length < recipe.max_length


def test_at_least_three_recipes_ship():
    names = {p.stem for p in RECIPES}
    assert {"original_openhermes_mistral7b", "cpu_demo"} <= names
    assert len(names) >= 3


def test_original_recipe_values():
    recipe = load_recipe(Path(RECIPES[0]).parent / "original_openhermes_mistral7b.yaml")
    assert recipe.model_name_or_path == "teknium/OpenHermes-2.5-Mistral-7B"
    assert (recipe.learning_rate, recipe.lr_scheduler_type, recipe.warmup_steps, recipe.max_steps) == (
        5e-5,
        "cosine",
        100,
        200,
    )
    assert (recipe.per_device_train_batch_size, recipe.gradient_accumulation_steps, recipe.beta) == (4, 4, 0.1)
    assert (recipe.max_prompt_length, recipe.max_length) == (1024, 1536)


def test_unknown_key_is_named_with_where_the_valid_keys_are(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("learning_rate: 1e-4\nzzz_qqq: 0.2\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert "zzz_qqq" in str(err.value) and "did you mean" not in str(err.value)
    assert "dpo-xpu train --help lists every key" in str(err.value)


def test_yaml_exponent_without_dot_is_read_as_float(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("learning_rate: 5e-4\n")  # PyYAML reads this as a string
    assert load_recipe(path).learning_rate == pytest.approx(5e-4)


def test_overrides_convert_types_and_win_over_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("max_steps: 10\n")
    recipe = load_recipe(path, ["max_steps=3", "bf16=false", "lora_target_modules=q_proj,v_proj", "limit=null"])
    assert recipe.max_steps == 3 and recipe.bf16 is False
    assert recipe.lora_target_modules == ["q_proj", "v_proj"]
    assert recipe.limit is None


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"max_steps": "ten"}, "max_steps: expected an integer"),
        ({"device": "gpu"}, "device"),
        ({"backend": "openvino"}, "backend"),
        ({"reference": "frozen"}, "reference"),
        ({"beta": 0}, "beta: must be > 0"),
        ({"max_prompt_length": 2000, "max_length": 1024}, "max_prompt_length"),
        ({"bf16": "maybe"}, "bf16"),
        ({"max_steps": 2.5}, "max_steps"),
    ],
)
def test_bad_values_are_refused_with_the_field(values, fragment):
    with pytest.raises(RecipeError, match=fragment.split(":")[0]) as err:
        make_recipe(values)
    assert fragment in str(err.value)


def test_parse_overrides_requires_equals():
    with pytest.raises(RecipeError, match="key=value"):
        parse_overrides(["max_steps"])


def test_not_a_mapping(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(path)


def test_missing_file():
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe("no/such/recipe.yaml")


def test_round_trip_through_yaml(tmp_path):
    recipe = Recipe(max_steps=7, lora_target_modules=["q_proj"])
    again = load_recipe(recipe.save(tmp_path / "r.yaml"))
    assert again == recipe


def test_readme_lists_every_option_with_its_default():
    import dataclasses

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line for line in readme.splitlines() if line.startswith("| `")}
    for f in dataclasses.fields(Recipe):
        assert f.name in rows, f"README.md's options table lacks {f.name}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = rows[f.name].split("|")[2].strip().strip("`")
        if isinstance(default, bool):
            assert shown == str(default).lower(), f.name
        elif default is None:
            assert shown == "null", f.name
        elif isinstance(default, list):
            assert shown == ", ".join(default), f.name
        else:
            assert shown == str(default), f.name


def test_readme_table_is_made_from_the_field_metadata():
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "sync_readme.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_key_is_documented_once_in_its_field():
    from dpo_xpu.recipes import key_docs

    for name, doc in key_docs().items():
        assert doc["unit"] and doc["help"] and doc["default_from"], name


def test_defaults_that_differ_from_trls_are_listed_with_their_reason():
    from trl import DPOConfig

    from dpo_xpu.recipes import key_docs, options_table, trl_default_differences

    differs = trl_default_differences()
    trl_defaults = {f.name: f.default for f in dataclasses.fields(DPOConfig)}
    assert differs["learning_rate"] == (5e-5, trl_defaults["learning_rate"])  # the original recipe's 5e-5
    assert "beta" not in differs  # 0.1 in both
    docs = key_docs()
    table = {line.split(" | ")[0].strip("| `"): line for line in options_table().splitlines()[2:]}
    for name, (ours, theirs) in differs.items():
        assert ours != theirs
        assert "TRL's default" not in docs[name]["default_from"], f"{name}: say why dpo_xpu differs from TRL"
        assert f"TRL's default: `{theirs}`" in table[name] or theirs is None or isinstance(theirs, bool), name


def test_reference_auto_picks_precomputed_where_it_saves_work_and_says_why():
    from dpo_xpu.train.reference import reference_plan

    plan = reference_plan(
        Recipe(max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=1), "1.x", rows=12
    )
    assert (plan.strategy, plan.precomputed_by) == ("precomputed", "dpo_xpu") and "auto -> precomputed" in plan.why
    assert reference_plan(Recipe(max_steps=-1, num_train_epochs=1.0), "1.x", rows=500).strategy == "precomputed"
    # 6 steps of 2 pairs see 12 of 20 rows: precomputing all 20 costs more than 12 per-step reference forwards
    plan = reference_plan(
        Recipe(max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=1), "1.x", rows=20
    )
    assert plan.strategy == "adapter-off" and "12 pairs of 20 rows" in plan.why
    # ... unless the global batch is larger: 2 processes see all 20 in 6 steps of 2 pairs each
    assert reference_plan(
        Recipe(max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=1), "1.x", 20, world_size=2
    ).strategy == ("precomputed")
    assert reference_plan(Recipe(max_steps=-1, num_train_epochs=0.5), "1.x", rows=20).strategy == "adapter-off"
    assert reference_plan(Recipe(reference_free=True), "1.x", rows=1).strategy == "adapter-off"
    assert reference_plan(Recipe(loss_type="simpo"), "1.x", rows=1).reference_free
    plan = reference_plan(Recipe(reference_device="cpu"), "1.x", rows=1)
    assert plan.separate_model and plan.device == "cpu"
    assert reference_plan(Recipe(adapter_name_or_path="adapter"), "1.x", rows=1).strategy == "adapter-off"
    ipex = reference_plan(Recipe(backend="ipex-llm"), "0.11", rows=1)
    assert ipex.strategy == "adapter-off" and not ipex.trl_precomputes and "ipex-llm" in ipex.why
    explicit = reference_plan(Recipe(reference="separate"), "1.x", rows=1)
    assert explicit.separate_model and explicit.why == "reference: separate (set in the recipe)"
    with pytest.raises(RecipeError, match="reference_device: 'cpu' needs reference: separate"):
        Recipe(reference="adapter-off", reference_device="cpu")


def test_keywords_win_over_trl_options_as_dataclasses_replace_needs(tmp_path):
    """``Recipe(trl_options=..., key=...)`` (what ``dataclasses.replace`` calls) takes the keyword; a recipe file
    or dict (make_recipe) that gives a key both ways with different values is refused instead."""
    recipe = make_recipe({"output_dir": str(tmp_path / "a"), "max_steps": 5})
    again = dataclasses.replace(recipe, output_dir=str(tmp_path / "b"), reference="separate")
    assert (again.output_dir, again.max_steps, again.reference) == (str(tmp_path / "b"), 5, "separate")
    with pytest.raises(RecipeError, match="output_dir: given twice"):
        make_recipe({"output_dir": "a", "trl_options": {"output_dir": "b"}})


def test_a_recipe_path_that_is_not_a_readable_file_is_one_line(tmp_path):
    import os

    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    with pytest.raises(RecipeError, match=f"^recipe file {fifo} cannot be read \\(not a regular file\\)"):
        load_recipe(fifo)
    with pytest.raises(RecipeError, match="is a folder, not a recipe file"):
        load_recipe("")  # the current folder


def test_copies_and_pickles_of_a_recipe_keep_checking_assignments(tmp_path):
    import copy
    import pickle

    recipe = make_recipe({"output_dir": str(tmp_path / "run"), "ld_alpha": 0.5})
    for other in (copy.copy(recipe), copy.deepcopy(recipe), pickle.loads(pickle.dumps(recipe))):
        assert other == recipe
        with pytest.raises(RecipeError, match="beta: must be > 0"):
            other.beta = 0
        other.max_length = 300  # max_prompt_length unset: follows
        assert other.max_prompt_length == 200 and recipe.max_length == 1536
