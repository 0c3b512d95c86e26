"""Token lengths of preference pairs: how long prompts and answers are, and what a ``max_length`` keeps.

Lengths are counted as training sees them (TRL 1.x): no special tokens added, and an answer's tokens are those
of prompt + answer after the point where they part from the prompt's own tokens.

    >>> lengths = token_lengths(pairs, tokenizer)             # {"prompt": [...], "chosen": [...], "rejected": [...]}
    >>> length_summary(lengths, max_length=1024, max_prompt_length=512)
"""

from __future__ import annotations

import statistics
from typing import Any

from matplotlib.figure import Figure

from dpo_xpu.evaluation import _answer_tokens

COLUMNS = ("prompt", "chosen", "rejected")


def token_lengths(dataset: Any, tokenizer: Any) -> dict[str, list[int]]:
    """Count the tokens of every prompt, chosen and rejected answer.

    Args:
        dataset (`datasets.Dataset` or `dict`): columns `prompt`, `chosen`, `rejected` (see `format_orca_dataset`).
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer.

    Returns:
        `dict[str, list[int]]`: for each of `prompt`, `chosen`, `rejected`, one token count per row.
    """
    lengths: dict[str, list[int]] = {column: [] for column in COLUMNS}
    for prompt, chosen, rejected in zip(dataset["prompt"], dataset["chosen"], dataset["rejected"]):
        prompt_ids, chosen_ids = _answer_tokens(tokenizer, prompt, chosen, None, None)
        _, rejected_ids = _answer_tokens(tokenizer, prompt, rejected, None, None)
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
        if prompt >= max_length:
            dropped += 1
        elif prompt + max(chosen, rejected) <= max_length:
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
