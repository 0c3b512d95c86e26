"""The offline demo model: built without downloads, deterministic, ChatML, NF4-friendly sizes."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from dpo_xpu.demo import DEMO_CONFIG, build_demo_model


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return build_demo_model(tmp_path_factory.mktemp("demo") / "model")


def test_build_is_deterministic(demo_dir, tmp_path):
    again = build_demo_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json"):
        assert (demo_dir / name).read_bytes() == (again / name).read_bytes(), name


def test_tokenizer_speaks_chatml(demo_dir):
    tok = AutoTokenizer.from_pretrained(demo_dir)
    ids = tok("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_sizes_suit_nf4_cpu_kernels():
    for key in ("hidden_size", "intermediate_size"):
        assert DEMO_CONFIG[key] % 32 == 0


def test_reuse_and_refusal(demo_dir, tmp_path):
    assert build_demo_model(demo_dir) == demo_dir  # already built: reused
    other = tmp_path / "user-folder"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        build_demo_model(other)
    assert (other / "mine.txt").read_text() == "keep"
