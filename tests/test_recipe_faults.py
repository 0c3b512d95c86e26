"""Faulty recipes end in one line (a RecipeError) that names the key or the file and the fix (issue #22).

Dicts given to launch_training, duplicate keys, files that are not UTF-8, YAML syntax errors and tags, misspelt
keys, NaN / infinity / overflowing numbers, TRL options refused by value, a notebook's missing recipe_file,
assignments in Python, trl_options that are not a mapping or repeat a top-level key, empty paths, no LoRA layer,
warmup_ratio, a folder as the recipe file, and Python API arguments of the wrong kind.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers import run_cli

from dpo_xpu.errors import RecipeError
from dpo_xpu.recipes import Recipe, load_recipe, make_recipe

ROOT = Path(__file__).resolve().parents[1]


def _refusal(path: Path) -> str:
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "\n" not in message, message
    return message


def _write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "recipe.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# 1. launch_training(dict) -----------------------------------------------------------------------------------------


def test_launch_training_reads_a_dict_as_a_recipe_file(tmp_path, monkeypatch):
    """A dict gets TRL's options and converted values, as a recipe file does (not Recipe(**dict))."""
    import dpo_xpu.launch as launch

    seen = []
    monkeypatch.setattr(launch, "_train_worker", lambda recipe, overwrite, resume: seen.append(recipe))
    values = {"device": "cpu", "output_dir": str(tmp_path / "run"), "report_to": ["tensorboard"]}
    run_dir = launch.launch_training({**values, "learning_rate": "1e-4", "max_steps": "5"}, num_processes=1)
    (recipe,) = seen
    assert run_dir == tmp_path / "run"
    assert recipe.trl_options == {
        "output_dir": str(tmp_path / "run"),
        "report_to": ["tensorboard"],
        "learning_rate": 1e-4,
        "max_steps": 5,
    }
    assert (recipe.learning_rate, recipe.max_steps) == (1e-4, 5)
    with pytest.raises(RecipeError, match="learning_rte \\(did you mean learning_rate\\?\\)"):
        launch.launch_training({**values, "learning_rte": 1e-4}, num_processes=1)
    assert len(seen) == 1


# 2-4. the file itself -----------------------------------------------------------------------------------------------


def test_a_duplicate_key_is_refused_with_both_lines(tmp_path):
    message = _refusal(_write(tmp_path, "beta: 0.1\nlearning_rate: 1e-4\nmax_steps: 3\nlearning_rate: 2e-4\n"))
    assert message.startswith(f"recipe file {tmp_path / 'recipe.yaml'}, line 4")
    assert "key 'learning_rate' is given twice, on lines 2 and 4; keep one of them" in message


def test_a_duplicate_key_in_a_nested_mapping_is_refused(tmp_path):
    path = _write(tmp_path, "dataset_mixture:\n  a.jsonl: 0.5\n  b.jsonl: 0.2\n  a.jsonl: 0.3\n")
    assert "key 'a.jsonl' is given twice, on lines 2 and 4" in _refusal(path)


def test_a_file_that_is_not_utf8_names_the_byte_and_the_fix(tmp_path):
    path = _write(tmp_path, "max_steps: 3\noutput_dir: runs/caf\xe9\n".encode("latin-1"))
    message = _refusal(path)
    assert message.startswith(f"recipe file {path} is not UTF-8: byte 0xe9 at offset 33 (line 2)")
    assert "save it as UTF-8" in message


@pytest.mark.parametrize(
    "text, where, fix",
    [
        ("beta: 0.1\n\tmax_steps: 3\n", "line 2, column 1", "indent with spaces: YAML does not allow tabs"),
        ("beta: 0.1\n  max_steps: 3\n", "line 2, column 12", "check the indentation of that line"),
        ("lora_target_modules: [q_proj, v_proj\nbeta: 0.1\n", "line 2", "check the indentation"),
        ("beta: !!python/object:os.system {}\n", "line 1, column 7", "remove the tag: a recipe holds plain values"),
        ("beta: !!python/name:os.system\n", "line 1", "remove the tag"),
    ],
    ids=["tab", "indentation", "unclosed-list", "python-object-tag", "python-name-tag"],
)
def test_yaml_errors_are_one_line_with_the_line_and_the_fix(tmp_path, text, where, fix):
    path = _write(tmp_path, text)
    message = _refusal(path)
    assert message.startswith(f"recipe file {path}, {where}"), message
    assert fix in message


