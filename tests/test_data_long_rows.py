"""Pathological rows: texts far beyond ``max_length`` are cut (or dropped) before anything tokenises them whole,
and the log names the row. (A 50 MB row was tokenised whole for 4 min 41 s at 7.8 GB peak.)"""

from __future__ import annotations

import logging

import datasets
import pytest

from dpo_xpu.data.lengths import drop_long_pairs
from dpo_xpu.data.preferences import format_orca_dataset
from dpo_xpu.data.truncation import NORMALIZER_MARGIN, char_limit, longest_token_chars, truncate_prompts

GOOD = {"system": "", "question": "What is 2 + 2?", "chosen": "4.", "rejected": "5."}
HUGE_ANSWER = "word " * 2_000_000  # 10 MB
HUGE_QUESTION = "why? " * 1_600_000  # 8 MB
MAX_LENGTH = 64


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


@pytest.fixture
def tokenised(qwen2, monkeypatch) -> list[int]:
    """The length in characters of every text qwen2 tokenises during the test."""
    seen: list[int] = []
    call = type(qwen2).__call__

    def counting(self, text, *args, **kwargs):
        seen.append(len(text))
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(qwen2), "__call__", counting)
    return seen


def test_the_char_limit_is_an_upper_bound(qwen2, stories) -> None:
    assert longest_token_chars(qwen2) == 128  # 128 spaces, one token
    assert longest_token_chars(stories) == 7
    assert char_limit(qwen2, MAX_LENGTH) == MAX_LENGTH * 128 * NORMALIZER_MARGIN
    for tokenizer in (qwen2, stories):
        longest = max(tokenizer.get_vocab(), key=len)
        for text in (" " * 5000, "=" * 5000, tokenizer.convert_tokens_to_string([longest]) * 300, HUGE_ANSWER[:5000]):
            tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            assert len(text) <= tokens * longest_token_chars(tokenizer)


@pytest.mark.parametrize("conversational", [False, True], ids=["orca", "conversational"])
def test_format_cuts_far_too_long_rows_before_tokenising(qwen2, caplog, tokenised, conversational: bool) -> None:
    rows = [GOOD, {**GOOD, "chosen": HUGE_ANSWER}, {**GOOD, "question": HUGE_QUESTION}]
    if conversational:
        rows = [
            {
                "prompt": [{"role": "user", "content": row["question"]}],
                "chosen": [{"role": "assistant", "content": row["chosen"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]}],
            }
            for row in rows
        ]
    dataset = datasets.Dataset.from_list(rows)
    limit = char_limit(qwen2, MAX_LENGTH)
    with caplog.at_level(logging.WARNING):
        formatted = format_orca_dataset(dataset, qwen2, max_length=MAX_LENGTH)
    assert max(tokenised) <= 2 * limit  # prompt + answer, each cut first; whole: minutes and gigabytes
    whole = format_orca_dataset(dataset.select([0]), qwen2)[0]
    assert formatted[0] == whole  # rows that fit are untouched
    assert formatted[1]["chosen"] == (HUGE_ANSWER + "<|im_end|>\n")[:limit]  # an answer keeps its start
    assert formatted[1]["prompt"] == whole["prompt"] and formatted[1]["rejected"] == whole["rejected"]
    assert len(formatted[2]["prompt"]) == limit  # a prompt keeps its end
    assert formatted[2]["prompt"].endswith("why? <|im_end|>\n<|im_start|>assistant\n")
    messages = warnings_of(caplog)
    assert [message.split(" is far longer")[0] for message in messages] == ["row 2", "row 3"]
    assert "chosen: 10,000,011 characters" in messages[0] and "prompt: 8,000,0" in messages[1]
    assert f"max_length={MAX_LENGTH} tokens" in messages[0] and f"cut to {limit} characters" in messages[0]
    # still too long afterwards: the length filter drops them, as any over-long row
    kept, report = drop_long_pairs(formatted, qwen2, MAX_LENGTH)
    assert kept.to_list() == [whole] and report["dropped"] == 2


def test_length_filter_drops_huge_rows_without_tokenising_them(qwen2, caplog, tokenised) -> None:
    good = format_orca_dataset(datasets.Dataset.from_list([GOOD]), qwen2)[0]
    dataset = datasets.Dataset.from_list(
        [good, {**good, "rejected": HUGE_ANSWER}, good, {**good, "prompt": HUGE_QUESTION + good["prompt"]}]
    )
    tokenised.clear()
    with caplog.at_level(logging.WARNING):
        kept, report = drop_long_pairs(dataset, qwen2, MAX_LENGTH)
    assert 0 < max(tokenised) <= char_limit(qwen2, MAX_LENGTH)
    assert report == {
        "rows": 4,
        "kept": 2,
        "dropped": 2,
        "max_length": MAX_LENGTH,
        "reasons": {"prompt+chosen": 1, "prompt+rejected": 2},
    }
    assert kept.to_list() == [good, good]
    (message,) = warnings_of(caplog)
    assert message.startswith(f"drop_long_rows: rows 2, 4 far longer than max_length={MAX_LENGTH} tokens")


def test_truncate_prompts_cuts_huge_prompts_first_and_keeps_the_same_tokens(qwen2, caplog, tokenised) -> None:
    tail = "The end of a long prompt, where the question is. " * 8
    medium = "Some context. " * 3000 + tail  # 42 kB: over the limit for 8 tokens (4096 characters)
    dataset = datasets.Dataset.from_dict({"prompt": ["Short.", medium, HUGE_QUESTION + tail]})
    with caplog.at_level(logging.WARNING):
        cut = truncate_prompts(dataset, qwen2, 8)
    assert 0 < max(tokenised) <= char_limit(qwen2, 8)
    # the same cut as tokenising the whole prompt: its last 8 tokens
    ids = qwen2(medium, add_special_tokens=False, return_offsets_mapping=True)
    assert cut["prompt"][1] == medium[ids["offset_mapping"][-8][0] :]
    assert cut["prompt"] == ["Short.", cut["prompt"][1], cut["prompt"][1]]
    (message,) = warnings_of(caplog)
    assert message.startswith("truncate_prompts: rows 2, 3 far longer than max_prompt_length=8 tokens")
