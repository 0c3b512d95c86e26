"""Preference data: load Intel/orca_dpo_pairs (or a local file in its format), validate it, format it.

The data flow is the original recipe's (Maxime Labonne's "Fine-tune Mistral-7b with DPO", Intel's ipex-llm
DPO example): rows with the columns ``system``, ``question``, ``chosen`` and ``rejected`` become a ChatML
``prompt`` (system turn, user turn, then the opening of the assistant turn) and two answers that each end
with ``<|im_end|>``. Rows in TRL's conversational format (lists of chat messages, see
:func:`validate_conversational_rows`) become the same strings through :func:`conversational_format`.

```python
from dpo_xpu.data.preferences import DEMO_SAMPLE_PATH, format_orca_dataset, load_orca_dpo_pairs, train_eval_split

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

DEMO_SAMPLE_PATH: Path = Path(__file__).resolve().parents[1] / "assets" / "orca_demo_sample.jsonl"
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


_CONVERSATIONAL_HINT = (
    " (for lists of chat messages, use data_format: conversational with 'prompt', 'chosen' and 'rejected' "
    "message lists, or only 'chosen' and 'rejected' holding whole conversations)"
)
ROLES: tuple[str, ...] = ("system", "user", "assistant")
"""The message roles the conversational format accepts."""


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
                hint = _CONVERSATIONAL_HINT if isinstance(value, list) else ""
                raise PreferenceDataError(
                    f"{where}, column {column!r}: expected a string, found {_describe(value)}. "
                    f"Fix: {_fix(column)}{hint}."
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


_CONVERSATIONAL_FIX = (
    ", with 'chosen' and 'rejected' holding the assistant answer after the 'prompt' messages (or, without "
    "'prompt', the whole conversations, the same up to the answer)"
)


def _messages(value: Any, where: str, column: str) -> list[dict[str, str]]:
    """One column of a conversational row as `[{"role", "content"}, ...]`, checked message by message."""
    if not isinstance(value, list) or not value:
        strings = " (rows of plain strings: use data_format: auto or prompt-chosen-rejected)" * isinstance(value, str)
        raise PreferenceDataError(
            f"{where}, column {column!r}: expected a non-empty list of chat messages, found {_describe(value)}. "
            f'Fix: write {column!r} as a list of {{"role": ..., "content": ...}} messages{_CONVERSATIONAL_FIX}'
            f"{strings}."
        )
    messages = []
    for number, message in enumerate(value, start=1):
        at = f"{where}, column {column!r}, message {number}"
        if not isinstance(message, Mapping):
            raise PreferenceDataError(
                f"{at}: expected a chat message {{'role': ..., 'content': ...}}, found {_describe(message)}. "
                'Fix: write each message as {"role": "user", "content": "..."}.'
            )
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in ROLES:
            found = _describe(role) if "role" in message else f"no 'role' (keys {sorted(message)})"
            raise PreferenceDataError(
                f"{at}, key 'role': expected one of {list(ROLES)}, found {found}. Fix: give every message a "
                "'role' of 'system', 'user' or 'assistant'."
            )
        if not isinstance(content, str) or (role != "system" and not content.strip()):
            found = _describe(content) if "content" in message else f"no 'content' (keys {sorted(message)})"
            raise PreferenceDataError(
                f"{at}, key 'content': expected a {'string' if role == 'system' else 'non-empty string'}, found "
                f"{found}. Fix: give every {role!r} message its text as a string 'content', or remove the row."
            )
        messages.append({"role": role, "content": content})
    return messages


_IMPLICIT_FIX = (
    "make 'chosen' and 'rejected' the same conversation up to a user message, each ending with its own assistant "
    "answer (or give the conversation so far as a 'prompt' list)"
)
_EXPLICIT_FIX = "'chosen' and 'rejected' hold only the assistant answer to the 'prompt' messages"


def _stripped(messages: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(message["role"], message["content"].strip()) for message in messages]


def validate_conversational_rows(
    rows: Iterable[Mapping[str, Any]], source_name: str = "rows", line_numbers: Sequence[int] | None = None
) -> list[dict[str, list[dict[str, str]]]]:
    """Check rows in TRL's conversational preference format and split implicit prompts off.

    A row holds `chosen` and `rejected` lists of chat messages (`{"role": ..., "content": ...}`, role one of
    `ROLES`) and either a `prompt` list (the conversation so far; `chosen`/`rejected` hold the assistant
    answer) or no `prompt` (or a null one): then `chosen` and `rejected` hold whole conversations, and the
    messages they share from the start are the prompt. The prompt must end with a user message; each answer
    must start and end with an assistant message. Only `role` and `content` of each message are kept.

    Args:
        rows (`Iterable[Mapping[str, Any]]`): the rows, e.g. a list of dicts or a `datasets.Dataset`.
        source_name (`str`, defaults to `"rows"`): what the rows came from (a file name), quoted in messages.
        line_numbers (`Sequence[int]`, *optional*): the 1-based file line of each row, as in
            :func:`validate_preference_rows`.

    Returns:
        `list[dict[str, list[dict[str, str]]]]`: one `{"prompt", "chosen", "rejected"}` of message lists a row.

    Raises:
        PreferenceDataError: a row is not a mapping, lacks `chosen` or `rejected`, holds a column that is not
            a non-empty list of messages, a message without a known string `role` or a string `content`
            (non-empty except for system messages), a prompt that does not end with a user message, an answer
            that does not start and end with an assistant message, conversations that share no prompt, or equal
            answers. The message names the line or row, the column, the message number and the fix.
    """
    pairs = []
    for index, row in enumerate(rows):
        where = f"{source_name} line {line_numbers[index]}" if line_numbers else f"{source_name} row {index + 1}"
        if not isinstance(row, Mapping) or "chosen" not in row or "rejected" not in row:
            found = f"the columns {sorted(row)}" if isinstance(row, Mapping) else _describe(row)
            raise PreferenceDataError(
                f"{where}: expected an object with 'chosen' and 'rejected' lists of chat messages (and an "
                f"optional 'prompt' list), found {found}. Fix: give every row 'chosen' and 'rejected'."
            )
        chosen, rejected = _messages(row["chosen"], where, "chosen"), _messages(row["rejected"], where, "rejected")
        if _stripped(chosen) == _stripped(rejected):
            raise PreferenceDataError(
                f"{where}, column 'rejected': identical to 'chosen' (after stripping whitespace), so the pair "
                "states no preference. Fix: give a worse 'rejected' answer or remove the row."
            )
        if row.get("prompt") is None:
            pairs_of_messages = enumerate(zip(chosen, rejected))
            shared = next((i for i, (a, b) in pairs_of_messages if a != b), min(len(chosen), len(rejected)))
            for column, messages in (("chosen", chosen), ("rejected", rejected)):
                if shared == len(messages):
                    raise PreferenceDataError(
                        f"{where}, column {column!r}: no answer of its own (without a 'prompt' column, all its "
                        f"messages also begin the other column). Fix: {_IMPLICIT_FIX}."
                    )
            if shared == 0:
                raise PreferenceDataError(
                    f"{where}, column 'chosen', message 1: differs from 'rejected' from the first message, so "
                    f"without a 'prompt' column there is no shared prompt. Fix: {_IMPLICIT_FIX}."
                )
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
            prompt_column, fix = "chosen", _IMPLICIT_FIX
        else:
            prompt, shared, prompt_column = _messages(row["prompt"], where, "prompt"), 0, "prompt"
            fix = _EXPLICIT_FIX
        if prompt[-1]["role"] != "user":
            raise PreferenceDataError(
                f"{where}, column {prompt_column!r}, message {len(prompt)}: the prompt must end with a user "
                f"message, found {prompt[-1]['role']!r}. Fix: {fix}."
            )
        for column, answer in (("chosen", chosen), ("rejected", rejected)):
            for position in (0, len(answer) - 1):
                if answer[position]["role"] != "assistant":
                    raise PreferenceDataError(
                        f"{where}, column {column!r}, message {shared + position + 1}: the answer must "
                        f"{'start' if position == 0 else 'end'} with an assistant message, found "
                        f"{answer[position]['role']!r}. Fix: {fix}."
                    )
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


class _RepeatedKey(dict):
    """A JSON object that repeats a key; `key` is the first key it repeats."""

    key: str = ""


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json` object hook: keep the object, but mark it when a key repeats (plain `json` keeps the last value)."""
    row = dict(pairs)
    if len(row) == len(pairs):
        return row
    keys = [key for key, _ in pairs]
    marked = _RepeatedKey(row)
    marked.key = next(key for index, key in enumerate(keys) if key in keys[:index])
    return marked


