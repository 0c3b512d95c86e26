"""Known-harmless messages of the stack, filtered at their source by their exact text (never all warnings).

- bitsandbytes >= 0.49 logs "Failed to load CPU gemm_4bit_forward from kernels-community" on CPUs with AVX512-BF16
  when the optional ``kernels`` package is absent, then uses its own kernel, the one dpo_xpu wants anyway.
- kernels logs "Skipping publisher trust check ... because Hugging Face Hub is in offline mode" at every start with
  ``HF_HUB_OFFLINE=1`` (the docs' offline setting); the kernel comes from the local cache.
- transformers logs "mtime may not be reliable on this filesystem" when it rotates checkpoints saved within a
  second; its fallback, ordering by step number, is the right order anyway.
- transformers 5 warns that ``gradient_checkpointing_enable`` (and the other old checkpointing names, which PEFT and
  TRL's ``DPOConfig`` still use) is deprecated, several times a run; nothing a user can change.

:func:`install` runs when ``dpo_xpu`` is imported. No library filters another library's messages, hence these lines.
"""

from __future__ import annotations

import logging
import warnings

#: Start of the bitsandbytes log line dropped by :func:`install`.
BNB_KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
#: Start of the kernels log line dropped by :func:`install` (offline mode, the hub's publisher check skipped).
KERNELS_OFFLINE_MESSAGE = "Skipping publisher trust check"
#: The logger of each dropped line, and the line's start.
DROPPED_LINES = {
    "bitsandbytes.backends.cpu.ops": BNB_KERNELS_MESSAGE,
    "kernels._internals.hf_hub": KERNELS_OFFLINE_MESSAGE,
    "transformers.trainer_utils": "mtime may not be reliable on this filesystem",
}
#: transformers' deprecation warnings of the old gradient-checkpointing names (a regular expression).
CHECKPOINTING_DEPRECATION = (
    r"`(gradient_checkpointing(_enable|_disable|_kwargs)?|is_gradient_checkpointing)` is deprecated"
)


class _DropMessage(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def install() -> None:
    """Filter the messages above (idempotent)."""
    for name, start in DROPPED_LINES.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in log.filters):
            log.addFilter(_DropMessage(start))
    warnings.filterwarnings("ignore", message=CHECKPOINTING_DEPRECATION, category=FutureWarning)
