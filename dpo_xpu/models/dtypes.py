"""transformers' name for the ``dtype`` keyword of ``from_pretrained`` and ``from_config``, which it renamed.

A leaf of :mod:`dpo_xpu.models`: :mod:`dpo_xpu.models.base` and :mod:`dpo_xpu.models.gguf` (which base imports)
both need it, and neither may import the other's importer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    """``dtype=`` for transformers >= 4.56, ``torch_dtype=`` before (the keyword was renamed)."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}
