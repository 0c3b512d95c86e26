"""Known-harmless messages of the stack, filtered at their source by their exact text (never all warnings), when
``dpo_xpu`` is imported; no library filters another library's messages. Why each is harmless:

- bitsandbytes' missing ``kernels`` package on AVX512-BF16 CPUs: it falls back to its own kernel, the one we want;
- kernels' skipped publisher check with ``HF_HUB_OFFLINE=1``: the kernel comes from the local cache;
- transformers' unreliable mtime when rotating checkpoints: its fallback, the step number, is the right order;
- transformers 5's deprecated checkpointing names, which PEFT and TRL still call: nothing a user can change.
"""

from __future__ import annotations

import logging
import warnings

BNB_KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
KERNELS_OFFLINE_MESSAGE = "Skipping publisher trust check"
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
