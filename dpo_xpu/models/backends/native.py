"""The native backend: PyTorch's own device (xpu, cuda or cpu), bitsandbytes NF4, PEFT LoRA, TRL 1.x.

NF4 is bitsandbytes' 4-bit NormalFloat (Dettmers et al. 2023, "QLoRA", section 3) with bf16 compute;
bitsandbytes >= 0.48 runs it on XPU, CUDA and CPU. The policy gets PEFT's
``prepare_model_for_kbit_training`` (norms and embeddings upcast to float32) and LoRA adapters; a
``separate`` reference gets the same upcast, frozen, so both compute the same numbers at step 0.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from dpo_xpu.errors import ModelLoadError
from dpo_xpu.models.base import LoraSettings, dtype_kwarg, from_pretrained, loading

logger = logging.getLogger(__name__)

#: bitsandbytes repacks NF4 weights for its AVX512-BF16 CPU kernel in blocks of this many output rows.
CPU_REPACK_BLOCK = 32


def disable_cpu_nf4_repack(model: torch.nn.Module) -> int:
    """Keep bitsandbytes from repacking NF4 weights for its AVX512-BF16 CPU inference kernel.

    bitsandbytes 0.50 repacks a ``Linear4bit`` at its first eval-mode, no-grad call on such CPUs and fails
    ("N must be divisible by block_n") when the layer's output size is not a multiple of 32 (stories260K's
    MLP has 172). The repacked kernel also rounds differently from the training kernel, so a reference in
    eval mode would not match the adapter-off policy. Keeping one kernel for train and eval fixes both.

    Returns:
        The number of ``Linear4bit`` layers changed (0 for a model without NF4 layers).
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def load_base(
    model_name_or_path: str,
    quantization: str,
    device: torch.device,
    dtype: torch.dtype,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Any:
    """The base model on ``device``: NF4 (bitsandbytes ``Linear4bit``, compute in ``dtype``) or ``dtype`` weights
    (``quantization: none``), with an SFT ``state_dict`` applied before quantization. Used for the policy, the
    reference and the SFT base that ``export: merged`` merges into.

    Raises:
        ModelLoadError: the model cannot be found or loaded (the message names it and the fix).
    """
    kwargs: dict[str, Any] = {**dtype_kwarg(dtype), "device_map": {"": str(device)}}
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
        )
    elif quantization != "none":
        raise ModelLoadError(f"quantization {quantization!r} is not supported by the native backend (nf4, none)")
    if state_dict is None:
        model = from_pretrained(AutoModelForCausalLM, model_name_or_path, **kwargs)
    else:
        model = _from_state_dict(model_name_or_path, state_dict, **kwargs)
    if quantization == "nf4" and device.type == "cpu":
        disable_cpu_nf4_repack(model)
    return model


def _from_state_dict(model_name_or_path: str, state_dict: dict[str, torch.Tensor], **kwargs: Any) -> Any:
    """The base's architecture with the weights of ``state_dict`` (an SFT checkpoint), quantized as ``kwargs`` say.

    transformers takes ``state_dict=`` only without a model path, so the concrete class is looked up from the
    config; the weights then go through the same loading (and NF4 quantization) as weights read from disk.
    """
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = from_pretrained(AutoConfig, model_name_or_path)
    with loading("model", model_name_or_path):
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(
            None, config=config, state_dict=state_dict, **kwargs
        )
    model.name_or_path = model.config._name_or_path = model_name_or_path
    try:
        model.generation_config = GenerationConfig.from_pretrained(model_name_or_path)
    except OSError:
        pass  # the folder has no generation_config.json: keep the one built from the config
    logger.info(
        "base weights from the SFT state dict (%d tensors), architecture of %s", len(state_dict), model_name_or_path
    )
    return model


def _upcast_for_training(model: PreTrainedModel, quantization: str, gradient_checkpointing: bool) -> None:
    if quantization == "nf4":
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()


def lora_targets_present(model: torch.nn.Module, wanted: list[str]) -> list[str]:
    """Return the names in ``wanted`` that name at least one ``nn.Linear``-like layer of ``model``.

    Raises:
        ModelLoadError: none of them exists (the message lists the model's linear layer names).
    """
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) or type(module).__name__.startswith("Linear")
    }
    present = [t for t in wanted if t in names]
    if not present:
        raise ModelLoadError(
            f"none of the LoRA target modules {wanted} exists in this model; its linear layers are "
            f"{sorted(names)}: set lora_target_modules to some of them"
        )
    missing = sorted(set(wanted) - set(present))
    if missing:
        logger.info("LoRA targets absent from this model, skipped: %s", ", ".join(missing))
    return present


def load_policy_model(
    model_name_or_path: str,
    quantization: str,
    device: torch.device,
    dtype: torch.dtype,
    lora: LoraSettings,
    gradient_checkpointing: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name_or_path: str | None = None,
) -> PreTrainedModel:
    """Base model (NF4 or plain) + ``prepare_model_for_kbit_training`` + PEFT LoRA adapters.

    See :func:`dpo_xpu.models.loading.load_policy_model` for the arguments (``state_dict`` is its ``sft_state_dict``).
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    model = load_base(model_name_or_path, quantization, device, dtype, state_dict)
    _upcast_for_training(model, quantization, gradient_checkpointing)
    if adapter_name_or_path is not None:
        fix = f"give a LoRA adapter folder (adapter_config.json) trained on {model_name_or_path}, as a run's adapter/"
        with loading("adapter_name_or_path", adapter_name_or_path, fallback=fix):
            policy = PeftModel.from_pretrained(model, adapter_name_or_path, is_trainable=True)
        logger.info("policy continues from the adapter %s (its own LoRA settings)", adapter_name_or_path)
        return policy
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_targets_present(model, lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    policy = get_peft_model(model, config)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    logger.info("policy loaded on %s (%s): %d trainable LoRA parameters", device, quantization, trainable)
    return policy


def load_reference_model(
    model_name_or_path: str,
    quantization: str,
    device: torch.device,
    dtype: torch.dtype,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> PreTrainedModel:
    """A frozen copy of the base in eval mode, with the policy's dtype handling (the ``separate`` strategy)."""
    model = load_base(model_name_or_path, quantization, device, dtype, state_dict)
    _upcast_for_training(model, quantization, gradient_checkpointing=False)
    model.requires_grad_(False)
    model.eval()
    return model


def load_trained_policy(
    model_name_or_path: str,
    adapter_dir: str,
    quantization: str,
    device: torch.device,
    dtype: torch.dtype,
) -> PreTrainedModel:
    """The base prepared as for training, with a saved LoRA adapter loaded on it (eval mode, frozen)."""
    from peft import PeftModel

    model = load_base(model_name_or_path, quantization, device, dtype)
    _upcast_for_training(model, quantization, gradient_checkpointing=False)
    with loading("adapter", adapter_dir):
        policy = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    if quantization == "nf4":
        # TRL trains QLoRA adapters in bf16 (QLoRA paper, section 3); keep them so to compute the same logits.
        for name, param in policy.named_parameters():
            if "lora_" in name and "lora_magnitude_vector" not in name:
                param.data = param.data.to(torch.bfloat16)
    policy.eval()
    return policy
