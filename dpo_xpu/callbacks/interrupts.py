"""Stopping a run cleanly: on SIGINT (Ctrl-C) or SIGTERM, and when training diverges to NaN.

While :class:`StopOnSignal` is active, the first SIGINT or SIGTERM only sets a flag; at the end of the step
being computed its callback asks ``Trainer`` to save a checkpoint and stop. A second signal restores the previous
handler and interrupts at once (the checkpoint being written, if any, is then partial and skipped on resume).

    >>> stopper = StopOnSignal()
    >>> with stopper:
    ...     trainer.add_callback(stopper); trainer.train()
    >>> stopper.signal_name    # "SIGTERM" when a signal stopped the run, else None

:class:`StopOnDivergence` stops at the first step whose trainable weights or logged loss, rewards or gradient norm
are not finite, without saving that state as a checkpoint, and raises
:class:`~dpo_xpu.errors.TrainingDiverged`: one line with the step, the values, the likely cause and the last good
checkpoint. (``Trainer`` hides a NaN loss by default, ``logging_nan_inf_filter``: the weights and rewards show it.)
"""

from __future__ import annotations

import logging
import math
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


#: The logged values :class:`StopOnDivergence` checks (TRL's names).
WATCHED = (
    *("loss", "grad_norm", "rewards/chosen", "rewards/rejected"),
    *("rewards/margins", "logps/chosen", "logps/rejected"),
)


def _finite(value: Any) -> bool:
    value = value.item() if hasattr(value, "item") else value
    return not isinstance(value, float) or math.isfinite(value)


def _show(value: Any) -> str:
    value = value.item() if hasattr(value, "item") else value
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def weights_finite(model: Any) -> bool:
    """Whether every trainable parameter of ``model`` is finite (one device sync per device, not per tensor)."""
    import torch

    flags: dict[Any, list[Any]] = {}
    for param in model.parameters():
        if param.requires_grad:
            flags.setdefault(param.device, []).append(torch.isfinite(param.detach()).all())
    return all(bool(torch.stack(found).all()) for found in flags.values())


def divergence_message(step: int, logs: dict[str, Any], args: Any, weights_ok: bool) -> str:
    """The one line of :class:`~dpo_xpu.errors.TrainingDiverged`: the step, the values, the likely causes (from the
    run's ``learning_rate``, ``beta`` and ``bf16``) and the last good checkpoint in ``args.output_dir``."""
    from dpo_xpu.callbacks.checkpoints import newest_complete_step

    values = ", ".join(f"{key} {_show(logs[key])}" for key in WATCHED if key in logs)
    if not weights_ok:
        values += (", " if values else "") + "trainable weights not finite after the update"
    lr, beta, bf16 = getattr(args, "learning_rate", None), getattr(args, "beta", None), getattr(args, "bf16", False)
    causes = []
    if isinstance(lr, float) and lr > 1e-3:
        causes.append(f"learning_rate {lr:g} is too high (DPO with LoRA uses about 5e-6 to 5e-4)")
    if isinstance(beta, (int, float)) and beta > 1:
        causes.append(f"beta {beta:g} is large (DPO uses about 0.01 to 0.5)")
    if bf16:
        causes.append("a bf16 overflow (bf16: false computes in float32)")
    if not causes:
        causes.append(f"learning_rate {lr:g} too high for this model and data" if isinstance(lr, float) else "")
    kept = newest_complete_step(args.output_dir)
    where = (
        f"the last good checkpoint, checkpoint-{kept}, is kept (--resume continues from it with the same recipe)"
        if kept is not None
        else "no checkpoint was saved before it"
    )
    return (
        f"training diverged at step {step}: {values}. Likely cause: {'; or '.join(c for c in causes if c)}. The "
        f"diverged state was not saved; {where}. Fix: lower learning_rate (or beta) and start again with --overwrite "
        "(overwrite=True)"
    )


class StopOnDivergence(TrainerCallback):
    """Stop training at the first non-finite step, before it is saved, with one line saying why.

    After each optimizer step the trainable weights are checked (:func:`weights_finite`); a non-finite one makes the
    step logged (its values reach ``metrics.jsonl``), not saved nor evaluated, and stops training. At that log, or
    any log whose :data:`WATCHED` values are not finite, it raises :class:`~dpo_xpu.errors.TrainingDiverged`. Put it
    after the callbacks that write the step's row and mark checkpoints (``Trainer`` calls them in order).
    """

    def __init__(self) -> None:
        self.step: int | None = None  # the step whose update made the weights non-finite

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Check the trainable weights; on a non-finite one, log this step, do not save it, and stop."""
        if model is not None and not weights_finite(model):
            self.step = state.global_step
            control.should_log = True
            control.should_save = False
            control.should_evaluate = False
            control.should_training_stop = True

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Raise :class:`~dpo_xpu.errors.TrainingDiverged` at a diverged step's log (before its checkpoint)."""
        from dpo_xpu.errors import TrainingDiverged

        logs = logs or {}
        if self.step is None and all(_finite(logs[key]) for key in WATCHED if key in logs):
            return
        raise TrainingDiverged(divergence_message(state.global_step, logs, args, weights_ok=self.step is None))
