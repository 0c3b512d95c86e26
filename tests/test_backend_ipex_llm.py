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

from dpo_xpu.errors import ModelLoadError  # noqa: E402
from dpo_xpu.models.backends.ipex_llm import lora_targets, low_bit_format  # noqa: E402
from dpo_xpu.pipeline import run_training  # noqa: E402
from dpo_xpu.recipes import Recipe  # noqa: E402


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
    with pytest.raises(ModelLoadError, match="'all-linear' is not offered by the ipex-llm backend"):
        lora_targets(Attn(), "all-linear")  # one line, not PEFT's string taken letter by letter


def ipex_recipe(model, data, out, **kw) -> Recipe:
    """The original recipe's shape on CPU, as the example's README runs it: ipex-llm, a separate low-bit reference,
    bf16, gradient checkpointing on (reentrant on TRL 0.11)."""
    values = dict(
        backend="ipex-llm",
        reference="separate",
        limit=24,
        max_steps=5,
        warmup_steps=0,
        bf16=True,
        gradient_checkpointing=True,
    )
    return cpu_recipe(model, data, out, **{**values, **kw})


def non_low_bit_dtypes(model) -> set[torch.dtype]:
    """The dtypes of a model's floating-point parameters that are neither low-bit storage nor LoRA matrices."""
    return {p.dtype for n, p in model.named_parameters() if p.dtype.is_floating_point and "lora_" not in n}


@pytest.mark.slow
def test_original_recipe_loads_as_the_example_and_the_step0_check_reports_its_dtype_gap(
    stories260k_path, orca_rows_path, tmp_path
):
    """The example loads its policy with the checkpoint's dtype (stories260K: float32; ipex-llm drops the
    BitsAndBytesConfig's bf16 compute dtype) and its reference in bfloat16, so on a float32 checkpoint the two differ
    before any update, on every CPU. The size of the gap depends on the CPU's kernels; that there is one, and that
    the step-0 check names the dtype cause, does not."""
    result = run_training(ipex_recipe(stories260k_path, orca_rows_path, tmp_path / "run"), live_plot=False)
    rows = [r for r in result.metrics if "loss" in r]
    assert len(rows) == 5
    for row in rows:
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    trainer = result.trainer
    # the example's training arguments: adamw_hf, transformers 4.45's default (reentrant) checkpointing
    assert trainer.args.optim == "adamw_hf" and trainer.args.gradient_checkpointing
    assert trainer.args.gradient_checkpointing_kwargs is None
    # the example's dtypes: policy float32 outside the low-bit layers, reference bfloat16; separate, low-bit, frozen
    assert non_low_bit_dtypes(trainer.model) == {torch.float32}
    ref = trainer.ref_model
    assert non_low_bit_dtypes(ref) == {torch.bfloat16}
    assert not any(p.requires_grad for p in ref.parameters())
    assert any(type(m).__name__ == "LowBitLinear" for m in ref.modules())
    # the step-0 check: a gap, reported once, with the dtype cause
    first = rows[0]
    assert first["step0/logratio_gap"] > 1e-3
    assert "policy float32, reference bfloat16" in first["step0/warning"]
    assert all("step0/warning" not in row for row in rows[1:])
    env = json.loads((result.run_dir / "environment.json").read_text())
    assert any(v["topic"] == "ipex-llm" and v["level"] == "warning" for v in env["verdicts"])


@pytest.mark.slow
def test_adapter_off_with_checkpointing_starts_at_ln2_on_any_cpu(stories260k_path, orca_rows_path, tmp_path):
    """ipex-llm's CPU low-bit layers run one kernel for a forward that builds a graph and another for inference, and
    these round differently on some CPUs (this is CPU-kernel dependent). With reentrant checkpointing the policy's
    checkpointed layers run their first forward without a graph, so the policy takes the reference's kernel; with the
    adapter switched off as the reference, the weights and dtypes are the policy's own. So the policy equals the
    reference at step 0 exactly, whatever the CPU: rewards 0 and the loss ln 2 (TRL 0.11 logs it to 4 digits)."""
    recipe = ipex_recipe(stories260k_path, orca_rows_path, tmp_path / "run", reference="adapter-off", max_steps=2)
    result = run_training(recipe, live_plot=False)
    first = next(r for r in result.metrics if "loss" in r)
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["step0/logratio_gap"] == 0.0 and "step0/warning" not in first


@pytest.mark.slow
def test_reference_free_runs_no_reference_forward_on_trl_011(stories260k_path, orca_rows_path, tmp_path):
    """TRL 0.11's own reference_free still runs the reference and logs rewards against it; dpo_xpu's runs none and
    logs beta * log pi, the quantities the loss compares."""
    from helpers import make_trainer

    from dpo_xpu.models.backends.ipex_llm_trainer import ReferenceFreeDPOTrainer

    recipe = ipex_recipe(
        stories260k_path,
        orca_rows_path,
        tmp_path / "run",
        reference="adapter-off",
        reference_free=True,
        max_steps=2,
        limit=4,
    )
    trainer = make_trainer(recipe)
    assert isinstance(trainer, ReferenceFreeDPOTrainer)
    calls = []
    forward = trainer.concatenated_forward
    trainer.concatenated_forward = lambda model, batch: calls.append(1) or forward(model, batch)
    trainer.train()
    assert len(calls) == 2  # one policy forward per step, no reference forward
    rows = [r for r in trainer.state.log_history if "loss" in r]
    for row in rows:
        assert row["rewards/chosen"] == pytest.approx(recipe.beta * row["logps/chosen"], rel=1e-5)
        assert row["rewards/rejected"] == pytest.approx(recipe.beta * row["logps/rejected"], rel=1e-5)


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
    result = run_cli("train", "--recipe", "recipes/cpu_tiny.yaml", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run / "adapter" / "adapter_config.json").is_file()
