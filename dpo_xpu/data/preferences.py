"""Preference data: load Intel/orca_dpo_pairs (or a local file in its format), validate it, format it.

The data flow is the original recipe's (Maxime Labonne's "Fine-tune Mistral-7b with DPO", Intel's ipex-llm
DPO example): rows with the columns ``system``, ``question``, ``chosen`` and ``rejected`` become a ChatML
``prompt`` (system turn, user turn, then the opening of the assistant turn) and two answers that each end
with ``<|im_end|>`` (a warning says so once when the model's own template is not ChatML;
``chat_format="model"`` writes them in that template instead). Rows in TRL's conversational format (lists of
chat messages, see :func:`validate_conversational_rows`) are written in the model's own chat template by
:func:`conversational_format` (the same ChatML strings when that template is ChatML, or there is none).

```python
from dpo_xpu.data.preferences import DEMO_SAMPLE_PATH, format_orca_dataset, load_orca_dpo_pairs, train_eval_split

rows = load_orca_dpo_pairs(DEMO_SAMPLE_PATH)  # or "Intel/orca_dpo_pairs" from the hub
pairs = format_orca_dataset(rows, tokenizer, max_length=1536)  # columns: prompt, chosen, rejected
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

from dpo_xpu.data.truncation import char_limit
from dpo_xpu.errors import PreferenceDataError
from dpo_xpu.recipes import CHAT_FORMATS

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


# The values of `chat_format` (dpo_xpu.recipes.CHAT_FORMATS): which chat format format_orca_dataset writes rows in.
# "auto": orca rows (and generic ones) in ChatML, as the original recipe does, with a warning when the model's own
# template is not ChatML; conversational rows in the model's own template. "model": every row in the model's own
# chat template. "chatml": every row in ChatML (no warning). Without a chat template, every value gives ChatML.
_WARNED: set[tuple[str, str]] = set()
"""(tokenizer name, template) pairs already warned about by :func:`_warn_orca_in_chatml`, once per process."""


def _template(tokenizer: Any) -> str | None:
    """The tokenizer's own (default) chat template, or None when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):  # named templates: the default one formats chats
        template = template.get("default")
    return template if isinstance(template, str) and template.strip() else None


def _is_chatml(template: Any) -> bool:
    return isinstance(template, str) and "<|im_start|>" in template and "<|im_end|>" in template


def _check_chat_format(chat_format: str) -> None:
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat_format: unknown {chat_format!r}. Fix: use one of {list(CHAT_FORMATS)}.")


def _in_model_template(tokenizer: Any, chat_format: str, orca: bool) -> bool:
    """Whether rows go through the tokenizer's own template, split into prompt and answers (not ChatML)."""
    _check_chat_format(chat_format)
    wanted = chat_format == "model" or (chat_format == "auto" and not orca)
    return wanted and _template(tokenizer) is not None and not _is_chatml(_template(tokenizer))


def _warn_orca_in_chatml(tokenizer: Any, chat_format: str) -> None:
    """Say once per process and tokenizer that orca rows are written in ChatML for a model with another template."""
    template = _template(tokenizer)
    if chat_format != "auto" or template is None or _is_chatml(template):
        return
    key = (str(getattr(tokenizer, "name_or_path", "")), template)
    if key in _WARNED:
        return
    _WARNED.add(key)
    logger.warning(
        "Orca rows are formatted in ChatML, as the original recipe does, but the tokenizer %r has its own chat "
        "template, which is not ChatML: the model is trained in a chat format other than its own. Set chat_format: "
        "model (recipe key) to render them with the model's own template, or chat_format: chatml to keep ChatML "
        "and silence this warning.",
        key[0],
    )


def _chatml_prompt(messages: Sequence[Mapping[str, str]], tokenizer: Any) -> str:
    """The chat template (the tokenizer's when ChatML, else `CHATML_TEMPLATE`) with the assistant turn opened."""
    template = None if _is_chatml(_template(tokenizer)) else CHATML_TEMPLATE
    return tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=False, add_generation_prompt=True
    )


def _chatml_render(
    prompt: list[dict[str, str]], answers: Mapping[str, list[dict[str, str]]], tokenizer: Any
) -> dict[str, str]:
    """The recipe's ChatML strings: an answer is its first message's content plus `IM_END`, then whole turns."""
    formatted = {"prompt": _chatml_prompt(prompt, tokenizer)}
    for column, answer in answers.items():
        formatted[column] = "".join(
            ("" if index == 0 else f"<|im_start|>{message['role']}\n") + message["content"] + IM_END
            for index, message in enumerate(answer)
        )
    return formatted


_MODEL_FIX = "or set chat_format: chatml to format the rows in ChatML"


