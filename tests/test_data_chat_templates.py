"""The model's own chat template: conversational rows use it, orca rows keep ChatML (saying so once) unless
``chat_format="model"``, tokenizers without a template keep ChatML."""

from __future__ import annotations

import logging

import datasets
import pytest
from transformers import AutoTokenizer

from dpo_xpu.data import preferences
from dpo_xpu.data.preferences import chatml_format, format_orca_dataset
from dpo_xpu.data.sources import mix_sources
from dpo_xpu.errors import PreferenceDataError

# Zephyr's template (HuggingFaceH4/zephyr-7b-beta), as written there; `eos_token` is Qwen2's <|endoftext|> here.
ZEPHYR = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)
# Llama-3-Instruct's template, with its BOS written out (Qwen2's tokenizer has no bos_token).
LLAMA3 = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = '<|begin_of_text|>' + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Gemma-style: refuses system messages, calls the assistant "model".
GEMMA = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
ORCA = {"system": "Be brief.", "question": "What is 2 + 2?", "chosen": "4.", "rejected": "5."}
ZEPHYR_ORCA = {
    "prompt": "<|system|>\nBe brief.<|endoftext|>\n<|user|>\nWhat is 2 + 2?<|endoftext|>\n<|assistant|>\n",
    "chosen": "4.<|endoftext|>\n",
    "rejected": "5.<|endoftext|>\n",
}
CHATML_ORCA = {
    "prompt": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "chosen": "4.<|im_end|>\n",
    "rejected": "5.<|im_end|>\n",
}


def m(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def conversation(row: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    prompt = [m("system", row["system"])] * bool(row["system"]) + [m("user", row["question"])]
    return {"prompt": prompt, "chosen": [m("assistant", row["chosen"])], "rejected": [m("assistant", row["rejected"])]}


@pytest.fixture
def templated(qwen2_tokenizer_path):
    """A copy of the Qwen2 tokenizer with the given chat template (the session's `qwen2` stays ChatML)."""

    def make(template: str):
        tokenizer = AutoTokenizer.from_pretrained(qwen2_tokenizer_path)
        tokenizer.chat_template = template
        return tokenizer

    return make


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preferences, "_WARNED", set())


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == preferences.logger.name and r.levelno >= logging.WARNING
    ]


# --- conversational rows: the model's own template ---------------------------------------------------------------


def test_conversational_rows_use_a_zephyr_template(templated) -> None:
    tokenizer = templated(ZEPHYR)
    formatted = chatml_format(conversation(ORCA), tokenizer)
    assert formatted == ZEPHYR_ORCA
    whole = tokenizer.apply_chat_template(conversation(ORCA)["prompt"] + [m("assistant", "4.")], tokenize=False)
    assert formatted["prompt"] + formatted["chosen"] == whole  # prompt + answer is the whole chat, as rendered


def test_conversational_multi_turn_answer_uses_a_llama3_template(templated) -> None:
    row = {
        "prompt": [m("user", "Name a fruit.")],
        "chosen": [m("assistant", "Apple."), m("user", "Another?"), m("assistant", "Pear.")],
        "rejected": [m("assistant", "Rock.")],
    }
    assert chatml_format(row, templated(LLAMA3), row=4) == {
        "prompt": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nName a fruit.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "chosen": "Apple.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAnother?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nPear.<|eot_id|>",
        "rejected": "Rock.<|eot_id|>",
    }


def test_conversational_rows_in_a_dataset_and_the_boundary_check(templated) -> None:
    tokenizer = templated(ZEPHYR)
    rows = datasets.Dataset.from_list([conversation(ORCA), conversation({**ORCA, "rejected": "\nfive"})])
    # Qwen2's BPE merges the prompt's final "\n" with the answer's leading one: the check still names the row
    with pytest.raises(PreferenceDataError, match=r"^row 2, column 'rejected': the prompt's last tokens merge"):
        format_orca_dataset(rows, tokenizer)
    assert format_orca_dataset(rows.select([0]), tokenizer).to_list() == [ZEPHYR_ORCA]
    assert format_orca_dataset(rows.select([0]), tokenizer, chat_format="chatml").to_list() == [CHATML_ORCA]


def test_a_template_that_refuses_the_messages_names_the_row_and_the_switch(templated) -> None:
    tokenizer = templated(GEMMA)
    with pytest.raises(PreferenceDataError) as caught:
        chatml_format(conversation(ORCA), tokenizer, row=3)
    assert str(caught.value).startswith(
        "row 3: the tokenizer's chat template refused the messages (System role not supported). Fix:"
    )
    assert "chat_format: chatml" in str(caught.value)
    assert chatml_format(conversation({**ORCA, "system": ""}), tokenizer) == {
        "prompt": "<start_of_turn>user\nWhat is 2 + 2?<end_of_turn>\n<start_of_turn>model\n",
        "chosen": "4.<end_of_turn>\n",
        "rejected": "5.<end_of_turn>\n",
    }


