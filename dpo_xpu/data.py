"""Preference data: load Intel/orca_dpo_pairs (or a local file in its format), validate it, format it.

The data flow is the original recipe's (Maxime Labonne's "Fine-tune Mistral-7b with DPO", Intel's ipex-llm
DPO example): rows with the columns ``system``, ``question``, ``chosen`` and ``rejected`` become a ChatML
``prompt`` (system turn, user turn, then the opening of the assistant turn) and two answers that each end
with ``<|im_end|>``.

```python
from dpo_xpu.data import DEMO_SAMPLE_PATH, format_orca_dataset, load_orca_dpo_pairs, train_eval_split

rows = load_orca_dpo_pairs(DEMO_SAMPLE_PATH)  # or "Intel/orca_dpo_pairs" from the hub
pairs = format_orca_dataset(rows, tokenizer)  # columns: prompt, chosen, rejected
train, evaluation = train_eval_split(pairs, eval_fraction=0.1, seed=42)
```
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import datasets

from dpo_xpu.errors import PreferenceDataError

logger = logging.getLogger(__name__)

ORCA_COLUMNS: tuple[str, ...] = ("system", "question", "chosen", "rejected")
"""The columns of Intel/orca_dpo_pairs, in the dataset's order."""

LOCAL_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".parquet")
"""File types :func:`load_orca_dpo_pairs` reads from disk."""

DEMO_SAMPLE_PATH: Path = Path(__file__).resolve().parent / "assets" / "orca_demo_sample.jsonl"
"""Orca-format pairs written by the dpo_xpu developers for the offline demo (not from the hub data)."""

