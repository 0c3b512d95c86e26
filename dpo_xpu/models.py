"""Models: the tokenizer, the policy (NF4 base + LoRA adapters) and the frozen reference model.

The functions here are backend-neutral: they resolve the device and the model path, then call the
backend module (``dpo_xpu.backends.native`` or ``dpo_xpu.backends.ipex_llm``) that knows its stack.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_xpu.backends import get_backend
from dpo_xpu.errors import ModelLoadError
from dpo_xpu.recipes import DEFAULT_LORA_TARGETS

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass
class LoraSettings:
    """LoRA adapter settings (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

    Args:
        r: rank of the update matrices A (r x in) and B (out x r). Default 16 (the original recipe).
        alpha: scaling numerator; the update B @ A is scaled by ``alpha / r``. Default 16.
        dropout: dropout on the adapter input. Default 0.05.
        target_modules: names of the linear layers that get adapters; names the model lacks are skipped,
            and none present is an error. Default: the attention and MLP projections.
    """

    r: int = 16
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))


def resolve_model_path(model_name_or_path: str | Path) -> str:
    """Return a local folder as an absolute path, or a hub id unchanged.

    A string is a hub id when no such local path exists and it has the hub's ``name`` or ``org/name``
    form. Anything else that does not exist locally is an error here, before transformers tries the hub.

    Raises:
        ModelLoadError: the path looks local (absolute, ``./``, ``~``, or more than one ``/``) but is absent.
    """
    text = str(model_name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return str(path.resolve())
    looks_local = text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text
    if looks_local:
        raise ModelLoadError(
            f"model folder {text} does not exist: give an existing local folder (with config.json and the "
            "weights) or a hub id such as 'teknium/OpenHermes-2.5-Mistral-7B'"
        )
    return text


def _from_pretrained(loader: Any, model_name_or_path: str, **kwargs: Any) -> Any:
    """Call ``loader.from_pretrained`` and turn a failure to find the files into a :class:`ModelLoadError`."""
    try:
        return loader.from_pretrained(model_name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        if Path(model_name_or_path).exists():
            raise
        raise ModelLoadError(
            f"could not load {model_name_or_path!r}: no local folder of that name, and the hub did not "
            f"provide it ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Check the id and your network, "
            "or download the model and give its local folder"
        ) from None


def load_tokenizer(model_name_or_path: str | Path, padding_side: str = "left") -> PreTrainedTokenizerBase:
    """Load the tokenizer with left padding (for batched generation) and a pad token.

    Args:
        model_name_or_path: hub id or local folder.
        padding_side: ``"left"`` (default) or ``"right"``.

    Returns:
        The tokenizer; when it has no pad token, the EOS token is used as pad token.

    Raises:
        ModelLoadError: the folder or hub id cannot be found.
    """
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, resolve_model_path(model_name_or_path))
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
) -> PreTrainedModel:
    """Load the policy: the base model (NF4 by default) with trainable LoRA adapters.

    Args:
        model_name_or_path: hub id or local folder.
        quantization: ``"nf4"`` (bitsandbytes 4-bit NormalFloat, compute dtype ``dtype``) or ``"none"``.
        device: ``"auto"``, ``"xpu"``, ``"cuda"``, ``"cpu"`` or a ``torch.device``.
        dtype: compute/weight dtype, default ``torch.bfloat16``.
        lora: adapter settings, default :class:`LoraSettings` ``()`` (r 16, alpha 16, dropout 0.05).
        backend: ``"native"`` or ``"ipex-llm"``.
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).

    Returns:
        A ``peft.PeftModel`` on ``device`` whose only trainable parameters are the LoRA matrices.

    Raises:
        ModelLoadError: the model cannot be found. DeviceNotAvailableError: ``device`` is absent.
    """
    import torch

    from dpo_xpu.environment import select_device

    return get_backend(backend).load_policy_model(
        resolve_model_path(model_name_or_path),
        quantization=quantization,
        device=device if isinstance(device, torch.device) else select_device(device),
        dtype=dtype or torch.bfloat16,
        lora=lora or LoraSettings(),
        gradient_checkpointing=gradient_checkpointing,
    )


def load_reference_model(
    model_name_or_path: str | Path,
    quantization: str = "nf4",
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
    backend: str = "native",
) -> PreTrainedModel:
    """Load a separate frozen reference model (the ``separate`` strategy): same base, no adapters,
    eval mode, no parameter requiring grad. Arguments as :func:`load_policy_model`.
    """
    import torch

    from dpo_xpu.environment import select_device

    return get_backend(backend).load_reference_model(
        resolve_model_path(model_name_or_path),
        quantization=quantization,
        device=device if isinstance(device, torch.device) else select_device(device),
        dtype=dtype or torch.bfloat16,
    )


def load_trained_policy(
    model_name_or_path: str | Path,
    adapter_dir: str | Path,
    quantization: str = "nf4",
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
    backend: str = "native",
) -> PreTrainedModel:
    """Load the base as for training and put a saved LoRA adapter (``<run>/adapter``) on it.

    The base gets the same quantization and dtype handling as during training, so the result computes the
    same logits as the trained policy did. Returned in eval mode with no trainable parameter.

    Raises:
        ModelLoadError: the base or the adapter folder cannot be found.
    """
    import torch

    from dpo_xpu.environment import select_device

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelLoadError(f"{adapter_dir} holds no LoRA adapter (adapter_config.json): give a run's adapter/ folder")
    return get_backend(backend).load_trained_policy(
        resolve_model_path(model_name_or_path),
        str(adapter_dir),
        quantization=quantization,
        device=device if isinstance(device, torch.device) else select_device(device),
        dtype=dtype or torch.bfloat16,
    )


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """Return ``(trainable, total)`` parameter counts (4-bit packed weights count as stored elements)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
