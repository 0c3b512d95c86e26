"""TRL's conversational preference format: detection, row-by-row validation, ChatML formatting, training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pytest

from dpo_xpu.data.preferences import (
    chatml_format,
    format_orca_dataset,
    load_orca_dpo_pairs,
)
from dpo_xpu.data.rows import validate_conversational_rows
from dpo_xpu.data.sources import load_preference_pairs, mix_sources
from dpo_xpu.errors import PreferenceDataError
from dpo_xpu.pipeline import load_run_data
from dpo_xpu.recipes import Recipe


def m(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def orca_rows(path: Path, n: int | None = None) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:n] if n else rows


def explicit(row: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    prompt = [m("system", row["system"])] * bool(row["system"]) + [m("user", row["question"])]
    return {"prompt": prompt, "chosen": [m("assistant", row["chosen"])], "rejected": [m("assistant", row["rejected"])]}


def implicit(row: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    pair = explicit(row)
    return {"chosen": pair["prompt"] + pair["chosen"], "rejected": pair["prompt"] + pair["rejected"]}


def chatml_prompt(*turns: tuple[str, str]) -> str:
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns) + "<|im_start|>assistant\n"


@pytest.fixture(params=["qwen2", "stories"])
def tokenizer(request: pytest.FixtureRequest):
    return request.getfixturevalue(request.param)


# --- the real rows, both conversational forms, both tokenizers -----------------------------------------------


@pytest.mark.parametrize("form", [explicit, implicit])
def test_real_rows_load_and_format_exactly(tokenizer, orca_rows_path: Path, tmp_path: Path, form) -> None:
    originals = orca_rows(orca_rows_path)
    path = write_jsonl(tmp_path / "conversations.jsonl", [form(row) for row in originals])
    loaded = load_preference_pairs(path)  # data_format: auto
    assert loaded.column_names == ["prompt", "chosen", "rejected"]
    assert loaded[0] == explicit(originals[0])  # implicit prompts are split off at load time
    formatted = format_orca_dataset(loaded, tokenizer)
    assert formatted.column_names == ["prompt", "chosen", "rejected"] and len(formatted) == 284
    for original, row in zip(originals, formatted, strict=True):
        assert row == {
            "prompt": chatml_prompt(("system", original["system"]), ("user", original["question"])),
            "chosen": original["chosen"] + "<|im_end|>\n",
            "rejected": original["rejected"] + "<|im_end|>\n",
        }
    # the same strings as the orca path formats from the same rows
    orca = format_orca_dataset(load_orca_dpo_pairs(orca_rows_path), tokenizer)
    assert formatted.to_list() == orca.to_list()
    assert load_preference_pairs(path, data_format="conversational").to_list() == loaded.to_list()


def test_multi_turn_prompt_and_answer_exact_strings(tokenizer) -> None:
    prompt = [m("system", "Be kind."), m("user", "Hi"), m("assistant", "Hello!"), m("user", "Name a fruit.")]
    row = {
        "prompt": prompt,
        "chosen": [m("assistant", "Apple."), m("user", "Another?"), m("assistant", "Pear.")],
        "rejected": [m("assistant", "Rock.")],
    }
    expected = {
        "prompt": "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n",
        "chosen": "Apple.<|im_end|>\n<|im_start|>user\nAnother?<|im_end|>\n<|im_start|>assistant\nPear.<|im_end|>\n",
        "rejected": "Rock.<|im_end|>\n",
    }
    assert chatml_format(row, tokenizer) == expected
    whole = [{"chosen": prompt + row["chosen"], "rejected": prompt + row["rejected"]}]
    assert validate_conversational_rows(whole) == [row]  # the implicit form splits at the first difference
    assert chatml_format(validate_conversational_rows(whole)[0], tokenizer) == expected
    assert tokenizer.chat_template is None or "<|im_start|>" in tokenizer.chat_template  # tokenizer unchanged


def test_no_system_message_and_empty_system_content(qwen2, tmp_path: Path) -> None:
    rows = [
        {"prompt": [m("user", "Q")], "chosen": [m("assistant", "A")], "rejected": [m("assistant", "B")]},
        {
            "chosen": [m("system", ""), m("user", "Q"), m("assistant", "A")],
            "rejected": [m("system", ""), m("user", "Q"), m("assistant", "B")],
        },
    ]
    formatted = format_orca_dataset(load_preference_pairs(write_jsonl(tmp_path / "c.jsonl", rows)), qwen2)
    assert formatted["prompt"] == [chatml_prompt(("user", "Q")), chatml_prompt(("system", ""), ("user", "Q"))]
    assert formatted["chosen"] == ["A<|im_end|>\n"] * 2


def test_extra_message_keys_are_dropped_and_nulls_mean_no_prompt(tmp_path: Path) -> None:
    rows = [
        {
            "prompt": None,
            "chosen": [m("user", "Q"), m("assistant", "A")],
            "rejected": [m("user", "Q"), m("assistant", "B")],
        },
        {
            "prompt": [{**m("user", "Q"), "name": "x"}],
            "chosen": [m("assistant", "A")],
            "rejected": [m("assistant", "B")],
        },
    ]
    loaded = load_preference_pairs(write_jsonl(tmp_path / "c.jsonl", rows))
    assert loaded["prompt"] == [[m("user", "Q")]] * 2


# --- row-by-row validation ---------------------------------------------------------------------------------

GOOD = {"prompt": [m("user", "Q")], "chosen": [m("assistant", "A")], "rejected": [m("assistant", "B")]}
IMPLICIT_FIX = (
    "Fix: make 'chosen' and 'rejected' the same conversation up to a user message, each ending with its own "
    "assistant answer (or give the conversation so far as a 'prompt' list)."
)
EXPLICIT_FIX = "Fix: 'chosen' and 'rejected' hold only the assistant answer to the 'prompt' messages."


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            {**GOOD, "rejected": [m("assistant", "B"), "hello"]},
            "c.jsonl line 3, column 'rejected', message 2: expected a chat message {'role': ..., 'content': ...}, "
            'found str \'hello\'. Fix: write each message as {"role": "user", "content": "..."}.',
        ),
        (
            {**GOOD, "chosen": [{"content": "A"}]},
            "c.jsonl line 3, column 'chosen', message 1, key 'role': expected one of ['system', 'user', "
            "'assistant'], found no 'role' (keys ['content']). Fix: give every message a 'role' of 'system', "
            "'user' or 'assistant'.",
        ),
        (
            {**GOOD, "prompt": [m("human", "Q")]},
            "c.jsonl line 3, column 'prompt', message 1, key 'role': expected one of ['system', 'user', "
            "'assistant'], found str 'human'. Fix: give every message a 'role' of 'system', 'user' or 'assistant'.",
        ),
        (
            {**GOOD, "prompt": [m("system", "S"), {"role": "user", "content": [{"type": "text", "text": "Q"}]}]},
            "c.jsonl line 3, column 'prompt', message 2, key 'content': expected a non-empty string, found list "
            "[{'type': 'text', 'text': 'Q'}]. Fix: give every 'user' message its text as a string 'content', or "
            "remove the row.",
        ),
        (
            {**GOOD, "chosen": [m("assistant", "  ")]},
            "c.jsonl line 3, column 'chosen', message 1, key 'content': expected a non-empty string, found str "
            "'  '. Fix: give every 'assistant' message its text as a string 'content', or remove the row.",
        ),
        (
            {**GOOD, "prompt": []},
            "c.jsonl line 3, column 'prompt': expected a non-empty list of chat messages, found list []. Fix: "
            "write 'prompt' as a list of {\"role\": ..., \"content\": ...} messages, with 'chosen' and 'rejected' "
            "holding the assistant answer after the 'prompt' messages (or, without 'prompt', the whole "
            "conversations, the same up to the answer).",
        ),
        (
            {**GOOD, "chosen": "A"},
            "c.jsonl line 3, column 'chosen': expected a non-empty list of chat messages, found str 'A'. Fix: "
            "write 'chosen' as a list of",
        ),
        (
            {"prompt": GOOD["prompt"], "chosen": GOOD["chosen"]},
            "c.jsonl line 3: expected an object with 'chosen' and 'rejected' lists of chat messages (and an "
            "optional 'prompt' list), found the columns ['chosen', 'prompt']. Fix: give every row 'chosen' and "
            "'rejected'.",
        ),
        (
            {**GOOD, "prompt": [m("user", "Q"), m("assistant", "Sure.")]},
            f"c.jsonl line 3, column 'prompt', message 2: the prompt must end with a user message, found "
            f"'assistant'. {EXPLICIT_FIX}",
        ),
        (
            {**GOOD, "chosen": [m("user", "Q"), m("assistant", "A")]},
            "c.jsonl line 3, column 'chosen', message 1: the answer must start with an assistant message, found "
            f"'user'. {EXPLICIT_FIX}",
        ),
        (
            {**GOOD, "rejected": [m("assistant", "B"), m("user", "More?")]},
            "c.jsonl line 3, column 'rejected', message 2: the answer must end with an assistant message, found "
            f"'user'. {EXPLICIT_FIX}",
        ),
        (
            {**GOOD, "rejected": [m("assistant", " A\n")]},
            "c.jsonl line 3, column 'rejected': identical to 'chosen' (after stripping whitespace), so the pair "
            "states no preference. Fix: give a worse 'rejected' answer or remove the row.",
        ),
        (
            {
                "chosen": [m("system", "S1"), m("user", "Q"), m("assistant", "A")],
                "rejected": [m("system", "S2"), m("user", "Q"), m("assistant", "B")],
            },
            "c.jsonl line 3, column 'chosen', message 1: differs from 'rejected' from the first message, so "
            f"without a 'prompt' column there is no shared prompt. {IMPLICIT_FIX}",
        ),
        (
            {
                "chosen": [m("user", "Q"), m("assistant", "A"), m("user", "Q2"), m("assistant", "A2")],
                "rejected": [m("user", "Q"), m("assistant", "A"), m("user", "Other"), m("assistant", "B2")],
            },
            "c.jsonl line 3, column 'chosen', message 2: the prompt must end with a user message, found "
            f"'assistant'. {IMPLICIT_FIX}",
        ),
        (
            {"chosen": [m("user", "Q"), m("assistant", "A")], "rejected": [m("user", "Q"), m("user", "Q again")]},
            "c.jsonl line 3, column 'rejected', message 2: the answer must start with an assistant message, found "
            f"'user'. {IMPLICIT_FIX}",
        ),
        (
            {"chosen": [m("user", "Q"), m("assistant", "A")], "rejected": [m("user", "Q"), m("assistant", "A ")]},
            "c.jsonl line 3, column 'rejected': identical to 'chosen' (after stripping whitespace)",
        ),
        (
            {"chosen": [m("user", "Q"), m("assistant", "A")], "rejected": [m("user", "Q")]},
            "c.jsonl line 3, column 'rejected': no answer of its own (without a 'prompt' column, all its messages "
            f"also begin the other column). {IMPLICIT_FIX}",
        ),
        (
            {
                "chosen": [m("user", "Q"), m("assistant", "A")],
                "rejected": [m("user", "Q"), m("assistant", "A"), m("user", "Q2"), m("assistant", "B")],
            },
            "c.jsonl line 3, column 'chosen': no answer of its own (without a 'prompt' column, all its messages "
            f"also begin the other column). {IMPLICIT_FIX}",
        ),
        (
            ["not", "an", "object"],
            "c.jsonl line 3: is a JSON array, not an object with the columns of a preference pair (found list "
            "['not', 'an', 'object']). Fix:",
        ),
    ],
)
def test_bad_rows_name_line_column_message_and_fix(tmp_path: Path, bad, message: str) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(bad) + "\n" + json.dumps(GOOD) + "\n", encoding="utf-8")
    with pytest.raises(PreferenceDataError) as caught:
        load_preference_pairs(path)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_rows_without_a_prompt_column_in_parquet_and_hub_rows(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [implicit({"system": "S", "question": "Q", "chosen": "A", "rejected": "B"})] * 2
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    assert load_preference_pairs(tmp_path / "c.parquet")[1] == {
        "prompt": [m("system", "S"), m("user", "Q")],
        "chosen": [m("assistant", "A")],
        "rejected": [m("assistant", "B")],
    }
    bad = datasets.Dataset.from_list([*rows, {**rows[0], "rejected": rows[0]["chosen"]}])
    with pytest.raises(PreferenceDataError, match=r"^hub rows row 3, column 'rejected': identical to 'chosen'"):
        validate_conversational_rows(bad, source_name="hub rows")


def test_strings_with_data_format_conversational_and_lists_with_the_generic_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "B"}])
    with pytest.raises(PreferenceDataError) as caught:
        load_preference_pairs(path, data_format="conversational")
    assert str(caught.value).startswith("g.jsonl line 1, column 'chosen': expected a non-empty list of chat messages")
    assert str(caught.value).endswith("(rows of plain strings: use data_format: auto or prompt-chosen-rejected).")
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD])
    with pytest.raises(PreferenceDataError) as caught:
        load_preference_pairs(path, data_format="prompt-chosen-rejected")
    assert str(caught.value).startswith("c.jsonl line 1, column 'prompt': expected a string, found list [{'role'")
    assert "use data_format: conversational" in str(caught.value)


def test_boundary_check_still_applies(qwen2, tmp_path: Path) -> None:
    rows = [GOOD, {**GOOD, "rejected": [m("assistant", "\nB")]}]
    loaded = load_preference_pairs(write_jsonl(tmp_path / "c.jsonl", rows))
    with pytest.raises(PreferenceDataError, match=r"^row 2, column 'rejected': the prompt's last tokens merge .*Fix"):
        format_orca_dataset(loaded, qwen2)


# --- the training pipeline: mixtures, load_run_data, a short run ---------------------------------------------


def test_mixture_of_orca_and_conversational_sources(qwen2, orca_rows_path: Path, tmp_path: Path) -> None:
    originals = orca_rows(orca_rows_path)
    orca = write_jsonl(tmp_path / "orca.jsonl", originals[:100])
    conversational = write_jsonl(tmp_path / "conv.jsonl", [implicit(row) for row in originals[100:]])
    mixed, counts = mix_sources({str(orca): 1, str(conversational): 1}, limit=40, seed=3)
    assert counts == {str(orca): 20, str(conversational): 20}
    assert mixed.column_names == ["prompt", "chosen", "rejected"]
    formatted = format_orca_dataset(mixed, qwen2)
    by_question = {row["question"]: row for row in originals}
    for row in formatted:
        question = row["prompt"].split("<|im_start|>user\n", 1)[1].removesuffix("<|im_end|>\n<|im_start|>assistant\n")
        original = by_question[question]
        assert row == {
            "prompt": chatml_prompt(("system", original["system"]), ("user", question)),
            "chosen": original["chosen"] + "<|im_end|>\n",
            "rejected": original["rejected"] + "<|im_end|>\n",
        }
    sources = [originals.index(by_question[p[-1]["content"]]) < 100 for p in mixed["prompt"]]
    assert sum(sources) == 20


def test_load_run_data_gives_the_orca_strings(stories, orca_rows_path: Path, tmp_path: Path) -> None:
    conversational = write_jsonl(tmp_path / "conv.jsonl", [explicit(row) for row in orca_rows(orca_rows_path)])
    report = tmp_path / "report.json"
    train, evaluation = load_run_data(
        Recipe(dataset_name_or_path=str(conversational), limit=16, eval_fraction=0.25), stories, report_path=report
    )
    reference = load_run_data(Recipe(dataset_name_or_path=str(orca_rows_path), limit=16, eval_fraction=0.25), stories)
    assert train.to_list() == reference[0].to_list() and evaluation.to_list() == reference[1].to_list()
    assert json.loads(report.read_text())["rows"] == 16


@pytest.mark.slow
def test_conversational_rows_train(stories260k_path: Path, orca_rows_path: Path, tmp_path: Path) -> None:
    from helpers import short_recipe

    from dpo_xpu.pipeline import run_training

    rows = write_jsonl(tmp_path / "conv.jsonl", [implicit(row) for row in orca_rows(orca_rows_path, 12)])
    recipe = short_recipe(stories260k_path, rows, tmp_path / "run", max_steps=2)
    result = run_training(recipe, live_plot=False)
    losses = [row["loss"] for row in result.metrics if "loss" in row]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=0.01)
