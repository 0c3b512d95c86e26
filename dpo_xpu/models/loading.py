"""Models: the tokenizer, the policy (NF4 base + LoRA adapters) and the frozen reference model, backend-neutral:
each function resolves the device and the model path, then calls the backend module that knows its stack."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_xpu.errors import ModelLoadError
from dpo_xpu.models.backends import get_backend
from dpo_xpu.models.base import LoraSettings, from_pretrained, loading, resolve_model_path

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def _device_and_dtype(device: str | torch.device, dtype: torch.dtype | None) -> dict[str, Any]:
    """The backend loaders' ``device`` (resolved: ``"auto"`` -> xpu, cuda or cpu) and ``dtype`` (default bf16)."""
    import torch

    from dpo_xpu.device import select_device

    return {
        "device": device if isinstance(device, torch.device) else select_device(device),
        "dtype": dtype or torch.bfloat16,
    }


def load_tokenizer(model_name_or_path: str | Path, padding_side: str = "left") -> PreTrainedTokenizerBase:
    """Load the tokenizer with ``padding_side`` (left, for batched generation) and a pad token (EOS when it has none).

    Raises:
        ModelLoadError: the folder or hub id cannot be found, holds no tokenizer, or a tokenizer file is damaged.
    """
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer, resolve_model_path(model_name_or_path, tokenizer_only=True))
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy_model(
    model_name_or_path: str | Path,
    quantization: str = "nf4",
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
    lora: LoraSettings | None = None,
    backend: str = "native",
    gradient_checkpointing: bool = False,
    sft_state_dict: str | Path | dict[str, torch.Tensor] | None = None,
    adapter_name_or_path: str | Path | None = None,
) -> PreTrainedModel:
    """Load the policy: the base model (NF4 by default) with trainable LoRA adapters.

    Args:
        model_name_or_path: hub id, local folder or GGUF file.
        quantization: ``"nf4"`` (bitsandbytes 4-bit NormalFloat, compute dtype ``dtype``) or ``"none"``.
        device: ``"auto"``, ``"xpu"``, ``"cuda"``, ``"cpu"`` or a ``torch.device``.
        dtype: compute/weight dtype, default ``torch.bfloat16``.
        lora: adapter settings, default :class:`LoraSettings` ``()``.
        backend: ``"native"`` or ``"ipex-llm"``.
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).
        sft_state_dict: an SFT checkpoint (``policy.pt``, :func:`load_sft_state_dict`) or its state dict, loaded
            into the base before quantization.
        adapter_name_or_path: an existing LoRA adapter (folder or hub id) to continue training, with its own
            settings (``lora`` unused); TRL 1.x's ``adapter-off`` reference then freezes a copy of it, so the
            reference is the starting policy, as DPO's reference is the starting point.

    Returns:
        A ``peft.PeftModel`` on ``device`` whose only trainable parameters are the LoRA matrices.

    Raises:
        ModelLoadError: the model, SFT checkpoint or adapter cannot be found or loaded, or do not fit; the message
            names the file and the fix. DeviceNotAvailableError: ``device`` is absent.
    """
    loader = get_backend(backend).load_policy_model
    path = resolve_model_path(model_name_or_path)
    return loader(
        path,
        quantization=quantization,
        **_device_and_dtype(device, dtype),
        lora=lora or LoraSettings(),
        gradient_checkpointing=gradient_checkpointing,
        **_starting_point(loader, backend, path, sft_state_dict, adapter_name_or_path),
    )


def load_reference_model(
    model_name_or_path: str | Path,
    quantization: str = "nf4",
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
    backend: str = "native",
    sft_state_dict: str | Path | dict[str, torch.Tensor] | None = None,
) -> PreTrainedModel:
    """Load a separate frozen reference model (the ``separate`` strategy): same base, no adapters,
    eval mode, no parameter requiring grad. Arguments as :func:`load_policy_model`; give the policy's
    ``sft_state_dict`` so both start from the same SFT weights.
    """
    loader = get_backend(backend).load_reference_model
    path = resolve_model_path(model_name_or_path)
    return loader(
        path,
        quantization=quantization,
        **_device_and_dtype(device, dtype),
        **_starting_point(loader, backend, path, sft_state_dict, None),
    )