def _repeated_key(value: Any, path: tuple[str | int, ...] = ()) -> tuple[str | int, ...] | None:
    """The path to the first repeated key in a parsed JSON value (e.g. `('chosen', 0, 'content')`), or None."""
    if isinstance(value, _RepeatedKey):
        return (*path, value.key)
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for name, item in items:
        if (found := _repeated_key(item, (*path, name))) is not None:
            return found
    return None


def _refuse_repeated_key(row: Any, where: str) -> None:
    path = _repeated_key(row)
    if path is None:
        return
    inside = "".join(f", message {part + 1}" if isinstance(part, int) else f", key {part!r}" for part in path[1:-1])
    place = f", column {path[0]!r}{inside}" if len(path) > 1 else ""
    raise PreferenceDataError(
        f"{where}{place}: the key {path[-1]!r} appears more than once in one JSON object (only the last value "
        f"would be kept). Fix: keep a single {path[-1]!r} in that object."
    )


def _read_text(path: Path) -> str:
    """The file decoded as UTF-8 (a leading byte-order mark is dropped); bad bytes are reported by line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        start = raw.rfind(b"\n", 0, error.start) + 1
        line = raw.count(b"\n", 0, start) + 1
        column = len(raw[start : error.start].decode("utf-8", errors="replace")) + 1
        raise PreferenceDataError(
            f"{path.name} line {line}: not valid UTF-8 (byte 0x{raw[error.start]:02x} at column {column}, byte "
            f"{error.start - start + 1} of the line). Fix: re-save the file as UTF-8 (e.g. your editor's "
            "'save with encoding', or iconv -f <its encoding> -t utf-8)."
        ) from None


def _read_jsonl(path: Path, text: str | None = None) -> tuple[list[Any], list[int]]:
    rows, line_numbers = [], []
    for number, line in enumerate((_read_text(path) if text is None else text).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=_object_pairs)
        except json.JSONDecodeError as error:
            found = line.strip() if len(line.strip()) <= 60 else line.strip()[:57] + "..."
            raise PreferenceDataError(
                f"{path.name} line {number}: not valid JSON ({error.msg}, column {error.colno}); "
                f"found {found!r}. Fix: write one JSON object per line, "
                '{"system": "...", "question": "...", "chosen": "...", "rejected": "..."}.'
            ) from error
        _refuse_repeated_key(row, f"{path.name} line {number}")
        rows.append(row)
        line_numbers.append(number)
    return rows, line_numbers


def read_local_rows(path: Path) -> tuple[list[Any], list[int] | None]:
    """The rows of a local ``.jsonl``, ``.json`` or ``.parquet`` file, as read (not yet validated).

    Returns:
        ``(rows, line_numbers)``: the row objects, and for JSON lines the file line of each (``None`` otherwise),
        so that validation errors name the line.

    Raises:
        PreferenceDataError: the file cannot be read or parsed (the message names the file and the line).
    """
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".json":
        # Read with the json module, not pyarrow: pyarrow's type inference would cast or reject a stray
        # number or null before validation could name its row.
        text = _read_text(path)
        try:
            data = json.loads(text, object_pairs_hook=_object_pairs)
        except json.JSONDecodeError:
            return _read_jsonl(path, text)  # JSON lines saved as .json
        if not isinstance(data, list):
            raise PreferenceDataError(
                f"{path.name}: expected a JSON list of row objects (or one object per line), "
                f"found {type(data).__name__}. Fix: save the rows as [{{...}}, {{...}}] or as JSON lines."
            )
        for index, row in enumerate(data):
            _refuse_repeated_key(row, f"{path.name} row {index + 1}")
        return data, None
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist(), None
    except (pa.ArrowException, OSError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise PreferenceDataError(
            f"{path.name}: not a readable parquet file ({reason}). Fix: re-save the rows with a parquet writer "
            "(e.g. pandas.DataFrame.to_parquet), or as .jsonl."
        ) from None


def load_hub_split(source: str, split: str) -> datasets.Dataset:
    """``datasets.load_dataset(source, split=split)`` for a hub id, after checking at once that the id can be had
    (:func:`dpo_xpu.hub.check_hub_id`: cached, or the hub on and reachable).

    Raises:
        PreferenceDataError: the id is not cached and the hub is off or unreachable (the message says how to pass
            a local file instead).
    """
    from dpo_xpu.hub import check_hub_id

    check_hub_id(source, "dataset", PreferenceDataError, "dataset_name_or_path")
    return datasets.load_dataset(source, split=split)


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
        PreferenceDataError: the file does not exist, is a directory, has an unsupported type, is not UTF-8
            (JSON files), repeats a key in a JSON object, or holds no rows, or a row fails
            :func:`validate_preference_rows` (the message names the line or row, the column and the fix).
        ValueError: `limit` is below 1.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of rows or None, got {limit!r}.")
    path = Path(source)
    if isinstance(source, Path) or path.suffix in LOCAL_SUFFIXES or path.exists():
        if path.is_dir():
            raise PreferenceDataError(
                f"{path} is a directory, not a data file. Fix: pass one .jsonl, .json or .parquet file (e.g. "
                f"{path / 'train.jsonl'}), or a hub id such as 'Intel/orca_dpo_pairs'."
            )
        if not path.is_file():
            raise PreferenceDataError(
                f"{path} does not exist. Fix: pass an existing .jsonl, .json or .parquet file, or a hub id "
                "such as 'Intel/orca_dpo_pairs'."
            )
        if path.suffix not in LOCAL_SUFFIXES:
            raise PreferenceDataError(
                f"{path}: unsupported file type {path.suffix!r}. Fix: save the rows as one of {list(LOCAL_SUFFIXES)}."
            )
        rows, line_numbers = read_local_rows(path)
        if not rows:
            raise PreferenceDataError(f"{path} holds no rows. Fix: add at least one preference pair.")
        validate_preference_rows(rows, source_name=path.name, line_numbers=line_numbers)
        dataset = datasets.Dataset.from_dict({column: [row[column] for row in rows] for column in ORCA_COLUMNS})
    else:
        dataset = load_hub_split(str(source), split)
        validate_preference_rows(dataset, source_name=f"{source} [{split}]")
        dataset = dataset.select_columns(list(ORCA_COLUMNS))
    logger.info("Loaded %d preference pairs from %s", len(dataset), source)
    if limit is not None:
        dataset = dataset.shuffle(seed=seed).select(range(min(limit, len(dataset)))).flatten_indices()
        logger.info("Kept %d pairs (shuffled with seed %d)", len(dataset), seed)
    return dataset


def _is_chatml(template: Any) -> bool:
    return isinstance(template, str) and "<|im_start|>" in template and "<|im_end|>" in template


def _chatml_prompt(messages: Sequence[Mapping[str, str]], tokenizer: Any) -> str:
    """The chat template (the tokenizer's when ChatML, else `CHATML_TEMPLATE`) with the assistant turn opened."""
    template = None if _is_chatml(getattr(tokenizer, "chat_template", None)) else CHATML_TEMPLATE
    return tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=False, add_generation_prompt=True
    )


