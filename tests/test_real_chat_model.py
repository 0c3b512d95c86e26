"""A real instruction-tuned chat model end to end: SmolLM2-135M-Instruct (Llama architecture, ChatML template) on
real orca rows, NF4 + LoRA on the CPU. Slow (about 10 s per step on 2 cores); stories260K keeps the fast tests."""

from __future__ import annotations

import math

import pytest
from helpers import cpu_recipe, run_notebooks

from dpo_xpu.data.preferences import chatml_format
from dpo_xpu.models.loading import load_tokenizer


def test_the_prompt_is_the_models_own_chatml_template(smollm2_path):
    """Its template inserts a default system turn when a row has none; the ChatML markers are single tokens."""
    tokenizer = load_tokenizer(smollm2_path)
    row = {"system": "", "question": "What is the capital of France?", "chosen": "Paris.", "rejected": "Rome."}
    formatted = chatml_format(row, tokenizer)
    assert formatted["prompt"].startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert formatted["prompt"].endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert formatted["chosen"] == "Paris.<|im_end|>\n"
    ids = tokenizer("<|im_start|>user<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") and len(ids) == 3


@pytest.mark.slow
def test_dpo_on_the_real_chat_model_generalises_to_held_out_pairs(smollm2_path, orca_rows_path, tmp_path):
    from dpo_xpu.eval.heldout import evaluate_preferences, generate_samples
    from dpo_xpu.pipeline import load_run_data, run_training

    recipe = cpu_recipe(
        smollm2_path,
        orca_rows_path,
        tmp_path / "run",
        drop_long_rows=True,  # the rows that fit whole in 320 tokens: 30 of the 284
        max_length=320,
        max_prompt_length=200,
        eval_fraction=0.3,
        learning_rate=5e-4,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_steps=12,
    )
    result = run_training(recipe, live_plot=False)
    rows = [r for r in result.metrics if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert rows[0]["step0/logratio_gap"] < 1e-3 and "step0/warning" not in rows[0]
    assert all(math.isfinite(r["loss"]) for r in rows)

    tokenizer = load_tokenizer(smollm2_path)
    _, heldout = load_run_data(recipe, tokenizer)
    policy = result.trainer.model
    report = evaluate_preferences(
        policy, tokenizer, heldout, beta=recipe.beta, max_length=recipe.max_length, max_prompt_length=200
    )
    assert report["n_pairs"] == len(heldout) >= 8
    assert report["reward_accuracy"] > 0.5 and report["mean_margin"] > 0, report
    samples = generate_samples(policy, tokenizer, list(heldout["prompt"][:3]), max_new_tokens=24)
    assert any(s["policy"] != s["reference"] for s in samples), samples


@pytest.mark.slow
@pytest.mark.notebook
def test_notebooks_03_and_04_train_and_evaluate_the_real_chat_model(smollm2_path, orca_rows_path, tmp_path):
    """Notebooks 3 and 4 under papermill on SmolLM2 with the recipe's defaults for the reference and prefix sharing
    (auto: precomputed, since 6 steps of 2 pairs cover all 12 training rows, and prefix sharing on)."""
    import json

    import nbformat

    out = tmp_path / "run"
    params = {
        "model_name_or_path": smollm2_path,
        "dataset_name_or_path": orca_rows_path,
        "output_dir": out,
        "limit": None,  # the 30 of the 284 rows that fit whole in 320 tokens: 12 train, 18 held out
        "eval_fraction": 0.6,
        "max_steps": 6,
        "max_length": 320,
        "max_prompt_length": 200,
        "learning_rate": 5e-4,
        "bf16": False,
        "device": "cpu",
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "warmup_steps": 0,
        "num_eval_samples": 2,
        "max_new_tokens": 16,
        "recipe_overrides": {"drop_long_rows": True, "reference": "auto"},
    }
    result = run_notebooks(params, "--only", "03", "04", timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    executed = nbformat.read(out / "notebooks" / "03_dpo_training.ipynb", as_version=4)
    text = "\n".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "reference: auto -> " in text and "prefix sharing: auto -> on" in text, text[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and losses[0] == pytest.approx(math.log(2), abs=1e-4)
    report = json.loads((out / "evaluation.json").read_text())
    assert report["n_pairs"] == 18 and math.isfinite(report["mean_margin"]), report
