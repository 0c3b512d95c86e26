"""Preference rows as read and checked: every bad row is one line naming the file line (or row), column and fix.

The JSON readers are ours, not ``datasets``': those cast or refuse a stray value before its row can be named, keep a
repeated key's last value silently, and report a bad byte or bracket without its line. Parquet is read by pyarrow.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

from dpo_xpu.data.truncation import common_prefix_length
from dpo_xpu.errors import PreferenceDataError

ORCA_COLUMNS: tuple[str, ...] = ("system", "question", "chosen", "rejected")  # Intel/orca_dpo_pairs' order
LOCAL_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".parquet")

_CONVERSATIONAL_HINT = (
    " (for lists of chat messages, use data_format: conversational with 'prompt', 'chosen' and 'rejected' "
    "message lists, or only 'chosen' and 'rejected' holding whole conversations)"
)
ROLES: tuple[str, ...] = ("system", "user", "assistant")
_SAME = (
    "column 'rejected': identical to 'chosen' (after stripping whitespace), so the pair states no preference. "
    "Fix: give a worse 'rejected' answer or remove the row."
)


def _fix(column: str) -> str:
    if column == "system":
        return "give every row a string 'system' prompt (use \"\" for none)"
    answer = " answer" if column in ("chosen", "rejected") else ""
    return f"give every row a non-empty {column!r}{answer} or remove the row"


def _where(source_name: str, line_numbers: Sequence[int] | None, index: int) -> str:
    return f"{source_name} line {line_numbers[index]}" if line_numbers else f"{source_name} row {index + 1}"


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return f"{type(value).__name__} {shown}"


def _json_kind(value: Any) -> str:
    """What a JSON value is, in JSON's words (array, number, string, boolean, null, object)."""
    kinds = {list: "array", str: "string", bool: "boolean", type(None): "null", dict: "object"}
    return next((kind for cls, kind in kinds.items() if isinstance(value, cls)), "number")


def _check_unicode(value: str, at: str) -> None:
    """Refuse text with a lone surrogate (a JSON escape such as \\ud800 without its pair): no Unicode text, so no
    writer (pyarrow, the tokenizer) can encode it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise PreferenceDataError(
            f"{at}: the text is not valid Unicode (a lone surrogate U+{ord(value[error.start]):04X} at character "
            f"{error.start + 1}: a JSON escape such as \\ud800 without its pair). Fix: replace or remove "
            "that character (re-export the text as UTF-8 from its source), or remove the row."
        ) from None


def validate_preference_rows(
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[str] = ORCA_COLUMNS,
    source_name: str = "rows",
    line_numbers: Sequence[int] | None = None,
    allow_empty: Sequence[str] = ("system",),
) -> int:
    """Check that every row holds each of `columns` as a string of valid Unicode (non-blank outside `allow_empty`)
    and a `chosen` that differs from `rejected`; return the number of rows. The first bad row raises a
    `PreferenceDataError` naming `source_name`, "line N" (1-based `line_numbers`) or "row N", the column and the fix
    (a row that is no object, a missing column, no string, a blank one, a lone surrogate, the same two answers)."""
    count = 0
    for count, row in enumerate(rows, start=1):
        where = _where(source_name, line_numbers, count - 1)
        if not isinstance(row, Mapping):
            raise PreferenceDataError(
                f"{where}: is a JSON {_json_kind(row)}, not an object with the columns {list(columns)} (found "
                f"{_describe(row)}). Fix: write each row as one JSON object such as "
                f"{{{', '.join(f'{c!r}: ...' for c in columns)}}}, or remove it."
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
            _check_unicode(value, f"{where}, column {column!r}")
        if "chosen" in columns and "rejected" in columns and row["chosen"].strip() == row["rejected"].strip():
            raise PreferenceDataError(f"{where}, {_SAME}")
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
        _check_unicode(content, f"{at}, key 'content'")
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
    """One `{"prompt", "chosen", "rejected"}` of `{"role", "content"}` message lists a row of TRL's conversational
    format; without `prompt`, the conversations' shared start is the prompt. The prompt ends with a user message,
    each answer starts and ends with an assistant one; else `PreferenceDataError`, as :func:`validate_preference_rows`.
    """
    pairs = []
    for index, row in enumerate(rows):
        where = _where(source_name, line_numbers, index)
        if not isinstance(row, Mapping) or "chosen" not in row or "rejected" not in row:
            found = f"the columns {sorted(row)}" if isinstance(row, Mapping) else _describe(row)
            raise PreferenceDataError(
                f"{where}: expected an object with 'chosen' and 'rejected' lists of chat messages (and an "
                f"optional 'prompt' list), found {found}. Fix: give every row 'chosen' and 'rejected'."
            )
        chosen, rejected = _messages(row["chosen"], where, "chosen"), _messages(row["rejected"], where, "rejected")
        if _stripped(chosen) == _stripped(rejected):
            raise PreferenceDataError(f"{where}, {_SAME}")
        if row.get("prompt") is None:
            shared = common_prefix_length(chosen, rejected)
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
    key: str = ""  # the first key the JSON object repeats


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json` object hook: mark an object whose key repeats (plain `json` keeps the last value)."""
    keys = [key for key, _ in pairs]
    if len(set(keys)) == len(keys):
        return dict(pairs)
    marked = _RepeatedKey(pairs)
    marked.key = next(key for index, key in enumerate(keys) if key in keys[:index])
    return marked