def test_a_set_value_that_is_not_yaml_is_one_line():
    with pytest.raises(RecipeError, match=r"^--set lora_target_modules=\[q_proj: the value is not valid YAML .*quote"):
        load_recipe(None, ["lora_target_modules=[q_proj"])


def test_the_cli_prints_a_recipe_file_fault_as_one_line(tmp_path):
    path = _write(tmp_path, "max_steps: 3\nmax_steps: 4\n")
    result = run_cli("train", "--recipe", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("dpo-xpu: error:")]
    assert "key 'max_steps' is given twice, on lines 1 and 2" in line


# 5. misspelt keys ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, suggestion",
    [("learning_rte", "learning_rate"), ("save_total_limt", "save_total_limit"), ("Beta", "beta")],
)
def test_an_unknown_key_suggests_the_closest_one(key, suggestion):
    with pytest.raises(RecipeError) as err:
        make_recipe({key: 1})
    message = str(err.value)
    assert f"unknown recipe key {key} (did you mean {suggestion}?)" in message
    assert "Valid keys" not in message and len(message) < 250


# 6. NaN, infinities, overflow ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, message",
    [
        ({"beta": math.nan}, "beta: must be a finite number, found nan"),
        ({"learning_rate": math.inf}, "learning_rate: must be a finite number, found inf"),
        ({"learning_rate": "1e999"}, "learning_rate: must be a finite number, found '1e999'"),
        ({"lora_dropout": -math.inf}, "lora_dropout: must be a finite number, found -inf"),
        ({"dataset_mixture": {"a.jsonl": math.nan}}, "dataset_mixture['a.jsonl']: must be a finite number, found nan"),
        ({"dataset_mixture": {"a.jsonl": math.inf}}, "dataset_mixture['a.jsonl']: must be a finite number, found inf"),
        ({"dataset_mixture": {"a.jsonl": -1}}, "dataset_mixture must map each source to a positive proportion"),
        ({"max_grad_norm": math.nan}, "max_grad_norm: must be a finite number, found nan"),
        ({"ld_alpha": math.inf}, "ld_alpha: must be a finite number, found inf"),
        ({"loss_weights": [1.0, math.nan]}, "loss_weights[1]: must be a finite number, found nan"),
        ({"max_steps": "1e999"}, "max_steps: expected a finite integer, found '1e999'"),
        ({"max_steps": math.inf}, "max_steps: expected a finite integer, found inf"),
        ({"max_steps": 10**30}, "max_steps: must be at most 2**63 - 1, found an integer of 31 digits"),
        ({"save_total_limit": "1e999"}, "save_total_limit: expected a finite integer, found '1e999'"),
        ({"beta": -0.1}, "beta: must be > 0"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_numbers_that_are_not_finite_are_refused(values, message):
    with pytest.raises(RecipeError) as err:
        make_recipe(values)
    assert message in str(err.value)


def test_nan_is_refused_from_a_file_from_set_and_in_a_recipe_built_directly(tmp_path):
    assert "beta: must be a finite number, found nan" in _refusal(_write(tmp_path, "beta: .nan\n"))
    with pytest.raises(RecipeError, match="learning_rate: must be a finite number, found inf"):
        load_recipe(None, ["learning_rate=.inf"])
    with pytest.raises(RecipeError, match="num_train_epochs: must be a finite number"):
        Recipe(num_train_epochs=math.inf)


# 7. TRL options by value --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, message",
    [
        ({"save_total_limit": "abc"}, "save_total_limit: expected an integer, found 'abc'"),
        ({"save_total_limit": 2.5}, "save_total_limit: expected an integer, found 2.5"),
        ({"use_weighting": "maybe"}, "use_weighting: expected true or false, found 'maybe'"),
        ({"max_grad_norm": [1]}, "max_grad_norm: expected a number, found [1]"),
        ({"max_grad_norm": None}, "max_grad_norm: null is not allowed (expected a number)"),
        ({"optim": "nope"}, "optim: 'nope' is not one of the installed transformers' OptimizerNames: use one of"),
        ({"optim": "adamw_torh"}, "optim: 'adamw_torh' is not one of the installed transformers' OptimizerNames: did"),
        ({"eval_strategy": "step"}, "eval_strategy: 'step' is not one of the installed transformers' Interval"),
    ],
)
def test_trl_options_are_converted_to_their_field_type_or_refused(values, message):
    with pytest.raises(RecipeError) as err:
        make_recipe(values)
    assert message in str(err.value)


def test_trl_option_values_are_converted_to_their_field_type():
    recipe = load_recipe(None, ["save_total_limit=2", "max_grad_norm=5e-1", "use_weighting=true", "run_name=2024"])
    assert recipe.trl_options == {
        "save_total_limit": 2,
        "max_grad_norm": 0.5,
        "use_weighting": True,
        "run_name": "2024",
    }
    assert make_recipe({"save_total_limit": None, "report_to": "none"}).trl_options["save_total_limit"] is None


@pytest.mark.parametrize(
    "values, message",
    [
        ({"fp16": True}, "fp16, bf16: the installed TRL"),
        ({"load_best_model_at_end": True}, "load_best_model_at_end: the installed TRL"),
        ({"dataloader_prefetch_factor": 2}, "dataloader_prefetch_factor: the installed TRL"),
        ({"torch_empty_cache_steps": 0}, "torch_empty_cache_steps: the installed TRL"),
    ],
)
def test_validate_recipe_names_the_key_dpo_config_refuses(tmp_path, values, message):
    from dpo_xpu.train.trl_config import validate_recipe
    from dpo_xpu.train.trl_internals import trl_generation

    recipe = make_recipe({"output_dir": str(tmp_path / "run"), **values})
    with pytest.raises(RecipeError) as err:
        validate_recipe(recipe, use_cpu=True, generation=trl_generation())
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_validate_recipe_accepts_the_shipped_recipes_and_writes_nothing(tmp_path):
    from dpo_xpu.train.trl_config import validate_recipe
    from dpo_xpu.train.trl_internals import trl_generation

    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        recipe = load_recipe(path, {"output_dir": str(tmp_path / path.stem)})
        if recipe.backend == "native":
            validate_recipe(recipe, use_cpu=True, generation=trl_generation())
    assert list(tmp_path.iterdir()) == []


def test_run_training_refuses_a_trl_option_before_the_run_folder_is_touched(tmp_path):
    from dpo_xpu.pipeline import run_training

    run = tmp_path / "run"
    recipe = make_recipe({"device": "cpu", "output_dir": str(run), "dataloader_prefetch_factor": 2})
    with pytest.raises(RecipeError, match="^dataloader_prefetch_factor: the installed TRL"):
        run_training(recipe, live_plot=False)
    assert not run.exists()


# 8. a notebook's recipe_file ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "recipe_file, hint",
    [("recipes/gpu.yaml", "the recipes in recipes: "), ("recipes/cpu_dem.yaml", 'did you mean "cpu_demo.yaml"?')],
)
def test_a_missing_recipe_file_is_one_line_with_the_shipped_ones(recipe_file, hint, monkeypatch):
    from dpo_xpu.demo import notebook_recipe

    monkeypatch.chdir(ROOT)
    with pytest.raises(RecipeError) as err:
        notebook_recipe(recipe_file)
    assert str(err.value).startswith(f"recipe_file = {recipe_file!r} does not exist: ") and hint in str(err.value)
    assert "cpu_tiny.yaml" in str(err.value)
    assert err.value._render_traceback_() == [f"RecipeError: {err.value}"]  # one line in Jupyter


