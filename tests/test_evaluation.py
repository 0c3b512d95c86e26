"""dpo_xpu.eval.heldout, dpo_xpu.outputs.merge and dpo_xpu.data.lengths on the real stories260K model and orca rows."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dpo_xpu import (
    check_merged_logits,
    evaluate_preferences,
    format_orca_dataset,
    generate_samples,
    length_summary,
    load_orca_dpo_pairs,
    load_policy_model,
    load_run_recipe,
    load_tokenizer,
    merge_and_save,
    sequence_log_probs,
    token_lengths,
    write_evaluation,
)
from dpo_xpu.errors import RecipeError, RunFolderError
from dpo_xpu.recipes import Recipe


@pytest.fixture(scope="module")
def tokenizer(stories260k_path):
    return load_tokenizer(stories260k_path)


@pytest.fixture(scope="module")
def pairs(orca_rows_path, tokenizer):
    return format_orca_dataset(load_orca_dpo_pairs(orca_rows_path, limit=4, seed=0), tokenizer)


def _policy(path):
    torch.manual_seed(0)  # LoRA A's random init: the same adapter in every run (a merge's greedy check depends on it)
    return load_policy_model(path, device="cpu", dtype=torch.float32)


def _train_adapter(policy, seed=0, std=0.05):
    """Stand-in for training: random LoRA B matrices (at init they are zero)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * std
    return policy


