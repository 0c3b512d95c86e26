"""Data sources: the generic prompt/chosen/rejected format, mixtures, the length filter and data_report.json."""

from __future__ import annotations

import json
import re

import pytest

from dpo_xpu.data.lengths import token_lengths
from dpo_xpu.data.preferences import chatml_format
from dpo_xpu.data.sources import detect_format, load_preference_pairs, mix_sources, mixture_counts
from dpo_xpu.errors import PreferenceDataError
from dpo_xpu.models.loading import load_tokenizer
from dpo_xpu.pipeline import load_run_data
from dpo_xpu.recipes import Recipe


def orca_rows(path, n=None):
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:n] if n else rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def generic_file(orca_path, path, n=None):
    rows = [
        {"prompt": r["question"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in orca_rows(orca_path, n)
    ]
    return write_jsonl(path, rows)


@pytest.mark.parametrize(
    ("available", "proportions", "limit"),
    [
        ({"a": 100, "b": 100}, {"a": 0.7, "b": 0.3}, None),
        ({"a": 50, "b": 1000}, {"a": 0.5, "b": 0.5}, None),
        ({"a": 284, "b": 200, "c": 13}, {"a": 3, "b": 2, "c": 1}, 77),
        ({"a": 10, "b": 10, "c": 10}, {"a": 1, "b": 1, "c": 1}, 7),
    ],
)
def test_mixture_counts_are_within_one_row_of_the_proportions(available, proportions, limit):
    counts = mixture_counts(available, proportions, limit)
    total = sum(counts.values())
    weight = sum(proportions.values())
    most = min(available[k] * weight / p for k, p in proportions.items())
    assert total == (min(limit, int(most + 1e-9)) if limit else int(most + 1e-9))
    for name, share in proportions.items():
        assert abs(counts[name] - total * share / weight) < 1
        assert counts[name] <= available[name]


def test_mix_sources_is_seeded_without_replacement_and_mixes_formats(orca_rows_path, tmp_path):
    orca = write_jsonl(tmp_path / "orca.jsonl", orca_rows(orca_rows_path, 100))
    generic = generic_file(orca_rows_path, tmp_path / "generic.jsonl")
    mixture = {str(orca): 0.7, str(generic): 0.3}
    mixed, counts = mix_sources(mixture, limit=40, seed=3)
    assert counts == {str(orca): 28, str(generic): 12}
    assert len(mixed) == 40 and mixed.column_names == ["system", "question", "chosen", "rejected"]
    pairs = list(zip(mixed["question"], mixed["chosen"], mixed["system"]))
    assert len(set(pairs)) == 40  # no row drawn twice (orca rows keep their system prompt, generic ones get "")
    assert sum(1 for s in mixed["system"] if s == "") >= 12
    again, _ = mix_sources(mixture, limit=40, seed=3)
    assert again["question"] == mixed["question"]
    other, _ = mix_sources(mixture, limit=40, seed=4)
    assert other["question"] != mixed["question"]


def test_generic_rows_are_validated_with_line_column_and_fix(tmp_path):
    rows = [
        {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"},
        {"prompt": "Name a colour.", "chosen": "Blue", "rejected": "Seven"},
        {"prompt": "Say hi.", "chosen": "Hi!"},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(PreferenceDataError, match=r"pairs.jsonl line 3: missing column 'rejected'.*Fix"):
        load_preference_pairs(path)
    rows[2]["rejected"] = "Bye."
    rows[0]["prompt"] = "  "
    with pytest.raises(PreferenceDataError, match=r"line 1, column 'prompt': expected a non-empty string"):
        load_preference_pairs(write_jsonl(path, rows))
    rows[0]["prompt"] = "What is 2 + 2?"
    with pytest.raises(PreferenceDataError, match=r"line 1: missing column 'system'"):
        load_preference_pairs(write_jsonl(path, rows), data_format="orca")
    loaded = load_preference_pairs(write_jsonl(path, rows))
    assert loaded[0] == {"system": "", "question": "What is 2 + 2?", "chosen": "4", "rejected": "5"}


def test_format_detection_names_every_format():
    assert detect_format(["system", "question", "chosen", "rejected"]) == "orca"
    assert detect_format(["prompt", "chosen", "rejected", "id"]) == "prompt-chosen-rejected"
    messages = [{"role": "assistant", "content": "A"}]
    assert detect_format(["chosen", "rejected"], example={"chosen": messages, "rejected": messages}) == "conversational"
    assert detect_format(["prompt", "chosen", "rejected"], example={"chosen": messages}) == "conversational"
    with pytest.raises(PreferenceDataError) as caught:
        detect_format(["text", "label"], "pairs.jsonl line 1")
    assert str(caught.value) == (
        "pairs.jsonl line 1: cannot tell the data format from the columns ['label', 'text']. Fix: use the columns "
        "['system', 'question', 'chosen', 'rejected'] (data_format: orca), ['prompt', 'chosen', 'rejected'] "
        "(data_format: prompt-chosen-rejected), or 'chosen' and 'rejected' lists of chat messages with an "
        "optional 'prompt' list (data_format: conversational)."
    )


@pytest.mark.parametrize(
    ("columns", "missing", "fmt"),
    [
        (["system", "question", "chosen"], "column 'rejected'", "orca"),
        (["question", "chosen", "rejected"], "column 'system'", "orca"),
        (["prompt", "chosen"], "column 'rejected'", "prompt-chosen-rejected"),
        (["instruction", "chosen", "rejected"], "column 'prompt'", "prompt-chosen-rejected"),
        (["system", "question", "id"], "columns 'chosen', 'rejected'", "orca"),
    ],
)
def test_near_miss_columns_name_what_is_missing(columns, missing, fmt):
    with pytest.raises(PreferenceDataError) as caught:
        detect_format(columns, "pairs.jsonl line 1")
    plural = "s" if "columns" in missing else ""
    assert str(caught.value) == (
        f"pairs.jsonl line 1: missing {missing} of the {fmt} format (found {sorted(columns)}). Fix: add the "
        f"column{plural} to every row (or rename the column{plural} holding {'them' if plural else 'it'}), "
        f"for data_format: {fmt}."
    )


def test_parquet_json_and_jsonl_without_rejected_name_the_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    orca = [{"system": "S", "question": "Q", "chosen": "A"}] * 2
    pq.write_table(pa.Table.from_pylist(orca), tmp_path / "orca.parquet")
    with pytest.raises(PreferenceDataError, match=r"^orca\.parquet row 1: missing column 'rejected' of the orca fo"):
        load_preference_pairs(tmp_path / "orca.parquet")
    generic = [{"prompt": "Q", "chosen": "A"}] * 2
    (tmp_path / "generic.json").write_text(json.dumps(generic))
    with pytest.raises(PreferenceDataError, match=r"^generic\.json row 1: missing column 'rejected' of the prompt-"):
        load_preference_pairs(tmp_path / "generic.json")
    path = tmp_path / "generic.jsonl"
    path.write_text("\n" + json.dumps(generic[0]) + "\n")
    with pytest.raises(PreferenceDataError, match=r"^generic\.jsonl line 2: missing column 'rejected' of the prompt-"):
        load_preference_pairs(path)
    conversational = {"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "A"}]}
    write_jsonl(path, [conversational])
    with pytest.raises(PreferenceDataError, match=r"^generic\.jsonl line 1: missing column 'rejected' of the convers"):
        load_preference_pairs(path)


def test_directory_and_unknown_format_are_one_line(tmp_path):
    folder = re.escape(str(tmp_path))
    with pytest.raises(PreferenceDataError, match=rf"^{folder} is a directory, not a data file\. Fix: pass one "):
        load_preference_pairs(tmp_path)
    with pytest.raises(PreferenceDataError, match=rf"^{folder} is a directory"):
        load_preference_pairs(str(tmp_path), data_format="orca")
    with pytest.raises(PreferenceDataError, match=r"^data_format: unknown 'chatml'\. Fix: use one of \['auto', "):
        load_preference_pairs(tmp_path, data_format="chatml")


def test_generic_prompt_is_the_user_turn_of_the_same_chatml(qwen2_tokenizer_path):
    tokenizer = load_tokenizer(qwen2_tokenizer_path)
    generic = chatml_format({"system": "", "question": "Hi?", "chosen": "Hello.", "rejected": "Go."}, tokenizer)
    assert generic["prompt"].endswith("<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n")
    assert generic["chosen"] == "Hello.<|im_end|>\n"


def test_length_filter_drops_long_pairs_and_reports_why(stories260k_path, orca_rows_path, tmp_path):
    tokenizer = load_tokenizer(stories260k_path)
    recipe = Recipe(
        dataset_name_or_path=str(orca_rows_path),
        limit=16,
        max_length=1200,
        max_prompt_length=None,
        drop_long_rows=True,
        eval_fraction=0.25,
    )
    report_path = tmp_path / "data_report.json"
    train, evaluation = load_run_data(recipe, tokenizer, report_path=report_path)
    report = json.loads(report_path.read_text())
    whole = load_run_data(Recipe(dataset_name_or_path=str(orca_rows_path), limit=16), tokenizer)[0]
    lengths = token_lengths(whole, tokenizer)
    too_long = [
        (p + c > 1200, p + r > 1200) for p, c, r in zip(lengths["prompt"], lengths["chosen"], lengths["rejected"])
    ]
    dropped = sum(any(t) for t in too_long)
    assert 0 < dropped < 16, "pick max_length so that some rows are dropped"
    assert report["rows"] == 16
    assert report["length_filter"] == {
        "rows": 16,
        "kept": 16 - dropped,
        "dropped": dropped,
        "max_length": 1200,
        "reasons": {"prompt+chosen": sum(t[0] for t in too_long), "prompt+rejected": sum(t[1] for t in too_long)},
    }
    assert len(train) + len(evaluation) == 16 - dropped
    assert (report["train_rows"], report["eval_rows"]) == (len(train), len(evaluation))
    kept = token_lengths(train, tokenizer)
    assert max(p + max(c, r) for p, c, r in zip(kept["prompt"], kept["chosen"], kept["rejected"])) <= 1200


def test_length_filter_that_drops_everything_says_so(stories260k_path, orca_rows_path):
    tokenizer = load_tokenizer(stories260k_path)
    recipe = Recipe(dataset_name_or_path=str(orca_rows_path), limit=4, max_length=20, max_prompt_length=None)
    recipe.drop_long_rows = True
    with pytest.raises(PreferenceDataError, match="all 4 pairs are longer than max_length=20"):
        load_run_data(recipe, tokenizer)


def test_mixture_recipe_reports_counts_per_source(stories260k_path, orca_rows_path, tmp_path):
    generic = generic_file(orca_rows_path, tmp_path / "generic.jsonl", 30)
    recipe = Recipe(dataset_mixture={str(orca_rows_path): 2, str(generic): 1}, limit=12)
    load_run_data(recipe, load_tokenizer(stories260k_path), report_path=tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["mixture"] == {str(orca_rows_path): 8, str(generic): 4}
    assert report["rows"] == report["train_rows"] == 12
