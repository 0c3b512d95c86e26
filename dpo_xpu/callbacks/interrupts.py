"""Stopping a run cleanly: on SIGINT (Ctrl-C) or SIGTERM, and when training diverges to NaN.

The first signal saves a checkpoint at the end of the step, then stops; a second one interrupts at once (a partial
checkpoint is skipped on resume). A non-finite step is never saved, and raises one line saying why (``Trainer``'s
``logging_nan_inf_filter`` hides a NaN loss: the weights and rewards show it).
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


class StopOnSignal(TrainerCallback):
    """A context manager installing the handlers (main thread only) and a callback that turns a received signal into
    ``should_save`` + ``should_training_stop`` at the step's end."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def signal_name(self) -> str | None:
        """``"SIGINT"`` / ``"SIGTERM"`` once received, else ``None``."""
        return signal.Signals(self.signum).name if self.signum is not None else None

    @property
    def exit_code(self) -> int:
        """The shell's exit code for the signal: 128 + its number."""
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
            self._previous = {signum: signal.signal(signum, self._handle) for signum in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from dpo_xpu.distributed import agree_on_signal

        self.signum = agree_on_signal(self.signum)  # several processes: a signal to any rank stops them all here
        if self.signum is not None:
            control.should_save = control.should_training_stop = True


#: The logged values :class:`StopOnDivergence` checks (TRL's names).
WATCHED = tuple("loss grad_norm rewards/chosen rewards/rejected rewards/margins logps/chosen logps/rejected".split())


def weights_finite(model: Any) -> bool:
    """Whether every trainable parameter of ``model`` is finite (one sync per device, not per tensor)."""
    import torch

    flags: dict[Any, list[Any]] = {}
    for param in model.parameters():
        if param.requires_grad:
            flags.setdefault(param.device, []).append(torch.isfinite(param.detach()).all())
    return all(bool(torch.stack(found).all()) for found in flags.values())


def divergence_message(step: int, logs: dict[str, Any], args: Any, weights_ok: bool) -> str:
    """The one line of :class:`~dpo_xpu.errors.TrainingDiverged`: the step, its :data:`WATCHED` values, the likely
    causes and the last good checkpoint."""
    from dpo_xpu.callbacks.checkpoints import newest_complete_step

    values = [f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}" for key, value in logs.items()]
    values += [] if weights_ok else ["trainable weights not finite after the update"]
    lr, beta, bf16 = getattr(args, "learning_rate", None), getattr(args, "beta", None), getattr(args, "bf16", False)
    causes = []
    if isinstance(lr, float) and lr > 1e-3:
        causes.append(f"learning_rate {lr:g} is too high (DPO with LoRA uses about 5e-6 to 5e-4)")
    if isinstance(beta, (int, float)) and beta > 1:
        causes.append(f"beta {beta:g} is large (DPO uses about 0.01 to 0.5)")
    if bf16:
        causes.append("a bf16 overflow (bf16: false computes in float32)")
    if not causes and isinstance(lr, float):
        causes.append(f"learning_rate {lr:g} too high for this model and data")
    kept = newest_complete_step(args.output_dir)
    where = f"the last good checkpoint, checkpoint-{kept}, is kept (--resume continues from it with the same recipe)"
    return (
        f"training diverged at step {step}: {', '.join(values)}. Likely cause: {'; or '.join(causes)}. The diverged "
        f"state was not saved; {where if kept is not None else 'no checkpoint was saved before it'}. Fix: lower "
        "learning_rate (or beta) and start again with --overwrite (overwrite=True)"
    )


class StopOnDivergence(TrainerCallback):
    """Stop at the first non-finite step (weights after the update, or a :data:`WATCHED` value), logged but not
    saved, raising :class:`~dpo_xpu.errors.TrainingDiverged`. Add it after the callbacks that write the step's row."""

    def __init__(self) -> None:
        self.step: int | None = None  # the step whose update made the weights non-finite

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None and not weights_finite(model):
            self.step = state.global_step
            control.should_log = control.should_training_stop = True
            control.should_save = control.should_evaluate = False

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        from dpo_xpu.errors import TrainingDiverged

        logs = {key: v.item() if hasattr(v, "item") else v for key, v in (logs or {}).items() if key in WATCHED}
        if self.step is None and all(math.isfinite(v) for v in logs.values() if isinstance(v, float)):
            return
        raise TrainingDiverged(divergence_message(state.global_step, logs, args, weights_ok=self.step is None))
