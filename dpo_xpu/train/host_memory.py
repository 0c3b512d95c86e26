"""Host memory on CPU runs: hand glibc's freed pages back to the OS after each training forward pass, and read what
glibc's allocator has in use (the CPU's ``torch.cuda.memory_allocated``, for the benchmark and the planner's tests).

glibc keeps freed blocks below its mmap threshold in its heaps, and a block still in use above them keeps the pages
below resident: the activations a training forward frees (gradient checkpointing) stay resident through the LM
head's backward, where the step peaks. Measured on SmolLM2-135M-Instruct with dpo_xpu's defaults
(``benchmarks/dpo_step.py``): about 290 MiB resident above what was in use at the peak; with ``malloc_trim(0)``
after each training forward, about 40. PyTorch has no call for glibc's ``malloc_trim`` or ``mallinfo2``, hence these
few lines. The trim runs only on the CPU, where glibc is present, after forward passes with gradients on
(generation and the reference precompute are left alone).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)


@functools.cache
def _libc(name: str) -> Any:
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def _malloc_trim() -> Any:
    return _libc("malloc_trim")


class _Mallinfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc 2.33 or later): every field a ``size_t``, in bytes or counts."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def _mallinfo2() -> Any:
    function = _libc("mallinfo2")
    if function is not None:
        function.restype = _Mallinfo2
    return function


def allocated_mib() -> float | None:
    """Memory in use by glibc's allocator now, in MiB (``uordblks + hblkhd`` of ``mallinfo2``: heap chunks in use
    plus mmapped blocks, without the freed memory it keeps resident); ``None`` without glibc 2.33 or later."""
    function = _mallinfo2()
    if function is None:
        return None
    info = function()
    return (info.uordblks + info.hblkhd) / 2**20


def release_freed_memory() -> bool:
    """Return the allocator's free pages to the OS (glibc ``malloc_trim(0)``); ``False`` where glibc is absent."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    return trim is not None


def release_after_training_forward(model: torch.nn.Module) -> Any:
    """Call :func:`release_freed_memory` after each forward pass of ``model`` (the CPU policy) with gradients on;
    return the hook's handle (``.remove()`` undoes it), or ``None`` where glibc is absent."""
    if _malloc_trim() is None:
        logger.debug("no glibc malloc_trim: freed host memory stays with the allocator")
        return None

    def after_forward(module: torch.nn.Module, args: Any, output: Any) -> None:
        if torch.is_grad_enabled():
            release_freed_memory()

    return model.register_forward_hook(after_forward)
