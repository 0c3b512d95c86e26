"""Trainer callbacks: ``metrics.jsonl`` at every logging step, and reward curves redrawn live.

Both are plain ``transformers.TrainerCallback`` subclasses, so they work with TRL 0.11 and TRL 1.x.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from dpo_xpu.plotting import CURVES_FILE, METRICS_FILE, plot_reward_curves, read_metrics

logger = logging.getLogger(__name__)

#: The metrics written for each training log, with TRL's names.
TRAIN_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "learning_rate",
    "grad_norm",
)


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class MetricsLoggerCallback(TrainerCallback):
    """Append one JSON line per logging step to ``<run_dir>/metrics.jsonl``.

    Train rows hold ``step``, ``epoch``, ``elapsed_s`` (seconds since training began) and the
    :data:`TRAIN_KEYS` the trainer logged. Evaluation rows hold the trainer's ``eval_*`` values renamed
    ``eval/*`` (``eval_rewards/margins`` -> ``eval/rewards/margins``).

    Args:
        run_dir: the run folder; created if absent.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._start = time.perf_counter()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        row: dict[str, Any] = {"step": state.global_step, "epoch": _clean(state.epoch)}
        if "loss" in logs:
            row.update({key: _clean(logs[key]) for key in TRAIN_KEYS if key in logs})
        elif "eval_loss" in logs:
            row.update({"eval/" + key[5:]: _clean(v) for key, v in logs.items() if key.startswith("eval_")})
        else:
            return  # the end-of-training summary (train_runtime, ...) is not a step
        row["elapsed_s"] = round(time.perf_counter() - self._start, 3)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def _live_display_available() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class LiveRewardPlotCallback(TrainerCallback):
    """Redraw the reward curves at each logging step and save them as ``reward_curves.png``.

    In a Jupyter kernel the picture is updated in place in the cell's output (one display, replaced at
    each redraw); elsewhere (scripts, CI) only the PNG is written. Reads the rows that
    :class:`MetricsLoggerCallback` wrote, so put this callback after it.

    Args:
        run_dir: the run folder holding ``metrics.jsonl``.
        every: redraw every this many logging events (default 1).
        display: ``None`` detects a Jupyter kernel; ``True``/``False`` forces it.
    """

    def __init__(self, run_dir: str | Path, every: int = 1, display: bool | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.every = max(1, every)
        self.display = _live_display_available() if display is None else display
        self._handle: Any = None
        self._events = 0
        self.redraws = 0

    def redraw(self) -> Path | None:
        """Draw the curves from ``metrics.jsonl`` now; return the PNG path (``None`` before any row)."""
        metrics_path = self.run_dir / METRICS_FILE
        if not metrics_path.exists():
            return None
        rows = read_metrics(metrics_path)
        if not rows:
            return None
        out = self.run_dir / CURVES_FILE
        fig = plot_reward_curves(rows, out_path=out)
        self.redraws += 1
        if self.display:
            from IPython.display import Image, display

            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=80)
            image = Image(data=buffer.getvalue(), format="png")
            if self._handle is None:
                self._handle = display(image, display_id=True)
            else:
                self._handle.update(image)
        return out

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self._events += 1
        if self._events % self.every == 0:
            self.redraw()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.redraw()
