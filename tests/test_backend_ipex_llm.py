"""The ipex-llm backend (the original recipe). Runs in .venv-ipex-llm, which `make test` builds; skipped in
the native environment, where ipex-llm's pins (transformers 4.45, TRL < 0.12) cannot be installed."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

pytest.importorskip("ipex_llm", reason="ipex-llm is not installed here: run in .venv-ipex-llm (make test builds it)")
pytestmark = pytest.mark.ipex_llm

from helpers import cpu_recipe, run_cli, set_args  # noqa: E402

from dpo_xpu.backends.ipex_llm import lora_targets, low_bit_format  # noqa: E402
from dpo_xpu.errors import ModelLoadError  # noqa: E402
from dpo_xpu.recipes import Recipe  # noqa: E402
from dpo_xpu.training import run_training  # noqa: E402


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
    """The original recipe's shape on CPU: ipex-llm, a separate low-bit reference, bf16 autocast (what ipex-llm
    runs on the CPU with a bf16 model)."""
    values = dict(backend="ipex-llm", reference="separate", limit=24, max_steps=5, warmup_steps=0, bf16=True)
    return cpu_recipe(model, data, out, **{**values, **kw})


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
    args = set_args(
        backend="ipex-llm",
        reference="separate",
        model_name_or_path=stories260k_path,
        dataset_name_or_path=orca_rows_path,
        output_dir=run,
        max_steps=2,
        limit=8,
        max_length=1024,
        max_prompt_length=512,
        device="cpu",
    )
    result = run_cli("train", "--recipe", "recipes/cpu_demo.yaml", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run / "adapter" / "adapter_config.json").is_file()