def _check_boundary(formatted: Mapping[str, str], tokenizer: Any, row: int | None) -> None:
    """Refuse a pair whose prompt tokens are not a prefix of the prompt + answer tokens."""
    prompt = formatted["prompt"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for column in ("chosen", "rejected"):
        ids = tokenizer(prompt + formatted[column], add_special_tokens=False)["input_ids"]
        if ids[: len(prompt_ids)] == prompt_ids:
            continue
        at = next(i for i, (a, b) in enumerate(zip(prompt_ids, ids, strict=False)) if a != b)
        where = f"row {row}" if row is not None else "row"
        raise PreferenceDataError(
            f"{where}, column {column!r}: the prompt's last tokens merge with the start of the answer "
            f"(prompt alone ends {tokenizer.convert_ids_to_tokens(prompt_ids[at:])}, prompt + {column} has "
            f"{tokenizer.convert_ids_to_tokens(ids[at : len(prompt_ids) + 1])} there; answer starts "
            f"{formatted[column][:20]!r}). Fix: strip leading whitespace and newlines from the {column!r} "
            "answer, or remove the row."
        )


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
    formatted = {
        "prompt": _chatml_prompt(messages, tokenizer),
        "chosen": example["chosen"] + IM_END,
        "rejected": example["rejected"] + IM_END,
    }
    _check_boundary(formatted, tokenizer, example.get("_row") if row is None else row)
    return formatted


def conversational_format(example: Mapping[str, Any], tokenizer: Any, row: int | None = None) -> dict[str, str]:
    """Turn one conversational row into the same ChatML prompt and answers as :func:`chatml_format`.

    The prompt is the chat template applied to the `prompt` messages with `add_generation_prompt=True` (the
    tokenizer's template when it is ChatML, else `CHATML_TEMPLATE`). An answer is its first (assistant)
    message's content plus `"<|im_end|>\\n"`, as in :func:`chatml_format`; any further messages of the
    answer follow as whole ChatML turns.

    Args:
        example (`Mapping[str, Any]`): a row with `prompt`, `chosen` and `rejected` lists of messages, as
            :func:`validate_conversational_rows` returns them (implicit prompts already split off).
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer.
        row (`int`, *optional*): the 1-based row number quoted in errors; defaults to `example.get("_row")`.

    Returns:
        `dict[str, str]`: `{"prompt", "chosen", "rejected"}`.

    Raises:
        PreferenceDataError: the token-boundary check of :func:`chatml_format` fails.
    """
    formatted = {"prompt": _chatml_prompt(example["prompt"], tokenizer)}
    for column in ("chosen", "rejected"):
        formatted[column] = "".join(
            ("" if index == 0 else f"<|im_start|>{message['role']}\n") + message["content"] + IM_END
            for index, message in enumerate(example[column])
        )
    _check_boundary(formatted, tokenizer, example.get("_row") if row is None else row)
    return formatted


def _format_row(example: dict[str, Any], index: int, tokenizer: Any) -> dict[str, str]:
    formatter = chatml_format if "question" in example else conversational_format
    return formatter(example, tokenizer, row=index + 1)


def format_orca_dataset(dataset: datasets.Dataset, tokenizer: Any, num_proc: int | None = None) -> datasets.Dataset:
    """Apply :func:`chatml_format` (or, to conversational rows, :func:`conversational_format`) to every row and
    keep only `prompt`, `chosen` and `rejected`.

    Args:
        dataset (`datasets.Dataset`): orca-format rows, e.g. from :func:`load_orca_dpo_pairs`, or
            conversational rows (`prompt`, `chosen`, `rejected` message lists) from
            :func:`dpo_xpu.data.sources.load_preference_pairs`.
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