# 9. assignments in Python -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("beta", -1.0, "beta: must be > 0, found -1.0"),
        ("max_steps", 0, "max_steps: must be > 0, or -1"),
        ("max_prompt_length", 1000, "max_prompt_length (1000) must be smaller than max_length (512)"),
        ("eval_fraction", 1.5, "eval_fraction: must be in [0, 1), found 1.5"),
        ("learning_rate", "fast", "learning_rate: expected a number, found 'fast'"),
        ("lora_r", "big", "lora_r: expected an integer, found 'big'"),
        ("device", "gpu", "device: 'gpu' is not one of auto, xpu, cuda, cpu"),
        ("reference", "frozen", "reference: 'frozen' is not one of auto"),
        ("output_dir", None, "output_dir: must be a folder path"),
        ("warmup_ratio", 2, "warmup_ratio: must be in [0, 1], found 2"),
        ("use_cpu", True, "use_cpu: dpo_xpu sets this TRL option itself: set device: cpu"),
        ("learning_rte", 5.0, "unknown recipe key learning_rte (did you mean learning_rate?)"),
        ("trl_options", 3, "trl_options: expected a mapping of TRL option names to values"),
    ],
)
def test_an_assignment_is_checked_as_a_file_value_and_a_refused_one_changes_nothing(tmp_path, key, value, message):
    recipe = make_recipe({"output_dir": str(tmp_path / "run"), "max_length": 512, "report_to": "none"})
    before = recipe.to_dict()
    with pytest.raises(RecipeError) as err:
        setattr(recipe, key, value)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert recipe.to_dict() == before and not hasattr(recipe, "learning_rte")


