"""Trainer callbacks: ``metrics.jsonl`` rows, live reward curves, one line per logged step, policy-vs-reference
samples. Plain ``transformers.TrainerCallback`` subclasses, so they work with TRL 0.11 and TRL 1.x."""

from __future__ import annotations

import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.utils import is_in_notebook

from dpo_xpu.outputs.plotting import CURVES_FILE, METRICS_FILE, plot_reward_curves, read_metrics

logger = logging.getLogger(__name__)

#: The metrics written for each training log, with TRL's names.
TRAIN_KEYS = tuple(
    "loss rewards/chosen rewards/rejected rewards/accuracies rewards/margins logps/chosen logps/rejected "
    "learning_rate grad_norm".split()
)

#: Keys of a ``metrics.jsonl`` row that are not in the trainer's log (the step-0 check's ``step0/*``, the eval rows'
#: drift, the throughput's ``perf/*``, ``elapsed_s``): :class:`MetricsLoggerCallback` also adds them to the trainer's
#: ``log_history``, so that a checkpoint's ``trainer_state.json`` holds every row whole (:func:`metrics_row`).
ROW_EXTRAS = ("step0/", "eval/drift_chosen_logratio", "perf/", "elapsed_s")


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


def metrics_row(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The ``metrics.jsonl`` row of one entry of ``trainer.state.log_history`` (``None`` for the end-of-training
    summary): ``step``, ``epoch``, the :data:`TRAIN_KEYS` logged (or the ``eval_*`` values renamed ``eval/*``), then
    the entry's :data:`ROW_EXTRAS`. The logger and resume's rebuild both use it, so rows have the same keys."""
    row: dict[str, Any] = {"step": entry.get("step"), "epoch": _clean(entry.get("epoch"))}
    if "loss" in entry:
        row.update({key: _clean(entry[key]) for key in TRAIN_KEYS if key in entry})
    elif "eval_loss" in entry:
        row.update({"eval/" + key[5:]: _clean(v) for key, v in entry.items() if key.startswith("eval_")})
    else:
        return None
    return row | {key: v for key, v in entry.items() if key.startswith(ROW_EXTRAS)}  # elapsed_s comes last


class MetricsLoggerCallback(TrainerCallback):
    """Append one JSON line per logging step to ``<run_dir>/metrics.jsonl`` (``run_dir`` created if absent).

    Rows as :func:`metrics_row`, plus ``elapsed_s`` (seconds since training began); evaluation rows also get
    ``eval/drift_chosen_logratio`` = ``eval/rewards/chosen / beta``, the mean ``log pi(y_w|x) - log pi_ref(y_w|x)``
    over the chosen answers (TRL's reward is ``beta`` times it, Rafailov et al. 2023, eq. 5), except for
    ``reference_free`` runs. With ``step0`` (the run's :class:`~dpo_xpu.train.step0.Step0Check`; ``None``: no check)
    the step-1 row gets the step-0 check's keys; with ``meter`` (a :class:`~dpo_xpu.train.throughput.ThroughputMeter`)
    each train row gets the ``perf/*`` throughput since the last one. The log says how long the run will take after
    steps 1 (warm-up included) and 5 (:func:`time_estimate`).
    """

    #: Steps after which the time the run will take is logged (the first includes warm-up; later ones correct it).
    ESTIMATE_AT = (1, 5)

    def __init__(self, run_dir: str | Path, step0: Any = None, meter: Any = None) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._start = time.perf_counter()
        self._first_step = 0
        self.step0 = step0
        self.meter = meter

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Refuse (:class:`RunFolderError`) a ``metrics.jsonl`` holding rows after ``state.global_step``: another
        training's (a second trainer on the same ``output_dir``), which this one's would mix with."""
        from dpo_xpu.errors import RunFolderError

        self._start = time.perf_counter()
        self._first_step = state.global_step
        if self.meter is not None:  # TRL counts num_tokens from 0 in each trainer, a resumed one too
            self.meter.start(state.global_step, 0.0)
        rows = read_metrics(self.path) if self.path.is_file() else []
        steps = [row["step"] for row in rows if isinstance(row, dict) and isinstance(row.get("step"), int)]
        fresh_start_on_rows = state.global_step == 0 and self.path.is_file() and self.path.stat().st_size > 0
        if fresh_start_on_rows or any(step > state.global_step for step in steps):
            raise RunFolderError(
                f"{self.path} already holds the steps of another training (up to step {max(steps, default=0)}): this "
                "one would mix its steps with them. Fix: give this trainer another output_dir, or resume the run "
                "(run_training(recipe, resume=True))"
            )

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Append the step's row (:func:`metrics_row`); its :data:`ROW_EXTRAS` also go to the log history's entry."""
        if not getattr(state, "is_world_process_zero", True):
            return  # under several processes, rank 0 alone writes (its logs are already averaged over the ranks)
        logs = logs if logs is not None else {}
        row = metrics_row({**logs, "step": state.global_step, "epoch": state.epoch})
        if row is None:
            return  # the end-of-training summary (train_runtime, ...) is not a step
        extras: dict[str, Any] = {}
        if "loss" in row:
            if self.step0 is not None and state.global_step == 1:
                extras.update(self.step0(row))
            if self.meter is not None:
                perf = self.meter.values(state.global_step, logs.get("num_tokens"))
                extras.update(perf)
                logs.update(perf)  # for the step line, printed by a callback after this one
            done = state.global_step - self._first_step
            steps_left = getattr(state, "max_steps", 0) - state.global_step
            if done in self.ESTIMATE_AT and steps_left > 0:
                logger.info("%s", time_estimate(done, time.perf_counter() - self._start, steps_left))
        else:
            beta, chosen = getattr(args, "beta", None), row.get("eval/rewards/chosen")
            if beta and isinstance(chosen, (int, float)) and not getattr(args, "reference_free", False):
                extras["eval/drift_chosen_logratio"] = chosen / beta
        extras["elapsed_s"] = round(time.perf_counter() - self._start, 3)
        row.update(extras)
        history = getattr(state, "log_history", None)
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(extras)  # saved with each checkpoint: resume rebuilds rows metrics.jsonl lost from it
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


def time_estimate(steps_done: int, seconds: float, steps_left: int) -> str:
    """One line: how long the steps so far took and how long the rest will take at that pace.

    >>> time_estimate(1, 12.0, 39)
    'step 1 took 12 s (warm-up included): the 39 steps left will take about 8 min'
    """
    per_step = seconds / steps_done
    head = f"{steps_done} steps took {_duration(seconds)} ({per_step:.3g} s a step)"
    if steps_done == 1:
        head = f"step 1 took {_duration(seconds)} (warm-up included)"
    rest = "the last step" if steps_left == 1 else f"the {steps_left} steps left"
    return f"{head}: {rest} will take about {_duration(per_step * steps_left)}"


def step_line(logs: dict[str, Any], state: Any) -> str | None:
    """One line for a logged step, ``"step 5/40  loss 0.6812  accuracy 0.75  margin 0.0310  lr 2.00e-04"``, then
    pairs/s, MFU and peak MiB where logged (evaluation rows start with ``eval``); ``None`` for the summary."""
    prefix = "eval_" if "eval_loss" in logs else ""
    if f"{prefix}loss" not in logs:
        return None
    head = f"eval at step {state.global_step}" if prefix else f"step {state.global_step}/{state.max_steps}"
    parts = [head, f"loss {logs[prefix + 'loss']:.4f}"]
    for key, label, fmt in (
        ("rewards/accuracies", "accuracy", ".2f"),
        ("rewards/margins", "margin", ".4f"),
        ("learning_rate", "lr", ".2e"),
        ("perf/pairs_per_s", "pairs/s", ".3g"),
        ("perf/mfu", "MFU", ".1%"),
        ("perf/peak_memory_mib", "peak MiB", ",.0f"),
    ):
        value = logs.get(prefix + key)
        if isinstance(value, (int, float)):
            parts.append(f"{label} {value:{fmt}}")
    return "  ".join(parts)


class StepLinePrinterCallback(TrainerCallback):
    """One concise line per logged step (:func:`step_line`, rank 0 only), printed: for runs without a progress bar
    (``disable_tqdm``)."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        line = step_line(logs or {}, state) if state.is_world_process_zero else None
        if line is not None:
            self.write(line)

    def write(self, line: str) -> None:
        """Print one step line to stdout."""
        print(line, flush=True)


class StepLineProgressCallback(StepLinePrinterCallback, ProgressCallback):
    """transformers' progress bar, with the step lines written above it in place of the raw dict of every metric;
    ``lines=False`` (notebooks, where the live curves show the values) writes none."""

    def __init__(self, lines: bool = True) -> None:
        super().__init__()
        self.lines = lines

    def write(self, line: str) -> None:
        """Write one step line above the progress bar (nothing with ``lines=False`` or before the bar exists)."""
        if self.lines and self.training_bar is not None:
            self.training_bar.write(line)


def use_step_lines(trainer: Any, notebook: bool) -> None:
    """Replace the trainer's progress callback (a dict of every metric per step, or a notebook table) by
    :class:`StepLineProgressCallback` (in a notebook without lines) or, with ``disable_tqdm``,
    :class:`StepLinePrinterCallback`."""
    from transformers.trainer_callback import PrinterCallback

    progress = (PrinterCallback, ProgressCallback, StepLinePrinterCallback)
    for callback in list(trainer.callback_handler.callbacks):
        if isinstance(callback, progress) or type(callback).__name__ == "NotebookProgressCallback":  # no IPython import
            trainer.remove_callback(callback)
    trainer.add_callback(
        StepLinePrinterCallback() if trainer.args.disable_tqdm else StepLineProgressCallback(lines=not notebook)
    )


class FirstStepCallback(TrainerCallback):
    """Notes when the first optimizer step has ended (``done``): from then on the run folder holds a run."""

    done = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.done = True


class LiveRewardPlotCallback(TrainerCallback):
    """Redraw the reward curves from ``<run_dir>/metrics.jsonl`` at logging steps and save them as
    ``reward_curves.png``; put it after :class:`MetricsLoggerCallback`, which writes the rows.

    With ``display`` (``None``: in a Jupyter kernel, as transformers' ``is_in_notebook`` says) the picture is also
    replaced in place in the cell's output. A redraw takes about half a second, which on a GPU would double a small
    model's run (H200: 0.54x TRL's pairs/s redrawing every step), so a logging step redraws only while redrawing
    stays under ``max_share`` (default 0.05) of the wall time; the first logging step and the end of training always
    redraw.
    """

    def __init__(self, run_dir: str | Path, display: bool | None = None, max_share: float = 0.05) -> None:
        self.run_dir = Path(run_dir)
        self.display = is_in_notebook() if display is None else display
        self.max_share = max_share
        self._handle: Any = None
        self._last_end: float | None = None  # when the last redraw ended
        self._cost = 0.0  # what the last redraw took, seconds
        self.redraws = 0

    def redraw(self) -> Path | None:
        """Draw the curves from ``metrics.jsonl`` now; return the PNG path (``None`` before any row)."""
        rows = read_metrics(self.run_dir) if (self.run_dir / METRICS_FILE).exists() else []
        if not rows:
            return None
        out = self.run_dir / CURVES_FILE
        began = time.perf_counter()
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
        self._last_end = time.perf_counter()
        self._cost = self._last_end - began
        return out

    def _due(self) -> bool:
        """Whether a redraw now keeps redrawing under ``max_share`` of the wall time since the last one."""
        last_end = self._last_end
        return last_end is None or self._cost <= self.max_share * (time.perf_counter() - last_end + self._cost)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if getattr(state, "is_world_process_zero", True) and self._due():
            self.redraw()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if getattr(state, "is_world_process_zero", True):
            self.redraw()


EVAL_SAMPLES_FILE = "eval_samples.jsonl"


class _AdapterView:
    """The policy seen through one named adapter (TRL's frozen ``ref`` copy), for ``generate_samples``."""

    def __init__(self, model: Any, adapter: str) -> None:
        self.model, self.adapter = model, adapter

    def __getattr__(self, name: str) -> Any:  # training, eval, train, parameters: the policy's
        return getattr(self.model, name)

    def generate(self, **kwargs: Any) -> Any:
        from dpo_xpu.train.trl_internals import use_adapter

        with use_adapter(self.model, self.adapter):
            return self.model.generate(**kwargs)


class EvalSamplesCallback(TrainerCallback):
    """At each evaluation, greedy answers (at most ``max_new_tokens`` each) of the policy and of the reference to the
    ChatML ``prompts`` (e.g. the first ``num_eval_samples`` of the eval split), by
    :func:`dpo_xpu.eval.heldout.generate_samples`, appended to ``<run_dir>/eval_samples.jsonl``, one
    ``{"step", "prompt", "policy", "reference"}`` line per prompt. The reference is the separate ``reference`` model
    when given, else TRL's frozen ``ref`` adapter when the policy has one, else the policy with its adapters off."""

    def __init__(
        self, run_dir: str | Path, tokenizer: Any, prompts: list[str], max_new_tokens: int = 64, reference: Any = None
    ) -> None:
        self.path = Path(run_dir) / EVAL_SAMPLES_FILE
        self.tokenizer, self.prompts, self.reference = tokenizer, prompts, reference
        self.max_new_tokens = max_new_tokens

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        from dpo_xpu.eval.heldout import generate_samples

        if model is None or not self.prompts or not state.is_world_process_zero:
            return
        reference = self.reference
        if reference is None and "ref" in getattr(model, "peft_config", {}):
            reference = _AdapterView(model, "ref")
        samples = generate_samples(model, self.tokenizer, self.prompts, self.max_new_tokens, reference=reference)
        with self.path.open("a", encoding="utf-8") as handle:
            for sample in samples:
                handle.write(json.dumps({"step": state.global_step, **sample}, ensure_ascii=False) + "\n")
        logger.info("Wrote %d policy/reference samples at step %d to %s", len(samples), state.global_step, self.path)
