"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM: save a checkpoint at the end of the current step.

While :class:`StopOnSignal` is active, the first SIGINT or SIGTERM only sets a flag; at the end of the step
being computed its callback asks ``Trainer`` to save a checkpoint and stop. A second signal restores the previous
handler and interrupts at once (the checkpoint being written, if any, is then partial and skipped on resume).

    >>> stopper = StopOnSignal()
    >>> with stopper:
    ...     trainer.add_callback(stopper); trainer.train()
    >>> stopper.signal_name    # "SIGTERM" when a signal stopped the run, else None
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal(TrainerCallback):
    """A context manager that installs the handlers (main thread only; elsewhere it does nothing) and a
    ``TrainerCallback`` that turns a received signal into ``should_save`` + ``should_training_stop``."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def signal_name(self) -> str | None:
        """``"SIGINT"`` / ``"SIGTERM"`` once one was received, else ``None``."""
        return signal.Signals(self.signum).name if self.signum is not None else None

    @property
    def exit_code(self) -> int:
        """The shell's exit code for the signal: 128 + its number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + (self.signum or signal.SIGINT)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # the second signal: stop now
            self.__exit__()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        logger.warning(
            "%s received: saving a checkpoint at the end of this step, then stopping (send it again to stop now)",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from dpo_xpu.distributed import agree_on_signal

        self.signum = agree_on_signal(self.signum)  # several processes: a signal to any rank stops them all here
        if self.signum is not None:
            control.should_save = True
            control.should_training_stop = True
