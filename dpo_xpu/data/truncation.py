"""TRL's truncation rule, in one place: which tokens of a (prompt, answer) pair a run trains on.

TRL 1.x tokenizes prompt and prompt + answer, starts the answer where the two diverge, keeps the prompt's last
``max_prompt_length`` tokens (``keep_end``, dpo_xpu's cut on TRL 1.x, which dropped ``max_prompt_length``), then
the sequence's first ``max_length``. The held-out evaluation, the token-length report and the benchmark count
tokens through :func:`answer_tokens`; training cuts prompts with :func:`truncate_prompts` before TRL's collator.
Our own code because TRL keeps this rule inside its collator and tokenization step, with no public function.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


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

    Args:
        dataset: rows with a ``prompt`` string column.
        tokenizer: the run's tokenizer (a fast one, for offsets).
        max_prompt_length: tokens to keep, counted without special tokens added by the tokenizer.

    Returns:
        The dataset with long prompts shortened (others unchanged).
    """

    def cut(example: dict[str, Any]) -> dict[str, Any]:
        enc = tokenizer(example["prompt"], add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if len(offsets) <= max_prompt_length:
            return {"prompt": example["prompt"]}
        start = offsets[len(offsets) - max_prompt_length][0]
        return {"prompt": example["prompt"][start:]}

    before = dataset["prompt"]
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