def test_an_assignment_is_converted_and_the_saved_recipe_reads_back(tmp_path):
    recipe = make_recipe({"output_dir": str(tmp_path / "run")})
    recipe.learning_rate, recipe.max_steps, recipe.lora_target_modules = "1e-4", "7", "q_proj,v_proj"
    recipe.eval_fraction, recipe.warmup_ratio = "0.1", 0.5
    assert (recipe.learning_rate, recipe.max_steps, recipe.eval_fraction, recipe.warmup_ratio) == (1e-4, 7, 0.1, 0.5)
    assert recipe.lora_target_modules == ["q_proj", "v_proj"]
    assert load_recipe(recipe.save(tmp_path / "recipe.yaml")) == recipe


def test_max_prompt_length_left_unset_follows_an_assigned_max_length():
    recipe = make_recipe({})
    recipe.max_length = 300  # unset: two thirds of max_length, as in a file that gives only max_length
    assert recipe.max_prompt_length == 200
    recipe.max_prompt_length = 100
    recipe.max_length = 400
    assert recipe.max_prompt_length == 100  # set: kept, and checked against max_length
    with pytest.raises(RecipeError, match=r"max_prompt_length \(100\) must be smaller than max_length \(50\)"):
        recipe.max_length = 50
    assert (recipe.max_length, recipe.max_prompt_length) == (400, 100)


# 10. trl_options that are not a mapping of names, and keys given twice ----------------------------------------------


@pytest.mark.parametrize("value", ["3", "[a, b]", "abc", "true"])
def test_trl_options_that_are_not_a_mapping_are_refused(value):
    with pytest.raises(RecipeError, match="^trl_options: expected a mapping of TRL option names to values"):
        load_recipe(None, [f"trl_options={value}"])


