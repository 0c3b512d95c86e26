"""The trainer factory on the installed TRL generation (each environment runs this file with its own TRL:
TRL 1.x in .venv, TRL 0.11 in .venv-ipex-llm)."""

from __future__ import annotations

import math

import pytest
from helpers import config_kwargs, cpu_recipe

from dpo_xpu.data.truncation import truncate_prompts
from dpo_xpu.errors import RecipeError
from dpo_xpu.models.loading import load_tokenizer
from dpo_xpu.pipeline import run_training
from dpo_xpu.recipes import Recipe
from dpo_xpu.train.trl_internals import trl_generation


@pytest.mark.parametrize(
    "loss_type, generation",
    [("sigmoid_norm", "0.11"), ("discopop", "0.11"), ("aot_pair", "1.x")],
)
def test_a_loss_the_installed_trl_lacks_is_refused(loss_type, generation):
    with pytest.raises(RecipeError) as err:
        config_kwargs(Recipe(loss_type=loss_type), generation)
    assert "loss_type" in str(err.value) and f"TRL {generation}" in str(err.value)


def test_config_kwargs_per_generation():
    recipe = Recipe(max_prompt_length=100, max_length=300)
    old, new = config_kwargs(recipe, "0.11"), config_kwargs(recipe, "1.x")
    assert old["max_prompt_length"] == 100 and "max_prompt_length" not in new
    assert old["loss_type"] == "sigmoid" and new["loss_type"] == ["sigmoid"]
    assert new["optim"] == "adamw_torch" and isinstance(new["bf16"], bool)
    # the ipex-llm example's optimizer and checkpointing (reentrant: no kwargs) on TRL 0.11; non-reentrant on 1.x
    assert old["optim"] == "adamw_hf" and "gradient_checkpointing_kwargs" not in old
    assert new["gradient_checkpointing_kwargs"] == {"use_reentrant": False}


def test_installed_trl_accepts_the_config(tmp_path):
    from trl import DPOConfig

    config = DPOConfig(**config_kwargs(Recipe(output_dir=str(tmp_path), bf16=False), trl_generation(), use_cpu=True))
    assert config.beta == 0.1 and config.learning_rate == 5e-5 and config.lr_scheduler_type == "cosine"


def test_truncate_prompts_keeps_the_end_on_a_token_boundary(qwen2_tokenizer_path):
    from datasets import Dataset

    tok = load_tokenizer(qwen2_tokenizer_path)
    long_prompt = (
        "<|im_start|>user\n" + " ".join(f"word{i}" for i in range(200)) + "<|im_end|>\n<|im_start|>assistant\n"
    )
    short_prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ds = Dataset.from_list([{"prompt": long_prompt}, {"prompt": short_prompt}])
    out = truncate_prompts(ds, tok, 32)
    cut = out[0]["prompt"]
    assert long_prompt.endswith(cut) and len(cut) < len(long_prompt)
    ids = tok(cut, add_special_tokens=False)["input_ids"]
    full = tok(long_prompt, add_special_tokens=False)["input_ids"]
    assert ids == full[-32:]
    assert out[1]["prompt"] == short_prompt


@pytest.mark.slow
def test_factory_trains_with_max_prompt_length_on_the_installed_trl(stories260k_path, orca_rows_path, tmp_path):
    """The original recipe's max_prompt_length works on both generations (dpo_xpu cuts prompts on TRL 1.x)."""
    recipe = cpu_recipe(
        stories260k_path,
        orca_rows_path,
        tmp_path / "run",
        quantization="none",
        limit=6,
        max_steps=2,
        max_length=700,
        max_prompt_length=64,
        warmup_steps=0,
    )
    result = run_training(recipe, live_plot=False)
    rows = [r for r in result.metrics if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=0.01)
    assert all(math.isfinite(r["loss"]) for r in rows)
    from trl import DPOTrainer

    assert isinstance(result.trainer, DPOTrainer)
    assert trl_generation() in ("0.11", "1.x")


def test_cpu_scores_only_answer_tokens_with_the_same_log_probs(stories260k_path, monkeypatch):
    """TRL 1.x's fused LM head under dpo_xpu's CPU switches (answer tokens only, narrow tiles): same numbers."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    if not hasattr(trl_utils, "add_fused_lm_head"):
        pytest.skip("this TRL has no fused LM head (TRL 0.11)")
    import torch
    from transformers import AutoModelForCausalLM

    from dpo_xpu.train.trl_internals import cpu_lm_head

    model = AutoModelForCausalLM.from_pretrained(stories260k_path, dtype=torch.float32).eval()
    trl_utils.add_fused_lm_head(model)
    tok = load_tokenizer(stories260k_path)
    batch = tok(
        ["Once upon a time there was a cat.", "Lily saw a dog in the big park today."],
        return_tensors="pt",
        padding=True,
    )
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :4] = -100  # the "prompt": not scored
    rows_scored = []
    apply = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(
        trl_utils._ChunkedLogProbFunction,
        "apply",
        lambda hidden, *a: rows_scored.append(hidden.shape[0]) or apply(hidden, *a),
    )
    trl_own = trl_utils._use_triton
    with torch.no_grad():
        every = model(**batch, labels=labels, fused_lm_head=True).log_probs
        with cpu_lm_head() as switched:
            assert switched
            compact = model(**batch, labels=labels, fused_lm_head=True).log_probs
        assert trl_utils._use_triton is trl_own  # restored: a plain DPOTrainer built later keeps TRL's behaviour
        again = model(**batch, labels=labels, fused_lm_head=True).log_probs
    n_labels = int((labels[:, 1:] != -100).sum())
    total = labels[:, 1:].numel()
    assert rows_scored == [total, n_labels, total] and n_labels < total
    assert torch.equal(every, again)
    assert torch.allclose(every, compact, atol=1e-6)
    assert every.abs().sum() > 0
