"""Tests for dpo_xpu.data.preferences: loading, validation, ChatML formatting and the train/eval split."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from dpo_xpu.data import preferences as data
from dpo_xpu.data.preferences import (
    CHATML_TEMPLATE,
    DEMO_SAMPLE_PATH,
    chatml_format,
    format_orca_dataset,
    load_orca_dpo_pairs,
    train_eval_split,
)
from dpo_xpu.data.rows import validate_preference_rows
from dpo_xpu.data.sources import load_preference_pairs
from dpo_xpu.errors import PreferenceDataError

GOOD = {"system": "Be brief.", "question": "What is 2 + 2?", "chosen": "4.", "rejected": "5."}
CONVERSATION = {
    "prompt": [{"role": "user", "content": "What is 2 + 2?"}],
    "chosen": [{"role": "assistant", "content": "4."}],
    "rejected": [{"role": "assistant", "content": "5."}],
}
IM_START, IM_END = 151644, 151645


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_line", "column", "words"),
    [
        (json.dumps({k: v for k, v in GOOD.items() if k != "chosen"}), "chosen", "missing column"),
        (json.dumps({**GOOD, "chosen": None}), "chosen", "found null"),
        (json.dumps({**GOOD, "question": 42}), "question", "found int 42"),
        (json.dumps({**GOOD, "system": None}), "system", "found null"),
        (json.dumps({**GOOD, "question": "   "}), "question", "non-empty"),
        (json.dumps({**GOOD, "chosen": ""}), "chosen", "non-empty"),
        (json.dumps({**GOOD, "rejected": "\n\t"}), "rejected", "non-empty"),
        (
            json.dumps({**GOOD, "chosen": " same answer", "rejected": "same answer\n"}),
            "rejected",
            "identical",
        ),
    ],
)
def test_bad_jsonl_row_names_line_and_column(tmp_path: Path, bad_line: str, column: str, words: str) -> None:
    # line 1 good, line 2 blank (skipped but counted), line 3 bad
    path = write_jsonl(tmp_path / "sample.jsonl", [json.dumps(GOOD), "", bad_line, json.dumps(GOOD)])
    with pytest.raises(PreferenceDataError) as caught:
        load_orca_dpo_pairs(path)
    message = str(caught.value)
    assert message.startswith("sample.jsonl line 3")
    assert repr(column) in message
    assert words in message
    assert "Fix:" in message


@pytest.mark.parametrize(("bad_line", "words"), [('{"system": "", "question": ', "not valid JSON"), ("[1, 2]", "list")])
def test_line_that_is_not_a_json_object(tmp_path: Path, bad_line: str, words: str) -> None:
    path = write_jsonl(tmp_path / "sample.jsonl", [json.dumps(GOOD), json.dumps(GOOD), bad_line])
    with pytest.raises(PreferenceDataError, match=r"^sample\.jsonl line 3: .*Fix:") as caught:
        load_orca_dpo_pairs(path)
    assert words in str(caught.value)


def test_empty_system_is_accepted(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "ok.jsonl", [json.dumps({**GOOD, "system": ""}), json.dumps(GOOD)])
    dataset = load_orca_dpo_pairs(path)
    assert dataset["system"] == ["", "Be brief."]
    assert dataset.column_names == ["system", "question", "chosen", "rejected"]


def test_parquet_reports_row_numbers(tmp_path: Path) -> None:
    rows = [GOOD, GOOD, {**GOOD, "chosen": None}]
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(PreferenceDataError, match=r"^pairs\.parquet row 3, column 'chosen': .*found null"):
        load_orca_dpo_pairs(path)
    pq.write_table(pa.Table.from_pylist(rows[:2]), path)
    assert len(load_orca_dpo_pairs(path)) == 2


def test_json_list_reports_row_numbers(tmp_path: Path) -> None:
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "question": 7}]), encoding="utf-8")
    with pytest.raises(PreferenceDataError, match=r"^pairs\.json row 2, column 'question': expected a string"):
        load_orca_dpo_pairs(path)
    path.write_text(json.dumps({"rows": [GOOD]}), encoding="utf-8")
    with pytest.raises(PreferenceDataError, match="expected a JSON list"):
        load_orca_dpo_pairs(path)


def test_json_lines_saved_as_json_report_line_numbers(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pairs.json", [json.dumps(GOOD), json.dumps({**GOOD, "rejected": "4."})])
    with pytest.raises(PreferenceDataError, match=r"^pairs\.json line 2, column 'rejected': identical"):
        load_orca_dpo_pairs(path)


def test_missing_unsupported_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(PreferenceDataError, match="does not exist"):
        load_orca_dpo_pairs(tmp_path / "nope.jsonl")
    csv = tmp_path / "pairs.csv"
    csv.write_text("system,question,chosen,rejected\n", encoding="utf-8")
    with pytest.raises(PreferenceDataError, match="unsupported file type '.csv'"):
        load_orca_dpo_pairs(csv)
    empty = write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(PreferenceDataError, match="holds no rows"):
        load_orca_dpo_pairs(empty)
    with pytest.raises(ValueError, match="limit"):
        load_orca_dpo_pairs(empty, limit=0)


def test_hub_source_goes_through_load_dataset_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load_dataset(source: str, split: str) -> datasets.Dataset:
        calls.append((source, split))
        rows = [{**GOOD, "extra": 1}, {**GOOD, "extra": 2, "chosen": "  "}]
        return datasets.Dataset.from_list(rows if split == "bad" else rows[:1])

    monkeypatch.setattr(data.datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr("dpo_xpu.hub.hub_unreachable_reason", lambda: None)  # as if the hub answered
    dataset = load_orca_dpo_pairs("Intel/orca_dpo_pairs")
    assert calls == [("Intel/orca_dpo_pairs", "train")]
    assert dataset.column_names == ["system", "question", "chosen", "rejected"]
    with pytest.raises(PreferenceDataError, match=r"^Intel/orca_dpo_pairs \[bad\] row 2, column 'chosen'"):
        load_orca_dpo_pairs("Intel/orca_dpo_pairs", split="bad")


def test_validate_generic_prompt_chosen_rejected_format() -> None:
    columns = ("prompt", "chosen", "rejected")
    rows = [{"prompt": "Q", "chosen": "A", "rejected": "B"}] * 3
    assert validate_preference_rows(rows, columns=columns) == 3
    bad = [*rows, {"prompt": "", "chosen": "A", "rejected": "B"}]
    with pytest.raises(PreferenceDataError, match=r"^my rows line 9, column 'prompt': expected a non-empty"):
        validate_preference_rows(bad, columns=columns, source_name="my rows", line_numbers=[1, 2, 3, 9])


# --- the real rows and the shipped sample -------------------------------------------------------------------


def test_real_orca_rows_load(orca_rows_path: Path) -> None:
    dataset = load_orca_dpo_pairs(orca_rows_path)
    assert len(dataset) == 284
    assert dataset.column_names == ["system", "question", "chosen", "rejected"]
    first = json.loads(orca_rows_path.read_text(encoding="utf-8").splitlines()[0])
    assert dataset[0] == first


def test_limit_is_seeded_and_deterministic(orca_rows_path: Path) -> None:
    full = load_orca_dpo_pairs(orca_rows_path)
    a = load_orca_dpo_pairs(orca_rows_path, limit=10, seed=1)
    b = load_orca_dpo_pairs(orca_rows_path, limit=10, seed=1)
    c = load_orca_dpo_pairs(orca_rows_path, limit=10, seed=2)
    assert len(a) == 10
    assert a["question"] == b["question"]
    assert a["question"] != c["question"]
    assert a["question"] != full["question"][:10]
    assert set(a["question"]) <= set(full["question"])
    assert len(load_orca_dpo_pairs(orca_rows_path, limit=1000)) == 284


def test_demo_sample_ships_and_validates() -> None:
    assert DEMO_SAMPLE_PATH.is_file()
    lines = [json.loads(line) for line in DEMO_SAMPLE_PATH.read_text(encoding="utf-8").splitlines()]
    assert all(list(row) == ["system", "question", "chosen", "rejected"] for row in lines)
    dataset = load_orca_dpo_pairs(DEMO_SAMPLE_PATH)
    assert len(dataset) >= 40
    assert "" in dataset["system"]
    assert len(set(dataset["question"])) == len(dataset)
    assert all(len(answer) <= 400 for answer in [*dataset["chosen"], *dataset["rejected"]])


# --- ChatML formatting ---------------------------------------------------------------------------------


def test_chatml_format_exact_strings_qwen2(qwen2) -> None:
    with_system = chatml_format(
        {
            "system": "You are a helpful assistant.",
            "question": "What is 2 + 2?",
            "chosen": "4",
            "rejected": "5",
        },
        qwen2,
    )
    assert with_system == {
        "prompt": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
        "chosen": "4<|im_end|>\n",
        "rejected": "5<|im_end|>\n",
    }
    without_system = chatml_format(
        {"system": "", "question": "Translate: chat", "chosen": "cat", "rejected": "dog"}, qwen2
    )
    assert without_system == {
        "prompt": "<|im_start|>user\nTranslate: chat<|im_end|>\n<|im_start|>assistant\n",
        "chosen": "cat<|im_end|>\n",
        "rejected": "dog<|im_end|>\n",
    }


def test_chatml_format_exact_ids_qwen2(qwen2) -> None:
    out = chatml_format({"system": "You are helpful.", "question": "Hi", "chosen": "Hello!", "rejected": "Go."}, qwen2)
    prompt_ids = qwen2(out["prompt"], add_special_tokens=False)["input_ids"]
    chosen_ids = qwen2(out["prompt"] + out["chosen"], add_special_tokens=False)["input_ids"]
    system_turn = [IM_START, 8948, 198, 2610, 525, 10950, 13, IM_END, 198]  # system \n You are helpful .
    user_turn = [IM_START, 872, 198, 13048, IM_END, 198]  # user \n Hi
    generation_prompt = [IM_START, 77091, 198]  # assistant \n
    expected_prompt = system_turn + user_turn + generation_prompt
    assert prompt_ids == expected_prompt
    assert chosen_ids == expected_prompt + [9707, 0, IM_END, 198]  # Hello ! <|im_end|> \n


def test_all_real_rows_format_with_qwen2(qwen2, orca_rows_path: Path) -> None:
    rows = load_orca_dpo_pairs(orca_rows_path)
    formatted = format_orca_dataset(rows, qwen2)
    assert formatted.column_names == ["prompt", "chosen", "rejected"]
    assert len(formatted) == 284
    for original, row in zip(rows, formatted, strict=True):
        assert row["prompt"] == (
            f"<|im_start|>system\n{original['system']}<|im_end|>\n"
            f"<|im_start|>user\n{original['question']}<|im_end|>\n<|im_start|>assistant\n"
        )
        assert row["chosen"] == original["chosen"] + "<|im_end|>\n"
        assert row["rejected"] == original["rejected"] + "<|im_end|>\n"


def test_tokenizer_without_chatml_gets_explicit_template(qwen2, stories) -> None:
    assert stories.chat_template is None
    for example in (
        {
            "system": "You are helpful.",
            "question": "Tell a story.",
            "chosen": "Once upon a time.",
            "rejected": "No.",
        },
        {"system": "", "question": "Tell a story.", "chosen": "Once upon a time.", "rejected": "No."},
    ):
        assert chatml_format(example, stories) == chatml_format(example, qwen2)
    assert stories.chat_template is None  # the user's tokenizer is not changed
    assert "<|im_start|>" in CHATML_TEMPLATE and "<|im_end|>" in CHATML_TEMPLATE


def test_non_chatml_template_is_replaced(qwen2, qwen2_tokenizer_path: Path) -> None:
    other = AutoTokenizer.from_pretrained(qwen2_tokenizer_path)
    other.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    example = {"system": "S", "question": "Q", "chosen": "A", "rejected": "B"}
    assert chatml_format(example, other)["prompt"] == "<|im_start|>system\nS<|im_end|>\n" + (
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    )


def test_boundary_merge_raises_with_row_and_tokens(qwen2) -> None:
    # Qwen2's byte-level BPE merges the prompt's final "\n" (Ċ, 198) with an answer's leading "\n"
    # into one token "ĊĊ" (271): a real merge, not a mock.
    example = {"system": "", "question": "Hi", "chosen": "\nHello", "rejected": "Bye"}
    with pytest.raises(PreferenceDataError) as caught:
        chatml_format(example, qwen2, row=5)
    message = str(caught.value)
    assert message.startswith("row 5, column 'chosen'")
    assert "prompt alone ends ['Ċ'], prompt + chosen has ['ĊĊ', 'Hello'] there" in message
    assert "Fix: strip leading whitespace" in message
    with pytest.raises(PreferenceDataError, match=r"^row 7, column 'rejected'"):
        chatml_format({**example, "chosen": "Hello", "rejected": "\n\nBye", "_row": 7}, qwen2)


def test_format_dataset_reports_one_based_row(qwen2) -> None:
    rows = datasets.Dataset.from_list([GOOD, {**GOOD, "rejected": "\nfive"}, GOOD])
    with pytest.raises(PreferenceDataError, match=r"^row 2, column 'rejected'"):
        format_orca_dataset(rows, qwen2)


# --- train/eval split ----------------------------------------------------------------------------------


def test_train_eval_split_sizes_determinism_disjointness() -> None:
    dataset = datasets.Dataset.from_dict({"i": list(range(284))})
    train, evaluation = train_eval_split(dataset, eval_fraction=0.1, seed=3)
    assert (len(train), len(evaluation)) == (255, 29)
    assert set(train["i"]).isdisjoint(evaluation["i"])
    assert set(train["i"]) | set(evaluation["i"]) == set(range(284))
    again_train, again_eval = train_eval_split(dataset, eval_fraction=0.1, seed=3)
    assert again_train["i"] == train["i"] and again_eval["i"] == evaluation["i"]
    assert train_eval_split(dataset, eval_fraction=0.1, seed=4)[1]["i"] != evaluation["i"]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_train_eval_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        train_eval_split(datasets.Dataset.from_dict({"i": [1, 2, 3]}), eval_fraction=fraction)


def test_train_eval_split_rejects_empty_part() -> None:
    with pytest.raises(PreferenceDataError, match="training part would be empty"):
        train_eval_split(datasets.Dataset.from_dict({"i": [1]}), eval_fraction=0.5)


def test_chatml_tokenizer_keeps_its_own_template(qwen2_tokenizer_path: Path) -> None:
    # A ChatML template with a default system turn (as Qwen2.5's has) is used as is, not replaced.
    own = AutoTokenizer.from_pretrained(qwen2_tokenizer_path)
    own.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nDefault.<|im_end|>\n{% endif %}" + CHATML_TEMPLATE
    )
    example = {"system": "", "question": "Q", "chosen": "A", "rejected": "B"}
    assert chatml_format(example, own)["prompt"] == (
        "<|im_start|>system\nDefault.<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    )


# --- reading: encoding, directories, repeated keys, unreadable parquet ---------------------------------------


def test_invalid_utf8_names_line_column_and_byte(tmp_path: Path) -> None:
    good = json.dumps(GOOD).encode()
    bad = json.dumps({**GOOD, "question": "Caf?"}).encode().replace(b"?", b"\xe9")  # Latin-1 "é"
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + b"\n\n" + bad + b"\n" + good + b"\n")
    column = bad.index(b"\xe9") + 1
    with pytest.raises(PreferenceDataError) as caught:
        load_orca_dpo_pairs(path)
    assert str(caught.value) == (
        f"latin1.jsonl line 3: not valid UTF-8 (byte 0xe9 at column {column}, byte {column} of the line). "
        "Fix: re-save the file as UTF-8 (e.g. your editor's 'save with encoding', or iconv -f <its encoding> "
        "-t utf-8)."
    )
    # A character column counts characters, the byte offset bytes: two-byte "ü" before the bad byte.
    path.write_bytes(json.dumps({**GOOD, "system": "ü"}, ensure_ascii=False).encode() + b"\n" + bad + b"\xff")
    with pytest.raises(PreferenceDataError, match=r"^latin1\.jsonl line 2: not valid UTF-8 \(byte 0xe9 at column "):
        load_orca_dpo_pairs(path)
    first = json.dumps({**GOOD, "system": "ü"}, ensure_ascii=False).encode() + b"\xff"
    path.write_bytes(first + b"\n")
    with pytest.raises(PreferenceDataError) as caught:
        load_orca_dpo_pairs(path)
    assert f"(byte 0xff at column {len(first) - 1}, byte {len(first)} of the line)" in str(caught.value)


def test_invalid_utf8_in_a_json_list_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.json"
    text = json.dumps([GOOD, {**GOOD, "chosen": "Ol\u00e1"}], ensure_ascii=False, indent=1)
    path.write_bytes(text.encode("latin-1"))
    line = next(n for n, row in enumerate(text.splitlines(), start=1) if "Ol" in row)
    with pytest.raises(
        PreferenceDataError, match=rf"^pairs\.json line {line}: not valid UTF-8 .*re-save the file as UTF-8"
    ):
        load_orca_dpo_pairs(path)


def test_utf8_with_byte_order_mark_loads(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\n").encode())
    assert load_orca_dpo_pairs(path)[0] == GOOD


def test_directory_says_it_is_a_directory(tmp_path: Path) -> None:
    folder = tmp_path / "pairs"
    folder.mkdir()
    with pytest.raises(PreferenceDataError) as caught:
        load_orca_dpo_pairs(folder)
    assert str(caught.value) == (
        f"{folder} is a directory, not a data file. Fix: pass one .jsonl, .json or .parquet file (e.g. "
        f"{folder / 'train.jsonl'}), or a hub id such as 'Intel/orca_dpo_pairs'."
    )
    with pytest.raises(PreferenceDataError, match="is a directory"):
        load_orca_dpo_pairs(str(folder))  # a string path too
    with pytest.raises(PreferenceDataError, match="does not exist"):
        load_orca_dpo_pairs(folder / "missing.jsonl")


def test_repeated_key_in_a_jsonl_row_is_refused(tmp_path: Path) -> None:
    repeated = '{"system": "", "question": "Q", "chosen": "A", "rejected": "B", "chosen": "C"}'
    path = write_jsonl(tmp_path / "dup.jsonl", [json.dumps(GOOD), repeated])
    with pytest.raises(PreferenceDataError) as caught:
        load_orca_dpo_pairs(path)
    assert str(caught.value) == (
        "dup.jsonl line 2: the key 'chosen' appears more than once in one JSON object (only the last value "
        "would be kept). Fix: keep a single 'chosen' in that object."
    )
    path = write_jsonl(tmp_path / "dup.jsonl", [json.dumps(GOOD), repeated.replace('"chosen": "C"', '"x": "C"')])
    assert len(load_orca_dpo_pairs(path)) == 2  # the same keys without the repeat load


def test_repeated_key_in_a_json_list_names_row_and_nesting(tmp_path: Path) -> None:
    path = tmp_path / "dup.json"
    path.write_text(
        '[{"system": "", "question": "Q", "chosen": "A", "rejected": "B"},'
        ' {"system": "", "system": "S", "question": "Q", "chosen": "A", "rejected": "B"}]',
        encoding="utf-8",
    )
    with pytest.raises(PreferenceDataError, match=r"^dup\.json row 2: the key 'system' appears more than once"):
        load_orca_dpo_pairs(path)
    path.write_text('[{"a": {"b": 1}, "c": [{"d": 1, "d": 2}]}]', encoding="utf-8")
    with pytest.raises(PreferenceDataError, match=r"^dup\.json row 1, column 'c', message 1: the key 'd' appears"):
        load_orca_dpo_pairs(path)


def test_unreadable_parquet_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(PreferenceDataError, match=r"^broken\.parquet: not a readable parquet file \(.*\)\. Fix: ") as e:
        load_orca_dpo_pairs(path)
    assert "\n" not in str(e.value)


# --- rows that are no object, text that is no Unicode --------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_line", "kind", "found"),
    [
        ("[1, 2]", "array", "list [1, 2]"),
        ("3.5", "number", "float 3.5"),
        ('"a row"', "string", "str 'a row'"),
        ("null", "null", "null"),
        ("true", "boolean", "bool True"),
    ],
)
@pytest.mark.parametrize("line", [1, 2])
@pytest.mark.parametrize("good", [GOOD, CONVERSATION], ids=["orca", "conversational"])
def test_a_jsonl_line_that_is_no_object_is_named_as_such(tmp_path: Path, bad_line, kind, found, line, good) -> None:
    """On line 1 too, where the format was guessed from its columns ("cannot tell the data format from [])"), and
    after a first conversational row, whose checks named it differently."""
    lines = [json.dumps(good), json.dumps(good)]
    lines.insert(line - 1, bad_line)
    path = write_jsonl(tmp_path / "sample.jsonl", lines)
    with pytest.raises(PreferenceDataError) as caught:
        load_preference_pairs(path)  # data_format auto
    message = str(caught.value)
    assert message.startswith(f"sample.jsonl line {line}: is a JSON {kind}, not an object with the columns ")
    assert f"(found {found}). Fix: write each row as one JSON object such as {{" in message
    assert "cannot tell the data format" not in message


@pytest.mark.parametrize(("rows", "index"), [([GOOD, None], 1), ([7, GOOD], 0), ([GOOD, GOOD, [GOOD]], 2)])
def test_a_json_array_item_that_is_no_object_is_named_by_row_and_index(tmp_path: Path, rows, index) -> None:
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(PreferenceDataError, match=rf"^pairs\.json row {index + 1} \(array index {index}\): is a JSON "):
        load_preference_pairs(path)


@pytest.mark.parametrize("column", ["system", "question", "chosen", "rejected"])
def test_a_lone_surrogate_names_line_and_column(tmp_path: Path, column: str) -> None:
    bad = json.dumps({**GOOD, column: "\ud800 a"})  # written as the JSON escape \ud800 (ensure_ascii)
    assert "\\ud800" in bad
    path = write_jsonl(tmp_path / "sample.jsonl", [json.dumps(GOOD), bad])
    with pytest.raises(PreferenceDataError) as caught:
        load_preference_pairs(path)
    message = str(caught.value)
    assert message.startswith(f"sample.jsonl line 2, column {column!r}: the text is not valid Unicode (a lone ")
    assert "surrogate U+D800 at character 1" in message and "Fix: replace or remove that character" in message


def test_a_lone_surrogate_in_other_formats_is_named(tmp_path: Path) -> None:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [json.dumps({"prompt": "q", "chosen": "a\udfff", "rejected": "b"})])
    with pytest.raises(PreferenceDataError, match=r"^pairs\.jsonl line 1, column 'chosen': .*U\+DFFF at character 2"):
        load_preference_pairs(pairs)
    talk = {
        "prompt": [{"role": "user", "content": "q\udc00"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    chat = write_jsonl(tmp_path / "chat.jsonl", [json.dumps(talk)])
    with pytest.raises(PreferenceDataError, match=r"^chat\.jsonl line 1, column 'prompt', message 1, key 'content': "):
        load_preference_pairs(chat)
    rows = [{**GOOD, "question": "\ud83d"}]  # rows given directly (no file): by row
    with pytest.raises(PreferenceDataError, match=r"^rows row 1, column 'question': the text is not valid Unicode"):
        validate_preference_rows(rows)