@pytest.mark.parametrize(
    "value, message",
    [
        ("{1: 2}", "trl_options: option name 1 is not a name"),
        ("{null: 2}", "trl_options: option name None is not a name"),
        ("{lora_r: 8}", "lora_r: a dpo_xpu key, not a TRL option: give it as a top-level key"),
        ("{lerning_rate: 0.1}", "unknown recipe key lerning_rate (did you mean learning_rate?)"),
    ],
)
def test_keys_inside_trl_options_must_be_trl_option_names(value, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(None, [f"trl_options={value}"])
    assert message in str(err.value)


def test_an_option_given_at_top_level_and_in_trl_options_must_agree(tmp_path):
    with pytest.raises(RecipeError, match=r"^max_steps: given twice, .*\(2\) and in trl_options \(3\); give it once"):
        make_recipe({"max_steps": 2, "trl_options": {"max_steps": 3}})
    path = _write(tmp_path, "max_steps: 2\ntrl_options: {max_steps: '2', ld_alpha: 0.5}\n")
    assert load_recipe(path).trl_options == {"max_steps": 2, "ld_alpha": 0.5}  # the same value twice
    assert "given twice" in _refusal(_write(tmp_path, "seed: 1\ntrl_options: {seed: 2}\n"))
    # a --set value replaces the file's, wherever the file gives it
    path = _write(tmp_path, "trl_options: {max_steps: 3, ld_alpha: 0.5}\n")
    assert load_recipe(path, ["max_steps=5"]).trl_options == {"max_steps": 5, "ld_alpha": 0.5}


# 11. values a run cannot start from ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("output_dir=", "output_dir: must be a folder path (the run folder), found null"),
        ("output_dir=''", "output_dir: must be a folder path (the run folder), found ''"),
        ("output_dir='  '", "output_dir: must be a folder path"),
        ("model_name_or_path=''", "model_name_or_path: must be a hub id, folder or .gguf file"),
        ("model_name_or_path=", "model_name_or_path: null is not allowed"),
        ("dataset_name_or_path=''", "dataset_name_or_path: must be a hub id or a data file"),
        ("lora_target_modules=[]", "lora_target_modules: must name at least one layer"),
        ("lora_target_modules=' , '", "lora_target_modules: must name at least one layer"),
        ("lora_target_modules=['']", "lora_target_modules: must name at least one layer"),
        ("warmup_ratio=2", "warmup_ratio: must be in [0, 1], found 2"),
        ("warmup_ratio=-0.1", "warmup_ratio: must be in [0, 1], found -0.1"),
    ],
)
def test_empty_paths_no_lora_layer_and_a_warmup_ratio_above_one_are_refused(override, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(None, [override])
    assert message in str(err.value)


def test_a_warmup_ratio_in_range_is_kept():
    assert load_recipe(None, ["warmup_ratio=1"]).warmup_ratio == 1.0


# 12. what is not a recipe file, a mapping or key=value strings ------------------------------------------------------


def test_a_folder_given_as_the_recipe_file_is_named_as_a_folder(tmp_path):
    with pytest.raises(RecipeError, match=f"^{tmp_path} is a folder, not a recipe file: give a .yaml file$"):
        load_recipe(tmp_path)
    result = run_cli("train", "--recipe", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{tmp_path} is a folder, not a recipe file" in result.stderr


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: make_recipe(None),
            "make_recipe: expected a mapping of recipe keys ({'max_steps': 3}), found NoneType",
        ),
        (lambda: make_recipe("max_steps: 3"), "found str 'max_steps: 3'; load_recipe(path) reads a recipe file"),
        (lambda: make_recipe([("max_steps", 3)]), "make_recipe: expected a mapping of recipe keys"),
        (lambda: load_recipe(3), "recipe file: expected a path (a str or Path), found int 3"),
        (lambda: load_recipe(None, [3]), 'overrides: expected a list of "key=value" strings'),
        (lambda: load_recipe(None, "max_steps=3"), 'overrides: expected a list of "key=value" strings'),
        (lambda: load_recipe(None, {1: 2}), "recipe key 1 is not a name"),
    ],
    ids=["none", "yaml-text", "pairs", "int-path", "int-override", "str-overrides", "int-key"],
)
def test_the_python_api_names_what_it_expected(call, message):
    with pytest.raises(RecipeError) as err:
        call()
    assert message in str(err.value)
