"""Models: the tokenizer, the policy (NF4 base + LoRA adapters) and the frozen reference model, backend-neutral:
each function resolves the device and the model path, then calls the backend module that knows its stack."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_xpu.errors import ModelLoadError
from dpo_xpu.models.backends import get_backend
from dpo_xpu.models.base import LoraSettings, check_adapter_folder, from_pretrained, loading, resolve_model_path

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


#: The files a tokenizer is read from, one set enough (as transformers' tokenizer classes name them).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tiktoken.model")
#: Fewer tokens than this is no vocabulary (a byte-level one alone holds 256).
_MIN_VOCAB = 16


def load_tokenizer(model_name_or_path: str | Path, padding_side: str = "left") -> PreTrainedTokenizerBase:
    """The tokenizer with ``padding_side`` (left, for batched generation) and a pad token (EOS when it has none).

    Raises:
        ModelLoadError: when none can be loaded, or when the one loaded is empty (a vocabulary of fewer than 16
            tokens, or ordinary text encoded to no tokens: transformers builds such a tokenizer from a config.json
            alone when the folder holds no tokenizer files)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model_name_or_path, tokenizer_only=True)
    tokenizer = from_pretrained(AutoTokenizer, path)
    if len(tokenizer) < _MIN_VOCAB or not tokenizer("hello world", add_special_tokens=False)["input_ids"]:
        files = ", ".join(_TOKENIZER_FILES)
        fix = "copy the model's tokenizer files into it (as save_pretrained or hf download writes them)"
        if Path(path).is_dir() and not any((Path(path) / name).is_file() for name in _TOKENIZER_FILES):
            raise ModelLoadError(f"model folder {path} holds no tokenizer files ({files}): {fix}")
        raise ModelLoadError(
            f"tokenizer {path} is empty ({len(tokenizer)} tokens; 'hello world' encodes to "
            f"{tokenizer('hello world', add_special_tokens=False)['input_ids']}): its tokenizer files ({files}) "
            f"are not the model's: {fix}"
        )
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
    """The policy: a ``peft.PeftModel`` on ``device`` whose only trainable parameters are LoRA matrices, over the
    base (hub id, folder or GGUF file; ``quantization`` ``"nf4"`` or ``"none"``; ``dtype`` default bf16), with an SFT
    checkpoint (:func:`load_sft_state_dict`) loaded before quantization, or continuing ``adapter_name_or_path`` (its
    own settings; TRL 1.x's ``adapter-off`` reference then starts from it too). Raises :class:`ModelLoadError`."""
    loader = get_backend(backend).load_policy_model
    path = resolve_model_path(model_name_or_path)
    if adapter_name_or_path is not None and Path(adapter_name_or_path).expanduser().exists():
        check_adapter_folder(adapter_name_or_path, "adapter_name_or_path")
    kwargs = _loader_kwargs(loader, backend, path, quantization, device, dtype, sft_state_dict, adapter_name_or_path)
    return loader(path, lora=lora or LoraSettings(), gradient_checkpointing=gradient_checkpointing, **kwargs)


def load_reference_model(
    model_name_or_path: str | Path,
    quantization: str = "nf4",
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
    backend: str = "native",
    sft_state_dict: str | Path | dict[str, torch.Tensor] | None = None,
) -> PreTrainedModel:
    """A separate frozen reference (the ``separate`` strategy): the base, no adapters, eval mode; arguments as
    :func:`load_policy_model` (give the policy's ``sft_state_dict``)."""
    loader = get_backend(backend).load_reference_model
    path = resolve_model_path(model_name_or_path)
    return loader(path, **_loader_kwargs(loader, backend, path, quantization, device, dtype, sft_state_dict, None))


def _loader_kwargs(
    loader: Any, backend: str, path: str, quantization: str, device: Any, dtype: Any, sft: Any, adapter: Any
) -> dict[str, Any]:
    """A backend loader's keywords: ``device`` resolved, ``dtype`` (default bf16), an SFT state dict and a starting
    adapter, refused where the backend lacks them."""
    import inspect

    import torch

    from dpo_xpu.device import select_device

    kwargs: dict[str, Any] = {"quantization": quantization, "dtype": dtype or torch.bfloat16}
    kwargs["device"] = device if isinstance(device, torch.device) else select_device(device)
    if sft is not None:
        kwargs["state_dict"] = sft if isinstance(sft, dict) else load_sft_state_dict(sft, path)
    if adapter is not None:
        kwargs["adapter_name_or_path"] = str(adapter)
    names = {"state_dict": "sft_checkpoint", "adapter_name_or_path": "adapter_name_or_path"}
    missing = [names[k] for k in names if k in kwargs and k not in inspect.signature(loader).parameters]
    if missing:
        raise ModelLoadError(f"backend {backend!r} cannot apply {', '.join(missing)}: use backend 'native'")
    return kwargs


#: State-dict entries older transformers saved that current models rebuild themselves.
_IGNORED_SFT_KEYS = ("rotary_emb.inv_freq",)


def load_sft_state_dict(path: str | Path, model_name_or_path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an SFT checkpoint as the original DPO code writes it (Rafailov et al. 2023,
    github.com/eric-mitchell/direct-preference-optimization: ``torch.save({"state": policy.state_dict(), ...})``),
    loaded with ``weights_only=True`` onto the CPU; :class:`ModelLoadError` naming what differs when it is missing,
    damaged, more than tensors, or not exactly the model's parameters and shapes."""
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
    """The base loaded as for training (the same logits) with a saved adapter on it, frozen, in eval mode.

    Raises:
        ModelLoadError: naming the file and the fix, for a base that does not load, or an adapter folder without
            an ``adapter_config.json`` PEFT reads (not JSON, no object, no ``peft_type``, keys of the wrong kind)
            or whose weights do not fit the base."""
    adapter_dir = check_adapter_folder(adapter_dir)
    loader = get_backend(backend).load_trained_policy
    path = resolve_model_path(model_name_or_path)
    kwargs = _loader_kwargs(loader, backend, path, quantization, device, dtype, None, None)
    return loader(path, str(adapter_dir), **kwargs)
