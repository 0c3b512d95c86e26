"""Preference pairs in the original recipe's format: Intel/orca_dpo_pairs rows as a chat ``prompt`` and two answers.

As in Maxime Labonne's "Fine-tune Mistral-7b with DPO" and Intel's ipex-llm DPO example, an orca row becomes a ChatML
prompt (system turn, user turn, the opened assistant turn) and two answers ending with ``<|im_end|>``;
``chat_format`` (:data:`dpo_xpu.recipes.CHAT_FORMATS`) chooses the model's own template instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets

from dpo_xpu.data.sources import load_preference_pairs, orca_messages
from dpo_xpu.data.truncation import char_limit, common_prefix_length
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
_Messages = list[dict[str, str]]


def load_orca_dpo_pairs(
    source: str | Path = "Intel/orca_dpo_pairs", split: str = "train", limit: int | None = None, seed: int = 42
) -> datasets.Dataset:
    """The orca columns of validated pairs: :func:`~dpo_xpu.data.sources.load_preference_pairs` with
    ``data_format="orca"`` (arguments and errors as there)."""
    return load_preference_pairs(source, "orca", split, limit, seed)


_WARNED: set[tuple[str, str]] = set()  # (tokenizer name, template) pairs warned about, once per process


def _template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):  # named templates: the default one formats chats
        template = template.get("default")
    return template if isinstance(template, str) and template.strip() else None


def _is_chatml(template: Any) -> bool:
    return isinstance(template, str) and "<|im_start|>" in template and "<|im_end|>" in template


def _use_model_template(tokenizer: Any, chat_format: str, orca: bool) -> bool:
    """Whether the rows are rendered in the tokenizer's own template (one that is not ChatML); warns, once per
    tokenizer and template, when orca rows go to ChatML under "auto" though the tokenizer has its own."""
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat_format: unknown {chat_format!r}. Fix: use one of {list(CHAT_FORMATS)}.")
    template = _template(tokenizer)
    own = template is not None and not _is_chatml(template)
    key = (str(getattr(tokenizer, "name_or_path", "")), template)
    if own and orca and chat_format == "auto" and key not in _WARNED:
        _WARNED.add(key)
        logger.warning(
            "Orca rows are formatted in ChatML, as the original recipe does, but the tokenizer %r has its own chat "
            "template, which is not ChatML: the model is trained in a chat format other than its own. Set "
            "chat_format: model (recipe key) to render them with the model's own template, or chat_format: chatml to "
            "keep ChatML and silence this warning.",
            key[0],
        )
    return own and (chat_format == "model" or (chat_format == "auto" and not orca))


_MODEL_FIX = "or set chat_format: chatml to format the rows in ChatML"


def _render(prompt: _Messages, answers: Mapping[str, _Messages], tokenizer: Any, where: str, model: bool):
    """The prompt with the generation prompt, each answer the rest of the whole chat: in the model's template
    (`model`), else in the recipe's ChatML (`CHATML_TEMPLATE`: an answer is its content and ``<|im_end|>``, then
    whole turns; the prompt in the tokenizer's own template when that is ChatML)."""
    from jinja2 import TemplateError

    def render(messages: _Messages, template: str | None, opened: bool = False) -> str:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=opened
        )

    template = None if model else CHATML_TEMPLATE
    try:
        head = render(prompt, template, opened=True)
        wholes = {column: render(prompt + answer, template) for column, answer in answers.items()}
    except TemplateError as error:
        raise PreferenceDataError(
            f"{where}: the tokenizer's chat template refused the messages ({error}). Fix: change the row's "
            f"messages to what the template accepts (e.g. no system message), {_MODEL_FIX}."
        ) from None
    own_chatml = not model and _is_chatml(_template(tokenizer))
    formatted = {"prompt": render(prompt, None, opened=True) if own_chatml else head}
    for column, whole in wholes.items():
        if not whole.startswith(head):
            at = common_prefix_length(head, whole)
            raise PreferenceDataError(
                f"{where}, column {column!r}: the tokenizer's chat template renders the whole conversation "
                f"differently from the prompt with its generation prompt (prompt: {head[at:][:30]!r}, "
                f"conversation: {whole[at:][:30]!r} there), so the answer cannot be split off. Fix: give the "
                f"tokenizer a template whose generation prompt begins the assistant turn, {_MODEL_FIX}."
            )
        formatted[column] = whole[len(head) :]
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


def _check_boundary(formatted: Mapping[str, str], tokenizer: Any, where: str) -> None:
    """Refuse a pair whose prompt tokens are not a prefix of the prompt + answer tokens."""
    prompt = formatted["prompt"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for column in ("chosen", "rejected"):
        ids = tokenizer(prompt + formatted[column], add_special_tokens=False)["input_ids"]
        if ids[: len(prompt_ids)] == prompt_ids:
            continue
        at = common_prefix_length(prompt_ids, ids)
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
    turn when non-empty, user turn, assistant turn opened), answers ending with ``<|im_end|>``; `chat_format="model"`:
    the tokenizer's template. A conversational row (message lists) goes to the model's template under "auto" (prompt
    + answer is the whole conversation); with a ChatML template, none, or "chatml": ChatML as above. `row` (default
    `example["_row"]`) is the number errors quote; with `max_length`, a text over
    :func:`~dpo_xpu.data.truncation.char_limit` characters is cut first (the prompt keeps its end, an answer its
    start). `PreferenceDataError`: the prompt's tokens are no prefix of prompt + answer's (DPO would score part of
    the prompt as answer), or the model's template refuses the messages; `ValueError`: an unknown `chat_format`."""
    orca = "question" in example
    messages = orca_messages(example) if orca else example
    prompt, answers = list(messages["prompt"]), {column: list(messages[column]) for column in ("chosen", "rejected")}
    row = example.get("_row") if row is None else row
    where = f"row {row}" if row is not None else "row"
    formatted = _render(prompt, answers, tokenizer, where, _use_model_template(tokenizer, chat_format, orca))
    _cut_far_too_long(formatted, tokenizer, max_length, where)
    _check_boundary(formatted, tokenizer, where)
    return formatted


def format_orca_dataset(
    dataset: datasets.Dataset,
    tokenizer: Any,
    num_proc: int | None = None,
    chat_format: str = "auto",
    max_length: int | None = None,
) -> datasets.Dataset:
    """:func:`chatml_format` on every row (orca or conversational); returns the columns
    `prompt`, `chosen`, `rejected`. `chat_format` "auto": orca rows in ChatML, conversational rows in the model's
    template; "model": all in the model's; "chatml": all in ChatML. Errors as :func:`chatml_format` (row = position).
    """
    # checks chat_format and warns here too: a cached map would not call chatml_format
    _use_model_template(tokenizer, chat_format, orca="question" in dataset.column_names)
    formatted = dataset.map(
        lambda example, index: chatml_format(example, tokenizer, index + 1, chat_format, max_length),
        with_indices=True,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        desc="Chat formatting",
    )
    return formatted.select_columns(["prompt", "chosen", "rejected"])  # map keeps the columns it overwrites first


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