def _model_render(
    prompt: list[dict[str, str]], answers: Mapping[str, list[dict[str, str]]], tokenizer: Any, where: str
) -> dict[str, str]:
    """The tokenizer's own template: the prompt with the generation prompt, each answer the rest of the whole chat."""
    from jinja2 import TemplateError

    try:
        formatted = {"prompt": tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)}
        wholes = {
            column: tokenizer.apply_chat_template(prompt + answer, tokenize=False) for column, answer in answers.items()
        }
    except TemplateError as error:
        raise PreferenceDataError(
            f"{where}: the tokenizer's chat template refused the messages ({error}). Fix: change the row's "
            f"messages to what the template accepts (e.g. no system message), {_MODEL_FIX}."
        ) from None
    for column, whole in wholes.items():
        if not whole.startswith(formatted["prompt"]):
            pairs = enumerate(zip(formatted["prompt"], whole, strict=False))
            at = next((i for i, (a, b) in pairs if a != b), len(whole))
            raise PreferenceDataError(
                f"{where}, column {column!r}: the tokenizer's chat template renders the whole conversation "
                f"differently from the prompt with its generation prompt (prompt: {formatted['prompt'][at:][:30]!r}, "
                f"conversation: {whole[at:][:30]!r} there), so the answer cannot be split off. Fix: give the "
                f"tokenizer a template whose generation prompt begins the assistant turn, {_MODEL_FIX}."
            )
        formatted[column] = whole[len(formatted["prompt"]) :]
        if not formatted[column].strip():
            raise PreferenceDataError(
                f"{where}, column {column!r}: the tokenizer's chat template renders no answer after the prompt. "
                f"Fix: give the tokenizer a template that renders assistant messages, {_MODEL_FIX}."
            )
    return formatted


def _cut_far_too_long(formatted: dict[str, str], tokenizer: Any, max_length: int | None, where: str) -> None:
    """Cut, in place, texts too long to fit in `max_length` tokens, before anything tokenises them whole."""
    if max_length is None:
        return
    limit = char_limit(tokenizer, max_length)
    long = {column: len(text) for column, text in formatted.items() if len(text) > limit}
    if not long:
        return
    for column in long:
        text = formatted[column]
        formatted[column] = text[-limit:] if column == "prompt" else text[:limit]
    logger.warning(
        "%s is far longer than max_length=%d tokens can hold (%s; more than %d characters cannot fit in %d tokens "
        "with this tokenizer): cut to %d characters before tokenising (the prompt keeps its end, an answer its "
        "start, as truncation does); drop_long_rows drops the row, otherwise training truncates it.",
        where,
        max_length,
        ", ".join(f"{column}: {size:,} characters" for column, size in long.items()),
        limit,
        max_length,
        limit,
    )


def _format(
    prompt: list[dict[str, str]],
    answers: Mapping[str, list[dict[str, str]]],
    tokenizer: Any,
    row: int | None,
    in_model_template: bool,
    max_length: int | None,
) -> dict[str, str]:
    where = f"row {row}" if row is not None else "row"
    if in_model_template:
        formatted = _model_render(prompt, answers, tokenizer, where)
    else:
        formatted = _chatml_render(prompt, answers, tokenizer)
    _cut_far_too_long(formatted, tokenizer, max_length, where)
    _check_boundary(formatted, tokenizer, row)
    return formatted


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


def chatml_format(
    example: Mapping[str, Any],
    tokenizer: Any,
    row: int | None = None,
    chat_format: str = "auto",
    max_length: int | None = None,
) -> dict[str, str]:
    """Turn one orca row into a ChatML prompt and two answers, as the original recipe does.

    The prompt is the chat template applied to a system turn (only when `system` is non-empty) and a user turn
    (`question`), with `add_generation_prompt=True`. The tokenizer's own template is used when it is ChatML;
    otherwise `CHATML_TEMPLATE` is passed for this call (the tokenizer is not changed), with a warning, once per
    process and tokenizer, when the tokenizer has a template of another format. Each answer gets
    `"<|im_end|>\\n"` appended. With `chat_format="model"`, the row is written in the tokenizer's own template
    instead, as :func:`conversational_format` writes a conversational row.

    Args:
        example (`Mapping[str, Any]`): a row with the columns `system`, `question`, `chosen`, `rejected`.
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer.
        row (`int`, *optional*): the 1-based row number quoted in errors; defaults to `example.get("_row")`.
        chat_format (`str`, defaults to `"auto"`): one of `CHAT_FORMATS`. `"auto"` and `"chatml"` give ChatML
            (`"chatml"` without the warning); `"model"` the tokenizer's own template (ChatML when it has none).
        max_length (`int`, *optional*): the run's `max_length` (tokens). Given, a text longer than
            :func:`dpo_xpu.data.truncation.char_limit` characters, which cannot fit, is cut to that many before
            it is tokenised (the prompt keeps its end, an answer its start), with a warning naming the row.

    Returns:
        `dict[str, str]`: `{"prompt", "chosen", "rejected"}`.

    Raises:
        PreferenceDataError: the token ids of the prompt are not a prefix of those of prompt + answer (the
            prompt's last token merges with the answer's first one), so DPO would score part of the prompt as
            answer; or, with the model's template, the template refuses the messages or renders the prompt
            differently from the start of the whole conversation. The message names the row and column.
        ValueError: `chat_format` is not one of `CHAT_FORMATS`.
    """
    in_model_template = _in_model_template(tokenizer, chat_format, orca=True)
    if not in_model_template:
        _warn_orca_in_chatml(tokenizer, chat_format)
    prompt = [{"role": "system", "content": example["system"]}] if example["system"] else []
    prompt.append({"role": "user", "content": example["question"]})
    answers = {column: [{"role": "assistant", "content": example[column]}] for column in ("chosen", "rejected")}
    row = example.get("_row") if row is None else row
    return _format(prompt, answers, tokenizer, row, in_model_template, max_length)


