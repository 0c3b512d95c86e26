"""Where preference pairs come from: the orca, generic (``prompt``/``chosen``/``rejected``) and conversational
formats, and mixtures of several sources.

A generic ``prompt`` becomes the orca ``question`` (the bare user message, not one already in a chat template) with
an empty ``system``; a mixture holding a conversational source turns its orca sources into messages too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

from dpo_xpu.data.rows import (
    ORCA_COLUMNS,
    read_source,
    validate_conversational_rows,
    validate_preference_rows,
)
from dpo_xpu.errors import PreferenceDataError

logger = logging.getLogger(__name__)

PAIR_COLUMNS: tuple[str, ...] = ("prompt", "chosen", "rejected")  # the generic format's
FORMATS: tuple[str, ...] = ("auto", "orca", "prompt-chosen-rejected", "conversational")  # data_format's values

_REQUIRED: dict[str, tuple[str, ...]] = {"orca": ORCA_COLUMNS, "prompt-chosen-rejected": PAIR_COLUMNS}
#: Per format, the column each orca column is read from (None: empty).
_AS_ORCA = {"orca": ORCA_COLUMNS, "prompt-chosen-rejected": (None, *PAIR_COLUMNS)}


def detect_format(columns: Sequence[str], source_name: str = "rows", example: Mapping[str, Any] | None = None) -> str:
    """The data format of `columns`: `"orca"`, else `"conversational"` (the first row `example` holds message
    lists), else `"prompt-chosen-rejected"`; `PreferenceDataError` naming the nearest format's missing columns."""
    have = set(columns)
    if set(ORCA_COLUMNS) <= have:
        return "orca"
    listed = isinstance(example, Mapping) and any(isinstance(example.get(c), list) for c in PAIR_COLUMNS)
    formats = {"conversational": ("chosen", "rejected")} if listed else _REQUIRED
    for name, needed in formats.items():
        if set(needed) <= have:
            return name
    name, needed = min(formats.items(), key=lambda item: (len(set(item[1]) - have), -len(set(item[1]) & have)))
    missing = [column for column in needed if column not in have]
    if listed or len(set(needed) & have) >= 2:
        plural = "s" if len(missing) > 1 else ""
        raise PreferenceDataError(
            f"{source_name}: missing column{plural} {', '.join(map(repr, missing))} of the {name} format (found "
            f"{sorted(have)}). Fix: add the column{plural} to every row (or rename the column{plural} holding "
            f"{'them' if plural else 'it'}), for data_format: {name}."
        )
    raise PreferenceDataError(
        f"{source_name}: cannot tell the data format from the columns {sorted(columns)}. Fix: use the columns "
        f"{list(ORCA_COLUMNS)} (data_format: orca), {list(PAIR_COLUMNS)} (data_format: prompt-chosen-rejected), "
        "or 'chosen' and 'rejected' lists of chat messages with an optional 'prompt' list (data_format: "
        "conversational)."
    )


def orca_messages(row: Mapping[str, str]) -> dict[str, list[dict[str, str]]]:
    """An orca row as TRL's conversational row: the ``prompt`` messages (a system turn when ``system`` is not empty,
    the user turn) and one assistant message per answer."""
    system = [{"role": "system", "content": row["system"]}] if row["system"] else []
    return {
        "prompt": [*system, {"role": "user", "content": row["question"]}],
        **{column: [{"role": "assistant", "content": row[column]}] for column in ("chosen", "rejected")},
    }


