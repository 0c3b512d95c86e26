"""Preference pairs in the original recipe's format: load Intel/orca_dpo_pairs (or a local file in its format)
and write rows as a chat ``prompt`` and two answers.

As in Maxime Labonne's "Fine-tune Mistral-7b with DPO" and Intel's ipex-llm DPO example, an orca row (``system``,
``question``, ``chosen``, ``rejected``) becomes a ChatML prompt (system turn, user turn, the opened assistant turn)
and two answers ending with ``<|im_end|>``; ``chat_format`` (:data:`dpo_xpu.recipes.CHAT_FORMATS`) chooses the
model's own template instead. Conversational rows (:func:`dpo_xpu.data.rows.validate_conversational_rows`) are
written in the model's template, or the same ChatML strings when it is ChatML or missing.

```python
rows = load_orca_dpo_pairs(DEMO_SAMPLE_PATH)  # or "Intel/orca_dpo_pairs" from the hub
pairs = format_orca_dataset(rows, tokenizer, max_length=1536)  # columns: prompt, chosen, rejected
train, evaluation = train_eval_split(pairs, eval_fraction=0.1, seed=42)
```
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


def keep_shuffled(dataset: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    """The first `limit` rows after a shuffle with `seed` (every row, in order, when `limit` is None)."""
    if limit is None:
        return dataset
    kept = dataset.shuffle(seed=seed).select(range(min(limit, len(dataset)))).flatten_indices()
    logger.info("Kept %d pairs (shuffled with seed %d)", len(kept), seed)
    return kept


def load_orca_dpo_pairs(
    source: str | Path = "Intel/orca_dpo_pairs",
    split: str = "train",
    limit: int | None = None,
    seed: int = 42,
) -> datasets.Dataset:
    """Load and validate preference pairs in the Intel/orca_dpo_pairs format.

    Args:
        source: a hub dataset id (``datasets.load_dataset(source, split=split)``) or a local ``.jsonl``, ``.json``
            (a list of objects, or JSON lines) or ``.parquet`` file, such as :data:`DEMO_SAMPLE_PATH`.
        split: the hub split; ignored for local files.
        limit: keep this many rows after a shuffle with ``seed``; ``None`` keeps every row in file order.
        seed: the shuffle seed used with ``limit``.

    Returns:
        The columns ``system``, ``question``, ``chosen``, ``rejected`` (others are dropped).

    Raises:
        PreferenceDataError: the source cannot be read (:func:`dpo_xpu.data.rows.read_source`) or a row fails
            :func:`dpo_xpu.data.rows.validate_preference_rows` (the message names the line or row, column and fix).
        ValueError: ``limit`` is below 1.
    """
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


# chat_format "auto": orca (and generic) rows in ChatML, as the original recipe, warning when the model's own template
# is not ChatML; conversational rows in the model's template. "model": every row in the model's template. "chatml":
# every row in ChatML. Without a chat template, every value gives ChatML.
_WARNED: set[tuple[str, str]] = set()  # (tokenizer name, template) pairs warned about, once per process


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


def _chatml_render(
    prompt: list[dict[str, str]], answers: Mapping[str, list[dict[str, str]]], tokenizer: Any
) -> dict[str, str]:
    """The recipe's ChatML strings: the prompt in the tokenizer's template when ChatML (else `CHATML_TEMPLATE`) with
    the assistant turn opened; an answer its first message's content plus `IM_END`, then whole turns."""
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
    """Turn one orca row into a ChatML prompt and two answers, as the original recipe does.

    The prompt is the chat template (the tokenizer's when ChatML, else :data:`CHATML_TEMPLATE`, with a warning once
    per tokenizer) over a system turn (when `system` is non-empty) and a user turn (`question`), with the
    assistant turn opened; each answer gets `"<|im_end|>\\n"`. `chat_format="model"` uses the tokenizer's own
    template instead, as :func:`conversational_format` does. `row` (default `example.get("_row")`) is the 1-based
    row number errors quote. Given `max_length` (tokens), a text longer than
    :func:`dpo_xpu.data.truncation.char_limit` characters cannot fit and is cut to that many before tokenising
    (the prompt keeps its end, an answer its start), with a warning naming the row.

    Returns:
        `{"prompt", "chosen", "rejected"}` strings.

    Raises:
        PreferenceDataError: the prompt's token ids are not a prefix of those of prompt + answer (DPO would score
            part of the prompt as answer); or the model's template refuses the messages or renders the prompt
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
    """Turn one conversational row (`prompt`, `chosen`, `rejected` message lists, implicit prompts split off) into
    a prompt and two answers in the model's own chat template.

    The prompt is the template over `prompt` with the generation prompt; an answer is what the template renders
    after it for `prompt` + the answer's messages, so prompt + answer is the whole conversation. With a ChatML
    template, none, or `chat_format="chatml"`, the strings of :func:`chatml_format` instead (further messages
    follow the first answer as whole ChatML turns). `row` and `max_length` as in :func:`chatml_format`.

    Returns:
        `{"prompt", "chosen", "rejected"}` strings.

    Raises:
        PreferenceDataError, ValueError: as :func:`chatml_format`.
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
    """Apply :func:`chatml_format` (to conversational rows :func:`conversational_format`) to every row.

    `chat_format` "auto" writes orca rows in ChatML and conversational rows in the model's template, "model" every
    row in the model's template, "chatml" every row in ChatML. `num_proc` is `Dataset.map`'s; `max_length` cuts
    texts far too long to fit, as :func:`chatml_format` says.

    Returns:
        The columns `prompt`, `chosen`, `rejected` (every original column is dropped).

    Raises:
        PreferenceDataError: as :func:`chatml_format`; the row number is the 1-based position in `dataset`.
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
    """Split rows into a training and a held-out evaluation part of `ceil(len(dataset) * eval_fraction)` rows,
    shuffled with `seed` (the same seed gives the same split).

    Returns:
        `(train, evaluation)`, disjoint, together every row.

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
