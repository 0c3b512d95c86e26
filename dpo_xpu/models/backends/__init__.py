"""Backends, the only modules that know their stack: ``native`` (default; bitsandbytes NF4, PEFT, TRL 1.x) and
``ipex-llm`` (the original recipe, TRL < 0.12), each with the loaders of :mod:`dpo_xpu.models.loading`."""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

from dpo_xpu.errors import RecipeError
from dpo_xpu.recipes import BACKENDS


def get_backend(name: str) -> ModuleType:
    """The backend module for ``name``; :class:`RecipeError` for an unknown one."""
    if name not in BACKENDS:
        raise RecipeError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return import_module("dpo_xpu.models.backends." + name.replace("-", "_"))
