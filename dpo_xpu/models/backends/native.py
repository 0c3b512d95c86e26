"""The native backend: PyTorch's own device (xpu, cuda or cpu), bitsandbytes NF4, PEFT LoRA, TRL 1.x.

NF4 is bitsandbytes' 4-bit NormalFloat (Dettmers et al. 2023, "QLoRA", section 3) with bf16 compute. The policy and a
``separate`` reference both get PEFT's ``prepare_model_for_kbit_training``, so they compute the same numbers at step 0.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from dpo_xpu.errors import ModelLoadError
from dpo_xpu.models.base import LoraSettings, dtype_kwarg, from_pretrained, loading

logger = logging.getLogger(__name__)


def disable_cpu_nf4_repack(model: torch.nn.Module) -> int:
    """Keep bitsandbytes 0.50 from repacking NF4 weights for its AVX512-BF16 CPU inference kernel, which fails ("N
    must be divisible by block_n") on output sizes not a multiple of 32 and rounds differently from the training
    kernel; return the number of ``Linear4bit`` layers changed."""
    layers = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]  # bnb's Linear4bit
    for module in layers:
        module.support_avx512bf16_for_cpu = False
    return len(layers)


def load_base(
    model_name_or_path: str,
    quantization: str,
    device: torch.device,
    dtype: torch.dtype,
    state_dict: dict[str, torch.Tensor] | None = None,
    prepare: bool = False,
    gradient_checkpointing: bool = False,
) -> Any:
    """The base model on ``device``: NF4 (compute in ``dtype``) or ``dtype`` weights, with an SFT ``state_dict``
    applied before quantization; with ``prepare``, made ready for LoRA training as the policy is (PEFT's
    ``prepare_model_for_kbit_training`` for NF4). :class:`ModelLoadError` naming it and the fix."""
    kwargs: dict[str, Any] = {**dtype_kwarg(dtype), "device_map": {"": str(device)}}
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    elif quantization != "none":
        raise ModelLoadError(f"quantization {quantization!r} is not supported by the native backend (nf4, none)")
    if state_dict is None:
        model = from_pretrained(AutoModelForCausalLM, model_name_or_path, **kwargs)
    else:
        model = _from_state_dict(model_name_or_path, state_dict, **kwargs)
    if quantization == "nf4" and device.type == "cpu":
        disable_cpu_nf4_repack(model)
    if prepare and quantization == "nf4":
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif prepare and gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def _from_state_dict(model_name_or_path: str, state_dict: dict[str, torch.Tensor], **kwargs: Any) -> Any:
    """The base's architecture with ``state_dict``'s weights, loaded as from disk (transformers takes ``state_dict=``
    only without a model path)."""
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = from_pretrained(AutoConfig, model_name_or_path)
    with loading("model", model_name_or_path):
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(
            None, config=config, state_dict=state_dict, **kwargs
        )
    model.name_or_path = model.config._name_or_path = model_name_or_path
    with contextlib.suppress(OSError):  # no generation_config.json: keep the one built from the config
        model.generation_config = GenerationConfig.from_pretrained(model_name_or_path)
    logger.info(
        "base weights from the SFT state dict (%d tensors), architecture of %s", len(state_dict), model_name_or_path
    )
    return model


def _add_lora(model: PreTrainedModel, lora: LoraSettings) -> PreTrainedModel:
    """PEFT LoRA adapters; :class:`ModelLoadError` listing the model's linear layers when no target exists."""
    from peft import get_peft_model

    try:
        policy = get_peft_model(model, lora.peft_config())
    except ValueError as exc:
        if "not found in the base model" not in str(exc):
            raise
        names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if type(m).__name__.startswith("Linear")}
        raise ModelLoadError(
            f"none of the LoRA target modules {lora.target_modules} exists in this model; its linear layers are "
            f"{sorted(names)}: set lora_target_modules to some of them"
        ) from None
    targeted = {name.rsplit(".", 1)[-1] for name in policy.base_model.targeted_module_names}
    if isinstance(lora.target_modules, list) and (missing := sorted(set(lora.target_modules) - targeted)):
        logger.info("LoRA targets absent from this model, skipped: %s", ", ".join(missing))
    return policy


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
    """Base + ``prepare_model_for_kbit_training`` + LoRA adapters (or the given adapter, trainable); arguments as
    :func:`dpo_xpu.models.loading.load_policy_model`."""
    from peft import PeftModel

    model = load_base(model_name_or_path, quantization, device, dtype, state_dict, True, gradient_checkpointing)
    if adapter_name_or_path is not None:
        fix = f"give a LoRA adapter folder (adapter_config.json) trained on {model_name_or_path}, as a run's adapter/"
        with loading("adapter_name_or_path", adapter_name_or_path, fallback=fix):
            policy = PeftModel.from_pretrained(model, adapter_name_or_path, is_trainable=True)
        logger.info("policy continues from the adapter %s (its own LoRA settings)", adapter_name_or_path)
        return policy
    policy = _add_lora(model, lora)
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
    model = load_base(model_name_or_path, quantization, device, dtype, state_dict, prepare=True)
    return model.requires_grad_(False).eval()


def load_trained_policy(
    model_name_or_path: str, adapter_dir: str, quantization: str, device: torch.device, dtype: torch.dtype
) -> PreTrainedModel:
    """The base prepared as for training, with a saved LoRA adapter loaded on it (eval mode, frozen)."""
    from peft import PeftModel

    model = load_base(model_name_or_path, quantization, device, dtype, prepare=True)
    with loading("adapter", adapter_dir, fallback="give the run's adapter/ folder trained on this base model"):
        policy = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    if quantization == "nf4":
        # TRL trains QLoRA adapters in bf16 (QLoRA paper, section 3); keep them so to compute the same logits.
        for name, param in policy.named_parameters():
            if "lora_" in name and "lora_magnitude_vector" not in name:
                param.data = param.data.to(torch.bfloat16)
    return policy.eval()