CHATML_TEMPLATE: str = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""The standard ChatML chat template, for tokenizers whose own template is not ChatML (or that have none)."""

IM_END = "<|im_end|>\n"
"""What the recipe appends to each answer: the end of the assistant turn."""

_FIXES = {
    "system": "give every row a string 'system' prompt (use \"\" for none)",
    "question": "give every row a non-empty 'question' or remove the row",
    "chosen": "give every row a non-empty 'chosen' answer or remove the row",
    "rejected": "give every row a non-empty 'rejected' answer or remove the row",
}


def _fix(column: str) -> str:
    return _FIXES.get(column, f"give every row a non-empty {column!r} or remove the row")


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return f"{type(value).__name__} {shown}"


def validate_preference_rows(
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[str] = ORCA_COLUMNS,
    source_name: str = "rows",
    line_numbers: Sequence[int] | None = None,
    allow_empty: Sequence[str] = ("system",),
) -> int:
    """Check that every row is a usable preference pair, stopping at the first bad one.

    Args:
        rows (`Iterable[Mapping[str, Any]]`): the rows, e.g. a list of dicts or a `datasets.Dataset`.
        columns (`Sequence[str]`, defaults to `ORCA_COLUMNS`): the columns every row must have, each a string.
            Use `("prompt", "chosen", "rejected")` for the generic preference format.
        source_name (`str`, defaults to `"rows"`): what the rows came from (a file name), quoted in messages.
        line_numbers (`Sequence[int]`, *optional*): the 1-based file line of each row; messages then say
            "line N". Without it they say "row N", the 1-based position of the row.
        allow_empty (`Sequence[str]`, defaults to `("system",)`): columns that may hold an empty or blank
            string. Every other column must hold a non-blank string.

    Returns:
        `int`: the number of rows checked.

    Raises:
        PreferenceDataError: a row is not a mapping, lacks a column, holds a null or non-string value, holds a
            blank string in a column not in `allow_empty`, or has `chosen` equal to `rejected` (after
            stripping whitespace). The message names the row, the column and the fix.
    """
    count = 0
    for index, row in enumerate(rows):
        where = f"{source_name} line {line_numbers[index]}" if line_numbers else f"{source_name} row {index + 1}"
        if not isinstance(row, Mapping):
            raise PreferenceDataError(
                f"{where}: expected a JSON object with the columns {list(columns)}, found {_describe(row)}. "
                f"Fix: write each row as an object such as {{{', '.join(f'{c!r}: ...' for c in columns)}}}."
            )
        for column in columns:
            if column not in row:
                raise PreferenceDataError(
                    f"{where}: missing column {column!r} (found {sorted(row)}). "
                    f"Fix: every row needs the columns {list(columns)}; {_fix(column)}."
                )
            value = row[column]
            if not isinstance(value, str):
                raise PreferenceDataError(
                    f"{where}, column {column!r}: expected a string, found {_describe(value)}. Fix: {_fix(column)}."
                )
            if column not in allow_empty and not value.strip():
                raise PreferenceDataError(
                    f"{where}, column {column!r}: expected a non-empty string, found {value!r}. Fix: {_fix(column)}."
                )
        if "chosen" in columns and "rejected" in columns and row["chosen"].strip() == row["rejected"].strip():
            raise PreferenceDataError(
                f"{where}, column 'rejected': identical to 'chosen' (after stripping whitespace), so the "
                "pair states no preference. Fix: give a worse 'rejected' answer or remove the row."
            )
        count += 1
    return count


def _read_jsonl(path: Path) -> tuple[list[Any], list[int]]:
    rows, line_numbers = [], []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                found = line.strip() if len(line.strip()) <= 60 else line.strip()[:57] + "..."
                raise PreferenceDataError(
                    f"{path.name} line {number}: not valid JSON ({error.msg}, column {error.colno}); "
                    f"found {found!r}. Fix: write one JSON object per line, "
                    '{"system": "...", "question": "...", "chosen": "...", "rejected": "..."}.'
                ) from error
            line_numbers.append(number)
    return rows, line_numbers


def _read_local(path: Path) -> tuple[list[Any], list[int] | None]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".json":
        # Read with the json module, not pyarrow: pyarrow's type inference would cast or reject a stray
        # number or null before validation could name its row.
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return _read_jsonl(path)  # JSON lines saved as .json
        if not isinstance(data, list):
            raise PreferenceDataError(
                f"{path.name}: expected a JSON list of row objects (or one object per line), "
                f"found {type(data).__name__}. Fix: save the rows as [{{...}}, {{...}}] or as JSON lines."
            )
        return data, None
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist(), None


def load_orca_dpo_pairs(
    source: str | Path = "Intel/orca_dpo_pairs",
    split: str = "train",
    limit: int | None = None,
    seed: int = 42,
) -> datasets.Dataset:
    """Load and validate preference pairs in the Intel/orca_dpo_pairs format.

    Args:
        source (`str` or `Path`, defaults to `"Intel/orca_dpo_pairs"`): a Hugging Face Hub dataset id (loaded
            with `datasets.load_dataset(source, split=split)`), or a local `.jsonl`, `.json` (a list of
            objects, or JSON lines) or `.parquet` file. See `DEMO_SAMPLE_PATH` for a shipped offline sample.
        split (`str`, defaults to `"train"`): the split to load from the hub; ignored for local files.
        limit (`int`, *optional*): after validation, shuffle the rows with `seed` and keep the first `limit`.
            `None` keeps every row in file order; a `limit` above the row count keeps every row, shuffled.
        seed (`int`, defaults to 42): the shuffle seed used with `limit`.

    Returns:
        `datasets.Dataset`: the columns `system`, `question`, `chosen`, `rejected` (others are dropped).

    Raises:
        PreferenceDataError: the file does not exist, has an unsupported type or holds no rows, or a row fails
            :func:`validate_preference_rows` (the message names the line or row, the column and the fix).
        ValueError: `limit` is below 1.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of rows or None, got {limit!r}.")
    path = Path(source)
    if isinstance(source, Path) or path.suffix in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise PreferenceDataError(
                f"{path} does not exist. Fix: pass an existing .jsonl, .json or .parquet file, or a hub id "
                "such as 'Intel/orca_dpo_pairs'."
            )
        if path.suffix not in LOCAL_SUFFIXES:
            raise PreferenceDataError(
                f"{path}: unsupported file type {path.suffix!r}. Fix: save the rows as one of {list(LOCAL_SUFFIXES)}."
            )
        rows, line_numbers = _read_local(path)
        if not rows:
            raise PreferenceDataError(f"{path} holds no rows. Fix: add at least one preference pair.")
        validate_preference_rows(rows, source_name=path.name, line_numbers=line_numbers)
        dataset = datasets.Dataset.from_dict({column: [row[column] for row in rows] for column in ORCA_COLUMNS})
    else:
        dataset = datasets.load_dataset(str(source), split=split)
        validate_preference_rows(dataset, source_name=f"{source} [{split}]")
        dataset = dataset.select_columns(list(ORCA_COLUMNS))
    logger.info("Loaded %d preference pairs from %s", len(dataset), source)
    if limit is not None:
        dataset = dataset.shuffle(seed=seed).select(range(min(limit, len(dataset)))).flatten_indices()
        logger.info("Kept %d pairs (shuffled with seed %d)", len(dataset), seed)
    return dataset


def _is_chatml(template: Any) -> bool:
    return isinstance(template, str) and "<|im_start|>" in template and "<|im_end|>" in template


