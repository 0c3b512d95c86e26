"""Known-harmless messages of the stack, filtered at their source by their exact text (never all warnings).

- bitsandbytes >= 0.49 logs "Failed to load CPU gemm_4bit_forward from kernels-community" on every CPU with
  AVX512-BF16 when the optional ``kernels`` package (a hub download) is absent; it then uses its own kernel, which
  is what dpo_xpu wants anyway (:mod:`dpo_xpu.models.backends.native` keeps the training and inference kernels equal).
- kernels (the hub-kernel loader bitsandbytes asks for its CPU kernel) logs "Skipping publisher trust check ... because
  Hugging Face Hub is in offline mode" at every start with ``HF_HUB_OFFLINE=1``, the setting the docs recommend on
  an offline machine; the kernel it is about comes from the local cache, and there is nothing to act on.
- transformers logs "mtime may not be reliable on this filesystem, falling back to numerical ordering" when it
  rotates checkpoints saved less than a second apart (``save_total_limit``, fast steps): its fallback, ordering by
  step number, is the right order anyway.
- transformers 5 warns ``FutureWarning: `gradient_checkpointing_enable` is deprecated`` (and ``_disable``,
  ``is_gradient_checkpointing``, and the ``gradient_checkpointing`` / ``gradient_checkpointing_kwargs`` arguments
  TRL's ``DPOConfig`` still takes) whenever PEFT or TRL use the old names, several times a run, also with
  checkpointing off; nothing a user can change.

:func:`install` runs when ``dpo_xpu`` is imported. Python's ``warnings`` and ``logging`` filters are the tools;
no library filters another library's messages, hence these few lines.
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