def _refuse_repeated_key(value: Any, where: str, path: tuple[str | int, ...] = ()) -> None:
    """Raise at the first object of `value` that repeats a key, naming where it sits (column, message, key)."""
    if isinstance(value, _RepeatedKey):
        inside = "".join(f", message {part + 1}" if isinstance(part, int) else f", key {part!r}" for part in path[1:])
        raise PreferenceDataError(
            f"{where}{f', column {path[0]!r}{inside}' if path else ''}: the key {value.key!r} appears more than once "
            f"in one JSON object (only the last value would be kept). Fix: keep a single {value.key!r} in that object."
        )
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for name, item in items:
        _refuse_repeated_key(item, where, (*path, name))


def check_row_object(row: Any, where: str) -> None:
    """Raise `PreferenceDataError` naming `where` (the file line or row) for a row that is no JSON object (an array,
    number, string, boolean or null), before the format is told from its columns (it would have none)."""
    if not isinstance(row, dict):
        raise PreferenceDataError(
            f"{where}: is a JSON {_json_kind(row)}, not an object with the columns of a preference pair (found "
            f"{_describe(row)}). Fix: write each row as one JSON object such as "
            '{"system": ..., "question": ..., "chosen": ..., "rejected": ...} or {"prompt": ..., "chosen": ..., '
            '"rejected": ...}, or remove it.'
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
        check_row_object(row, f"{path.name} line {number}")
        _refuse_repeated_key(row, f"{path.name} line {number}")
        rows.append(row)
        line_numbers.append(number)
    return rows, line_numbers


def _read_local_rows(path: Path) -> tuple[list[Any], list[int] | None]:
    hub_id = "or a hub id such as 'Intel/orca_dpo_pairs'"
    if path.is_dir():
        raise PreferenceDataError(
            f"{path} is a directory, not a data file. Fix: pass one .jsonl, .json or .parquet file (e.g. "
            f"{path / 'train.jsonl'}), {hub_id}."
        )
    if not path.is_file():
        raise PreferenceDataError(
            f"{path} does not exist. Fix: pass an existing .jsonl, .json or .parquet file, {hub_id}."
        )
    if path.suffix not in LOCAL_SUFFIXES:
        raise PreferenceDataError(
            f"{path}: unsupported file type {path.suffix!r}. Fix: save the rows as one of {list(LOCAL_SUFFIXES)}."
        )
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".json":
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
            check_row_object(row, f"{path.name} row {index + 1} (array index {index})")
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


def read_source(source: str | Path, split: str = "train") -> tuple[list[Any], list[int] | None, str]:
    """``(rows, line_numbers, name)`` of a local file (a `Path`, a known suffix, or an existing path) or a hub split,
    unvalidated: the rows as a list, each row's file line (JSON lines; else ``None``), the name messages quote.
    `PreferenceDataError` when it cannot be read (naming the line) or is empty."""
    path = Path(source)
    if isinstance(source, Path) or path.suffix in LOCAL_SUFFIXES or path.exists():
        (rows, line_numbers), name = _read_local_rows(path), path.name
    else:
        from dpo_xpu.hub import check_hub_id

        check_hub_id(str(source), "dataset", PreferenceDataError, "dataset_name_or_path")
        rows, line_numbers = datasets.load_dataset(str(source), split=split).to_list(), None
        name = f"{source} [{split}]"
    if not rows:
        raise PreferenceDataError(f"{source} holds no rows. Fix: add at least one preference pair.")
    return rows, line_numbers, name
