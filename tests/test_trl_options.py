"""TRL's options under TRL's own names: accepted in recipes and on the CLI, passed to DPOConfig, honoured."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import config_kwargs, cpu_recipe

from dpo_xpu.errors import RecipeError
from dpo_xpu.pipeline import run_training
from dpo_xpu.recipes import load_recipe, make_recipe, trl_option_names
from dpo_xpu.train.trl_internals import trl_generation


def _kwargs(recipe):
    return config_kwargs(recipe, "1.x")


pytestmark = pytest.mark.skipif(trl_generation() != "1.x", reason="TRL 1.x's options (the native environment)")


def test_every_dpo_config_option_is_accepted_except_those_dpo_xpu_sets():
    from trl import DPOConfig

    names = trl_option_names()
    own = {f.name for f in dataclasses.fields(DPOConfig)} - set(names)
    assert {"ld_alpha", "use_weighting", "save_total_limit", "report_to", "sync_ref_model", "optim"} <= set(names)
    assert "precompute_ref_log_probs" in own and "beta" in own  # set through dpo_xpu's keys


def test_options_round_trip_through_yaml_and_reach_dpo_config(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("ld_alpha: 0.5\nuse_weighting: true\nsave_total_limit: 2\nreport_to: [tensorboard]\n")
    recipe = load_recipe(path, overrides=["f_divergence_type=js_divergence", "precompute_ref_batch_size=8"])
    assert recipe.trl_options["ld_alpha"] == 0.5 and recipe.trl_options["precompute_ref_batch_size"] == 8
    assert load_recipe(recipe.save(tmp_path / "again.yaml")) == recipe
    kwargs = _kwargs(recipe)
    assert (kwargs["ld_alpha"], kwargs["use_weighting"], kwargs["report_to"]) == (0.5, True, ["tensorboard"])
    assert kwargs["f_divergence_type"] == "js_divergence"


def test_every_trl_option_set_as_an_attribute_or_keyword_is_kept_in_trl_options(tmp_path):
    """``recipe.ld_alpha = ...`` (any DPOConfig option, not only dpo_xpu's overrides) lands in ``trl_options``, so
    ``to_dict``, ``recipe.yaml`` and DPOConfig see it; a dpo_xpu key that TRL also has stays dpo_xpu's."""
    from dpo_xpu.recipes import Recipe

    recipe = make_recipe({"output_dir": str(tmp_path / "run"), "max_steps": 5})
    recipe.ld_alpha, recipe.report_to, recipe.max_steps, recipe.loss_type = 0.5, ["tensorboard"], 7, "ipo"
    assert recipe.trl_options == {
        "output_dir": str(tmp_path / "run"),
        "max_steps": 7,
        "ld_alpha": 0.5,
        "report_to": ["tensorboard"],
    }
    assert recipe.to_dict()["ld_alpha"] == 0.5 and recipe.to_dict()["loss_type"] == "ipo"
    assert load_recipe(recipe.save(tmp_path / "r.yaml")) == recipe
    assert (_kwargs(recipe)["ld_alpha"], _kwargs(recipe)["max_steps"]) == (0.5, 7)
    assert Recipe(ld_alpha=0.5, max_steps=7).trl_options == {"ld_alpha": 0.5, "max_steps": 7}
    with pytest.raises(RecipeError, match="lerning_rate \\(did you mean learning_rate\\?\\)"):
        Recipe(lerning_rate=1e-4)


def test_assigning_trl_options_keeps_the_training_keys_and_checks_the_options(tmp_path):
    """``recipe.trl_options = {...}`` replaces the other TRL options, not output_dir, max_steps and the other training
    keys of the recipe (which are recipe keys, read as attributes), and converts and checks what it is given."""
    recipe = make_recipe({"output_dir": str(tmp_path / "run"), "max_steps": 5, "use_weighting": True})
    recipe.trl_options = {"ld_alpha": "0.5", "learning_rate": 1e-4}
    assert recipe.trl_options == {
        "output_dir": str(tmp_path / "run"),
        "max_steps": 5,
        "ld_alpha": 0.5,
        "learning_rate": 1e-4,
    }
    assert (recipe.output_dir, recipe.max_steps, recipe.use_weighting) == (str(tmp_path / "run"), 5, False)
    with pytest.raises(RecipeError, match="precompute_ref_log_probs: .*reference: precomputed"):
        recipe.trl_options = {"precompute_ref_log_probs": True}
    with pytest.raises(RecipeError, match="ld_alpha: expected a number"):
        recipe.trl_options = {"ld_alpha": "half"}


@pytest.mark.parametrize(
    "values, match",
    [
        ({"bogus_option": 1}, "unknown recipe key.*bogus_option.*installed TRL"),
        ({"precompute_ref_log_probs": True}, "precompute_ref_log_probs: .*reference: precomputed"),
        ({"use_cpu": True}, "use_cpu: .*device: cpu"),
    ],
)
def test_unknown_and_managed_options_are_one_clear_line(values, match):
    with pytest.raises(RecipeError, match=match):
        make_recipe(values)


def test_loss_weights_are_refused_where_dpo_xpu_weighs_the_terms():
    with pytest.raises(RecipeError, match="loss_weights: dpo_xpu weighs"):
        _kwargs(make_recipe({"nll_loss_coef": 0.5, "loss_weights": [1.0, 0.5]}))


def test_liger_kernel_is_refused_with_the_reason_where_it_is_missing():
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed here")
    with pytest.raises(RecipeError, match="use_liger_kernel: needs the liger-kernel package"):
        _kwargs(make_recipe({"use_liger_kernel": True}))


def test_a_tracker_that_is_not_installed_is_refused_before_anything_loads(monkeypatch):
    import transformers.integrations.integration_utils as trackers

    from dpo_xpu.train.trl_config import validate_recipe

    monkeypatch.setattr(trackers, "is_wandb_available", lambda: False)  # whether or not wandb is installed here
    with pytest.raises(RecipeError, match=r"report_to: WandbCallback requires wandb.*remove it from report_to"):
        validate_recipe(make_recipe({"report_to": ["wandb"]}), use_cpu=True, generation="1.x")
    validate_recipe(make_recipe({"report_to": "none"}), use_cpu=True, generation="1.x")


def test_train_help_documents_the_options():
    from helpers import run_cli

    result = run_cli("train", "--help")
    assert result.returncode == 0
    for name in ("ld_alpha", "use_weighting", "save_total_limit", "warmup_ratio", "report_to", "learning_rate"):
        assert f"\n    {name} = " in result.stdout, name
    assert "\n    save_total_limit = 2 (TRL's default: None): " in result.stdout  # dpo_xpu's default, with why


def test_dpo_xpu_keeps_two_checkpoints_unless_the_recipe_says_otherwise():
    from dpo_xpu.recipes import TRL_DEFAULT_OVERRIDES

    assert TRL_DEFAULT_OVERRIDES["save_total_limit"][0] == 2
    assert _kwargs(make_recipe({}))["save_total_limit"] == 2
    assert _kwargs(make_recipe({"save_total_limit": None}))["save_total_limit"] is None  # keep all
    assert _kwargs(make_recipe({"save_total_limit": 5}))["save_total_limit"] == 5


@pytest.mark.slow
def test_trl_only_options_train_and_are_honoured(stories260k_path, orca_rows_path, tmp_path):
    """ld_alpha, use_weighting, save_total_limit, warmup_ratio and report_to: [tensorboard] in one run."""
    pytest.importorskip("tensorboard", reason="report_to: [tensorboard] needs the tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    recipe = make_recipe(
        {
            **cpu_recipe(
                stories260k_path,
                orca_rows_path,
                run,
                limit=6,
                max_steps=4,
                max_length=320,
                max_prompt_length=192,
                warmup_steps=0,  # so that any warmup comes from warmup_ratio
            ).to_dict(),
            "save_steps": 1,
            "lr_scheduler_type": "linear",
            "ld_alpha": 0.5,
            "use_weighting": True,
            "save_total_limit": 2,
            "warmup_ratio": 0.5,
            "report_to": ["tensorboard"],
        }
    )
    result = run_training(recipe, live_plot=False)
    trainer = result.trainer
    assert trainer.ld_alpha == 0.5 and trainer.use_weighting is True
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]  # the limit of 2
    lrs = [row["learning_rate"] for row in result.metrics if "loss" in row]
    # warmup over half of the 4 steps (the logged rate is the one of the step: 0, half, peak), then linear decay
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(recipe.learning_rate) and lrs[3] < lrs[2]
    events = EventAccumulator(str(next(run.rglob("events.out.tfevents*")).parent))
    events.Reload()
    losses = [scalar.value for scalar in events.Scalars("train/loss")]
    assert losses == pytest.approx([row["loss"] for row in result.metrics if "loss" in row], rel=1e-5)
