"""Preference pairs in the original recipe's format: Intel/orca_dpo_pairs rows as a chat ``prompt`` and two answers.

As in Maxime Labonne's "Fine-tune Mistral-7b with DPO" and Intel's ipex-llm DPO example, an orca row becomes a ChatML
prompt (system turn, user turn, the opened assistant turn) and two answers ending with ``<|im_end|>``;
``chat_format`` (:data:`dpo_xpu.recipes.CHAT_FORMATS`) chooses the model's own template instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import datasets

from dpo_xpu.data.rows import ORCA_COLUMNS, read_source, validate_preference_rows
from dpo_xpu.data.truncation import char_limit
from dpo_xpu.errors import PreferenceDataError
from dpo_xpu.recipes import CHAT_FORMATS

logger = logging.getLogger(__name__)

#: Orca-format pairs written by the dpo_xpu developers for the offline demo (not from the hub data).
DEMO_SAMPLE_PATH: Path = Path(__file__).resolve().parents[1] / "assets" / "orca_demo_sample.jsonl"

CHATML_TEMPLATE: str = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
IM_END = "<|im_end|>\n"  # what the recipe appends to each answer
_Messages = list[dict[str, str]]


def keep_shuffled(dataset: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    """The first `limit` rows after a shuffle with `seed` (every row, in order, when `limit` is None)."""
    if limit is None:
        return dataset
    kept = dataset.shuffle(seed=seed).select(range(min(limit, len(dataset)))).flatten_indices()
    logger.info("Kept %d pairs (shuffled with seed %d)", len(kept), seed)
    return kept


def load_orca_dpo_pairs(
    source: str | Path = "Intel/orca_dpo_pairs", split: str = "train", limit: int | None = None, seed: int = 42
) -> datasets.Dataset:
    """The orca columns of validated pairs from a hub id (its ``split``) or a ``.jsonl``, ``.json`` or ``.parquet``
    file; ``limit``: that many rows after a shuffle with ``seed`` (``None``: all, in order). Raises
    `PreferenceDataError` for an unreadable source or a bad row, `ValueError` for a ``limit`` below 1."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of rows or None, got {limit!r}.")
    rows, line_numbers, name = read_source(source, split)
    validate_preference_rows(rows, source_name=name, line_numbers=line_numbers)
    if isinstance(rows, datasets.Dataset):
        dataset = rows.select_columns(list(ORCA_COLUMNS))
    else:
        dataset = datasets.Dataset.from_dict({column: [row[column] for row in rows] for column in ORCA_COLUMNS})
    logger.info("Loaded %d preference pairs from %s", len(dataset), source)
    return keep_shuffled(dataset, limit, seed)


_WARNED: set[tuple[str, str]] = set()  # (tokenizer name, template) pairs warned about, once per process


def _template(tokenizer: Any) -> str | None:
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
    _check_chat_format(chat_format)
    wanted = chat_format == "model" or (chat_format == "auto" and not orca)
    return wanted and _template(tokenizer) is not None and not _is_chatml(_template(tokenizer))


def _warn_orca_in_chatml(tokenizer: Any, chat_format: str) -> None:
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


def _chatml_render(prompt: _Messages, answers: Mapping[str, _Messages], tokenizer: Any) -> dict[str, str]:
    """The recipe's ChatML: an answer is its first message's content plus `IM_END`, then whole turns."""
    template = None if _is_chatml(_template(tokenizer)) else CHATML_TEMPLATE
    formatted = {
        "prompt": tokenizer.apply_chat_template(
            prompt, chat_template=template, tokenize=False, add_generation_prompt=True
        )
    }
    for column, answer in answers.items():
        formatted[column] = "".join(
            ("" if index == 0 else f"<|im_start|>{message['role']}\n") + message["content"] + IM_END
            for index, message in enumerate(answer)
        )
    return formatted


_MODEL_FIX = "or set chat_format: chatml to format the rows in ChatML"


