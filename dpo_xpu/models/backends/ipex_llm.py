"""The ipex-llm backend: Intel's DPO QLoRA example (``python/llm/example/GPU/LLM-Finetuning/DPO/dpo_finetuning.py``
in intel/ipex-llm) step for step, with TRL < 0.12 (docs/backends.md). ipex-llm was archived on 2026-01-28 and
intel-extension-for-pytorch discontinued after 2.8: this backend is for users who still have that stack.

The example's policy: its ``BitsAndBytesConfig`` (NF4, bf16 compute) through ipex-llm (2.2.0 loads it with
``torch_dtype="auto"``), ipex-llm's ``prepare_model_for_kbit_training`` (norms in float32) and ``get_peft_model``;
its ``separate`` reference: ``load_in_low_bit``, ``torch_dtype=bf16``. On a CPU (no NF4 there): ``int4`` /
``sym_int4``, logged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from dpo_xpu.errors import ModelLoadError
from dpo_xpu.models.base import LoraSettings, loading

logger = logging.getLogger(__name__)

ARCHIVED_WARNING = (
    "the ipex-llm backend uses ipex-llm, archived upstream on 2026-01-28 (no more fixes, including security "
    "fixes); intel-extension-for-pytorch was discontinued after 2.8. Prefer backend 'native'."
)


def _import_ipex_llm() -> Any:
    """Import ``ipex_llm.transformers``, restoring the root log level (ipex-llm sets it to INFO)."""
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
    """ipex-llm's ``load_in_low_bit``: ``nf4`` on XPU, ``sym_int4`` on a CPU; :class:`ModelLoadError` but for NF4."""
    if quantization != "nf4":
        raise ModelLoadError(
            f"quantization {quantization!r} is not offered by the ipex-llm backend (the original recipe is NF4); "
            "use quantization 'nf4' or backend 'native'"
        )
    if device.type == "xpu":
        return "nf4"
    logger.warning("ipex-llm does not support NF4 on %s: loading sym_int4 (symmetric 4-bit integers) instead", device)
    return "sym_int4"


def _from_pretrained(model_name_or_path: str, device: torch.device, **kwargs: Any) -> Any:
    ipex_transformers = _import_ipex_llm()
    try:
        model = ipex_transformers.AutoModelForCausalLM.from_pretrained(model_name_or_path, **kwargs)
    except OSError as exc:
        raise ModelLoadError(f"could not load {model_name_or_path!r} with ipex-llm: {exc}") from None
    return model.to(device)


def _load_policy_base(model_name_or_path: str, quantization: str, device: torch.device, dtype: torch.dtype) -> Any:
    """The example's policy base: its ``BitsAndBytesConfig`` through ipex-llm (``int4`` on a CPU), on ``device``."""
    from transformers import BitsAndBytesConfig

    quant_type = "nf4" if low_bit_format(quantization, device) == "nf4" else "int4"
    try:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_use_double_quant=False,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_compute_dtype=dtype,
        )
    except Exception as exc:  # noqa: BLE001 - transformers raises ImportError or PackageNotFoundError
        raise ModelLoadError(
            f"the ipex-llm example loads its policy with a BitsAndBytesConfig, which needs the bitsandbytes package "
            f"({type(exc).__name__}: {exc}): pip install bitsandbytes==0.45.1 (the example's version)"
        ) from None
    return _from_pretrained(model_name_or_path, device, quantization_config=config)


def lora_targets(model: torch.nn.Module, wanted: list[str] | str) -> list[str]:
    """The LoRA targets the loaded model has (a ``qkv_proj`` ipex-llm's ``optimize_model`` fused replaces q/k/v);
    :class:`ModelLoadError` if none, or for PEFT's ``"all-linear"`` (targets are matched by name here)."""
    if isinstance(wanted, str):
        raise ModelLoadError(
            f"lora_target_modules: {wanted!r} is not offered by the ipex-llm backend (it matches targets by name "
            "against ipex-llm's layers): list the names, e.g. [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj]"
        )
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    present = [t for t in wanted if t in names]
    if "qkv_proj" in names and {"q_proj", "k_proj", "v_proj"} & set(wanted) and "qkv_proj" not in present:
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
    """The example's policy; arguments as :func:`dpo_xpu.models.loading.load_policy_model`."""
    model = _load_policy_base(model_name_or_path, quantization, device, dtype)
    from ipex_llm.transformers.qlora import get_peft_model, prepare_model_for_kbit_training
    from peft.tuners.lora import LoraModel

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    config = lora.peft_config(lora_targets(model, lora.target_modules))

    # ipex-llm 2.2.0 puts a staticmethod of LoraModel back as a plain function, which breaks every later
    # get_peft_model call in the process ("takes 3 positional arguments but 4 were given").
    with _class_restored(LoraModel):
        model = get_peft_model(model, config)
    model.config.use_cache = False
    return model


@contextlib.contextmanager
def _class_restored(cls: type) -> Iterator[None]:
    """Put back, after the block, every attribute of ``cls`` the block replaced, added or removed."""
    before = dict(vars(cls))
    try:
        yield
    finally:
        for name in set(vars(cls)) - set(before):
            delattr(cls, name)
        for name, value in before.items():
            if vars(cls).get(name) is not value:
                setattr(cls, name, value)


def load_reference_model(model_name_or_path: str, quantization: str, device: torch.device, dtype: torch.dtype) -> Any:
    """The example's reference (``load_in_low_bit``, ``torch_dtype=dtype``, lm_head kept), frozen, eval mode."""
    kwargs = dict(load_in_low_bit=low_bit_format(quantization, device), optimize_model=False, torch_dtype=dtype)
    model = _from_pretrained(model_name_or_path, device, modules_to_not_convert=["lm_head"], **kwargs)
    return model.requires_grad_(False).eval()


def load_trained_policy(
    model_name_or_path: str, adapter_dir: str, quantization: str, device: torch.device, dtype: torch.dtype
) -> Any:
    """The policy's base, loaded as for training, with a saved adapter on it (eval mode, frozen)."""
    from ipex_llm.transformers.qlora import prepare_model_for_kbit_training
    from peft import PeftModel

    model = _load_policy_base(model_name_or_path, quantization, device, dtype)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # float32 norms, as trained
    with loading("adapter", adapter_dir, fallback="give the run's adapter/ folder trained on this base model"):
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=False).eval()
