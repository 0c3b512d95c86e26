"""Model loading on CPU: NF4 via bitsandbytes, LoRA targets, the frozen reference, path errors."""

from __future__ import annotations

import pytest
import torch

from dpo_xpu import hub
from dpo_xpu.errors import ModelLoadError, RecipeError
from dpo_xpu.models.backends import get_backend
from dpo_xpu.models.backends.native import disable_cpu_nf4_repack
from dpo_xpu.models.base import LoraSettings, resolve_model_path
from dpo_xpu.models.loading import load_policy_model, load_reference_model, load_tokenizer

CPU = torch.device("cpu")


def test_unknown_backend_is_refused():
    with pytest.raises(RecipeError, match="native, ipex-llm"):
        get_backend("openvino")


def test_missing_local_folder_names_the_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path("./models/nope")


def test_hub_id_is_kept_for_users(monkeypatch):
    monkeypatch.setattr("dpo_xpu.hub.hub_unreachable_reason", lambda: None)  # as if the hub answered
    assert resolve_model_path("teknium/OpenHermes-2.5-Mistral-7B") == "teknium/OpenHermes-2.5-Mistral-7B"
    monkeypatch.undo()
    assert (
        resolve_model_path("teknium/OpenHermes-2.5-Mistral-7B", check_hub=False) == "teknium/OpenHermes-2.5-Mistral-7B"
    )


def test_unreachable_hub_id_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"'no-such-org/no-such-model' is a hub id, the hub is switched off"):
        load_tokenizer("no-such-org/no-such-model")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    hub._probe.cache_clear()  # the probe's answer is kept per process: probe again through the patched socket
    monkeypatch.setattr(
        "dpo_xpu.hub.socket.create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("no route"))
    )
    with pytest.raises(ModelLoadError, match=r"the hub \(huggingface.co\) cannot be reached \(OSError: no route\)"):
        load_tokenizer("no-such-org/no-such-model")


def test_tokenizer_pads_left_with_a_pad_token(stories260k_path):
    tok = load_tokenizer(stories260k_path)
    assert tok.padding_side == "left" and tok.pad_token is not None


@pytest.fixture(scope="module")
def nf4_policy(stories260k_path):
    return load_policy_model(stories260k_path, "nf4", CPU, dtype=torch.float32, lora=LoraSettings())


def test_policy_is_nf4_with_only_lora_trainable(nf4_policy):
    import bitsandbytes as bnb

    base = nf4_policy.get_base_model()
    q_proj = base.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert q_proj.base_layer.weight.quant_state.quant_type == "nf4"
    trainable = [n for n, p in nf4_policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # r 16 on q,k,v,o,gate,up,down of 5 layers: (in + out) * r per layer
    cfg = base.config
    kv = cfg.num_key_value_heads * cfg.head_dim
    per_layer = sum((i + o) * 16 for i, o in [(64, 64), (64, kv), (64, kv), (64, 64), (64, 172), (64, 172), (172, 64)])
    assert sum(nf4_policy.get_parameter(n).numel() for n in trainable) == per_layer * cfg.num_hidden_layers


def test_eval_mode_forward_works_on_unaligned_nf4_layers(nf4_policy, stories260k_path):
    """stories260K's MLP (172 outputs) breaks bitsandbytes' AVX512-BF16 repack; eval and generate must work."""
    tok = load_tokenizer(stories260k_path)
    inputs = tok(["Once upon a time"], return_tensors="pt")
    nf4_policy.eval()
    with torch.no_grad():
        logits = nf4_policy(**inputs).logits
        out = nf4_policy.generate(**inputs, max_new_tokens=5, do_sample=False)
    nf4_policy.train()
    assert torch.isfinite(logits).all()
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5


def _lora_grads(policy, inputs) -> dict[str, torch.Tensor]:
    policy.zero_grad()
    torch.manual_seed(0)  # the same LoRA dropout masks
    policy(**inputs, labels=inputs["input_ids"]).loss.backward()
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad and p.grad is not None}


def test_an_evaluation_between_steps_leaves_the_training_gradients_as_they_were(nf4_policy, stories260k_path):
    """A no-grad eval-mode forward (evaluation, generation, a precompute) must not change what the next training step
    computes. bitsandbytes 0.50 repacks NF4 weights for its AVX512-BF16 inference kernel at such a call and keeps
    them packed; training then runs that kernel, which has no backward: no gradient would flow through the NF4
    layers to the earlier layers' LoRA matrices. dpo_xpu keeps one kernel (disable_cpu_nf4_repack)."""
    tok = load_tokenizer(stories260k_path)
    inputs = tok(["Lily saw a big dog. She was happy."], return_tensors="pt")
    nf4_policy.train()
    before = _lora_grads(nf4_policy, inputs)
    nf4_policy.eval()
    with torch.no_grad():
        nf4_policy(**inputs)
    nf4_policy.train()
    after = _lora_grads(nf4_policy, inputs)
    nf4_policy.zero_grad()
    assert before.keys() == after.keys() and any("layers.0." in n for n in before)
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_reference_is_frozen_and_matches_the_policy_at_init(nf4_policy, stories260k_path):
    reference = load_reference_model(stories260k_path, "nf4", CPU, dtype=torch.float32)
    assert not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    tok = load_tokenizer(stories260k_path)
    inputs = tok(["Lily saw a big dog."], return_tensors="pt")
    nf4_policy.eval()
    with torch.no_grad():
        a = nf4_policy(**inputs).logits
        b = reference(**inputs).logits
    nf4_policy.train()
    assert torch.allclose(a, b, atol=1e-5)


def test_disable_repack_counts_only_nf4_layers(nf4_policy):
    assert disable_cpu_nf4_repack(torch.nn.Linear(4, 4)) == 0


def test_lora_targets_follow_the_model(stories260k_path, caplog):
    def targeted(targets):
        lora = LoraSettings(r=4, target_modules=targets)
        policy = load_policy_model(stories260k_path, "none", CPU, dtype=torch.float32, lora=lora)
        return {name.rsplit(".", 1)[-1] for name in policy.base_model.targeted_module_names}

    with caplog.at_level("INFO", logger="dpo_xpu.models.backends.native"):
        assert targeted(["q_proj", "qkv_proj"]) == {"q_proj"}
    assert "LoRA targets absent from this model, skipped: qkv_proj" in caplog.text
    assert {"q_proj", "down_proj"} <= targeted("all-linear")  # PEFT's own shorthand passes through
    with pytest.raises(ModelLoadError, match=r"^none of the LoRA target modules \['qkv_proj'\] exists in this model; "):
        targeted(["qkv_proj"])


def test_unquantized_policy(stories260k_path):
    policy = load_policy_model(stories260k_path, "none", CPU, dtype=torch.float32, lora=LoraSettings(r=4, alpha=8))
    q_proj = policy.get_base_model().model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer) is torch.nn.Linear
    assert policy.peft_config["default"].r == 4 and policy.peft_config["default"].lora_alpha == 8
