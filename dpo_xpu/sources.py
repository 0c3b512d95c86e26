"""Where preference pairs come from: the orca format, the generic ``prompt``/``chosen``/``rejected`` format,
and mixtures of several sources.

Every source is read into the orca columns (``system``, ``question``, ``chosen``, ``rejected``), so one ChatML
path (:func:`dpo_xpu.data.chatml_format`) formats them all. A generic row's ``prompt`` is the user's message:
it becomes ``question`` with an empty ``system``, and so gets the same ``<|im_start|>user ... <|im_start|>assistant``
wrapping as an orca question without a system prompt. (A prompt that already holds a chat template would be
wrapped twice: write the bare user message.)

```python
from dpo_xpu.sources import load_preference_pairs, mix_sources

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

from dpo_xpu.data import LOCAL_SUFFIXES, ORCA_COLUMNS, _read_local, load_orca_dpo_pairs, validate_preference_rows
from dpo_xpu.errors import PreferenceDataError

logger = logging.getLogger(__name__)

PAIR_COLUMNS: tuple[str, ...] = ("prompt", "chosen", "rejected")
"""The columns of the generic preference format."""


def detect_format(columns: Sequence[str], source_name: str = "rows") -> str:
    """``"orca"`` when ``columns`` hold the orca columns, ``"prompt-chosen-rejected"`` when they hold
    ``prompt``, ``chosen`` and ``rejected`` (orca wins when both are present).

    Raises:
        PreferenceDataError: neither set of columns is present; the message shows both formats.
    """
    if set(ORCA_COLUMNS) <= set(columns):
        return "orca"
    if set(PAIR_COLUMNS) <= set(columns):
        return "prompt-chosen-rejected"
    raise PreferenceDataError(
        f"{source_name}: cannot tell the data format from the columns {sorted(columns)}. Expected either "
        f"{list(ORCA_COLUMNS)} (data_format: orca) or {list(PAIR_COLUMNS)} (data_format: prompt-chosen-rejected)."
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


def load_preference_pairs(
    source: str | Path,
    data_format: str = "auto",
    split: str = "train",
    limit: int | None = None,
    seed: int = 42,
) -> datasets.Dataset:
    """Load and validate preference pairs in either format, as orca columns.

    Args:
        source (`str` or `Path`): a hub dataset id or a local `.jsonl` / `.json` / `.parquet` file.
        data_format (`str`, defaults to `"auto"`): `"orca"`, `"prompt-chosen-rejected"` or `"auto"` (decided
            from the columns of the first row, or of the hub dataset).
        split (`str`, defaults to `"train"`): the hub split; ignored for local files.
        limit (`int`, *optional*): keep this many rows after a seeded shuffle (as `load_orca_dpo_pairs`).
        seed (`int`, defaults to 42): the shuffle seed used with `limit`.

    Returns:
        `datasets.Dataset`: the columns `system`, `question`, `chosen`, `rejected`; generic rows get
        `system=""` and `question=prompt`.

    Raises:
        PreferenceDataError: a missing or empty file, an undetectable format, or a bad row (the message names
            the line or row, the column and the fix, as :func:`dpo_xpu.data.validate_preference_rows`).
    """
    name = Path(source).name if _is_local(source) else str(source)
    if data_format == "orca":
        return load_orca_dpo_pairs(source, split=split, limit=limit, seed=seed)
    if _is_local(source):
        if not Path(source).is_file() or Path(source).suffix not in LOCAL_SUFFIXES:
            return load_orca_dpo_pairs(source, split=split, limit=limit, seed=seed)  # raises the clear error
        rows, line_numbers = _read_local(Path(source))
        if not rows:
            raise PreferenceDataError(f"{source} holds no rows. Fix: add at least one preference pair.")
        first = rows[0] if isinstance(rows[0], Mapping) else {}
        columns: Sequence[str] = list(first)
    else:
        rows = datasets.load_dataset(str(source), split=split)
        line_numbers, columns = None, rows.column_names
        name = f"{source} [{split}]"
    found = data_format if data_format != "auto" else detect_format(columns, name)
    if found == "orca":
        return load_orca_dpo_pairs(source, split=split, limit=limit, seed=seed)
    validate_preference_rows(rows, columns=PAIR_COLUMNS, source_name=name, line_numbers=line_numbers, allow_empty=())
    dataset = _generic_to_orca(rows)
    logger.info("Loaded %d prompt/chosen/rejected pairs from %s", len(dataset), source)
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
        `tuple[datasets.Dataset, dict[str, int]]`: the mixed rows (orca columns) and the rows drawn per source.

    Raises:
        PreferenceDataError: a source cannot be loaded or holds a bad row.
    """
    loaded = {name: load_preference_pairs(name, data_format=data_format, seed=seed) for name in mixture}
    counts = mixture_counts({name: len(rows) for name, rows in loaded.items()}, mixture, limit)
    parts = [loaded[name].shuffle(seed=seed).select(range(counts[name])) for name in mixture]
    mixed = datasets.concatenate_datasets(parts).shuffle(seed=seed).flatten_indices()
    for name, count in counts.items():
        logger.info("dataset_mixture: %d rows from %s (%.1f%%)", count, name, 100 * count / max(1, len(mixed)))
    return mixed, counts