def _starting_point(
    loader: Any,
    backend: str,
    model_name_or_path: str,
    sft_state_dict: str | Path | dict[str, torch.Tensor] | None,
    adapter_name_or_path: str | Path | None,
) -> dict[str, Any]:
    """Backend keywords for an SFT state dict and a starting adapter; refuse them where the backend lacks them."""
    import inspect

    extra: dict[str, Any] = {}
    if sft_state_dict is not None:
        if not isinstance(sft_state_dict, dict):
            sft_state_dict = load_sft_state_dict(sft_state_dict, model_name_or_path)
        extra["state_dict"] = sft_state_dict
    if adapter_name_or_path is not None:
        extra["adapter_name_or_path"] = str(adapter_name_or_path)
    missing = [k for k in extra if k not in inspect.signature(loader).parameters]
    if missing:
        names = {"state_dict": "sft_checkpoint", "adapter_name_or_path": "adapter_name_or_path"}
        raise ModelLoadError(
            f"backend {backend!r} cannot apply {', '.join(names[k] for k in missing)}: use backend 'native'"
        )
    return extra


#: State-dict entries older transformers saved that current models rebuild themselves (rotary frequencies).
_IGNORED_SFT_KEYS = ("rotary_emb.inv_freq",)


def load_sft_state_dict(path: str | Path, model_name_or_path: str | Path) -> dict[str, torch.Tensor]:
    """Read an SFT checkpoint as the original DPO code writes it and check it fits the model.

    The original code (Rafailov et al. 2023, github.com/eric-mitchell/direct-preference-optimization) saves
    ``torch.save({"step_idx": ..., "state": policy.state_dict(), "metrics": ...}, "policy.pt")``; ``state`` must
    name exactly the parameters of ``model_name_or_path`` with their shapes (``rotary_emb.inv_freq`` ignored, a tied
    output embedding may be absent). Loaded with ``weights_only=True`` (no code runs), onto the CPU.

    Returns:
        The state dict (parameter name -> tensor).

    Raises:
        ModelLoadError: the file is missing, damaged or a pickle of more than tensors, has no ``state`` dict, or its
            keys or shapes differ from the model's; the message names the file, what differs and the fix.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path).expanduser()
    fix = (
        "give the file the original DPO code's SFT run wrote (torch.save({'state': model.state_dict()}, "
        f"'policy.pt')) for the model {model_name_or_path}"
    )
    if not path.is_file():
        raise ModelLoadError(f"sft_checkpoint {path} does not exist: {fix}")
    with loading("sft_checkpoint", path, fallback=fix):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state"), dict):
        found = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ModelLoadError(f"sft_checkpoint {path} has no key 'state' holding a state dict (found {found}): {fix}")
    state = {k: v for k, v in checkpoint["state"].items() if not k.endswith(_IGNORED_SFT_KEYS)}
    config = from_pretrained(AutoConfig, resolve_model_path(model_name_or_path))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items() if not k.endswith(_IGNORED_SFT_KEYS)}
    missing = sorted(set(expected) - set(state))
    if getattr(config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        parts = [
            f"{label} {len(keys)} (e.g. {', '.join(keys[:3])})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        ]
        raise ModelLoadError(
            f"sft_checkpoint {path} does not fit {model_name_or_path} ({type(skeleton).__name__}): keys "
            f"{'; '.join(parts)}. A 'module.' or '_orig_mod.' prefix means it was saved from a wrapped model: {fix}"
        )
    return state


def load_trained_policy(
    model_name_or_path: str | Path,
    adapter_dir: str | Path,
    quantization: str = "nf4",
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
    backend: str = "native",
) -> PreTrainedModel:
    """Load the base as for training (same quantization and dtype, so the same logits) with a saved LoRA adapter
    (``<run>/adapter``) on it, in eval mode with no trainable parameter.

    Raises:
        ModelLoadError: the base or the adapter folder cannot be found or loaded; the message names the file and fix.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelLoadError(f"{adapter_dir} holds no LoRA adapter (adapter_config.json): give a run's adapter/ folder")
    return get_backend(backend).load_trained_policy(
        resolve_model_path(model_name_or_path),
        str(adapter_dir),
        quantization=quantization,
        **_device_and_dtype(device, dtype),
    )