def load_preference_pairs(
    source: str | Path, data_format: str = "auto", split: str = "train", limit: int | None = None, seed: int = 42
) -> datasets.Dataset:
    """Validated pairs from a hub id (its ``split``) or a ``.jsonl``, ``.json`` or ``.parquet`` file, in one of
    `FORMATS` (`"auto"`: :func:`detect_format`): the orca columns (a generic ``prompt`` as the ``question``, with
    an empty ``system``), or conversational message lists. ``limit``: that many rows after a shuffle with ``seed``
    (``None``: all, in order). `PreferenceDataError`: an unknown `data_format`, an unreadable source, an undetectable
    format, a row that is no object, or a bad row (text that is no valid Unicode included); `ValueError`: a
    ``limit`` below 1."""
    if data_format not in FORMATS:
        raise PreferenceDataError(f"data_format: unknown {data_format!r}. Fix: use one of {list(FORMATS)}.")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of rows or None, got {limit!r}.")
    rows, line_numbers, name = read_source(source, split)
    where = f"{name} line {line_numbers[0]}" if line_numbers else f"{name} row 1"
    found = data_format if data_format != "auto" else detect_format(list(rows[0]), where, rows[0])
    if found == "conversational":
        dataset = datasets.Dataset.from_list(validate_conversational_rows(rows, name, line_numbers))
    else:
        allow_empty = ("system",) if found == "orca" else ()
        validate_preference_rows(rows, _REQUIRED[found], name, line_numbers, allow_empty)
        columns = zip(ORCA_COLUMNS, _AS_ORCA[found])
        dataset = datasets.Dataset.from_dict({orca: [row[c] if c else "" for row in rows] for orca, c in columns})
    logger.info("Loaded %d %s pairs from %s", len(dataset), found, source)
    if limit is None:
        return dataset
    kept = dataset.shuffle(seed=seed).select(range(min(limit, len(dataset)))).flatten_indices()
    logger.info("Kept %d pairs (shuffled with seed %d)", len(kept), seed)
    return kept


def mixture_counts(available: Mapping[str, int], proportions: Mapping[str, float], limit: int | None = None):
    """Rows to draw per source (in the order of `proportions`): the total is `min(available / proportion)` (or
    `limit` when smaller), each share rounded by the largest-remainder method, so the counts add up to it."""
    weight = sum(proportions.values())
    shares = {name: value / weight for name, value in proportions.items()}
    total = min(math.floor(available[name] / share + 1e-9) for name, share in shares.items())
    if limit is not None and limit < total:
        total = limit
    elif limit is not None and limit > total:
        logger.warning("dataset_mixture: the sources hold %d rows in these proportions, not limit=%d", total, limit)
    exact = {name: total * share for name, share in shares.items()}
    counts = {name: math.floor(value) for name, value in exact.items()}
    by_remainder = sorted(exact, key=lambda name: exact[name] - counts[name], reverse=True)
    for name in by_remainder[: total - sum(counts.values())]:
        counts[name] += 1
    return {name: min(count, available[name]) for name, count in counts.items()}


def mix_sources(
    mixture: Mapping[str, float], limit: int | None = None, seed: int = 42, data_format: str = "auto"
) -> tuple[datasets.Dataset, dict[str, int]]:
    """A seeded mixture of sources (hub id or file -> positive weight), drawn without replacement in those
    proportions, and the rows drawn per source; `PreferenceDataError` for a source that cannot be loaded."""
    loaded = {name: load_preference_pairs(name, data_format=data_format, seed=seed) for name in mixture}
    if len({tuple(rows.column_names) for rows in loaded.values()}) > 1:  # conversational and orca sources
        loaded = {
            name: rows if "prompt" in rows.column_names else datasets.Dataset.from_list(list(map(orca_messages, rows)))
            for name, rows in loaded.items()
        }
    counts = mixture_counts({name: len(rows) for name, rows in loaded.items()}, mixture, limit)
    parts = [loaded[name].shuffle(seed=seed).select(range(counts[name])) for name in mixture]
    mixed = datasets.concatenate_datasets(parts).shuffle(seed=seed).flatten_indices()
    for name, count in counts.items():
        logger.info("dataset_mixture: %d rows from %s (%.1f%%)", count, name, 100 * count / max(1, len(mixed)))
    return mixed, counts
