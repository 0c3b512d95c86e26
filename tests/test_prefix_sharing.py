"""Prefix sharing: the packed layouts (one row per pair, and padding-free: several pairs per row), the same per-token
log-probs and gradients as TRL's two sequences, the same losses per step through training, the first loss ln 2, and
the refusals and fallbacks (ipex-llm, TRL 0.11, flash attention, eager)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from dpo_xpu.errors import RecipeError
from dpo_xpu.train.prefix_sharing import PrefixSharing, check_prefix_sharing, pack_pairs

pytest.importorskip("trl")


def _trl_batch(pairs: list[tuple[list[int], list[int], list[int]]], pad: int = 0) -> dict[str, torch.Tensor]:
    """TRL 1.x's collator layout: chosen rows then rejected rows, prompt + answer, right-padded."""
    rows = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    answer = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        mask[i, : len(p) + len(a)] = 1
        answer[i, len(p) : len(p) + len(a)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(answer == 0, -100)}


def test_pack_layout_positions_labels_and_mask():
    batch = _trl_batch([([11, 12, 13], [21, 22], [31, 32, 33]), ([14, 15], [23], [34, 35])])
    packed = pack_pairs(**batch)
    assert packed is not None
    # prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected, then padding
    assert packed.input_ids[0].tolist() == [11, 12, 13, 21, 22, 13, 31, 32, 33]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 5]
    assert packed.next_tokens[0].tolist() == [-100, -100, 21, 22, -100, 31, 32, 33, -100]
    assert packed.input_ids[1, :6].tolist() == [14, 15, 23, 15, 34, 35]
    assert packed.position_ids[1, :6].tolist() == [0, 1, 2, 1, 2, 3]
    assert packed.next_tokens[1].tolist() == [-100, 23, -100, 34, 35, -100, -100, -100, -100]
    assert (packed.sequence_tokens, packed.packed_tokens) == (5 + 6 + 3 + 4, 9 + 6)
    mask = packed.attention_mask[0, 0]
    chosen, rejected = [2, 3, 4], [5, 6, 7, 8]
    for q in rejected:
        assert not mask[q, chosen].any(), "a rejected token saw the chosen answer"
        assert mask[q, :2].all() and mask[q, 5 : q + 1].all() and not mask[q, q + 1 :].any()
    for q in chosen:
        assert mask[q, : q + 1].all() and not mask[q, q + 1 :].any()
    assert mask.any(dim=-1).all() and packed.attention_mask[1, 0].any(dim=-1).all()  # no empty row (sdpa NaN)


def test_padding_free_rows_keep_each_pair_apart():
    """Three pairs, a 16-token budget: pairs 0 and 1 share a row (9 + 6 tokens), pair 2 starts the next."""
    batch = _trl_batch([([11, 12, 13], [21, 22], [31, 32, 33]), ([14, 15], [23], [34, 35]), ([16], [24], [36])])
    packed = pack_pairs(**batch, row_tokens=16)
    assert packed.input_ids.shape == (2, 15)
    assert packed.input_ids[0].tolist() == [11, 12, 13, 21, 22, 13, 31, 32, 33, 14, 15, 23, 15, 34, 35]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 5, 0, 1, 2, 1, 2, 3]  # restart per pair
    assert packed.input_ids[1, :4].tolist() == [16, 24, 16, 36] and (packed.segments[1, 4:] == 3).all()
    assert (packed.segments[0] != 3).all()  # no padding in a full row
    mask = packed.attention_mask[0, 0]
    assert not mask[9:, :9].any(), "a token saw the pair before its own"
    assert torch.equal(mask[9:12, 9:12], torch.ones(3, 3, dtype=torch.bool).tril())  # prompt 14, chosen 15 23
    assert mask[12:, 9].all() and not mask[12:, 10:12].any()  # the rejected branch: its prompt, not the chosen
    assert mask.any(dim=-1).all() and packed.attention_mask[1, 0].any(dim=-1).all()
    assert pack_pairs(**batch, row_tokens=100).input_ids.shape == (1, 19)  # everything in one row
    assert pack_pairs(**batch, row_tokens=1).input_ids.shape == (3, 9)  # a pair over budget: a row of its own


@pytest.mark.parametrize("row_tokens", [None, 16, 100])
def test_unpack_puts_values_at_trl_positions(row_tokens):
    batch = _trl_batch([([11, 12, 13], [21, 22], [31, 32, 33]), ([14, 15], [23], [34, 35]), ([16], [24], [36])])
    packed = pack_pairs(**batch, row_tokens=row_tokens)
    # value = the label itself, so every value shows where it landed
    values = packed.next_tokens.clamp(min=0).float()
    out = packed.unpack(values)
    expected = batch["labels"][:, 1:].clamp(min=0).float()
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    "batch",
    [
        _trl_batch([([11, 12], [21], [31]), ([14, 15], [23], [34])]),
        {k: v[:3] for k, v in _trl_batch([([11, 12], [21], [31]), ([14, 15], [23], [34])]).items()},
    ],
    ids=["different-prompts", "odd-rows"],
)
def test_pack_declines_other_layouts(batch):
    if batch["input_ids"].size(0) == 4:  # make the pair's two prompts differ
        batch["input_ids"][2, 0] = 99
    assert pack_pairs(**batch) is None


