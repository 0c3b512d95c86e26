"""Token lengths of preference pairs as training counts them, what a ``max_length`` keeps, and ``drop_long_rows``."""

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
    """For each of `prompt`, `chosen`, `rejected` (formatted pairs), one token count per row."""
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
    """Statistics per column (`stats`: `min`, `median`, `mean`, `max` tokens) and what `max_length` /
    `max_prompt_length` do: `rows`, `kept_whole`, `prompt_cut`, `truncated` (answers lose their end), `dropped` (the
    prompt alone fills `max_length`)."""
    stats = {
        column: {"min": min(v), "median": statistics.median(v), "mean": round(statistics.fmean(v), 1), "max": max(v)}
        for column, v in lengths.items()
        if v
    }
    counts = dict.fromkeys(("kept_whole", "prompt_cut", "truncated", "dropped"), 0)
    for prompt, chosen, rejected in zip(lengths["prompt"], lengths["chosen"], lengths["rejected"]):
        if max_prompt_length is not None and prompt > max_prompt_length:
            counts["prompt_cut"] += 1
            prompt = max_prompt_length
        kept = [kept_answer_length(prompt, n, max_length) for n in (1, chosen, rejected)]
        counts["dropped" if kept[0] == 0 else "kept_whole" if kept[1:] == [chosen, rejected] else "truncated"] += 1
    return {"stats": stats, "rows": len(lengths["prompt"]), **counts}


def plot_token_lengths(
    lengths: dict[str, list[int]], max_length: int | None = None, max_prompt_length: int | None = None
) -> Figure:
    """Histograms of prompt and answer lengths (tokens; 11 x 3.4 inches), the limits marked."""
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
    """The pairs whose prompt + chosen and prompt + rejected fit in `max_length` tokens, and a report: `rows`, `kept`,
    `dropped`, `max_length`, `reasons` (rows too long per side). `PreferenceDataError` when none fits."""
    limit = char_limit(tokenizer, max_length)
    keep, far, reasons = [], [], dict.fromkeys(REASONS, 0)
    for index, (prompt, *answers) in enumerate(zip(dataset["prompt"], dataset["chosen"], dataset["rejected"])):
        cannot_fit = [len(prompt) + len(answer) > limit for answer in answers]  # not worth tokenising
        too_long = [
            huge or sum(map(len, answer_tokens(tokenizer, prompt, answer, None, None))) > max_length
            for huge, answer in zip(cannot_fit, answers)
        ]
        for reason, long in zip(REASONS, too_long):
            reasons[reason] += long
        if any(cannot_fit):
            far.append(index + 1)
        if not any(too_long):
            keep.append(index)
    rows = len(dataset)
    report = dict(rows=rows, kept=len(keep), dropped=rows - len(keep), max_length=max_length, reasons=reasons)
    if far:
        logger.warning(
            f"drop_long_rows: {row_list(far)} far longer than max_length={max_length} tokens (over {limit} "
            "characters): dropped without tokenising"
        )
    counts = ", ".join(f"{reason} too long: {count}" for reason, count in reasons.items())
    logger.info(
        f"drop_long_rows: dropped {report['dropped']} of {rows} pairs longer than max_length={max_length} tokens "
        f"({counts})"
    )
    if not keep:
        raise PreferenceDataError(
            f"drop_long_rows: all {rows} pairs are longer than max_length={max_length} tokens "
            f"({reasons}). Fix: raise max_length, or set drop_long_rows: false to truncate them instead."
        )
    return dataset.select(keep) if len(keep) < rows else dataset, report
