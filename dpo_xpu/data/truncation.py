"""TRL's truncation rule, in one place: which tokens of a (prompt, answer) pair a run trains on.

TRL 1.x tokenizes prompt and prompt + answer, starts the answer where the two diverge, keeps the prompt's last
``max_prompt_length`` tokens (``keep_end``, dpo_xpu's cut on TRL 1.x, which dropped ``max_prompt_length``), then
the sequence's first ``max_length``. The held-out evaluation, the token-length report and the benchmark count
tokens through :func:`answer_tokens`; training cuts prompts with :func:`truncate_prompts` before TRL's collator.
Our own code because TRL keeps this rule inside its collator and tokenization step, with no public function.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

NORMALIZER_MARGIN = 4
"""How many characters a tokenizer's normalizer may compose into one (NFC composes a Hangul jamo triple into one
syllable): the factor of :func:`char_limit` beyond the longest vocabulary entry."""

_LONGEST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters one token of `tokenizer` stands for: its longest vocabulary entry (added tokens too), at
    least 1. Byte-level and sentencepiece entries spell at least as many characters as they stand for (a byte-level
    entry one a byte, `<0x0A>` six for one), so this bounds it. Cached per tokenizer object and vocabulary size."""
    size = len(tokenizer)
    try:
        cached = _LONGEST.get(tokenizer)
    except TypeError:  # an object that cannot be weakly referenced or hashed
        cached = None
    if cached is not None and cached[0] == size:
        return cached[1]
    longest = max(map(len, tokenizer.get_vocab()), default=1) or 1
    try:
        _LONGEST[tokenizer] = (size, longest)
    except TypeError:
        pass
    return longest


def char_limit(tokenizer: Any, max_tokens: int) -> int:
    """Characters beyond which a text cannot fit in `max_tokens` tokens, whatever it holds:
    `max_tokens * longest_token_chars(tokenizer) * NORMALIZER_MARGIN`.

    A token stands for at most :func:`longest_token_chars` characters of normalized text, and normalizing shrinks a
    text by at most `NORMALIZER_MARGIN`. Cutting a text to this many characters (a prompt keeping its end, an answer
    its start) changes none of the tokens a run keeps, and spares tokenising it whole (a 50 MB row took 4 min 41 s
    and 7.8 GB).
    """
    return max_tokens * longest_token_chars(tokenizer) * NORMALIZER_MARGIN


def row_list(numbers: list[int], shown: int = 10) -> str:
    """`"rows 2, 7"`, or `"rows 1, 2, ... (12 rows)"` beyond `shown` numbers."""
    head = ", ".join(map(str, numbers[:shown]))
    more = f", ... ({len(numbers)} rows)" if len(numbers) > shown else ""
    return f"row{'s' * (len(numbers) > 1)} {head}{more}"


def kept_answer_length(prompt_length: int, answer_length: int, max_length: int | None) -> int:
    """Tokens of an answer TRL keeps after a prompt of ``prompt_length`` tokens: the sequence keeps its first
    ``max_length`` (``None``: all), so the answer keeps ``max_length - prompt_length`` at most, and none when the
    prompt alone fills ``max_length``."""
    if max_length is None:
        return answer_length
    return max(0, min(answer_length, max_length - prompt_length))


def answer_tokens(
    tokenizer: Any, prompt: str, answer: str, max_length: int | None, max_prompt_length: int | None
) -> tuple[list[int], list[int]]:
    """Token ids ``(prompt_ids, answer_ids)`` of one side of a formatted pair as TRL 1.x cuts them, without the
    special tokens the tokenizer would add: the answer starts where the ids of the prompt and of prompt + answer
    diverge; the prompt keeps its last ``max_prompt_length`` tokens, then the sequence its first ``max_length``
    (``None``: no cut)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    start = next(
        (i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), min(len(prompt_ids), len(full_ids))
    )
    prompt_ids, answer_ids = full_ids[:start], full_ids[start:]
    if max_prompt_length is not None:
        prompt_ids = prompt_ids[-max_prompt_length:]
    answer_ids = answer_ids[: kept_answer_length(len(prompt_ids), len(answer_ids), max_length)]
    return prompt_ids, answer_ids


def truncate_prompts(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_prompt_length: int) -> Dataset:
    """Cut each ``prompt`` to its last ``max_prompt_length`` tokens (counted without special tokens), as TRL 0.11's
    ``keep_end`` did (TRL 1.x dropped ``max_prompt_length``).

    The cut falls on a token boundary (the fast tokenizer's offsets), so no token is split. A prompt longer than
    :func:`char_limit` characters is first cut to its last that many, with a warning naming the rows.

    Returns:
        The dataset with long prompts shortened (others unchanged).
    """
    limit = char_limit(tokenizer, max_prompt_length)

    def cut(example: dict[str, Any]) -> dict[str, Any]:
        prompt = example["prompt"][-limit:]
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if len(offsets) <= max_prompt_length:
            return {"prompt": example["prompt"]}
        start = offsets[len(offsets) - max_prompt_length][0]
        return {"prompt": prompt[start:]}

    before = dataset["prompt"]
    far = [number for number, text in enumerate(before, start=1) if len(text) > limit]
    if far:
        logger.warning(
            "truncate_prompts: %s far longer than max_prompt_length=%d tokens can hold (over %d characters): "
            "cut to the last %d characters before tokenising",
            row_list(far),
            max_prompt_length,
            limit,
            limit,
        )
    dataset = dataset.map(cut, desc="Truncating prompts (keep end)")
    cut_count = sum(a != b for a, b in zip(before, dataset["prompt"]))
    if cut_count:
        logger.info(
            "%d of %d prompts were longer than %d tokens and kept their end",
            cut_count,
            len(before),
            max_prompt_length,
        )
    return dataset
