"""The length filter (``drop_long_rows: true``): drop pairs too long for ``max_length`` instead of truncating them.

Lengths are counted with the run's tokenizer on the ChatML-formatted pair, as training sees them
(:func:`dpo_xpu.lengths.token_lengths`: no special tokens added; the answer's tokens are those of prompt + answer
after the point where they part from the prompt's). The whole prompt counts, before any ``max_prompt_length`` cut.

    >>> kept, report = drop_long_pairs(pairs, tokenizer, max_length=1024)
    >>> report["dropped"], report["reasons"]
    (12, {'prompt+chosen': 9, 'prompt+rejected': 7})
"""

from __future__ import annotations

import logging
from typing import Any

from dpo_xpu.errors import PreferenceDataError
from dpo_xpu.lengths import token_lengths

logger = logging.getLogger(__name__)

REASONS = ("prompt+chosen", "prompt+rejected")


def drop_long_pairs(dataset: Any, tokenizer: Any, max_length: int) -> tuple[Any, dict[str, Any]]:
    """Keep the pairs whose prompt + chosen and prompt + rejected both fit in `max_length` tokens.

    Args:
        dataset (`datasets.Dataset`): ChatML-formatted pairs, columns `prompt`, `chosen`, `rejected`.
        tokenizer (`PreTrainedTokenizerBase`): the run's tokenizer.
        max_length (`int`): the recipe's `max_length` (tokens, prompt + answer).

    Returns:
        `tuple[datasets.Dataset, dict]`: the kept pairs, and a report: `rows` (before), `kept`, `dropped`,
        `max_length`, and `reasons` (rows over the limit per reason; a row too long on both answers counts under
        both, so the reasons may add up to more than `dropped`).

    Raises:
        PreferenceDataError: every pair is too long.
    """
    lengths = token_lengths(dataset, tokenizer)
    keep, reasons = [], dict.fromkeys(REASONS, 0)
    for index, (prompt, chosen, rejected) in enumerate(zip(lengths["prompt"], lengths["chosen"], lengths["rejected"])):
        too_long = {"prompt+chosen": prompt + chosen > max_length, "prompt+rejected": prompt + rejected > max_length}
        for reason, hit in too_long.items():
            reasons[reason] += hit
        if not any(too_long.values()):
            keep.append(index)
    report = {
        "rows": len(lengths["prompt"]),
        "kept": len(keep),
        "dropped": len(lengths["prompt"]) - len(keep),
        "max_length": max_length,
        "reasons": reasons,
    }
    logger.info(
        "drop_long_rows: dropped %d of %d pairs longer than max_length=%d tokens (%s)",
        report["dropped"],
        report["rows"],
        max_length,
        ", ".join(f"{reason} too long: {count}" for reason, count in reasons.items()),
    )
    if not keep:
        raise PreferenceDataError(
            f"drop_long_rows: all {report['rows']} pairs are longer than max_length={max_length} tokens "
            f"({reasons}). Fix: raise max_length, or set drop_long_rows: false to truncate them instead."
        )
    return dataset.select(keep) if len(keep) < report["rows"] else dataset, report
