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
    """The most characters one token of `tokenizer` stands for: its longest vocabulary entry (added tokens too).

    Byte-level and sentencepiece entries spell at least as many characters as they stand for (a byte-level
    entry has one character a byte, a byte-fallback piece such as `<0x0A>` six for one), so this is an upper
    bound. Cached per tokenizer object and vocabulary size.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the run's tokenizer.

    Returns:
        `int`: characters, at least 1.
    """
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
    """Characters beyond which a text cannot fit in `max_tokens` tokens, whatever it holds.

    A token stands for at most :func:`longest_token_chars` characters of normalized text, and normalizing
    shrinks a text by at most `NORMALIZER_MARGIN`, so a longer text has more than `max_tokens` tokens. Cutting
    a text to this many characters (a prompt keeping its end, an answer its start) changes none of the tokens
    that `max_length` / `max_prompt_length` keep, and spares tokenising it whole (a 50 MB row took 4 min 41 s
    and 7.8 GB).

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the run's tokenizer.
        max_tokens (`int`): the token budget, e.g. the recipe's `max_length`.

    Returns:
        `int`: `max_tokens * longest_token_chars(tokenizer) * NORMALIZER_MARGIN`.
    """
    return max_tokens * longest_token_chars(tokenizer) * NORMALIZER_MARGIN


def far_too_long(texts: list[str], limit: int) -> list[int]:
    """The 1-based numbers of the texts longer than `limit` characters."""
    return [number for number, text in enumerate(texts, start=1) if len(text) > limit]


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
    """Token ids of prompt and answer as TRL 1.x cuts them: the answer starts where the ids of the prompt and of
    prompt + answer diverge; the prompt keeps its last ``max_prompt_length`` tokens, then the sequence its first
    ``max_length``.

    Args:
        tokenizer: the run's tokenizer.
        prompt, answer: the ChatML-formatted texts of one side of a pair.
        max_length: tokens of prompt + answer to keep (``None``: no cut).
        max_prompt_length: tokens of the prompt to keep, from its end (``None``: no cut).

    Returns:
        ``(prompt_ids, answer_ids)``: two lists of token ids, without special tokens the tokenizer would add.
    """
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
    """Cut each ``prompt`` to its last ``max_prompt_length`` tokens, as TRL 0.11's ``keep_end`` did.

    TRL 1.x dropped ``max_prompt_length``; this keeps the original recipe's behaviour there. The cut is
    made on a token boundary of the prompt text (via the fast tokenizer's offsets), so no token is split.
    A prompt longer than :func:`char_limit` characters is first cut to its last that many (a warning names
    the rows), so that it is not tokenised whole.

    Args:
        dataset (`datasets.Dataset`): rows with a ``prompt`` string column.
        tokenizer (`PreTrainedTokenizerBase`): the run's tokenizer (a fast one, for offsets).
        max_prompt_length (`int`): tokens to keep, counted without special tokens added by the tokenizer.

    Returns:
        `datasets.Dataset`: the dataset with long prompts shortened (others unchanged).
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
    far = far_too_long(before, limit)
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
