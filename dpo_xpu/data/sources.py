"""Where preference pairs come from: the orca, generic (``prompt``/``chosen``/``rejected``) and conversational
formats, and mixtures of several sources.

Orca and generic rows are read into the orca columns and formatted by
:func:`dpo_xpu.data.preferences.chatml_format`: a generic ``prompt`` is the user's message (``question``, with an
empty ``system``), so write the bare message, not one already in a chat template. Conversational rows are read into
``prompt``/``chosen``/``rejected`` message lists, formatted by :func:`dpo_xpu.data.preferences.conversational_format`;
a mixture holding a conversational source turns its orca sources into messages too, so every row gets one format.

```python
rows = load_preference_pairs("my_pairs.jsonl")  # format detected from the columns
mixed, counts = mix_sources({"Intel/orca_dpo_pairs": 0.7, "my_pairs.jsonl": 0.3}, limit=1000, seed=42)
```
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

from dpo_xpu.data.preferences import keep_shuffled, load_orca_dpo_pairs
from dpo_xpu.data.rows import ORCA_COLUMNS, read_source, validate_conversational_rows, validate_preference_rows
from dpo_xpu.errors import PreferenceDataError

logger = logging.getLogger(__name__)

PAIR_COLUMNS: tuple[str, ...] = ("prompt", "chosen", "rejected")
"""The columns of the generic preference format."""

FORMATS: tuple[str, ...] = ("auto", "orca", "prompt-chosen-rejected", "conversational")
"""The values of `data_format` that :func:`load_preference_pairs` accepts."""

_REQUIRED: dict[str, tuple[str, ...]] = {"orca": ORCA_COLUMNS, "prompt-chosen-rejected": PAIR_COLUMNS}


def detect_format(columns: Sequence[str], source_name: str = "rows", example: Mapping[str, Any] | None = None) -> str:
    """Tell the data format from the columns (and, for message lists, the first row `example`).

    Returns:
        `"orca"` when `columns` hold the orca columns; else `"conversational"` when `example` holds a list in
        `prompt`, `chosen` or `rejected` and `columns` hold `chosen` and `rejected`; else
        `"prompt-chosen-rejected"` when they hold `prompt`, `chosen` and `rejected`.

    Raises:
        PreferenceDataError: no format's columns are all present; the message names the missing columns of the
            nearest format (two or more of its columns present, or message lists), else shows every format.
    """
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


def _generic_to_orca(rows: Sequence[Mapping[str, Any]] | datasets.Dataset) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {
            "system": [""] * len(rows),
            "question": [row["prompt"] for row in rows],
            "chosen": [row["chosen"] for row in rows],
            "rejected": [row["rejected"] for row in rows],
        }
    )


def _orca_to_conversational(rows: datasets.Dataset) -> datasets.Dataset:
    def turn(role: str, content: str) -> dict[str, str]:
        return {"role": role, "content": content}

    return datasets.Dataset.from_dict(
        {
            "prompt": [[turn("system", r["system"])] * bool(r["system"]) + [turn("user", r["question"])] for r in rows],
            "chosen": [[turn("assistant", r["chosen"])] for r in rows],
            "rejected": [[turn("assistant", r["rejected"])] for r in rows],
        }
    )


def load_preference_pairs(
    source: str | Path,
    data_format: str = "auto",
    split: str = "train",
    limit: int | None = None,
    seed: int = 42,
) -> datasets.Dataset:
    """Load and validate preference pairs in any of the formats of `FORMATS`.

    Args:
        source: a hub dataset id or a local `.jsonl` / `.json` / `.parquet` file.
        data_format: `"orca"`, `"prompt-chosen-rejected"`, `"conversational"` or `"auto"` (:func:`detect_format`
            on the first row, or the hub dataset's columns).
        split, limit, seed: as :func:`dpo_xpu.data.preferences.load_orca_dpo_pairs`.

    Returns:
        The orca columns (generic rows get `system=""` and `question=prompt`), or for conversational data
        `prompt`, `chosen`, `rejected` message lists (implicit prompts split off).

    Raises:
        PreferenceDataError: an unknown `data_format`, a source that cannot be read, an undetectable format, or a
            bad row (the message names the line or row, the column and the fix).
    """
    if data_format not in FORMATS:
        raise PreferenceDataError(f"data_format: unknown {data_format!r}. Fix: use one of {list(FORMATS)}.")
    if data_format == "orca":
        return load_orca_dpo_pairs(source, split=split, limit=limit, seed=seed)
    rows, line_numbers, name = read_source(source, split)
    if isinstance(rows, datasets.Dataset):
        columns: Sequence[str] = rows.column_names
        first = rows[0] if len(rows) else {}
    else:
        first = rows[0] if isinstance(rows[0], Mapping) else {}
        columns = list(first)
    where = f"{name} line {line_numbers[0]}" if line_numbers else f"{name} row 1"
    found = data_format if data_format != "auto" else detect_format(columns, where, first)
    if found == "orca":
        return load_orca_dpo_pairs(source, split=split, limit=limit, seed=seed)
    if found == "conversational":
        pairs = validate_conversational_rows(rows, source_name=name, line_numbers=line_numbers)
        dataset = datasets.Dataset.from_dict({column: [pair[column] for pair in pairs] for column in PAIR_COLUMNS})
    else:
        validate_preference_rows(
            rows, columns=PAIR_COLUMNS, source_name=name, line_numbers=line_numbers, allow_empty=()
        )
        dataset = _generic_to_orca(rows)
    logger.info("Loaded %d %s pairs from %s", len(dataset), found, source)
    return keep_shuffled(dataset, limit, seed)


def mixture_counts(available: Mapping[str, int], proportions: Mapping[str, float], limit: int | None = None):
    """How many rows to draw from each source so the mixture has the asked proportions.

    The total is `min(available / proportion)` over sources (proportions normalised to sum 1), or `limit` when
    smaller; each source gets `total * proportion` rounded by the largest-remainder method, so every count is
    within one row of what was asked and the counts add up to the total.

    Returns:
        `dict[str, int]`: rows per source, in the order of `proportions`.
    """
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
    mixture: Mapping[str, float],
    limit: int | None = None,
    seed: int = 42,
    data_format: str = "auto",
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Draw a seeded mixture of several sources, without replacement, in the given proportions.

    Each source (hub id or local file -> any positive weight) is loaded with :func:`load_preference_pairs` in
    `data_format` (`"auto"`: per source), shuffled with `seed`, and its first :func:`mixture_counts` rows taken (in
    all `limit`, or as many as the proportions allow); the mixture is shuffled again with `seed`.

    Returns:
        The mixed rows (orca columns, or conversational ones when a source is conversational) and the rows drawn
        per source.

    Raises:
        PreferenceDataError: a source cannot be loaded or holds a bad row.
    """
    loaded = {name: load_preference_pairs(name, data_format=data_format, seed=seed) for name in mixture}
    if len({tuple(rows.column_names) for rows in loaded.values()}) > 1:  # conversational and orca sources
        loaded = {
            name: rows if "prompt" in rows.column_names else _orca_to_conversational(rows)
            for name, rows in loaded.items()
        }
    counts = mixture_counts({name: len(rows) for name, rows in loaded.items()}, mixture, limit)
    parts = [loaded[name].shuffle(seed=seed).select(range(counts[name])) for name in mixture]
    mixed = datasets.concatenate_datasets(parts).shuffle(seed=seed).flatten_indices()
    for name, count in counts.items():
        logger.info("dataset_mixture: %d rows from %s (%.1f%%)", count, name, 100 * count / max(1, len(mixed)))
    return mixed, counts