def chatml_format(example: Mapping[str, Any], tokenizer: Any, row: int | None = None) -> dict[str, str]:
    """Turn one orca row into a ChatML prompt and two answers, as the original recipe does.

    The prompt is the chat template applied to a system turn (only when `system` is non-empty) and a user turn
    (`question`), with `add_generation_prompt=True`. The tokenizer's own template is used when it is ChatML;
    otherwise `CHATML_TEMPLATE` is passed for this call (the tokenizer is not changed). Each answer gets
    `"<|im_end|>\\n"` appended.

    Args:
        example (`Mapping[str, Any]`): a row with the columns `system`, `question`, `chosen`, `rejected`.
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer.
        row (`int`, *optional*): the 1-based row number quoted in errors; defaults to `example.get("_row")`.

    Returns:
        `dict[str, str]`: `{"prompt", "chosen", "rejected"}`.

    Raises:
        PreferenceDataError: the token ids of the prompt are not a prefix of those of prompt + answer (the
            prompt's last token merges with the answer's first one), so DPO would score part of the prompt as
            answer. The message names the row and column and quotes the tokens at the boundary.
    """
    messages = []
    if example["system"]:
        messages.append({"role": "system", "content": example["system"]})
    messages.append({"role": "user", "content": example["question"]})
    template = None if _is_chatml(getattr(tokenizer, "chat_template", None)) else CHATML_TEMPLATE
    prompt = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    formatted = {
        "prompt": prompt,
        "chosen": example["chosen"] + IM_END,
        "rejected": example["rejected"] + IM_END,
    }

    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for column in ("chosen", "rejected"):
        ids = tokenizer(prompt + formatted[column], add_special_tokens=False)["input_ids"]
        if ids[: len(prompt_ids)] == prompt_ids:
            continue
        at = next(i for i, (a, b) in enumerate(zip(prompt_ids, ids, strict=False)) if a != b)
        row = example.get("_row") if row is None else row
        where = f"row {row}" if row is not None else "row"
        raise PreferenceDataError(
            f"{where}, column {column!r}: the prompt's last tokens merge with the start of the answer "
            f"(prompt alone ends {tokenizer.convert_ids_to_tokens(prompt_ids[at:])}, prompt + {column} has "
            f"{tokenizer.convert_ids_to_tokens(ids[at : len(prompt_ids) + 1])} there; answer starts "
            f"{example[column][:20]!r}). Fix: strip leading whitespace and newlines from the {column!r} "
            "answer, or remove the row."
        )
    return formatted


def _format_row(example: dict[str, Any], index: int, tokenizer: Any) -> dict[str, str]:
    return chatml_format(example, tokenizer, row=index + 1)


def format_orca_dataset(dataset: datasets.Dataset, tokenizer: Any, num_proc: int | None = None) -> datasets.Dataset:
    """Apply :func:`chatml_format` to every row and keep only `prompt`, `chosen` and `rejected`.

    Args:
        dataset (`datasets.Dataset`): orca-format rows, e.g. from :func:`load_orca_dpo_pairs`.
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer.
        num_proc (`int`, *optional*): worker processes for `Dataset.map`; `None` formats in this process.

    Returns:
        `datasets.Dataset`: the columns `prompt`, `chosen`, `rejected` (every original column is dropped).

    Raises:
        PreferenceDataError: a row fails the token-boundary check of :func:`chatml_format`; the row number
            is its 1-based position in `dataset`.
    """
    formatted = dataset.map(
        partial(_format_row, tokenizer=tokenizer),
        with_indices=True,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        desc="ChatML formatting",
    )
    return formatted.select_columns(["prompt", "chosen", "rejected"])


def train_eval_split(
    dataset: datasets.Dataset, eval_fraction: float = 0.1, seed: int = 42
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split rows into a training and a held-out evaluation part, shuffled with a fixed seed.

    Args:
        dataset (`datasets.Dataset`): the rows to split.
        eval_fraction (`float`, defaults to 0.1): the share of rows held out, strictly between 0 and 1; the
            evaluation part has `ceil(len(dataset) * eval_fraction)` rows.
        seed (`int`, defaults to 42): the shuffle seed; the same seed gives the same split.

    Returns:
        `tuple[datasets.Dataset, datasets.Dataset]`: `(train, evaluation)`, disjoint, together every row.

    Raises:
        ValueError: `eval_fraction` is not strictly between 0 and 1.
        PreferenceDataError: one of the parts would be empty.
    """
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be strictly between 0 and 1, got {eval_fraction!r}. Fix: use e.g. 0.1.")
    n_eval = math.ceil(len(dataset) * eval_fraction)
    if n_eval >= len(dataset):
        raise PreferenceDataError(
            f"cannot split {len(dataset)} rows with eval_fraction={eval_fraction}: the training part would "
            "be empty. Fix: use more rows or a smaller eval_fraction."
        )
    parts = dataset.train_test_split(test_size=n_eval, shuffle=True, seed=seed)
    return parts["train"], parts["test"]
