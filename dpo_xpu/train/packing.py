"""Padding-free packing of prefix-shared pairs: how many tokens a row holds, and which pairs share one.

Several packed pairs in one row (:mod:`dpo_xpu.train.prefix_sharing` builds the row, its block mask and position
ids) run no pad token through the model; the price is attention over the whole row, since sdpa and eager compute
every query-key product of a row and mask the others. So a row grows while attention stays the cheaper part of a
token's cost: at most ``2 x batch x max_length`` tokens (TRL's padded two-sequence batch, which a packed
micro-batch never exceeds: one row per micro-batch), and no longer than where attention's ``4 x heads x head_dim``
FLOPs per key and token reach the linear layers' ``2 x parameters`` per token (SmolLM2-135M: 3,072 tokens), but
never below ``2 x max_length`` (the longest packed pair). Our own code: TRL's ``padding_free`` is disabled in TRL
1.16, and packed whole sequences for flash attention, not prefix-shared pairs.
"""

from __future__ import annotations

from typing import Any

from dpo_xpu.train.trl_internals import attn_implementation


def attention_break_even(config: Any) -> int | None:
    """Row length (tokens) at which a token's attention FLOPs equal its linear layers' (a Llama-style decoder
    layer: q, k, v, o and a gated MLP), from the model config; ``None`` where the config lacks a dimension."""
    try:
        hidden, heads, ff = config.hidden_size, config.num_attention_heads, config.intermediate_size
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
    except AttributeError:
        return None
    linear = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * ff
    return linear // (2 * heads * head_dim)


def packing_budget(
    setting: bool | str, model: Any, batch_size: int, max_length: int | None, precomputed_in_bf16: bool = False
) -> tuple[int | None, str]:
    """The padding-free rows' budget in tokens (``PrefixSharing``'s ``row_tokens``) of a run that shares prefixes.

    Args:
        setting: the recipe's ``prefix_sharing`` (``"unpacked"``: one row per pair, padded, as before packing).
        model: the policy, whose attention implementation and config are read.
        batch_size: pairs per micro-batch; max_length: TRL's ``max_length`` (``None``: no truncation).
        precomputed_in_bf16: the reference is precomputed, in bf16: it would share rows with other pairs than the
            policy's steps do, and bf16 rounds a token differently with other row mates (stories260K: first loss
            0.6835 instead of ln 2; 0.693155 one row per pair), so one row per pair. Float32 is exact either way.

    Returns:
        ``(row_tokens, why)``: ``None`` for one row per pair, and one line for the log saying why.
    """
    if setting == "unpacked":
        return None, "packing: off (prefix_sharing: unpacked): one row per pair, padded to the longest"
    if attn_implementation(model) == "eager":
        return None, "packing: off, one row per pair: eager attention would hold the whole row's scores in memory"
    if precomputed_in_bf16:
        return None, "packing: off, one row per pair: a reference precomputed in bf16 must see the rows of the steps"
    if max_length is None:
        return None, "packing: off, one row per pair: max_length: null gives the rows no budget"
    budget = 2 * batch_size * max_length
    even = attention_break_even(getattr(model, "config", None))
    if even is not None and budget > max(even, 2 * max_length):
        budget = max(even, 2 * max_length)
    return budget, f"packing: on: several pairs per row, no padding, rows of at most {budget} tokens"


def group_rows(lengths: list[int], row_tokens: int | None) -> list[list[int]]:
    """Consecutive items (packed pairs of ``lengths`` tokens) grouped into rows of at most ``row_tokens`` tokens, in
    order; an item longer than that gets a row of its own; ``None``: one item per row."""
    if row_tokens is None:
        return [[i] for i in range(len(lengths))]
    rows: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if rows[-1] and used + n > row_tokens:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows
