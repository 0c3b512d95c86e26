"""Prefix sharing: one sequence per preference pair, so the prompt's forward is computed once, not twice.

TRL runs a pair as two sequences, ``prompt + chosen`` and ``prompt + rejected``, so every prompt token goes
through the model twice. Prefix sharing (Wang et al., "Accelerating Direct Preference Optimization with Prefix
Sharing", arXiv:2410.20305, 2024, sec. 3 and fig. 1) packs a pair into one sequence,
``prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected``, with an attention mask under which each answer sees the
prompt and its own earlier tokens but never the other answer, and position ids that restart both answers where the
prompt ends. Every scored token then has exactly the context and position it had in its own sequence, so its
log-prob is the same (up to float rounding) while the prompt is computed once. The last prompt token is repeated in
each branch because it is the position that predicts the answer's first token, and both answers need that
prediction. Padding-free packing, which the paper combines with prefix sharing, puts several packed pairs in one
row, position ids restarting per pair and the mask kept inside each pair, so no pad token runs through the model
(:func:`~dpo_xpu.train.packing.packing_budget` sizes the rows; with eager attention, one row per pair).

Why our own code: no library does this for TRL's ``DPOTrainer``. TRL's ``padding_free`` is disabled in TRL 1.16
(it warns and pads), packed whole sequences (the prompt still twice) and needed flash attention; Liger-Kernel
tracks it as an open request (linkedin/Liger-Kernel #476); the paper's code is a research fork of another trainer.
:class:`PrefixSharing` hooks the fused-LM-head call TRL makes (:mod:`dpo_xpu.train.trl_internals`), runs the packed
batch through TRL's own fused LM head and returns the per-token outputs in TRL's two-sequence layout, leaving TRL's
loss, loop and metrics in place.

Attention: ``sdpa`` (transformers' default, and what runs on XPU) and ``eager`` take the 4-D mask. With
``prefix_sharing: true`` flash attention or TRL 0.11 (the ipex-llm backend) raises
:class:`~dpo_xpu.errors.RecipeError`; with ``auto`` (the default) the run keeps two sequences per pair and the log
says why (:func:`prefix_sharing_decision`); a batch not in TRL's pair layout runs unpacked, and the log says why once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from dpo_xpu.errors import RecipeError
from dpo_xpu.train.packing import group_rows
from dpo_xpu.train.pair_attention import PAIR_ATTENTION
from dpo_xpu.train.trl_internals import SHIFT_LABELS, attn_implementation, is_fused_head_call

logger = logging.getLogger(__name__)

#: Attention implementations that accept the packed 4-D mask (:data:`PAIR_ATTENTION`: sdpa, pair by pair).
SUPPORTED_ATTENTION = ("sdpa", "eager", PAIR_ATTENTION)

_PROMPT, _CHOSEN, _REJECTED, _PAD = 0, 1, 2, 3


@dataclass
class PackedPairs:
    """A batch of ``B`` preference pairs packed into ``R`` rows of length ``L`` (``R = B``: one pair per row;
    ``R < B``: padding-free, several pairs per row, each ``prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected``).

    Attributes:
        input_ids: ``[R, L]`` token ids, the pairs in order, then padding (at the end of a row only).
        position_ids: ``[R, L]``; restart at 0 for each pair; both answers continue from the prompt's last position.
        segments: ``[R, L]`` int8: 0 prompt, 1 chosen branch, 2 rejected branch, 3 padding.
        attention_mask: ``[R, 1, L, L]`` bool, True where a query (row) may attend a key (column): causal, within
            its own pair, and only to the prompt or its own branch.
        next_tokens: ``[R, L]`` the next token of each position within its branch, ``-100`` where unscored (the
            fused LM head's already-shifted labels).
        target_mask: ``[2B, T - 1]`` bool, the scored positions in TRL's layout (chosen rows, then rejected).
        sequence_tokens: real tokens in TRL's two-sequence layout (prompt counted twice).
        packed_tokens: real tokens in the packed layout.
        spans: per row, each pair's ``(start, chosen branch start, rejected branch start, end)`` positions
            (:mod:`dpo_xpu.train.pair_attention`).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    attention_mask: torch.Tensor
    next_tokens: torch.Tensor
    target_mask: torch.Tensor
    sequence_tokens: int
    packed_tokens: int
    spans: tuple[tuple[tuple[int, int, int, int], ...], ...] = ()

    def mask_for(self, attn_implementation: str | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The 4-D mask in the form the attention implementation takes: bool for sdpa, additive for eager.

        Raises:
            RecipeError: an attention implementation that cannot take a 4-D mask (flash attention).
        """
        if attn_implementation in (None, "sdpa", PAIR_ATTENTION):
            return self.attention_mask
        if attn_implementation == "eager":
            blocked = torch.finfo(dtype).min
            return torch.zeros(self.attention_mask.shape, dtype=dtype, device=self.attention_mask.device).masked_fill(
                ~self.attention_mask, blocked
            )
        raise _attention_error(attn_implementation)

    def unpack(self, per_token: torch.Tensor) -> torch.Tensor:
        """Move per-token values ``[R, L]`` (zero where unscored) to TRL's layout ``[2B, T - 1]``, keeping autograd.

        The values of pair ``b``'s chosen branch go to row ``b``, those of its rejected branch to row ``B + b``, at
        the positions TRL scores (its answer mask without the first column), in order.
        """
        scored = self.next_tokens != -100
        pairs = self.target_mask.size(0) // 2
        out = []
        for segment, rows in ((_CHOSEN, slice(0, pairs)), (_REJECTED, slice(pairs, 2 * pairs))):
            values = per_token[scored & (self.segments == segment)]
            target = self.target_mask[rows]
            out.append(per_token.new_zeros(target.shape).masked_scatter(target, values))
        return torch.cat(out, dim=0)


def _split_row(ids: torch.Tensor, real: torch.Tensor, answer: torch.Tensor) -> tuple[int, int] | None:
    """``(prompt length, answer length)`` of one TRL row laid out as prompt, answer, right padding; else None."""
    length = int(real.sum())
    prompt = int((real & ~answer).sum())
    n_answer = length - prompt
    if not bool(real[:length].all()) or bool(answer[:prompt].any()) or not bool(answer[prompt:length].all()):
        return None
    return prompt, n_answer


def pack_pairs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, row_tokens: int | None = None
) -> PackedPairs | None:
    """Pack TRL's two-sequence batch with prefix sharing; :func:`packing` also says why not.

    Args:
        input_ids: ``[2B, T]``, the ``B`` chosen rows (prompt + chosen) then the ``B`` rejected rows, right-padded,
            as TRL 1.x's ``DataCollatorForPreference`` builds them.
        attention_mask: ``[2B, T]``, 1 on real tokens.
        labels: ``[2B, T]``, the answer tokens' ids and ``-100`` elsewhere (TRL's ``labels``).
        row_tokens: ``None``: one row per pair, right-padded to the longest; a number: padding-free, consecutive
            pairs share a row of at most that many tokens (a longer pair gets a row of its own).

    Returns:
        The :class:`PackedPairs`, or ``None`` when the batch does not have that layout (an odd number of rows, a
        pair whose two rows have different prompts, an empty prompt, or tokens out of order). The caller then runs
        the plain two-sequence forward.
    """
    packed = packing(input_ids, attention_mask, labels, row_tokens)
    return packed if isinstance(packed, PackedPairs) else None


def packing(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, row_tokens: int | None = None
) -> PackedPairs | str:
    """As :func:`pack_pairs`, but a declined batch gives the reason (one line) instead of ``None``."""
    if input_ids.dim() != 2 or input_ids.size(0) % 2:
        return "not an even number of rows (chosen rows, then rejected rows)"
    pairs = input_ids.size(0) // 2
    real = attention_mask.bool()
    answer = labels != -100
    device = input_ids.device
    parts: list[tuple[torch.Tensor, ...]] = []  # per pair: ids, positions, segments, next tokens
    sizes: list[tuple[int, int, int]] = []  # per pair: prompt[:-1], chosen branch, rejected branch lengths
    for b in range(pairs):
        c, r = b, pairs + b
        split_c = _split_row(input_ids[c], real[c], answer[c])
        split_r = _split_row(input_ids[r], real[r], answer[r])
        if split_c is None or split_r is None:
            return "a row is not laid out as prompt, answer, right padding"
        if split_c[0] != split_r[0] or split_c[0] == 0:
            return "a pair's two rows have different prompts, or an empty one"
        prompt_len, n_chosen = split_c
        n_rejected = split_r[1]
        prompt = input_ids[c, :prompt_len]
        if not torch.equal(prompt, input_ids[r, :prompt_len]):
            return "a pair's two rows have different prompts"
        chosen = input_ids[c, prompt_len : prompt_len + n_chosen]
        rejected = input_ids[r, prompt_len : prompt_len + n_rejected]
        last = prompt[-1:]
        ids = torch.cat([prompt[:-1], last, chosen, last, rejected])
        start = prompt_len - 1
        spans = ((start, _PROMPT, 0), (n_chosen + 1, _CHOSEN, start), (n_rejected + 1, _REJECTED, start))
        positions = torch.cat([torch.arange(first, first + n, device=device) for n, _, first in spans])
        segments = torch.cat([torch.full((n,), seg, device=device, dtype=torch.int8) for n, seg, _ in spans])
        unscored = torch.full((1,), -100, device=device, dtype=input_ids.dtype)
        shift = torch.cat([torch.full((start,), -100, device=device, dtype=input_ids.dtype), chosen, unscored])
        parts.append((ids, positions, segments, torch.cat([shift, rejected, unscored])))
        sizes.append((start, n_chosen + 1, n_rejected + 1))
    # pairs in order, so that unpack's row-major reading keeps TRL's row order
    rows = group_rows([part[0].numel() for part in parts], row_tokens)
    length = max(sum(parts[b][0].numel() for b in row) for row in rows)

    def laid_out(index: int, value: int, dtype: torch.dtype) -> torch.Tensor:
        out = torch.full((len(rows), length), value, device=device, dtype=dtype)
        for i, row in enumerate(rows):
            values = torch.cat([parts[b][index] for b in row]) if index >= 0 else _pair_index(parts, row)
            out[i, : values.numel()] = values.to(dtype)
        return out

    segments = laid_out(2, _PAD, torch.int8)
    pair = laid_out(-1, -1, torch.int32)  # which pair each position belongs to, -1 for padding
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    keys = segments[:, None, :]
    # A query sees earlier prompt tokens and earlier tokens of its own branch, of its own pair; padding sees only
    # padding (never read), so no row of the mask is empty (an empty row would make sdpa return NaN).
    same_pair = pair[:, :, None] == pair[:, None, :]
    allowed = causal & same_pair & ((keys == _PROMPT) | (keys == segments[:, :, None]))
    spans = []
    for row in rows:
        at, row_spans = 0, []
        for b in row:
            prompt_rest, chosen_branch, rejected_branch = sizes[b]
            end = at + prompt_rest + chosen_branch + rejected_branch
            row_spans.append((at, at + prompt_rest, at + prompt_rest + chosen_branch, end))
            at = end
        spans.append(tuple(row_spans))
    return PackedPairs(
        input_ids=laid_out(0, 0, input_ids.dtype),
        position_ids=laid_out(1, 0, torch.long),
        segments=segments,
        attention_mask=allowed[:, None],
        next_tokens=laid_out(3, -100, input_ids.dtype),
        target_mask=answer[:, 1:],
        sequence_tokens=int(real.sum()),
        packed_tokens=int((segments != _PAD).sum()),
        spans=tuple(spans),
    )


def _pair_index(parts: list[tuple[torch.Tensor, ...]], row: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((parts[b][0].numel(),), b, device=parts[b][0].device) for b in row])


def _attention_error(attn_implementation: str | None) -> RecipeError:
    return RecipeError(f"prefix_sharing: {_attention_reason(attn_implementation)}. {_ATTENTION_FIX}")


def _attention_reason(attn_implementation: str | None) -> str:
    return f"needs sdpa or eager attention (a 4-D mask per pair); the model uses {attn_implementation!r}"


_ATTENTION_FIX = "Load it with attn_implementation='sdpa', or set prefix_sharing: false"


class PrefixSharing:
    """While active, TRL's fused-LM-head calls of ``module`` run packed, each pair's prompt once.

    A forward pre-hook packs TRL's batch (:func:`pack_pairs`) and calls the model with the packed ids, the 4-D mask,
    the position ids and the already-shifted labels; a forward hook moves the per-token outputs (log-probs, entropy,
    ...) back to TRL's ``[2B, T - 1]`` layout. Any other call passes unchanged, and so does a batch that
    :func:`packing` declines (its reason logged at info level, once per reason). Contexts nest: an inner one on the
    same module sees the packed call and passes it through.

    Args:
        module: the model TRL calls (the PEFT model, or a plain model with TRL's fused LM head).
        tokens: a dict to add the token counts to (``"sequence"``: real tokens in TRL's layout, ``"packed"``: in the
            packed one, for throughput and FLOPs accounting); default a new one, kept as ``self.tokens``.
        row_tokens: as :func:`pack_pairs`: ``None`` one row per pair, else padding-free rows of at most that many.

    Raises:
        RecipeError: (on a call) the model's attention implementation cannot take a 4-D mask.
    """

    def __init__(
        self, module: torch.nn.Module, tokens: dict[str, int] | None = None, row_tokens: int | None = None
    ) -> None:
        self.module = module
        self.row_tokens = row_tokens
        self.tokens = tokens if tokens is not None else {"sequence": 0, "packed": 0}
        self._handles: list[Any] = []
        self._pending: dict[int, PackedPairs] = {}

    def __enter__(self) -> PrefixSharing:
        self._handles = [
            self.module.register_forward_pre_hook(self._pack, with_kwargs=True),
            self.module.register_forward_hook(self._unpack, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pending.clear()

    def _pack(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        if args or not is_fused_head_call(kwargs) or kwargs.get("input_ids") is None:
            return None
        if kwargs.get("attention_mask") is None:
            return None
        packed = packing(kwargs["input_ids"], kwargs["attention_mask"], kwargs["labels"], self.row_tokens)
        if isinstance(packed, str):
            if packed not in _DECLINED:
                _DECLINED.add(packed)
                logger.info("prefix sharing: a batch runs unpacked, two sequences per pair: %s", packed)
            return None
        attn = attn_implementation(module)
        new = {k: v for k, v in kwargs.items() if k != "labels"}
        new.update(input_ids=packed.input_ids, attention_mask=packed.mask_for(attn), position_ids=packed.position_ids)
        new[SHIFT_LABELS] = packed.next_tokens
        if attn == PAIR_ATTENTION:
            new["pair_spans"] = packed.spans
        self._pending[id(packed.input_ids)] = packed
        self.tokens["sequence"] += packed.sequence_tokens
        self.tokens["packed"] += packed.packed_tokens
        return args, new

    def _unpack(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        packed = self._pending.pop(id(kwargs.get("input_ids")), None)
        if packed is None:
            return None
        shape = packed.next_tokens.shape
        return type(output)(
            **{k: packed.unpack(v) if torch.is_tensor(v) and v.shape == shape else v for k, v in output.items()}
        )


#: Reasons a batch ran unpacked that the log already gave (each said once per process).
_DECLINED: set[str] = set()


def prefix_sharing_obstacle(model: torch.nn.Module, trl_generation: str) -> tuple[str, str] | None:
    """``None`` where prefix sharing runs on this stack, else ``(reason, fix)``: TRL 0.11 (no fused LM head to score
    the packed labels), or an attention implementation that cannot take a 4-D mask. ``trl_generation``: ``"1.x"``
    or ``"0.11"`` (:func:`~dpo_xpu.train.trl_internals.trl_generation`)."""
    if trl_generation != "1.x":
        return (
            f"needs TRL >= 1.0 (its fused LM head scores the packed sequence); TRL {trl_generation} is installed",
            "Set prefix_sharing: false, or use the native environment",
        )
    attn = attn_implementation(model)
    if attn not in (None, *SUPPORTED_ATTENTION):
        return _attention_reason(attn), _ATTENTION_FIX
    return None


def check_prefix_sharing(model: torch.nn.Module, trl_generation: str) -> None:
    """Refuse prefix sharing where it cannot run, before any training starts.

    Raises:
        RecipeError: where :func:`prefix_sharing_obstacle` names an obstacle: its reason and its fix.
    """
    obstacle = prefix_sharing_obstacle(model, trl_generation)
    if obstacle is not None:
        raise RecipeError(f"prefix_sharing: {obstacle[0]}. {obstacle[1]}")


def prefix_sharing_decision(setting: bool | str, model: torch.nn.Module, trl_generation: str) -> tuple[bool, str]:
    """Whether a run shares prefixes, and why.

    Args:
        setting: the recipe's ``prefix_sharing``: ``True``, ``False``, ``"auto"`` (on where it runs) or
            ``"unpacked"`` (on, one row per pair: :func:`~dpo_xpu.train.packing.packing_budget`).
        model: the policy (a PEFT model or a plain causal LM).
        trl_generation: ``"1.x"`` or ``"0.11"``.

    Returns:
        ``(on, why)``: the decision, and one line for the log.

    Raises:
        RecipeError: ``setting`` is ``True`` (or ``"unpacked"``) where prefix sharing cannot run (see
            :func:`check_prefix_sharing`).
    """
    if setting is False:
        return False, "prefix sharing: off (prefix_sharing: false)"
    if setting is True or setting == "unpacked":
        check_prefix_sharing(model, trl_generation)
        return True, f"prefix sharing: on (prefix_sharing: {str(setting).lower()}): each pair's prompt computed once"
    obstacle = prefix_sharing_obstacle(model, trl_generation)
    if obstacle is not None:
        return False, f"prefix sharing: auto -> off, two sequences per pair ({obstacle[0]})"
    return True, "prefix sharing: auto -> on: each pair runs as one sequence, its prompt computed once"
