"""Starting points and outputs on the real stories260K + orca rows: an SFT state dict (policy.pt) for both models, an
existing adapter to continue from, a reference kept on the CPU, and the merged export."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import cpu_recipe as shared_recipe

from dpo_xpu.errors import ModelLoadError
from dpo_xpu.models.base import LoraSettings
from dpo_xpu.models.loading import load_policy_model, load_sft_state_dict, load_trained_policy
from dpo_xpu.pipeline import run_training

LN2 = math.log(2)
TEXT = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\nOnce upon a time"
ONE_STEP = dict(max_steps=1, limit=1, per_device_train_batch_size=1, warmup_steps=0)


@pytest.fixture(scope="module")
def policy_pt(stories260k_path, tmp_path_factory):
    """An SFT checkpoint as the original DPO code writes it: stories260K's weights plus seeded noise."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(stories260k_path, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    state = {k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in base.state_dict().items()}
    path = tmp_path_factory.mktemp("sft") / "policy.pt"
    torch.save({"step_idx": 100, "state": state, "metrics": {"loss": [1.0]}}, path)
    return path


def test_sft_checkpoint_without_state_is_refused(stories260k_path, tmp_path):
    bad = tmp_path / "policy.pt"
    torch.save({"model": {}}, bad)
    with pytest.raises(ModelLoadError, match=r"policy\.pt has no key 'state'.*torch\.save"):
        load_sft_state_dict(bad, stories260k_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_sft_state_dict(tmp_path / "absent.pt", stories260k_path)


def test_sft_checkpoint_with_other_keys_is_refused(stories260k_path, policy_pt, tmp_path):
    state = torch.load(policy_pt, weights_only=True)["state"]
    prefixed = tmp_path / "prefixed.pt"
    torch.save({"state": {"module." + k: v for k, v in state.items()}}, prefixed)
    with pytest.raises(ModelLoadError, match=r"prefixed\.pt does not fit .*missing.*unexpected"):
        load_sft_state_dict(prefixed, stories260k_path)
    wrong = dict(state)
    wrong["lm_head.weight"] = wrong["lm_head.weight"][:, :8]
    torch.save({"state": wrong}, tmp_path / "wrong.pt")
    with pytest.raises(ModelLoadError, match="wrong shape 1"):
        load_sft_state_dict(tmp_path / "wrong.pt", stories260k_path)


def test_sft_state_dict_is_quantized_like_weights_read_from_disk(stories260k_path, policy_pt, tmp_path):
    """NF4 from the state dict == NF4 from a folder holding the same weights (the weights go in before quantizing)."""
    from transformers import AutoModelForCausalLM

    state = load_sft_state_dict(policy_pt, stories260k_path)
    folder = tmp_path / "sft-folder"
    model = AutoModelForCausalLM.from_pretrained(stories260k_path, dtype=torch.float32)
    model.load_state_dict(state)
    model.save_pretrained(folder)
    lora = LoraSettings()
    from_sd = load_policy_model(stories260k_path, "nf4", "cpu", torch.float32, lora, sft_state_dict=state).eval()
    from_disk = load_policy_model(folder, "nf4", "cpu", torch.float32, lora).eval()
    base = load_policy_model(stories260k_path, "nf4", "cpu", torch.float32, lora).eval()
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        a, b, c = from_sd(input_ids=ids).logits, from_disk(input_ids=ids).logits, base(input_ids=ids).logits
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1


@pytest.mark.slow
def test_sft_checkpoint_reaches_policy_and_separate_reference(stories260k_path, orca_rows_path, policy_pt, tmp_path):
    runs = {}
    for name, extra in (("base", {}), ("sft", {"sft_checkpoint": str(policy_pt)})):
        recipe = shared_recipe(
            stories260k_path, orca_rows_path, tmp_path / name, reference="separate", **ONE_STEP, **extra
        )
        runs[name] = run_training(recipe, live_plot=False).metrics[0]
    sft, base = runs["sft"], runs["base"]
    assert sft["loss"] == pytest.approx(LN2, abs=1e-6)  # policy == reference: both got the SFT weights
    assert sft["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert abs(sft["logps/chosen"] - base["logps/chosen"]) > 1.0  # and they are not the base's


@pytest.fixture(scope="module")
def start_adapter(stories260k_path, tmp_path_factory):
    """A LoRA adapter with nonzero, bf16-exact weights (TRL 1.x casts a QLoRA adapter to bf16), saved to a folder."""
    policy = load_policy_model(stories260k_path, "nf4", "cpu", torch.float32, LoraSettings(r=4, alpha=8))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_" in name:
                value = (0.1 * torch.randn(param.shape, generator=generator)).to(torch.bfloat16)
                param.data = value.to(torch.float32)  # saved in float32, so every loader computes in float32
    folder = tmp_path_factory.mktemp("adapter") / "start"
    policy.save_pretrained(folder)
    return folder


def test_continuing_policy_reproduces_the_starting_adapter(stories260k_path, start_adapter):
    lora = LoraSettings()  # unused: the adapter keeps its own r=4
    policy = load_policy_model(stories260k_path, "nf4", "cpu", torch.float32, lora, adapter_name_or_path=start_adapter)
    assert policy.peft_config["default"].r == 4
    assert any(p.requires_grad for p in policy.parameters())
    saved = load_trained_policy(stories260k_path, start_adapter, "nf4", "cpu", torch.float32)
    # PEFT loads a frozen adapter on NF4 layers in bf16, and TRL 1.x casts the trainable one to bf16 (QLoRA):
    # compare the two as they compute in training and in use.
    for param in policy.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    policy.eval()
    with torch.no_grad():
        got, expected = policy(input_ids=ids).logits, saved(input_ids=ids).logits
        with policy.disable_adapter():
            base = policy(input_ids=ids).logits
    assert torch.equal(got, expected)
    assert (got - base).abs().max() > 0.1


@pytest.mark.slow
def test_continuing_from_an_adapter_starts_at_ln2(stories260k_path, orca_rows_path, start_adapter, tmp_path):
    recipe = shared_recipe(
        stories260k_path, orca_rows_path, tmp_path / "run", adapter_name_or_path=str(start_adapter), **ONE_STEP
    )
    result = run_training(recipe, live_plot=False)
    first = result.metrics[0]
    # TRL 1.x freezes a copy of the starting adapter as the reference: policy == reference at step 1
    assert "ref" in result.trainer.model.peft_config
    assert first["loss"] == pytest.approx(LN2, abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_reference_on_cpu_stays_there(stories260k_path, orca_rows_path, tmp_path):
    recipe = shared_recipe(
        stories260k_path, orca_rows_path, tmp_path / "run", reference="separate", reference_device="cpu", **ONE_STEP
    )
    result = run_training(recipe, live_plot=False)
    trainer = result.trainer
    assert type(trainer).__name__ == "DpoXpuTrainer"
    assert {p.device.type for p in trainer.ref_model.parameters()} == {"cpu"}
    assert result.metrics[0]["loss"] == pytest.approx(LN2, abs=1e-6)


@pytest.mark.slow
def test_merged_export_reproduces_the_adapter_logits(stories260k_path, orca_rows_path, tmp_path):
    from transformers import AutoModelForCausalLM

    from dpo_xpu.outputs.merge import MERGE_RTOL, check_merged_logits

    # a large learning rate, so one step moves the adapter well beyond bf16's rounding of the merged weights
    recipe = shared_recipe(
        stories260k_path, orca_rows_path, tmp_path / "run", export="merged", learning_rate=2e-2, **ONE_STEP
    )
    result = run_training(recipe, live_plot=False)
    merged = result.merged_dir
    assert merged == result.run_dir / "merged"
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer_config.json").is_file()
    assert (result.adapter_dir / "tokenizer_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.dtype == torch.bfloat16 and not hasattr(model, "peft_config")
    check = check_merged_logits(merged, result.adapter_dir, texts=[TEXT], base_model_name_or_path=stories260k_path)
    # bf16 rounds the merged weights once (8-bit mantissa): allow 1% of the logits' scale, and require the merge
    # to be much closer to the adapter model than the base is.
    assert check["max_abs_diff"] <= 0.01 * check["max_abs_logit"]
    assert check["max_abs_diff"] < 0.25 * check["adapter_effect"]
    # the run checked its own merge on its prompts (other inputs than TEXT), kept bf16, and says so
    report = json.loads((result.run_dir / "merge_check.json").read_text())
    assert report["matches"] is True and report["fallback"] is None and report["weights_dtype"] == "bfloat16"
    assert report["rtol"] == MERGE_RTOL
