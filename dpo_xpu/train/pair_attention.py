"""Attention over packed prefix-shared rows computed pair by pair: only the blocks the packed mask keeps.

A packed row (:mod:`dpo_xpu.train.prefix_sharing`) holds one or more pairs, each ``prompt[:-1] | prompt[-1] chosen |
prompt[-1] rejected``, and its mask lets a token see earlier prompt tokens and its own branch, in its own pair. sdpa
given that mask computes every query-key product of the row and masks most of them afterwards: on the CPU benchmark's
rows (two pairs of about 490 tokens) about a fifth of them are kept, and attention was 14% of a step. Here each pair
runs as two sdpa calls whose products are all kept but the causal corner: ``prompt + chosen`` causal (``is_causal``,
whose kernels skip the blocks above the diagonal), then the rejected branch against the prompt and itself (a small
mask). The same attention, up to float rounding (``tests/test_prefix_sharing.py`` compares log-probs and gradients).

Our own code: varlen and block-sparse attention exist as flash-attn's varlen kernels (CUDA) and FlexAttention (a
compiled kernel), neither for eager PyTorch on the CPU or XPU. On the CPU only (:func:`pair_attention_decision`):
on a GPU, two kernel launches per pair and layer may cost more than the masked products (not measured there).

It runs as a transformers attention function (:data:`PAIR_ATTENTION`, registered with ``AttentionInterface`` and with
sdpa's mask) that :func:`install_pair_attention` gives a model; a call without ``pair_spans`` (generation, an
unpacked batch, the reference of another trainer) runs transformers' own sdpa unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from dpo_xpu.train.trl_internals import attn_implementation

#: The attention implementation's name in transformers' ``AttentionInterface``.
PAIR_ATTENTION = "dpo_xpu_pair_sdpa"

#: One row's pairs, each ``(start, chosen branch start, rejected branch start, end)`` in token positions.
RowSpans = tuple[tuple[int, int, int, int], ...]


def pair_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    pair_spans: tuple[RowSpans, ...] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` ``[R, H, L, D]``, ``key``/``value`` ``[R, Hkv, L, D]``;
    returns ``([R, L, H, D], None)``. With ``pair_spans`` (one :data:`RowSpans` per row) the packed rows' attention
    pair by pair, positions outside every pair (the row's end padding) zero; without, transformers' sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if pair_spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    gqa = query.size(1) != key.size(1)
    dropout_p = dropout if module.training else 0.0

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **extra: Any) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, scale=scaling, enable_gqa=gqa, **extra
        )

    rows = []
    for r, spans in enumerate(pair_spans):
        # 4-D slices ([1, H, n, D]): sdpa's fused CPU kernel takes only those (3-D ones fall back to its math path)
        q, k, v = query[r : r + 1], key[r : r + 1], value[r : r + 1]
        pieces = []
        for start, chosen, rejected, end in spans:
            causal = slice(start, rejected)
            pieces.append(sdpa(q[:, :, causal], k[:, :, causal], v[:, :, causal], is_causal=True))
            n = end - rejected
            keys = torch.cat([k[:, :, start:chosen], k[:, :, rejected:end]], dim=2)
            values = torch.cat([v[:, :, start:chosen], v[:, :, rejected:end]], dim=2)
            mask = torch.ones(n, chosen - start + n, dtype=torch.bool, device=q.device)
            mask[:, chosen - start :] = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            pieces.append(sdpa(q[:, :, rejected:end], keys, values, attn_mask=mask))
        used = spans[-1][3] if spans else 0
        if used < q.size(2):  # the row's end padding: never attended to, never scored
            pieces.append(q.new_zeros(1, q.size(1), q.size(2) - used, q.size(3)))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def _register() -> None:
    # public API; registering again replaces the entry with the same function
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PAIR_ATTENTION, pair_attention_forward)
    AttentionMaskInterface.register(PAIR_ATTENTION, sdpa_mask)


def pair_attention_decision(model: Any, device_type: str) -> tuple[bool, str]:
    """Whether a prefix-sharing run computes attention pair by pair (on the CPU, for an sdpa model), and why."""
    attn = attn_implementation(model)
    if attn not in ("sdpa", PAIR_ATTENTION):
        return False, f"attention: the model's {attn!r}, with the packed mask"
    if device_type != "cpu":
        return (
            False,
            f"attention: sdpa with the packed mask (pair by pair is for the CPU; this run is on {device_type})",
        )
    return True, "attention: pair by pair, only the blocks the packed mask keeps"


def install_pair_attention(model: Any) -> None:
    """Give ``model`` (a PEFT model or a plain causal LM running sdpa) :data:`PAIR_ATTENTION`, which runs sdpa for
    every call that carries no ``pair_spans``."""
    _register()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(PAIR_ATTENTION)
