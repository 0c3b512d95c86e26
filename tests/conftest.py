"""Shared test settings: where ../shared lives, and the skip conditions declared once.

Real input (the 284 orca rows, stories260K, the Qwen2 tokenizer) is found through one setting,
``DPO_XPU_SHARED`` (default: ``../shared`` next to the project root). Tests that need it skip with
the reason when it is absent, so the suite still runs on a machine that has only the project.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DPO_XPU_SHARED", PROJECT_ROOT.parent / "shared")).resolve()

ORCA_ROWS = SHARED / "data" / "orca_dpo_pairs" / "sample-284.jsonl"
STORIES260K = SHARED / "models" / "stories260K"
QWEN2_TOKENIZER = SHARED / "tokenizers" / "qwen2"


def _require(path: Path) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not path.exists(),
        reason=f"shared asset {path} is absent (set DPO_XPU_SHARED to the folder holding ../shared)",
    )


require_orca_rows = _require(ORCA_ROWS)
require_stories260k = _require(STORIES260K)
require_qwen2_tokenizer = _require(QWEN2_TOKENIZER)


@pytest.fixture(scope="session")
def orca_rows_path() -> Path:
    if not ORCA_ROWS.exists():
        pytest.skip(f"shared asset {ORCA_ROWS} is absent (set DPO_XPU_SHARED)")
    return ORCA_ROWS


@pytest.fixture(scope="session")
def stories260k_path() -> Path:
    if not STORIES260K.exists():
        pytest.skip(f"shared asset {STORIES260K} is absent (set DPO_XPU_SHARED)")
    return STORIES260K


@pytest.fixture(scope="session")
def qwen2_tokenizer_path() -> Path:
    if not QWEN2_TOKENIZER.exists():
        pytest.skip(f"shared asset {QWEN2_TOKENIZER} is absent (set DPO_XPU_SHARED)")
    return QWEN2_TOKENIZER


@pytest.fixture(scope="session")
def qwen2(qwen2_tokenizer_path: Path):
    """The real Qwen2 tokenizer (ChatML template and special tokens)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen2_tokenizer_path)


@pytest.fixture(scope="session")
def stories(stories260k_path: Path):
    """stories260K's tokenizer (no chat template, 512 pieces)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stories260k_path)


SMOLLM2_GGUF = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_path(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct (a real ChatML chat model) as a Hugging Face folder, converted once from its GGUF."""
    if not SMOLLM2_GGUF.exists():
        pytest.skip(f"shared asset {SMOLLM2_GGUF} is absent (set DPO_XPU_SHARED)")
    pytest.importorskip("gguf", reason="reading the GGUF file needs the gguf package (the test extra has it)")
    from dpo_xpu.models.gguf import gguf_to_folder

    return gguf_to_folder(SMOLLM2_GGUF, cache_dir=tmp_path_factory.mktemp("gguf"))
