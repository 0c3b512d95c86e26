"""A 2-step run on a generic prompt/chosen/rejected JSONL (made from the real orca rows) with evaluation every
step and at step 0: eval/ rows in metrics.jsonl, and policy + reference samples in eval_samples.jsonl."""

from __future__ import annotations

import json

import pytest
from helpers import config_kwargs, cpu_recipe

from dpo_xpu.callbacks.metrics import EVAL_SAMPLES_FILE
from dpo_xpu.pipeline import run_training
from dpo_xpu.recipes import Recipe


def test_eval_settings_need_eval_steps_and_an_eval_split():
    assert "eval_strategy" not in config_kwargs(Recipe(eval_fraction=0.1), "1.x")
    assert "eval_strategy" not in config_kwargs(Recipe(eval_steps=5), "1.x")
    kwargs = config_kwargs(Recipe(eval_steps=5, eval_fraction=0.1, per_device_train_batch_size=3), "1.x")
    assert kwargs["eval_strategy"] == "steps" and kwargs["eval_steps"] == 5 and kwargs["eval_on_start"] is True
    assert kwargs["per_device_eval_batch_size"] == 3
    assert "eval_strategy" not in config_kwargs(Recipe(eval_steps=5, eval_fraction=0.1), "1.x", has_eval_dataset=False)


@pytest.fixture(scope="module")
def generic_run(stories260k_path, orca_rows_path, tmp_path_factory):
    base = tmp_path_factory.mktemp("generic")
    rows = [json.loads(line) for line in orca_rows_path.read_text().splitlines()[:10]]
    data = base / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": r["question"], "chosen": r["chosen"], "rejected": r["rejected"]}) + "\n" for r in rows
        )
    )
    recipe = cpu_recipe(
        stories260k_path,
        data,
        base / "run",
        data_format="prompt-chosen-rejected",
        warmup_steps=0,
        max_steps=2,
        eval_fraction=0.2,
        eval_steps=1,
        num_eval_samples=2,
        max_new_tokens=4,
    )
    return recipe, run_training(recipe, live_plot=False)


def test_eval_rows_at_step_zero_and_every_eval_steps(generic_run):
    recipe, result = generic_run
    evals = [row for row in result.metrics if "eval/loss" in row]
    assert [row["step"] for row in evals] == [0, 1, 2]
    assert [row["step"] for row in result.metrics if "loss" in row] == [1, 2]
    for row in evals:
        for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
            assert isinstance(row["eval/" + key], float), key
        assert row["eval/drift_chosen_logratio"] == pytest.approx(row["eval/rewards/chosen"] / recipe.beta)
    assert evals[0]["eval/loss"] == pytest.approx(0.6931, abs=1e-3)  # before any step, policy == reference


def test_eval_samples_hold_policy_and_reference_per_prompt_and_evaluation(generic_run):
    _, result = generic_run
    lines = [json.loads(line) for line in (result.run_dir / EVAL_SAMPLES_FILE).read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 0, 1, 1, 2, 2]
    assert len({line["prompt"] for line in lines}) == 2
    for line in lines:
        assert set(line) == {"step", "prompt", "policy", "reference"}
        assert line["prompt"].endswith("<|im_start|>assistant\n") and "<|im_start|>system" not in line["prompt"]
    assert lines[0]["policy"] == lines[0]["reference"]  # step 0: the adapter has not moved yet


def test_generic_run_writes_its_data_report(generic_run):
    _, result = generic_run
    report = json.loads((result.run_dir / "data_report.json").read_text())
    assert report == {"data_format": "prompt-chosen-rejected", "rows": 10, "train_rows": 8, "eval_rows": 2}
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