def _demo_policy(tmp_path, attn: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from dpo_xpu.demo import build_demo_model

    folder = build_demo_model(tmp_path / "demo-model")
    torch.manual_seed(0)
    pairwise = attn == "pairs"  # sdpa, pair by pair (dpo_xpu.train.pair_attention)
    model = AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="sdpa" if pairwise else attn, dtype=torch.float32
    )
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(model, config)
    for name, param in model.named_parameters():  # B = 0 at init: give the adapter an effect on the logits
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    if pairwise:
        from dpo_xpu.train.pair_attention import install_pair_attention

        install_pair_attention(model)
    return model


@pytest.mark.parametrize(
    ("attn", "row_tokens"),
    [
        ("sdpa", None),
        ("eager", None),
        ("sdpa", 10_000),
        ("sdpa", 160),
        ("eager", 10_000),
        ("pairs", None),
        ("pairs", 10_000),
        ("pairs", 160),
    ],
)
def test_packed_forward_equals_two_sequences(tmp_path, monkeypatch, attn, row_tokens):
    """TRL's two-sequence forward against prefix sharing, one row per pair (``None``) and padding-free (all pairs in
    one row; 160: two rows): per-token log-probs within 1e-5 (float32), the other outputs within 1e-4, and the LoRA
    gradients within 1e-4 relative; on the demo model, random pairs of uneven lengths. ``pairs``: sdpa computed
    pair by pair on the packed rows (the CPU's default), which must also see the spans of every pair."""
    model = _demo_policy(tmp_path, attn)
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size

    def toks(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    batch = _trl_batch([(toks(40), toks(25), toks(31)), (toks(17), toks(30), toks(6)), (toks(9), toks(1), toks(12))])
    with_spans: list[bool] = []  # per attention call: did it run pair by pair
    if attn == "pairs":
        from transformers import AttentionInterface

        from dpo_xpu.train.pair_attention import PAIR_ATTENTION

        inner = AttentionInterface._global_mapping[PAIR_ATTENTION]

        def spy(*args, **kwargs):
            with_spans.append(kwargs.get("pair_spans") is not None)
            return inner(*args, **kwargs)

        monkeypatch.setitem(AttentionInterface._global_mapping, PAIR_ATTENTION, spy)

    def run(shared: bool):
        model.zero_grad()
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        if shared:
            with PrefixSharing(model, row_tokens=row_tokens) as sharing:
                out = model(**kwargs, labels=batch["labels"], fused_lm_head=True)
            assert sharing.tokens["packed"] < sharing.tokens["sequence"]
            rows = pack_pairs(batch["input_ids"], batch["attention_mask"], batch["labels"], row_tokens).input_ids
            assert rows.size(0) == {None: 3, 10_000: 1, 160: 2}[row_tokens]
        else:
            out = model(**kwargs, labels=batch["labels"], fused_lm_head=True)
        sums = out.log_probs.sum(dim=1)
        (sums[:3] - sums[3:]).sum().backward()  # a DPO-like objective: both answers get gradients
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    plain, plain_grads = run(False)
    assert not any(with_spans)  # an unpacked call runs transformers' sdpa
    shared, shared_grads = run(True)
    assert all(with_spans[len(with_spans) // 2 :]) and (attn == "pairs") == bool(with_spans)
    for field, tolerance in (("log_probs", 1e-5), ("entropy", 1e-4), ("mean_logits", 1e-4)):
        a, b = getattr(plain, field), getattr(shared, field)
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=tolerance, rtol=0), (field, (a - b).abs().max())
    assert torch.equal(plain.is_top1, shared.is_top1) and torch.equal(plain.label_mask, shared.label_mask)
    assert (plain.log_probs != 0).sum() == batch["labels"][:, 1:].ne(-100).sum()
    assert plain_grads.keys() == shared_grads.keys() and plain_grads
    for name, g in plain_grads.items():
        scale = g.abs().max().clamp(min=1e-8)
        assert (g - shared_grads[name]).abs().max() / scale < 1e-4, name


def test_prefix_sharing_trains_to_the_same_losses(stories260k_path, orca_rows_path, tmp_path, caplog):
    """adapter-off without prefix sharing, with it one row per pair and padding-free, and precomputed + sharing
    (padding-free): each of 3 steps within 1e-4, the first loss ln 2 within 1e-4.

    At the original recipe's lr (5e-5). At lr 1e-2, Adam's first update (lr x sign of each gradient) turns the
    float rounding of near-zero gradients into full-size steps, so any change of summation order drifts apart
    (3e-3 by step 2 on this model, also for two unpacked layouts); the gradients themselves are compared in
    ``test_packed_forward_equals_two_sequences``.
    """
    from helpers import make_trainer, short_recipe

    from dpo_xpu.train.reference_cache import attach_precomputed_reference

    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins")

    def steps(precompute: bool = False, unpacked: bool = False, **overrides) -> tuple[list[dict], dict | None]:
        out = tmp_path / f"run-{precompute}-{unpacked}-{sorted(overrides.items())}"  # one folder per run
        recipe = short_recipe(stories260k_path, orca_rows_path, out, learning_rate=5e-5, **overrides)
        with caplog.at_level(logging.INFO, logger="dpo_xpu.train.factory"):
            trainer = make_trainer(recipe)
        if recipe.prefix_sharing is True:
            # stories260K (hidden 64) is attention-bound: rows of 2 x max_length; here a micro-batch in one row
            assert trainer.packing_row_tokens == 2 * 320 and "packing: on: several pairs per row" in caplog.text
            trainer.packing_row_tokens = None if unpacked else 2 * 2 * 320  # None: prefix_sharing: unpacked
        if precompute:
            attach_precomputed_reference(trainer, recipe, cache_dir=tmp_path / "cache")
        trainer.train()
        rows = [{k: row[k] for k in keys} for row in trainer.state.log_history if "loss" in row]
        return rows, getattr(trainer, "prefix_sharing_tokens", None)

    plain, _ = steps()
    shared, counts = steps(prefix_sharing=True)
    unpacked, unpacked_counts = steps(prefix_sharing=True, unpacked=True)
    cached, cached_counts = steps(precompute=True, prefix_sharing=True)
    assert counts["packed"] < 0.8 * counts["sequence"]  # orca prompts are long: the saving is real
    # the precompute ran packed too: its one pass over the 6 rows replaces the per-step reference passes
    assert cached_counts == counts == unpacked_counts
    assert plain[-1]["rewards/margins"] != 0.0  # the policy moved away from the reference
    for run in (plain, shared, unpacked, cached):
        assert run[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    for other in (shared, unpacked, cached):
        for a, b in zip(plain, other, strict=True):
            for k in keys:
                assert a[k] == pytest.approx(b[k], abs=1e-4), (k, a, b)


def test_refusals():
    from dpo_xpu.recipes import Recipe

    with pytest.raises(RecipeError, match="native backend"):
        Recipe(backend="ipex-llm", prefix_sharing=True)
    model = torch.nn.Linear(2, 2)
    model.config = type("Config", (), {"_attn_implementation": "flash_attention_2"})()
    with pytest.raises(RecipeError, match="sdpa or eager"):
        check_prefix_sharing(model, "1.x")
    model.config._attn_implementation = "sdpa"
    check_prefix_sharing(model, "1.x")
    with pytest.raises(RecipeError, match="TRL >= 1.0"):
        check_prefix_sharing(model, "0.11")


def test_auto_turns_on_where_it_runs_and_says_why_where_it_does_not():
    """prefix_sharing: auto (the default) is the refusals above turned into a fallback with the reason."""
    from dpo_xpu.recipes import Recipe, make_recipe
    from dpo_xpu.train.prefix_sharing import prefix_sharing_decision

    assert Recipe().prefix_sharing == "auto"
    assert Recipe(backend="ipex-llm").prefix_sharing == "auto"  # no refusal: auto falls back on that stack
    assert make_recipe({"prefix_sharing": "Auto"}).prefix_sharing == "auto"
    assert make_recipe({"prefix_sharing": "false"}).prefix_sharing is False
    with pytest.raises(RecipeError, match="prefix_sharing: 'maybe' is not one of auto, true, false"):
        Recipe(prefix_sharing="maybe")
    model = torch.nn.Linear(2, 2)
    model.config = type("Config", (), {"_attn_implementation": "sdpa"})()
    assert prefix_sharing_decision("auto", model, "1.x")[0] is True
    on, why = prefix_sharing_decision("auto", model, "0.11")
    assert on is False and "auto -> off" in why and "TRL >= 1.0" in why
    model.config._attn_implementation = "flash_attention_2"
    on, why = prefix_sharing_decision("auto", model, "1.x")
    assert on is False and "flash_attention_2" in why
    with pytest.raises(RecipeError, match="sdpa or eager"):  # asked for explicitly: still refused, with the fix
        prefix_sharing_decision(True, model, "1.x")
    assert prefix_sharing_decision(False, model, "1.x") == (False, "prefix sharing: off (prefix_sharing: false)")


def test_packing_budget_and_its_fallbacks():
    """Rows of 2 x batch x max_length tokens (a packed micro-batch never holds more), capped where attention would
    cost a token more than the linear layers (never below 2 x max_length); one row per pair, with the reason, for
    eager attention, no max_length, or prefix_sharing: unpacked."""
    from transformers import LlamaConfig

    from dpo_xpu.train.packing import attention_break_even, packing_budget

    model = torch.nn.Linear(2, 2)
    model.config = type("Config", (), {"_attn_implementation": "sdpa"})()  # no dimensions: no cap
    assert packing_budget("auto", model, 4, 512) == (
        4096,
        "packing: on: several pairs per row, no padding, rows of at most 4096 tokens",
    )
    smollm2 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    model.config = LlamaConfig(**smollm2, attn_implementation="sdpa")
    assert attention_break_even(model.config) == (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) // (2 * 576)
    assert packing_budget("auto", model, 4, 1024)[0] == 3072  # capped: 8192 would be attention-bound
    assert packing_budget("auto", model, 4, 2048)[0] == 4096  # never below 2 x max_length
    assert packing_budget(True, model, 2, 320)[0] == 1280  # the whole micro-batch in one row
    row_tokens, why = packing_budget(True, model, 4, None)
    assert row_tokens is None and "max_length: null" in why
    row_tokens, why = packing_budget("unpacked", model, 4, 512)
    assert row_tokens is None and "prefix_sharing: unpacked" in why
    row_tokens, why = packing_budget("auto", model, 4, 512, precomputed_in_bf16=True)
    assert row_tokens is None and "precomputed in bf16" in why
    model.config._attn_implementation = "eager"
    row_tokens, why = packing_budget("auto", model, 4, 512)
    assert row_tokens is None and "eager attention" in why


def test_first_loss_is_ln2_in_bf16(stories260k_path, orca_rows_path, tmp_path, caplog, monkeypatch):
    """bf16: a reference computed in the step's own rows (adapter-off) packs, a precomputed one runs one row per pair
    (its rows' mates would differ from the step's, and bf16 rounds by them), the fallback said at INFO; both start
    at ln 2 within 1e-3."""
    from helpers import make_trainer, short_recipe

    monkeypatch.setenv("DPO_XPU_CACHE_DIR", str(tmp_path / "cache"))

    def first_loss(reference: str) -> tuple[float, int | None]:
        out = tmp_path / reference
        recipe = short_recipe(stories260k_path, orca_rows_path, out, bf16=True, reference=reference, max_steps=1)
        with caplog.at_level(logging.INFO, logger="dpo_xpu.train.factory"):
            trainer = make_trainer(recipe)
        rows = trainer.packing_row_tokens
        trainer.packing_row_tokens = rows and 2 * 2 * 320  # a micro-batch in one row (stories260K: 640 by default)
        trainer.train()
        return next(row["loss"] for row in trainer.state.log_history if "loss" in row), rows

    packed, rows = first_loss("adapter-off")
    assert rows is not None and packed == pytest.approx(math.log(2), abs=1e-3)
    precomputed, rows = first_loss("precomputed")
    assert rows is None and "a reference precomputed in bf16 must see the rows of the steps" in caplog.text
    assert precomputed == pytest.approx(math.log(2), abs=1e-3)


def test_pair_attention_is_the_cpu_s_choice_and_plain_sdpa_without_spans(tmp_path):
    """The decision (on for sdpa on the CPU, off on an accelerator and for eager, each with its reason), and a model
    given pair attention generating exactly what sdpa generates: calls without pair spans run transformers' sdpa."""
    from dpo_xpu.train.pair_attention import PAIR_ATTENTION, install_pair_attention, pair_attention_decision

    model = _demo_policy(tmp_path, "sdpa").eval()
    assert pair_attention_decision(model, "cpu") == (
        True,
        "attention: pair by pair, only the blocks the packed mask keeps",
    )
    on_xpu, why = pair_attention_decision(model, "xpu")
    assert not on_xpu and "xpu" in why and "packed mask" in why
    eager, why = pair_attention_decision(_demo_policy(tmp_path, "eager"), "cpu")
    assert not eager and "'eager'" in why
    prompt = torch.tensor([[5, 9, 14, 3, 22, 7], [0, 0, 11, 4, 8, 30]])  # the second row left-padded
    mask = (torch.arange(6) >= torch.tensor([[0], [2]])).long()
    kwargs = {"input_ids": prompt, "attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    before = model.generate(**kwargs)
    install_pair_attention(model)
    assert model.config._attn_implementation == PAIR_ATTENTION
    assert pair_attention_decision(model, "cpu")[0]  # installed twice is the same choice
    assert torch.equal(model.generate(**kwargs), before)
