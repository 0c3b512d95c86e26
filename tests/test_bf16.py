"""bf16: auto (dpo_xpu.device.use_bf16): on where the device computes bfloat16 natively, settled once per run; and
bitsandbytes' CPU NF4 path in bf16 passes gradients through the NF4 layers as float32 does."""

from __future__ import annotations

import pytest
import torch
from conftest import require_stories260k
from helpers import config_kwargs

import dpo_xpu.environment as env
from dpo_xpu.device import cpu_bf16_instructions, use_bf16
from dpo_xpu.errors import RecipeError
from dpo_xpu.pipeline import open_run
from dpo_xpu.recipes import Recipe

AVX512_BF16 = "processor : 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
AMX = "flags : avx512f avx512_bf16 amx_bf16 amx_tile\n"
EMULATED = "flags : fpu sse2 avx2 avx512f\n"


def test_the_cpu_flags_name_the_native_bf16_instructions():
    assert cpu_bf16_instructions(AMX) == "AMX"
    assert cpu_bf16_instructions(AVX512_BF16) == "AVX512-BF16"
    assert cpu_bf16_instructions(EMULATED) is None
    assert cpu_bf16_instructions("model name : avx512_bf16 in a name, not a flag\n") is None


def test_auto_is_on_where_the_cpu_computes_bf16_and_off_with_the_reason_where_it_emulates_it():
    assert use_bf16("auto", "cpu", AVX512_BF16) == (True, "bf16: auto is on: this CPU has AVX512-BF16")
    on, why = use_bf16("auto", torch.device("cpu"), EMULATED)
    assert on is False and "emulated" in why and "off (float32)" in why


def test_true_and_false_keep_their_meaning_and_anything_else_is_refused():
    assert use_bf16(True, "cpu", EMULATED)[0] is True
    assert use_bf16(False, "cpu", AMX)[0] is False
    with pytest.raises(RecipeError, match="bf16: 'yes please' is not one of auto, true, false"):
        use_bf16("yes please", "cpu")


def test_auto_follows_torch_on_an_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    on, why = use_bf16("auto", "cuda:0")
    assert on is False and "does not support bf16" in why
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert use_bf16("auto", "cuda:1")[0] is True


@pytest.mark.parametrize("flags, expected", [(AVX512_BF16, True), (EMULATED, False)])
def test_a_run_settles_auto_once_and_trl_gets_a_bool(monkeypatch, caplog, tmp_path, flags, expected):
    monkeypatch.setattr("dpo_xpu.device.cpu_bf16_instructions", lambda cpuinfo=None: cpu_bf16_instructions(flags))
    recipe = Recipe(output_dir=str(tmp_path), device="cpu")
    recipe.bf16 = "auto"
    assert config_kwargs(recipe, use_cpu=True)["bf16"] is expected  # unsettled (a notebook's own call): decided
    monkeypatch.setattr("dpo_xpu.pipeline._open_run", lambda *args: (_ for _ in ()).throw(RuntimeError("stop")))
    with caplog.at_level("INFO", logger="dpo_xpu.pipeline"), pytest.raises(RuntimeError, match="stop"):
        open_run(recipe)  # settles bf16 for the device, as run_training does, before the folder is opened
    assert recipe.bf16 is expected and recipe.to_dict()["bf16"] is expected  # recipe.yaml records what ran
    assert "bf16: auto is" in caplog.text


def test_the_environment_check_says_which_and_why(monkeypatch):
    monkeypatch.setattr("dpo_xpu.device.cpu_bf16_instructions", lambda cpuinfo=None: None)
    auto = env._bf16_verdict("auto", "auto", env.Probe())
    assert auto.level == "ok" and "auto is off" in auto.message and "emulated" in auto.message
    forced = env._bf16_verdict(True, "cpu", env.Probe())
    assert forced.level == "warning" and "bf16: auto" in forced.fix
    monkeypatch.setattr("dpo_xpu.device.cpu_bf16_instructions", lambda cpuinfo=None: "AMX")
    assert env._bf16_verdict("auto", "auto", env.Probe()).message == "bf16: auto is on: this CPU has AMX"


def _lora_b_grads(model_path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The LoRA ``B`` gradients of one causal-LM loss on the NF4 policy computing in ``dtype`` (under autocast, as
    transformers' Trainer runs bf16), after an eval-mode no-grad pass (where a precompute runs the model)."""
    from dpo_xpu.models.loading import load_policy_model

    torch.manual_seed(0)  # the same LoRA A matrices for both dtypes
    policy = load_policy_model(model_path, "nf4", "cpu", dtype)
    ids = torch.randint(3, 512, (2, 96), generator=torch.Generator().manual_seed(1))
    bf16 = dtype == torch.bfloat16
    policy.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        policy(input_ids=ids)
    policy.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        policy(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.float().flatten() for n, p in policy.named_parameters() if "lora_B" in n}


@require_stories260k
def test_nf4_gradients_in_bf16_flow_through_every_layer_as_in_float32(stories260k_path):
    """bitsandbytes repacks NF4 weights for an inference-only AVX512-BF16 kernel at the first eval-mode call, after
    which no gradient reaches the layers below (train/trl_internals.py); dpo_xpu's loader keeps it off. The LoRA B
    gradients (A is random, B zero: only B's gradient is nonzero at step 0) of every layer, the first one's through
    all NF4 layers above it, then point where float32's do, within bf16's rounding."""
    fp32, bf16 = _lora_b_grads(stories260k_path, torch.float32), _lora_b_grads(stories260k_path, torch.bfloat16)
    assert fp32.keys() == bf16.keys() and any(".layers.0." in name for name in bf16)
    cosine = torch.nn.functional.cosine_similarity
    for name, grad in bf16.items():
        assert torch.isfinite(grad).all() and grad.abs().max() > 0, name
        assert cosine(grad, fp32[name], dim=0) > 0.9, name  # measured: >= 0.96 per matrix on AVX512-BF16
    every_bf16, every_fp32 = torch.cat(list(bf16.values())), torch.cat(list(fp32.values()))
    assert cosine(every_bf16, every_fp32, dim=0) > 0.98  # measured: 0.996
    assert (every_bf16 - every_fp32).norm() < 0.25 * every_fp32.norm()  # measured: 0.09
