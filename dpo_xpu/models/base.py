"""What the model loaders and both backends share: LoRA settings, the model path, the ``dtype`` keyword and
``from_pretrained`` with one-line errors. A leaf of :mod:`dpo_xpu.models`: the backends import it, never
:mod:`dpo_xpu.models.loading` (which imports them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_xpu.errors import ModelLoadError
from dpo_xpu.recipes import DEFAULT_LORA_TARGETS

if TYPE_CHECKING:
    import torch


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


def resolve_model_path(model_name_or_path: str | Path, check_hub: bool = True) -> str:
    """Return a local folder as an absolute path, or a hub id unchanged.

    A string is a hub id when no such local path exists and it has the hub's ``name`` or ``org/name`` form, and
    ``org`` is not a local folder (``runs/demo-model`` before ``make demo`` is a missing folder, not a hub id).
    Anything else that does not exist locally is an error here, before transformers tries the hub. A hub id that
    is not in the local cache while the hub is off or unreachable is an error at once, too
    (:func:`dpo_xpu.hub.check_hub_id`), instead of after a minute of retries.

    Args:
        model_name_or_path: a local folder or a hub id.
        check_hub: check at once that a hub id can be loaded (default); ``False`` skips that check.

    Raises:
        ModelLoadError: the path looks local (absolute, ``./``, ``~``, more than one ``/``, or inside an existing
            folder) but is absent; or a hub id cannot be had.
    """
    text = str(model_name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return str(path.resolve())
    parent_is_local = text.count("/") == 1 and Path(text.split("/", 1)[0]).expanduser().is_dir()
    looks_local = text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text or parent_is_local
    if looks_local:
        hint = f" (for the demo model: make demo, or dpo-xpu demo-model {text})" if "demo-model" in text else ""
        raise ModelLoadError(
            f"model folder {text} does not exist (looked in {path.resolve()}){hint}: give an existing local folder "
            "(with config.json and the weights) or a hub id such as 'teknium/OpenHermes-2.5-Mistral-7B'"
        )
    if check_hub:
        from dpo_xpu.hub import check_hub_id

        check_hub_id(text, "model", ModelLoadError, "model_name_or_path")
    return text


def dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    """``dtype=`` for transformers >= 4.56, ``torch_dtype=`` before (the keyword was renamed)."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


def from_pretrained(loader: Any, model_name_or_path: str, **kwargs: Any) -> Any:
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
