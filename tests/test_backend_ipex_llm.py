"""The ipex-llm backend (the original recipe). Runs in .venv-ipex-llm, which `make test` builds; skipped in
the native environment, where ipex-llm's pins (transformers 4.45, TRL < 0.12) cannot be installed."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("ipex_llm", reason="ipex-llm is not installed here: run in .venv-ipex-llm (make test builds it)")
pytestmark = pytest.mark.ipex_llm

from dpo_xpu.backends.ipex_llm import lora_targets, low_bit_format  # noqa: E402
from dpo_xpu.errors import ModelLoadError  # noqa: E402
from dpo_xpu.recipes import Recipe  # noqa: E402
from dpo_xpu.training import run_training  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_nf4_on_xpu_and_sym_int4_where_nf4_is_refused(caplog):
    assert low_bit_format("nf4", torch.device("xpu")) == "nf4"
    with caplog.at_level(logging.WARNING):
        assert low_bit_format("nf4", torch.device("cpu")) == "sym_int4"
    assert "sym_int4" in caplog.text
    with pytest.raises(ModelLoadError, match="nf4"):
        low_bit_format("none", torch.device("cpu"))


def test_lora_targets_follow_a_fused_qkv():
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv_proj = torch.nn.Linear(4, 12)
            self.o_proj = torch.nn.Linear(4, 4)

    assert lora_targets(Attn(), ["q_proj", "k_proj", "v_proj", "o_proj"]) == ["o_proj", "qkv_proj"]
    with pytest.raises(ModelLoadError):
        lora_targets(Attn(), ["gate_proj"])


def ipex_recipe(model, data, out, **kw) -> Recipe:
    values = dict(
        model_name_or_path=str(model),
        dataset_name_or_path=str(data),
        output_dir=str(out),
        backend="ipex-llm",
        device="cpu",
        reference="separate",
        limit=24,
        max_steps=5,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=5e-4,
        warmup_steps=0,
        max_length=1024,
        max_prompt_length=512,
        bf16=True,
        gradient_checkpointing=False,
        save_steps=1000,
    )
    values.update(kw)
    return Recipe(**values)


@pytest.mark.slow
def test_original_recipe_trains_with_a_separate_low_bit_reference(stories260k_path, orca_rows_path, tmp_path):
    result = run_training(ipex_recipe(stories260k_path, orca_rows_path, tmp_path / "run"), live_plot=False)
    rows = [r for r in result.metrics if "loss" in r]
    assert len(rows) == 5
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=0.01)
    for row in rows:
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    # the reference really was separate, low-bit and frozen
    ref = result.trainer.ref_model
    assert ref is not None and not any(p.requires_grad for p in ref.parameters())
    assert any(type(m).__name__ == "LowBitLinear" for m in ref.modules())
    env = json.loads((result.run_dir / "environment.json").read_text())
    assert any(v["topic"] == "ipex-llm" and v["level"] == "warning" for v in env["verdicts"])


@pytest.mark.slow
def test_cli_train_with_the_ipex_llm_backend(stories260k_path, orca_rows_path, tmp_path):
    run = tmp_path / "cli"
    args = [
        "train",
        "--recipe",
        "recipes/cpu_demo.yaml",
        "--set",
        "backend=ipex-llm",
        "--set",
        "reference=separate",
        "--set",
        f"model_name_or_path={stories260k_path}",
        "--set",
        f"dataset_name_or_path={orca_rows_path}",
        "--set",
        f"output_dir={run}",
        "--set",
        "max_steps=2",
        "--set",
        "limit=8",
        "--set",
        "max_length=1024",
        "--set",
        "max_prompt_length=512",
        "--set",
        "device=cpu",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "dpo_xpu.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run / "adapter" / "adapter_config.json").is_file()
