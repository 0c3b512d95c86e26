"""Where preference pairs come from: the orca format, the generic ``prompt``/``chosen``/``rejected`` format,
TRL's conversational format, and mixtures of several sources.

Orca and generic sources are read into the orca columns (``system``, ``question``, ``chosen``, ``rejected``),
formatted by :func:`dpo_xpu.data.preferences.chatml_format`. A generic row's ``prompt`` is the user's message:
it becomes ``question`` with an empty ``system``, and so gets the same ``<|im_start|>user ... <|im_start|>assistant``
wrapping as an orca question without a system prompt. (A prompt that already holds a chat template would be
wrapped twice: write the bare user message.)

Conversational sources (``chosen`` and ``rejected`` lists of ``{"role", "content"}`` messages, with a
``prompt`` list or, without one, whole conversations sharing their start) are read into ``prompt``,
``chosen``, ``rejected`` message lists, formatted by :func:`dpo_xpu.data.preferences.conversational_format`
in the model's own chat template (the same ChatML strings when that template is ChatML or missing). A mixture
holding a conversational source turns its orca sources into messages too, so that every row of the mixture gets
the same chat format. ``chat_format`` (see :data:`dpo_xpu.data.preferences.CHAT_FORMATS`) chooses the format.

```python
from dpo_xpu.data.sources import load_preference_pairs, mix_sources

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

from dpo_xpu.data.preferences import (
    LOCAL_SUFFIXES,
    ORCA_COLUMNS,
    load_hub_split,
    load_orca_dpo_pairs,
    read_local_rows,
    validate_conversational_rows,
    validate_preference_rows,
)
from dpo_xpu.errors import PreferenceDataError

logger = logging.getLogger(__name__)

PAIR_COLUMNS: tuple[str, ...] = ("prompt", "chosen", "rejected")
"""The columns of the generic preference format."""


FORMATS: tuple[str, ...] = ("auto", "orca", "prompt-chosen-rejected", "conversational")
"""The values of `data_format` that :func:`load_preference_pairs` accepts."""

_REQUIRED: dict[str, tuple[str, ...]] = {"orca": ORCA_COLUMNS, "prompt-chosen-rejected": PAIR_COLUMNS}


def detect_format(columns: Sequence[str], source_name: str = "rows", example: Mapping[str, Any] | None = None) -> str:
    """Tell the data format from the columns (and, for conversational data, the first row's values).

    ``"orca"`` when ``columns`` hold the orca columns; else ``"conversational"`` when ``example`` holds a list
    in ``prompt``, ``chosen`` or ``rejected`` and ``columns`` hold ``chosen`` and ``rejected``; else
    ``"prompt-chosen-rejected"`` when they hold ``prompt``, ``chosen`` and ``rejected``.

    Args:
        columns (`Sequence[str]`): the column names (of the first row, for a JSON file).
        source_name (`str`, defaults to `"rows"`): where the columns come from, quoted in messages.
        example (`Mapping[str, Any]`, *optional*): the first row, to tell message lists from strings.

    Returns:
        `str`: `"orca"`, `"prompt-chosen-rejected"` or `"conversational"`.

    Raises:
        PreferenceDataError: no format's columns are all present. When two or more columns of a format are
            (or the row holds message lists), the message names the missing columns and that format;
            otherwise it shows every format.
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


def _is_local(source: str | Path) -> bool:
    path = Path(source)
    return isinstance(source, Path) or path.suffix in LOCAL_SUFFIXES or path.exists()


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
        source (`str` or `Path`): a hub dataset id or a local `.jsonl` / `.json` / `.parquet` file.
        data_format (`str`, defaults to `"auto"`): `"orca"`, `"prompt-chosen-rejected"`, `"conversational"` or
            `"auto"` (decided by :func:`detect_format` from the first row, or the hub dataset's columns).
        split (`str`, defaults to `"train"`): the hub split; ignored for local files.
        limit (`int`, *optional*): keep this many rows after a seeded shuffle (as `load_orca_dpo_pairs`).
        seed (`int`, defaults to 42): the shuffle seed used with `limit`.

    Returns:
        `datasets.Dataset`: the columns `system`, `question`, `chosen`, `rejected` (generic rows get
        `system=""` and `question=prompt`), or, for conversational data, `prompt`, `chosen`, `rejected` lists
        of `{"role", "content"}` messages (implicit prompts split off, see
        :func:`dpo_xpu.data.preferences.validate_conversational_rows`).

    Raises:
        PreferenceDataError: an unknown `data_format`, a missing, unreadable or empty file, an undetectable
            format, or a bad row (the message names the line or row, the column and the fix, as
            :func:`dpo_xpu.data.preferences.validate_preference_rows`).
    """
    if data_format not in FORMATS:
        raise PreferenceDataError(f"data_format: unknown {data_format!r}. Fix: use one of {list(FORMATS)}.")
    name = Path(source).name if _is_local(source) else str(source)
    if data_format == "orca":
        return load_orca_dpo_pairs(source, split=split, limit=limit, seed=seed)
    if _is_local(source):
        if not Path(source).is_file() or Path(source).suffix not in LOCAL_SUFFIXES:
            return load_orca_dpo_pairs(source, split=split, limit=limit, seed=seed)  # raises the clear error
        rows, line_numbers = read_local_rows(Path(source))
        if not rows:
            raise PreferenceDataError(f"{source} holds no rows. Fix: add at least one preference pair.")
        first = rows[0] if isinstance(rows[0], Mapping) else {}
        columns: Sequence[str] = list(first)
    else:
        rows = load_hub_split(str(source), split)
        line_numbers, columns = None, rows.column_names
        first = rows[0] if len(rows) else {}
        name = f"{source} [{split}]"
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
    if limit is not None:
        dataset = dataset.shuffle(seed=seed).select(range(min(limit, len(dataset)))).flatten_indices()
    return dataset


def mixture_counts(available: Mapping[str, int], proportions: Mapping[str, float], limit: int | None = None):
    """How many rows to draw from each source so the mixture has the asked proportions.

    The total is the largest the sources allow, ``min(available / proportion)`` over sources (proportions
    normalised to sum 1), or ``limit`` when given and smaller. Each source then gets ``total * proportion``
    rounded by the largest-remainder method, so every count is within one row of what was asked and the
    counts add up to the total.

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

    Each source is loaded with :func:`load_preference_pairs` (its own format detected when `data_format` is
    `"auto"`), shuffled with `seed`, and its first :func:`mixture_counts` rows taken; the mixture is shuffled
    again with `seed`.

    Args:
        mixture (`Mapping[str, float]`): source (hub id or local file) -> proportion (any positive weights;
            normalised to sum 1).
        limit (`int`, *optional*): rows in the mixture; `None` takes as many as the proportions allow.
        seed (`int`, defaults to 42): the seed of every shuffle.
        data_format (`str`, defaults to `"auto"`): the format of every source, or `"auto"` per source.

    Returns:
        `tuple[datasets.Dataset, dict[str, int]]`: the mixed rows (orca columns; conversational columns when a
        source is conversational, so that every row is then formatted in the same chat format) and the rows drawn
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