def conversational_format(
    example: Mapping[str, Any],
    tokenizer: Any,
    row: int | None = None,
    chat_format: str = "auto",
    max_length: int | None = None,
) -> dict[str, str]:
    """Turn one conversational row into a prompt and two answers in the model's own chat template.

    The prompt is the tokenizer's chat template applied to the `prompt` messages with
    `add_generation_prompt=True`; an answer is what the template renders after that prompt for the whole
    conversation (`prompt` + the answer's messages), so prompt + answer is the whole conversation, as the model
    saw chats in its own training. When the tokenizer's template is ChatML, or it has none (or `chat_format`
    is `"chatml"`), the row gets the strings of :func:`chatml_format` instead: an answer is its first
    (assistant) message's content plus `"<|im_end|>\\n"`, and any further messages follow as whole ChatML turns.

    Args:
        example (`Mapping[str, Any]`): a row with `prompt`, `chosen` and `rejected` lists of messages, as
            :func:`validate_conversational_rows` returns them (implicit prompts already split off).
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer.
        row (`int`, *optional*): the 1-based row number quoted in errors; defaults to `example.get("_row")`.
        chat_format (`str`, defaults to `"auto"`): one of `CHAT_FORMATS`; `"auto"` and `"model"` give the
            model's template, `"chatml"` ChatML.
        max_length (`int`, *optional*): the run's `max_length` (tokens), to cut texts that cannot fit, as in
            :func:`chatml_format`.

    Returns:
        `dict[str, str]`: `{"prompt", "chosen", "rejected"}`.

    Raises:
        PreferenceDataError: the token-boundary check of :func:`chatml_format` fails, or the model's template
            refuses the messages or renders the prompt differently from the start of the whole conversation.
        ValueError: `chat_format` is not one of `CHAT_FORMATS`.
    """
    in_model_template = _in_model_template(tokenizer, chat_format, orca=False)
    answers = {column: list(example[column]) for column in ("chosen", "rejected")}
    row = example.get("_row") if row is None else row
    return _format(list(example["prompt"]), answers, tokenizer, row, in_model_template, max_length)


def _format_row(
    example: dict[str, Any], index: int, tokenizer: Any, chat_format: str, max_length: int | None
) -> dict[str, str]:
    formatter = chatml_format if "question" in example else conversational_format
    return formatter(example, tokenizer, row=index + 1, chat_format=chat_format, max_length=max_length)


def format_orca_dataset(
    dataset: datasets.Dataset,
    tokenizer: Any,
    num_proc: int | None = None,
    chat_format: str = "auto",
    max_length: int | None = None,
) -> datasets.Dataset:
    """Apply :func:`chatml_format` (or, to conversational rows, :func:`conversational_format`) to every row and
    keep only `prompt`, `chosen` and `rejected`.

    Args:
        dataset (`datasets.Dataset`): orca-format rows, e.g. from :func:`load_orca_dpo_pairs`, or
            conversational rows (`prompt`, `chosen`, `rejected` message lists) from
            :func:`dpo_xpu.data.sources.load_preference_pairs`.
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer.
        num_proc (`int`, *optional*): worker processes for `Dataset.map`; `None` formats in this process.
        chat_format (`str`, defaults to `"auto"`): one of `CHAT_FORMATS`: `"auto"` writes orca rows in ChatML
            (warning once when the model's template is another) and conversational rows in the model's template;
            `"model"` writes every row in the model's template; `"chatml"` every row in ChatML.
        max_length (`int`, *optional*): the run's `max_length` (tokens). Given, texts far too long to fit are cut
            before they are tokenised, as :func:`chatml_format` says; `None` tokenises every text whole.

    Returns:
        `datasets.Dataset`: the columns `prompt`, `chosen`, `rejected` (every original column is dropped).

    Raises:
        PreferenceDataError: a row fails the token-boundary check of :func:`chatml_format`, or the model's
            template cannot format it; the row number is its 1-based position in `dataset`.
        ValueError: `chat_format` is not one of `CHAT_FORMATS`.
    """
    _check_chat_format(chat_format)
    if "question" in dataset.column_names and not _in_model_template(tokenizer, chat_format, orca=True):
        _warn_orca_in_chatml(tokenizer, chat_format)  # here too: a cached map would not call chatml_format
    formatted = dataset.map(
        partial(_format_row, tokenizer=tokenizer, chat_format=chat_format, max_length=max_length),
        with_indices=True,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        desc="Chat formatting",
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
