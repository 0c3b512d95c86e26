"""TRL's truncation rule, in one place: which tokens of a (prompt, answer) pair a run trains on.

The answer starts where the tokens of prompt and of prompt + answer diverge; the prompt keeps its last
``max_prompt_length`` tokens (dpo_xpu's cut: TRL 1.x dropped that option), the sequence its first ``max_length``.
Our own code because TRL keeps this rule inside its collator, with no public function.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

#: How many characters a tokenizer's normalizer may compose into one (NFC: a Hangul jamo triple into one syllable).
NORMALIZER_MARGIN = 4

_LONGEST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def longest_token_chars(tokenizer: Any) -> int:
    """At least the characters one token stands for: its longest vocabulary entry (byte-level and sentencepiece
    entries spell at least what they stand for), cached per tokenizer and vocabulary size."""
    size = len(tokenizer)
    with contextlib.suppress(TypeError):  # an object that cannot be weakly referenced or hashed is not cached
        if (cached := _LONGEST.get(tokenizer)) is not None and cached[0] == size:
            return cached[1]
    longest = max(map(len, tokenizer.get_vocab()), default=1) or 1
    with contextlib.suppress(TypeError):
        _LONGEST[tokenizer] = (size, longest)
    return longest


def char_limit(tokenizer: Any, max_tokens: int) -> int:
    """Characters beyond which no text fits in `max_tokens` tokens: `max_tokens * longest_token_chars *
    NORMALIZER_MARGIN`. Cutting there keeps every token a run keeps, and spares tokenising a huge row whole (a 50 MB
    row took 4 min 41 s and 7.8 GB)."""
    return max_tokens * longest_token_chars(tokenizer) * NORMALIZER_MARGIN


def row_list(numbers: list[int], shown: int = 10) -> str:
    """`"rows 2, 7"`, or `"rows 1, 2, ... (12 rows)"` beyond `shown` numbers."""
    head = ", ".join(map(str, numbers[:shown]))
    more = f", ... ({len(numbers)} rows)" if len(numbers) > shown else ""
    return f"row{'s' * (len(numbers) > 1)} {head}{more}"


def common_prefix_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """How many leading items (token ids, characters, messages) `a` and `b` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def kept_answer_length(prompt_length: int, answer_length: int, max_length: int | None) -> int:
    """Tokens of an answer TRL keeps after a prompt: at most ``max_length - prompt_length`` (``None``: all)."""
    if max_length is None:
        return answer_length
    return max(0, min(answer_length, max_length - prompt_length))


def answer_tokens(
    tokenizer: Any, prompt: str, answer: str, max_length: int | None, max_prompt_length: int | None
) -> tuple[list[int], list[int]]:
    """Token ids ``(prompt_ids, answer_ids)`` of one side of a pair, cut as the module says (``None``: no cut),
    without special tokens."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    start = common_prefix_length(prompt_ids, full_ids)
    prompt_ids, answer_ids = full_ids[:start], full_ids[start:]
    if max_prompt_length is not None:
        prompt_ids = prompt_ids[-max_prompt_length:]
    answer_ids = answer_ids[: kept_answer_length(len(prompt_ids), len(answer_ids), max_length)]
    return prompt_ids, answer_ids


def truncate_prompts(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_prompt_length: int) -> Dataset:
    """The dataset with each ``prompt`` cut to its last ``max_prompt_length`` tokens, as TRL 0.11's ``keep_end``
    did, on a token boundary (the fast tokenizer's offsets); a prompt over :func:`char_limit` characters is cut
    first, with a warning naming the rows."""
    limit = char_limit(tokenizer, max_prompt_length)

    def cut(example: dict[str, Any]) -> dict[str, Any]:
        prompt = example["prompt"][-limit:]
        offsets = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        kept = prompt[offsets[-max_prompt_length][0] :] if len(offsets) > max_prompt_length else example["prompt"]
        return {"prompt": kept}

    before = dataset["prompt"]
    far = [number for number, text in enumerate(before, start=1) if len(text) > limit]
    if far:
        logger.warning(
            f"truncate_prompts: {row_list(far)} far longer than max_prompt_length={max_prompt_length} tokens can "
            f"hold (over {limit} characters): cut to the last {limit} characters before tokenising"
        )
    dataset = dataset.map(cut, desc="Truncating prompts (keep end)")
    cut_count = sum(a != b for a, b in zip(before, dataset["prompt"]))
    if cut_count:
        logger.info(
            "%d of %d prompts were longer than %d tokens and kept their end", cut_count, len(before), max_prompt_length
        )
    return dataset
