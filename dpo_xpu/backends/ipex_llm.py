"""The ipex-llm backend: the original recipe (ipex-llm low-bit loading, ipex-llm QLoRA, TRL < 0.12).

ipex-llm was archived upstream on 2026-01-28 (no more fixes, security fixes included) and
intel-extension-for-pytorch was discontinued after 2.8: this backend exists for users who still have
that stack (``environment-ipex-llm.yml``). New work should use the ``native`` backend.

The recipe, as in ipex-llm's DPO QLoRA example:

* policy: ``ipex_llm.transformers.AutoModelForCausalLM`` in NF4 with bf16 compute, moved to ``xpu``,
  then ``ipex_llm.transformers.qlora.prepare_model_for_kbit_training`` and ``get_peft_model``;
* reference (``separate``): the same loader with ``load_in_low_bit="nf4", optimize_model=False``.

Both are loaded with ``load_in_low_bit`` and ``optimize_model=False``: that is what ipex-llm itself does when
given a ``BitsAndBytesConfig`` (and it avoids needing bitsandbytes in this environment). ipex-llm's optimized
attention needs a KV cache that TRL's training forward does not pass, so ``optimize_model=True`` cannot train.
On a machine without an XPU, ipex-llm refuses NF4 ("NF3, NF4, FP4 and FP8 quantization are currently not
supported on CPU"); there this backend loads ``sym_int4`` instead and logs that it did.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from dpo_xpu.errors import ModelLoadError
from dpo_xpu.models import LoraSettings

logger = logging.getLogger(__name__)

ARCHIVED_WARNING = (
    "the ipex-llm backend uses ipex-llm, archived upstream on 2026-01-28 (no more fixes, including security "
    "fixes); intel-extension-for-pytorch was discontinued after 2.8. Prefer backend 'native'."
)
#: q/k/v projections that ipex-llm's optimize_model may fuse into one ``qkv_proj``.
FUSED_QKV = {"q_proj", "k_proj", "v_proj"}


def _import_ipex_llm() -> Any:
    """Import ``ipex_llm.transformers`` (restoring the root log level, which ipex-llm sets to INFO)."""
    root = logging.getLogger()
    level = root.level
    try:
        import ipex_llm.transformers as ipex_transformers
    except ImportError as exc:
        raise ModelLoadError(
            f"backend 'ipex-llm' needs the ipex-llm package ({exc}). Create its environment: "
            "conda env create -f environment-ipex-llm.yml (Intel GPU) or scripts/make_ipex_llm_venv.sh (CPU), "
            "or use backend 'native'"
        ) from None
    finally:
        root.setLevel(level)
    logger.warning(ARCHIVED_WARNING)
    return ipex_transformers


def low_bit_format(quantization: str, device: torch.device) -> str:
    """ipex-llm's ``load_in_low_bit`` value: ``nf4`` on XPU, ``sym_int4`` where NF4 is refused (CPU).

    Raises:
        ModelLoadError: a quantization this backend does not offer (only ``nf4``).
    """
    if quantization != "nf4":
        raise ModelLoadError(
            f"quantization {quantization!r} is not offered by the ipex-llm backend (the original recipe is NF4); "
            "use quantization 'nf4' or backend 'native'"
        )
    if device.type == "xpu":
        return "nf4"
    logger.warning("ipex-llm does not support NF4 on %s: loading sym_int4 (symmetric 4-bit integers) instead", device)
    return "sym_int4"


def _load_low_bit(model_name_or_path: str, quantization: str, device: torch.device, dtype: torch.dtype) -> Any:
    ipex_transformers = _import_ipex_llm()
    try:
        model = ipex_transformers.AutoModelForCausalLM.from_pretrained(
            model_name_or_path,
            load_in_low_bit=low_bit_format(quantization, device),
            optimize_model=False,
            torch_dtype=dtype,
            modules_to_not_convert=["lm_head"],
        )
    except OSError as exc:
        raise ModelLoadError(f"could not load {model_name_or_path!r} with ipex-llm: {exc}") from None
    return model.to(device)


def lora_targets(model: torch.nn.Module, wanted: list[str]) -> list[str]:
    """The LoRA target names that the loaded model really has; a fused ``qkv_proj`` replaces q/k/v.

    Raises:
        ModelLoadError: none of them exists.
    """
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    present = [t for t in wanted if t in names]
    if "qkv_proj" in names and FUSED_QKV & set(wanted) and "qkv_proj" not in present:
        present.append("qkv_proj")
    if not present:
        raise ModelLoadError(f"none of the LoRA target modules {wanted} exists in the model loaded by ipex-llm")
    return present


def load_policy_model(
    model_name_or_path: str,
    quantization: str,
    device: torch.device,
    dtype: torch.dtype,
    lora: LoraSettings,
    gradient_checkpointing: bool = False,
) -> Any:
    """Low-bit base + ipex-llm's ``prepare_model_for_kbit_training`` + ipex-llm's ``get_peft_model``."""
    from peft import LoraConfig

    model = _load_low_bit(model_name_or_path, quantization, device, dtype)
    from ipex_llm.transformers.qlora import get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_targets(model, lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    from peft.tuners.lora import LoraModel

    original = LoraModel.__dict__["_create_new_module"]
    try:
        return get_peft_model(model, config)
    finally:
        # ipex-llm 2.2.0 puts this staticmethod back as a plain function, which breaks every later
        # get_peft_model call in the process ("takes 3 positional arguments but 4 were given").
        LoraModel._create_new_module = original


def load_reference_model(model_name_or_path: str, quantization: str, device: torch.device, dtype: torch.dtype) -> Any:
    """The original reference: the same low-bit format, ``optimize_model=False``, frozen, eval mode."""
    model = _load_low_bit(model_name_or_path, quantization, device, dtype)
    model.requires_grad_(False)
    model.eval()
    return model


def load_trained_policy(
    model_name_or_path: str, adapter_dir: str, quantization: str, device: torch.device, dtype: torch.dtype
) -> Any:
    """The low-bit base with a saved adapter loaded on it (eval mode, frozen)."""
    from peft import PeftModel

    model = _load_low_bit(model_name_or_path, quantization, device, dtype)
    policy = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    policy.eval()
    return policy
