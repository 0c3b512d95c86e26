"""The ``precomputed`` reference: cache hit, a miss on each key change, rebuild of a damaged file, and the
same per-step losses and rewards as ``adapter-off`` (stories260K, a few steps on CPU).

Also checks TRL's chunked per-token log-probs (which every strategy uses instead of full logits) against
``log_softmax`` + ``gather`` on random logits.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import make_trainer, short_recipe

from dpo_xpu import files
from dpo_xpu.files import CACHE_DIR_ENV, weights_digest
from dpo_xpu.train.reference_cache import (
    CacheFileError,
    attach_precomputed_reference,
    load_reference_logps,
    reference_cache_key,
)

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def base(stories260k_path, orca_rows_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    recipe = short_recipe(stories260k_path, orca_rows_path, out / "run")
    return recipe, make_trainer(recipe), out / "cache"


def _key(trainer, recipe, cache):
    return reference_cache_key(trainer, trainer.train_dataset, recipe.to_dict(), memo_dir=cache)[0]


def test_hit_after_miss_gives_same_values(base, tmp_path):
    recipe, _, cache = base
    first = make_trainer(recipe)
    info = attach_precomputed_reference(first, recipe, cache_dir=cache)
    assert not info.hit and info.path.is_file() and info.rows == 6
    assert first.precompute_ref_logps and "ref_chosen_logps" in first.train_dataset.column_names
    second = make_trainer(recipe)
    info2 = attach_precomputed_reference(second, recipe, cache_dir=cache)
    assert info2.hit and info2.key == info.key and info2.path == info.path
    assert first.train_dataset["ref_chosen_logps"] == second.train_dataset["ref_chosen_logps"]
    assert first.train_dataset["ref_rejected_logps"] == second.train_dataset["ref_rejected_logps"]


@pytest.mark.parametrize(
    "change",
    [
        {"max_length": 256},
        {"limit": 5},  # the data
        {"max_prompt_length": 128},
        {"quantization": "none"},
        {"bf16": True},
    ],
    ids=lambda c: next(iter(c)),
)
def test_key_changes_with_setting(base, change):
    recipe, trainer, cache = base
    changed = short_recipe(
        Path(recipe.model_name_or_path), Path(recipe.dataset_name_or_path), Path(recipe.output_dir), **change
    )
    assert _key(make_trainer(changed), changed, cache) != _key(trainer, recipe, cache)


def test_key_changes_with_truncation_mode(base):
    recipe, trainer, cache = base
    before = _key(trainer, recipe, cache)
    trainer.data_collator.truncation_mode = "keep_end"
    try:
        assert _key(trainer, recipe, cache) != before
    finally:
        trainer.data_collator.truncation_mode = "keep_start"
    assert _key(trainer, recipe, cache) == before


def test_key_changes_with_tokenizer_and_chat_template(base):
    recipe, trainer, cache = base
    before = _key(trainer, recipe, cache)
    tokenizer = trainer.processing_class
    saved = tokenizer.chat_template
    tokenizer.chat_template = "{{ messages }}"
    try:
        assert _key(trainer, recipe, cache) != before
    finally:
        tokenizer.chat_template = saved
    tokenizer.add_tokens(["<dpo_xpu_test_token>"])
    assert _key(trainer, recipe, cache) != before


def test_key_changes_with_weights(base, tmp_path):
    from safetensors.torch import load_file, save_file

    recipe, trainer, cache = base
    copy = tmp_path / "model"
    shutil.copytree(recipe.model_name_or_path, copy)
    assert weights_digest(copy) == weights_digest(recipe.model_name_or_path)
    tensors = load_file(copy / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    assert weights_digest(copy) != weights_digest(recipe.model_name_or_path)
    assert weights_digest("org/model", "abc") != weights_digest("org/model", "abd")
    changed = short_recipe(copy, Path(recipe.dataset_name_or_path), Path(recipe.output_dir))
    assert _key(make_trainer(changed), changed, cache) != _key(trainer, recipe, cache)


def test_weights_rewritten_in_place_with_same_size_and_mtime_change_the_key(base, tmp_path):
    """Other weights of the same size written over model.safetensors, its mtime set back: the memo (kept so that a
    14 GB model is not read on every run) must not return the old digest, and the cache key changes."""
    from safetensors.torch import load_file, save_file

    recipe, trainer, _ = base
    copy, memo = tmp_path / "model", tmp_path / "memo"
    shutil.copytree(recipe.model_name_or_path, copy)
    weights = copy / "model.safetensors"
    before_key = reference_cache_key(trainer, trainer.train_dataset, recipe.to_dict(), str(copy), memo_dir=memo)[0]
    before = weights_digest(copy, memo_dir=memo)

    stat = weights.stat()
    tensors = load_file(weights)
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights, metadata={"format": "pt"})
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)

    after = weights_digest(copy, memo_dir=memo)
    assert after != before and after == weights_digest(copy)  # the new bytes' digest, read again
    assert (
        reference_cache_key(trainer, trainer.train_dataset, recipe.to_dict(), str(copy), memo_dir=memo)[0] != before_key
    )


def test_weights_digest_is_remembered_until_a_file_changes(stories260k_path, tmp_path, monkeypatch):
    copy, memo = tmp_path / "model", tmp_path / "memo"
    shutil.copytree(stories260k_path, copy)
    hashed = []
    original = files._hash_weight_files
    monkeypatch.setattr(files, "_hash_weight_files", lambda *a: hashed.append(a) or original(*a))
    first = weights_digest(copy, memo_dir=memo)
    assert weights_digest(copy, memo_dir=memo) == first and len(hashed) == 1  # read once, then remembered
    (copy / "model.safetensors").touch()  # a new mtime, the same bytes: read again, the same digest
    assert weights_digest(copy, memo_dir=memo) == first and len(hashed) == 2
    assert weights_digest(copy) == first and len(hashed) == 3  # no memo: always read


def test_evaluate_on_a_new_dataset_with_the_precomputed_reference(base, tmp_path, monkeypatch):
    """``reference: auto`` resolves to the precomputed reference; ``evaluate`` on rows the trainer never saw computes
    their reference log-probs (adapter-off policy) and, before any update, its rewards are 0 and its loss ln 2."""
    import math

    from dpo_xpu.models.loading import load_tokenizer
    from dpo_xpu.pipeline import load_run_data

    recipe, _, _ = base
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    auto = dataclasses.replace(recipe, reference="auto", output_dir=str(tmp_path / "run"))
    trainer = make_trainer(auto)
    assert trainer.precompute_ref_logps and trainer.reference_cache_info.rows == 6
    tokenizer = load_tokenizer(auto.model_name_or_path)
    train_prompts = set(load_run_data(auto, tokenizer)[0]["prompt"])
    more, _ = load_run_data(dataclasses.replace(auto, limit=12), tokenizer)
    new = more.filter(lambda row: row["prompt"] not in train_prompts).select(range(3))
    # uncut: evaluate cuts the prompts as the run's were cut (TRL alone would drop those longer than max_length)
    assert max(len(tokenizer(p)["input_ids"]) for p in new["prompt"]) > auto.max_prompt_length

    metrics = trainer.evaluate(new)

    assert trainer.reference_cache_by_split["eval"].rows == 3 and not trainer.reference_cache_by_split["eval"].hit
    assert trainer.reference_cache_info is trainer.reference_cache_by_split["train"]
    assert abs(metrics["eval_rewards/chosen"]) < 1e-4 and abs(metrics["eval_rewards/rejected"]) < 1e-4, metrics
    assert metrics["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)
    again = trainer.evaluate(new)  # the same rows again: read from the cache, checked, same values
    assert trainer.reference_cache_by_split["eval"].hit
    assert again["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-6)


def test_miss_on_changed_key_computes(base):
    recipe, _, cache = base
    changed = short_recipe(
        Path(recipe.model_name_or_path), Path(recipe.dataset_name_or_path), Path(recipe.output_dir), max_length=288
    )
    first = attach_precomputed_reference(make_trainer(recipe), recipe, cache_dir=cache)
    other = attach_precomputed_reference(make_trainer(changed), changed, cache_dir=cache)
    assert not other.hit and other.key != first.key and other.path.is_file()


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_damaged_file_is_rebuilt(base, tmp_path, damage):
    recipe, _, _ = base
    cache = tmp_path / "cache"
    good = make_trainer(recipe)
    info = attach_precomputed_reference(good, recipe, cache_dir=cache)
    data = info.path.read_bytes()
    if damage == "truncate":
        info.path.write_bytes(data[: len(data) - 7])
    elif damage == "flip":
        info.path.write_bytes(data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:])
    else:
        info.path.write_bytes(b"not a safetensors file")
    with pytest.raises(CacheFileError):
        load_reference_logps(info.path, info.key, info.rows)
    again = make_trainer(recipe)
    rebuilt = attach_precomputed_reference(again, recipe, cache_dir=cache)
    assert not rebuilt.hit and rebuilt.rebuilt
    assert again.train_dataset["ref_chosen_logps"] == good.train_dataset["ref_chosen_logps"]
    load_reference_logps(rebuilt.path, rebuilt.key, rebuilt.rows)  # valid again


def test_wrong_rows_or_key_rejected(base, tmp_path):
    recipe, _, _ = base
    info = attach_precomputed_reference(make_trainer(recipe), recipe, cache_dir=tmp_path)
    with pytest.raises(CacheFileError, match="rows"):
        load_reference_logps(info.path, info.key, info.rows + 1)
    with pytest.raises(CacheFileError, match="key"):
        load_reference_logps(info.path, "0" * 64, info.rows)


def test_precomputed_equals_adapter_off_per_step(base, tmp_path):
    """The precomputed reference is the adapter-off one: at step 1 (no update yet) loss and rewards agree within
    1e-4; over 3 steps at lr 1e-2 (so the policy moves) and on every batch the rewards agree within 0.5% of their
    scale. Not 1e-4 after step 1: the precompute batches rows by length, so its sums round differently (3e-5 nats
    on the AVX-512 CI machine), and Adam's early steps amplify that (7e-3 in rewards of about 7 by step 3, 0.1% of
    their scale), by an amount that depends on the CPU's kernels. A misaligned or wrong reference moves a reward by
    several tenths."""
    recipe, _, _ = base
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins")

    def steps(precomputed: bool) -> list[dict]:
        # one run folder per trainer: a second training on one folder is refused (its metrics would mix)
        trainer = make_trainer(dataclasses.replace(recipe, output_dir=str(tmp_path / f"run-{precomputed}")))
        if precomputed:
            attach_precomputed_reference(trainer, recipe, cache_dir=tmp_path / "cache")
        trainer.train()
        return [{k: row[k] for k in keys} for row in trainer.state.log_history if "loss" in row]

    adapter_off, precomputed = steps(False), steps(True)
    assert len(adapter_off) == len(precomputed) == 3
    assert adapter_off[-1]["rewards/margins"] != 0.0  # the policy did move away from the reference
    for k in keys:
        assert adapter_off[0][k] == pytest.approx(precomputed[0][k], abs=1e-4), (k, adapter_off[0], precomputed[0])
    for a, b in zip(adapter_off, precomputed):
        scale = max(abs(a["rewards/chosen"]), abs(a["rewards/rejected"]))
        for k in keys[1:]:
            assert a[k] == pytest.approx(b[k], abs=1e-4 + 5e-3 * scale), (k, a, b)


@pytest.mark.parametrize("outputs", [("log_probs",), ("log_probs", "entropy")])
def test_trl_chunked_logprobs_equal_log_softmax_gather(outputs):
    """TRL's chunked log-prob kernel (torch path on CPU) equals log_softmax + gather within 1e-5, with grads."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    torch.manual_seed(0)
    tokens, hidden_size, vocab = 37, 16, 1000
    hidden = torch.randn(tokens, hidden_size, dtype=torch.float64).float().requires_grad_()
    weight = torch.randn(vocab, hidden_size).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,))
    chunked = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 128, None, 1.0, outputs)[0]
    plain = torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    assert torch.allclose(chunked, plain, atol=1e-5, rtol=0)
    g1 = torch.autograd.grad(chunked.sum(), (hidden, weight))
    g2 = torch.autograd.grad(plain.sum(), (hidden, weight))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
