"""Backends: the only modules that know their stack.

``native`` (default): PyTorch's own XPU/CUDA/CPU devices, bitsandbytes NF4, PEFT, TRL 1.x.
``ipex-llm``: the original recipe (ipex-llm low-bit loading, TRL < 0.12), archived upstream.
Each backend module exposes ``load_policy_model`` and ``load_reference_model`` with the same signature.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

from dpo_xpu.errors import RecipeError
from dpo_xpu.recipes import BACKENDS


def get_backend(name: str) -> ModuleType:
    """Return the backend module for ``name`` (``"native"`` or ``"ipex-llm"``).

    Raises:
        RecipeError: ``name`` is not a known backend.
    """
    if name not in BACKENDS:
        raise RecipeError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return import_module("dpo_xpu.models.backends." + name.replace("-", "_"))