def test_adapter_off_reference_at_init_gives_zero_margins(stories260k_path, tokenizer, pairs):
    metrics = evaluate_preferences(_policy(stories260k_path), tokenizer, pairs, beta=0.1)
    assert metrics["n_pairs"] == 4 and metrics["beta"] == 0.1
    for key in ("mean_margin", "mean_chosen_reward", "mean_rejected_reward", "drift_chosen_logratio"):
        assert metrics[key] == 0.0, key
    assert metrics["reward_accuracy"] == 0.0  # ties are not wins


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_sequence_log_probs_equals_a_direct_computation(stories260k_path, tokenizer, pairs, padding_side):
    model = _train_adapter(_policy(stories260k_path)).eval()
    tokenizer.padding_side = padding_side
    prompt, answer = pairs[1]["prompt"], pairs[1]["chosen"]
    ids = tokenizer(prompt + answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        log_probs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    direct = log_probs[torch.arange(ids.shape[1] - 1), ids[0, 1:]][n_prompt - 1 :].sum()
    # batched with a pair of another length, so padding is exercised
    batched = sequence_log_probs(model, tokenizer, [pairs[0]["prompt"], prompt], [pairs[0]["rejected"], answer])
    assert batched.shape == (2,) and batched.dtype == torch.float32
    assert batched[1].item() == pytest.approx(direct.item(), abs=1e-3)
    tokenizer.padding_side = "left"


def test_sequence_log_probs_cuts_like_trl(stories260k_path, tokenizer, pairs):
    model = _policy(stories260k_path)
    prompts, answers = pairs["prompt"][:2], pairs["chosen"][:2]
    full = sequence_log_probs(model, tokenizer, prompts, answers)
    cut = sequence_log_probs(model, tokenizer, prompts, answers, max_length=200, max_prompt_length=100)
    nothing_left = sequence_log_probs(model, tokenizer, prompts, answers, max_length=100, max_prompt_length=100)
    assert torch.all(cut > full) and torch.all(cut < 0)  # fewer answer tokens, each log-prob < 0
    assert torch.all(nothing_left == 0)
    with pytest.raises(ValueError, match="one answer per prompt"):
        sequence_log_probs(model, tokenizer, prompts, answers[:1])


def test_trained_adapter_moves_rewards_and_generations_are_side_by_side(stories260k_path, tokenizer, pairs, capsys):
    policy = _train_adapter(_policy(stories260k_path))
    metrics = evaluate_preferences(policy, tokenizer, pairs, beta=0.1, batch_size=2, progress=True)
    shown = capsys.readouterr().err  # a progress bar over the 4 x 4 scored sequences
    assert "scoring pairs: 100%" in shown and "16/16" in shown
    assert metrics["drift_chosen_logratio"] != 0.0
    assert math.isclose(
        metrics["mean_margin"], metrics["mean_chosen_reward"] - metrics["mean_rejected_reward"], rel_tol=1e-5
    )
    assert math.isclose(metrics["mean_chosen_reward"], 0.1 * metrics["drift_chosen_logratio"], rel_tol=1e-4)
    samples = generate_samples(policy, tokenizer, pairs["prompt"][:2], max_new_tokens=8)
    assert [s["prompt"] for s in samples] == pairs["prompt"][:2]
    assert all(set(s) == {"prompt", "policy", "reference"} for s in samples)
    assert any(s["policy"] != s["reference"] for s in samples)
    # one prompt per generate call, with a progress bar over the answers: the same answers as one batch
    assert generate_samples(policy, tokenizer, pairs["prompt"][:2], 8, batch_size=1, progress=True) == samples
    assert "generating answers: 100%" in capsys.readouterr().err
    at_init = generate_samples(_policy(stories260k_path), tokenizer, pairs["prompt"][:1], max_new_tokens=8)
    assert at_init[0]["policy"] == at_init[0]["reference"]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, stories260k_path, tokenizer):
    folder = tmp_path_factory.mktemp("adapter")
    _train_adapter(_policy(stories260k_path)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_merged_bf16_model_reproduces_the_adapter_logits(tmp_path, adapter_dir, stories260k_path, pairs):
    merged = merge_and_save(adapter_dir, stories260k_path, tmp_path / "merged")
    assert (merged / "config.json").exists() and (merged / "tokenizer.json").exists()
    check = check_merged_logits(merged, adapter_dir, pairs["prompt"][:2], stories260k_path)
    assert check["weights_dtype"] == "bfloat16" and check["compute_dtype"] == "float32"
    assert check["max_abs_diff"] <= 0.02 * check["max_abs_logit"]  # one bf16 rounding of the merged weights
    assert check["max_abs_diff"] < check["adapter_effect"] / 5
    assert check["effect_ratio"] == pytest.approx(check["max_abs_diff"] / check["adapter_effect"])
    assert check["greedy_texts"] == 2 and len(check["greedy_first_difference"]) == 2


def test_merge_in_float32_is_exact_to_rounding(tmp_path, adapter_dir, stories260k_path, pairs):
    merged = merge_and_save(adapter_dir, None, tmp_path / "merged32", dtype=torch.float32)
    check = check_merged_logits(merged, adapter_dir, pairs["prompt"][:1], dtype=torch.float32)
    assert check["max_abs_diff"] < 1e-3 < check["adapter_effect"]


def test_merge_checked_keeps_bf16_where_it_matches_and_falls_back_to_float32_with_the_reason(
    tmp_path, adapter_dir, stories260k_path, pairs
):
    from dpo_xpu.outputs.merge import merge_checked

    texts = pairs["prompt"][:2]
    out, kept = merge_checked(adapter_dir, stories260k_path, tmp_path / "merged", texts)
    assert out == tmp_path / "merged" and kept["weights_dtype"] == "bfloat16"
    assert kept["matches"] is True and kept["fallback"] is None
    assert kept["effect_ratio"] <= kept["rtol"] and kept["greedy_same"] == kept["greedy_texts"] == 2
    # a bound the bf16 rounding cannot meet: the float32 merge is saved instead, and the report says why
    strict = kept["effect_ratio"] / 2
    _, fell_back = merge_checked(adapter_dir, stories260k_path, tmp_path / "merged", texts, rtol=strict)
    assert fell_back["weights_dtype"] == "float32" and "saved in float32" in fell_back["fallback"]
    assert "of the adapter's own effect" in fell_back["fallback"] and fell_back["matches"] is True
    assert fell_back["max_abs_diff"] < kept["max_abs_diff"] / 10
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "float32"


def test_merge_judged_against_the_adapters_effect_and_greedy_text():
    from dpo_xpu.outputs.merge import merge_mismatch

    # SmolLM2 after a short run: 1% of the largest logit, but 60% of what the adapter does: not a faithful merge
    report = dict(max_abs_diff=0.419, adapter_effect=0.692, effect_ratio=0.419 / 0.692, max_abs_logit=38.9)
    assert "61% of the adapter's own effect" in merge_mismatch({**report, "greedy_same": 3, "greedy_texts": 3}, 0.1)
    # logits close, but one greedy continuation changed: not faithful either
    close = {**report, "max_abs_diff": 0.01, "effect_ratio": 0.01 / 0.692, "greedy_same": 2, "greedy_texts": 3}
    assert merge_mismatch(close, 0.1) == "changed the greedy text of 1 of 3 prompts"
    assert merge_mismatch({**close, "greedy_same": 3}, 0.1) == ""  # faithful: nothing to say


def test_write_evaluation_and_refuse_non_finite(tmp_path):
    samples = [{"prompt": "p", "policy": "a", "reference": "b"}]
    eval_path, samples_path = write_evaluation(tmp_path, {"reward_accuracy": 0.75, "merge": {"ok": True}}, samples)
    assert json.loads(eval_path.read_text())["reward_accuracy"] == 0.75
    assert [json.loads(line) for line in samples_path.read_text().splitlines()] == samples
    with pytest.raises(ValueError, match="not finite"):
        write_evaluation(tmp_path, {"mean_margin": float("nan")})


def test_load_run_recipe_checks_the_split_settings(tmp_path):
    with pytest.raises(RunFolderError, match="train first"):
        load_run_recipe(tmp_path)
    Recipe(limit=64, eval_fraction=0.125).save(tmp_path / "recipe.yaml")
    assert load_run_recipe(tmp_path, limit=64, seed=42).eval_fraction == 0.125
    with pytest.raises(RecipeError, match="limit: run has 64, given 32"):
        load_run_recipe(tmp_path, limit=32)


def test_token_lengths_and_what_max_length_keeps(tokenizer, pairs):
    lengths = token_lengths(pairs, tokenizer)
    assert all(len(v) == 4 and min(v) > 0 for v in lengths.values())
    whole = length_summary(lengths, max_length=4096, max_prompt_length=2048)
    assert whole["kept_whole"] == 4 and whole["truncated"] == whole["dropped"] == whole["prompt_cut"] == 0
    tight = length_summary(lengths, max_length=min(lengths["prompt"]) + 1, max_prompt_length=None)
    assert tight["kept_whole"] == 0 and tight["truncated"] + tight["dropped"] == 4