@pytest.mark.parametrize(
    "template",
    [
        ZEPHYR.replace("{{ '<|assistant|>' }}", "{{ '<|bot|>' }}"),  # generation prompt "bot", answers "assistant"
        ZEPHYR.replace("'<|assistant|>\n'  + message['content'] + eos_token", "''"),  # renders no answers
    ],
    ids=["other-generation-prompt", "no-answers"],
)
def test_a_template_whose_prompt_is_not_the_start_of_the_chat_is_refused(templated, template: str) -> None:
    assert template != ZEPHYR
    with pytest.raises(PreferenceDataError, match=r"^row 1, column 'chosen': the tokenizer's chat template renders"):
        chatml_format(conversation(ORCA), templated(template), row=1)


# --- orca rows: ChatML by default, said once; chat_format="model" -------------------------------------------------


def test_orca_rows_keep_chatml_and_say_so_once(templated, caplog: pytest.LogCaptureFixture) -> None:
    tokenizer = templated(ZEPHYR)
    rows = datasets.Dataset.from_list([ORCA] * 3)
    with caplog.at_level(logging.WARNING, logger=preferences.logger.name):
        assert format_orca_dataset(rows, tokenizer).to_list() == [CHATML_ORCA] * 3
        assert chatml_format(ORCA, tokenizer) == CHATML_ORCA
        assert format_orca_dataset(rows, tokenizer).to_list() == [CHATML_ORCA] * 3
    (warning,) = warnings_of(caplog)
    assert "not ChatML" in warning and "chat_format: model" in warning and "chat_format: chatml" in warning


def test_orca_rows_in_the_model_template(templated, caplog: pytest.LogCaptureFixture) -> None:
    tokenizer = templated(ZEPHYR)
    rows = datasets.Dataset.from_list([ORCA, {**ORCA, "system": ""}])
    with caplog.at_level(logging.WARNING, logger=preferences.logger.name):
        formatted = format_orca_dataset(rows, tokenizer, chat_format="model").to_list()
        assert format_orca_dataset(rows, tokenizer, chat_format="chatml").to_list()[0] == CHATML_ORCA
    assert warnings_of(caplog) == []  # an explicit choice is not warned about
    assert formatted[0] == ZEPHYR_ORCA == chatml_format(ORCA, tokenizer, chat_format="model")
    assert formatted[1]["prompt"] == "<|user|>\nWhat is 2 + 2?<|endoftext|>\n<|assistant|>\n"
    # the same strings as the conversational row of the same pair
    assert formatted[0] == chatml_format(conversation(ORCA), tokenizer)


def test_chatml_and_templateless_tokenizers_are_unchanged(qwen2, stories, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=preferences.logger.name):
        for tokenizer in (qwen2, stories):
            for chat_format in preferences.CHAT_FORMATS:
                assert chatml_format(ORCA, tokenizer, chat_format=chat_format) == CHATML_ORCA
                assert chatml_format(conversation(ORCA), tokenizer, chat_format=chat_format) == CHATML_ORCA
    assert warnings_of(caplog) == []
    assert stories.chat_template is None


def test_mixture_with_a_conversational_source_is_all_in_the_model_template(templated, orca_rows_path, tmp_path) -> None:
    import json

    rows = [json.loads(line) for line in orca_rows_path.read_text(encoding="utf-8").splitlines()[:20]]
    conversational = tmp_path / "conv.jsonl"
    conversational.write_text("".join(json.dumps(conversation(row)) + "\n" for row in rows[10:]), encoding="utf-8")
    orca = tmp_path / "orca.jsonl"
    orca.write_text("".join(json.dumps(row) + "\n" for row in rows[:10]), encoding="utf-8")
    mixed, _ = mix_sources({str(orca): 1, str(conversational): 1}, limit=10, seed=0)
    formatted = format_orca_dataset(mixed, templated(LLAMA3))
    assert all(prompt.startswith("<|begin_of_text|><|start_header_id|>") for prompt in formatted["prompt"])
    assert all(answer.endswith("<|eot_id|>") for answer in [*formatted["chosen"], *formatted["rejected"]])


def test_unknown_chat_format_is_refused(qwen2) -> None:
    with pytest.raises(ValueError, match=r"^chat_format: unknown 'zephyr'\. Fix: use one of \['auto', 'model'"):
        format_orca_dataset(datasets.Dataset.from_list([ORCA]), qwen2, chat_format="zephyr")


def test_the_recipe_key_reaches_the_run_data(templated, tmp_path):
    """`chat_format` in a recipe decides how load_run_data writes the rows (the pipeline passes it down)."""
    import json

    from dpo_xpu.pipeline import load_run_data
    from dpo_xpu.recipes import make_recipe

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(ORCA) + "\n", encoding="utf-8")
    tokenizer = templated(ZEPHYR)
    for chat_format, expected in (("model", ZEPHYR_ORCA), ("chatml", CHATML_ORCA), ("auto", CHATML_ORCA)):
        recipe = make_recipe(dict(dataset_name_or_path=str(rows), chat_format=chat_format, drop_long_rows=False))
        train, _ = load_run_data(recipe, tokenizer)
        assert train[0] == expected, chat_format
    with pytest.raises(Exception, match="chat_format: 'zephyr' is not one of auto, model, chatml"):
        make_recipe(dict(chat_format="zephyr"))