def _model_render(prompt: _Messages, answers: Mapping[str, _Messages], tokenizer: Any, where: str) -> dict[str, str]:
    """The model's template: the prompt with the generation prompt, each answer the rest of the whole chat."""
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
    """Cut, in place, texts that cannot fit in `max_length` tokens, before anything tokenises them whole."""
    if max_length is None:
        return
    limit = char_limit(tokenizer, max_length)
    long = {column: len(text) for column, text in formatted.items() if len(text) > limit}
    if not long:
        return
    for column in long:  # as truncation does: the prompt keeps its end, an answer its start
        formatted[column] = formatted[column][-limit:] if column == "prompt" else formatted[column][:limit]
    sizes = ", ".join(f"{column}: {size:,} characters" for column, size in long.items())
    logger.warning(
        f"{where} is far longer than max_length={max_length} tokens can hold ({sizes}; more than {limit} characters "
        f"cannot fit in {max_length} tokens with this tokenizer): cut to {limit} characters before tokenising (the "
        "prompt keeps its end, an answer its start, as truncation does); drop_long_rows drops the row, otherwise "
        "training truncates it."
    )


def _format(
    example: Mapping[str, Any], prompt: _Messages, answers: Mapping[str, _Messages], tokenizer: Any, *options: Any
) -> dict[str, str]:
    """`options`: the caller's `row`, `chat_format`, `max_length`; orca rows get ChatML's warning."""
    row, chat_format, max_length = options
    row = example.get("_row") if row is None else row
    where = f"row {row}" if row is not None else "row"
    if _in_model_template(tokenizer, chat_format, orca="question" in example):
        formatted = _model_render(prompt, answers, tokenizer, where)
    else:
        if "question" in example:
            _warn_orca_in_chatml(tokenizer, chat_format)
        formatted = _chatml_render(prompt, answers, tokenizer)
    _cut_far_too_long(formatted, tokenizer, max_length, where)
    _check_boundary(formatted, tokenizer, where)
    return formatted


def _check_boundary(formatted: Mapping[str, str], tokenizer: Any, where: str) -> None:
    """Refuse a pair whose prompt tokens are not a prefix of the prompt + answer tokens."""
    prompt = formatted["prompt"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for column in ("chosen", "rejected"):
        ids = tokenizer(prompt + formatted[column], add_special_tokens=False)["input_ids"]
        if ids[: len(prompt_ids)] == prompt_ids:
            continue
        at = next(i for i, (a, b) in enumerate(zip(prompt_ids, ids, strict=False)) if a != b)
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
    """One orca row as `{"prompt", "chosen", "rejected"}` strings, as the original recipe: a ChatML prompt (system
    turn when non-empty, user turn, assistant turn opened), answers ending with `IM_END`; `chat_format="model"`: the
    tokenizer's template. `row` (default `example["_row"]`) is the number errors quote; with `max_length`, a text over
    :func:`~dpo_xpu.data.truncation.char_limit` characters is cut first (the prompt keeps its end, an answer its start).
    `PreferenceDataError`: the prompt's tokens are no prefix of prompt + answer's (DPO would score part of the prompt
    as answer), or the model's template refuses the messages; `ValueError`: an unknown `chat_format`."""
    prompt = [{"role": "system", "content": example["system"]}] if example["system"] else []
    prompt.append({"role": "user", "content": example["question"]})
    answers = {column: [{"role": "assistant", "content": example[column]}] for column in ("chosen", "rejected")}
    return _format(example, prompt, answers, tokenizer, row, chat_format, max_length)


def conversational_format(
    example: Mapping[str, Any],
    tokenizer: Any,
    row: int | None = None,
    chat_format: str = "auto",
    max_length: int | None = None,
) -> dict[str, str]:
    """Turn one conversational row (message lists) into `{"prompt", "chosen", "rejected"}` strings in the model's
    template: prompt + answer is the whole conversation. With a ChatML template, none, or `chat_format="chatml"`,
    :func:`chatml_format`'s strings. Arguments and errors as :func:`chatml_format`."""
    answers = {column: list(example[column]) for column in ("chosen", "rejected")}
    return _format(example, list(example["prompt"]), answers, tokenizer, row, chat_format, max_length)


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
    """:func:`chatml_format` (conversational rows: :func:`conversational_format`) on every row; returns the columns
    `prompt`, `chosen`, `rejected`. `chat_format` "auto": orca rows in ChatML, conversational rows in the model's
    template; "model": all in the model's; "chatml": all in ChatML. Errors as :func:`chatml_format` (row = position).
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
    """`(train, evaluation)`, disjoint: `ceil(len(dataset) * eval_fraction)` rows held out, shuffled with `seed`.
    Raises `ValueError` unless `0 < eval_fraction < 1`, `PreferenceDataError` when a part would be empty."""
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
