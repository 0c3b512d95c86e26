"""Token lengths of preference pairs: how long prompts and answers are, and what a ``max_length`` keeps.

Lengths are counted as training sees them (TRL 1.x): no special tokens added, and an answer's tokens are those
of prompt + answer after the point where they part from the prompt's own tokens.

    >>> lengths = token_lengths(pairs, tokenizer)             # {"prompt": [...], "chosen": [...], "rejected": [...]}
    >>> length_summary(lengths, max_length=1024, max_prompt_length=512)

The length filter (``drop_long_rows: true``) drops pairs too long for ``max_length`` instead of truncating them,
counting the whole prompt, before any ``max_prompt_length`` cut:

    >>> kept, report = drop_long_pairs(pairs, tokenizer, max_length=1024)
    >>> report["dropped"], report["reasons"]
    (12, {'prompt+chosen': 9, 'prompt+rejected': 7})
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

from matplotlib.figure import Figure

from dpo_xpu.data.truncation import answer_tokens, char_limit, kept_answer_length, row_list
from dpo_xpu.errors import PreferenceDataError

logger = logging.getLogger(__name__)

COLUMNS = ("prompt", "chosen", "rejected")


def token_lengths(dataset: Any, tokenizer: Any) -> dict[str, list[int]]:
    """Count the tokens of every prompt, chosen and rejected answer (`dataset`: the columns of
    :func:`dpo_xpu.data.preferences.format_orca_dataset`), as :func:`dpo_xpu.data.truncation.answer_tokens` does.

    Returns:
        For each of `prompt`, `chosen`, `rejected`, one token count per row.
    """
    lengths: dict[str, list[int]] = {column: [] for column in COLUMNS}
    for prompt, chosen, rejected in zip(dataset["prompt"], dataset["chosen"], dataset["rejected"]):
        prompt_ids, chosen_ids = answer_tokens(tokenizer, prompt, chosen, None, None)
        _, rejected_ids = answer_tokens(tokenizer, prompt, rejected, None, None)
        lengths["prompt"].append(len(prompt_ids))
        lengths["chosen"].append(len(chosen_ids))
        lengths["rejected"].append(len(rejected_ids))
    return lengths


def length_summary(
    lengths: dict[str, list[int]], max_length: int, max_prompt_length: int | None = None
) -> dict[str, Any]:
    """Statistics per column and what `max_length` / `max_prompt_length` (tokens) do to the rows.

    A row is kept whole when its prompt (cut to its last `max_prompt_length` tokens) plus its longer answer fits in
    `max_length`; otherwise the answers lose their end ("truncated"), or, when the prompt alone fills
    `max_length`, TRL drops the row ("dropped").

    Returns:
        `dict`: `stats` (per column: `min`, `median`, `mean`, `max` tokens), `rows`, `kept_whole`,
        `prompt_cut` (prompts longer than `max_prompt_length`), `truncated`, `dropped`.
    """
    stats = {
        column: {
            "min": min(values),
            "median": statistics.median(values),
            "mean": round(statistics.fmean(values), 1),
            "max": max(values),
        }
        for column, values in lengths.items()
        if values
    }
    kept = truncated = dropped = prompt_cut = 0
    for prompt, chosen, rejected in zip(lengths["prompt"], lengths["chosen"], lengths["rejected"]):
        if max_prompt_length is not None and prompt > max_prompt_length:
            prompt_cut += 1
            prompt = max_prompt_length
        if kept_answer_length(prompt, 1, max_length) == 0:
            dropped += 1
        elif all(kept_answer_length(prompt, n, max_length) == n for n in (chosen, rejected)):
            kept += 1
        else:
            truncated += 1
    return {
        "stats": stats,
        "rows": len(lengths["prompt"]),
        "kept_whole": kept,
        "prompt_cut": prompt_cut,
        "truncated": truncated,
        "dropped": dropped,
    }


def plot_token_lengths(
    lengths: dict[str, list[int]], max_length: int | None = None, max_prompt_length: int | None = None
) -> Figure:
    """Histograms of prompt and answer lengths (tokens), with `max_prompt_length` and `max_length` marked.

    Returns:
        `matplotlib.figure.Figure`: two panels (prompts; chosen and rejected answers), 11 x 3.4 inches.
    """
    fig = Figure(figsize=(11, 3.4), layout="constrained")
    prompt_ax, answer_ax = fig.subplots(1, 2)
    prompt_ax.hist(lengths["prompt"], bins=30, color="tab:grey")
    prompt_ax.set_title("Prompt lengths")
    answer_ax.hist([lengths["chosen"], lengths["rejected"]], bins=30, label=["chosen", "rejected"])
    answer_ax.set_title("Answer lengths")
    if max_prompt_length is not None:
        prompt_ax.axvline(max_prompt_length, color="tab:red", linestyle="--", label="max_prompt_length")
    if max_length is not None:
        prompt_ax.axvline(max_length, color="black", linestyle=":", label="max_length")
    for ax in (prompt_ax, answer_ax):
        ax.set_xlabel("tokens")
        ax.set_ylabel("rows")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return fig


REASONS = ("prompt+chosen", "prompt+rejected")


def drop_long_pairs(dataset: Any, tokenizer: Any, max_length: int) -> tuple[Any, dict[str, Any]]:
    """Keep the pairs whose prompt + chosen and prompt + rejected both fit in `max_length` tokens.

    A side longer than :func:`dpo_xpu.data.truncation.char_limit` characters cannot fit: it counts as too long
    without being tokenised, and a warning names its row.

    Returns:
        The kept pairs, and a report: `rows` (before), `kept`, `dropped`, `max_length`, and `reasons` (rows over the
        limit per side; a row too long on both counts under both).

    Raises:
        PreferenceDataError: every pair is too long.
    """
    limit = char_limit(tokenizer, max_length)
    prompts, keep, far, reasons = dataset["prompt"], [], [], dict.fromkeys(REASONS, 0)
    for index, (prompt, *answers) in enumerate(zip(prompts, dataset["chosen"], dataset["rejected"])):
        too_long = {}
        for reason, answer in zip(REASONS, answers):
            if len(prompt) + len(answer) > limit:  # cannot fit: not worth tokenising
                too_long[reason] = True
            else:
                prompt_ids, answer_ids = answer_tokens(tokenizer, prompt, answer, None, None)
                too_long[reason] = len(prompt_ids) + len(answer_ids) > max_length
            reasons[reason] += too_long[reason]
        if any(len(prompt) + len(answer) > limit for answer in answers):
            far.append(index + 1)
        if not any(too_long.values()):
            keep.append(index)
    rows = len(prompts)
    report = {
        "rows": rows,
        "kept": len(keep),
        "dropped": rows - len(keep),
        "max_length": max_length,
        "reasons": reasons,
    }
    if far:
        logger.warning(
            "drop_long_rows: %s far longer than max_length=%d tokens (over %d characters): dropped without tokenising",
            row_list(far),
            max_length,
            limit,
        )
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
