"""Checkpoints a run can resume from, and the checks that make resuming safe.

transformers' ``Trainer`` writes ``<output_dir>/checkpoint-N/`` every ``save_steps`` and at the last step
(``DefaultFlowCallback``, with ``save_strategy: steps``): the LoRA adapter, the optimizer, scheduler and RNG states
and ``trainer_state.json`` (the step, hence the data position it skips to on resume). :class:`CheckpointCallback`
adds a ``COMPLETE`` marker once a checkpoint is written, listing every file with its size and SHA-256, written last
and atomically. A checkpoint without a valid marker (interrupted while saving, or a file changed since), with a
``trainer_state.json`` that is not JSON, or with a pickle torch refuses to load as plain tensors
(``weights_only=True``: a corrupt or hostile ``optimizer.pt``) cannot be resumed from:
:func:`find_resume_checkpoint` skips it, says why, and never loads it.

On resume, ``metrics.jsonl`` is trimmed back to the checkpoint's step, and rows it lost at or before that step (a
line cut off mid-write) are rebuilt from the checkpoint's ``log_history`` (:func:`restore_step_rows`).

    >>> checkpoint = find_resume_checkpoint("runs/dpo")      # newest complete checkpoint-N
    >>> check_resume_recipe(recipe, "runs/dpo")               # refuses a recipe that changes the result
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from dpo_xpu.callbacks.metrics import metrics_row
from dpo_xpu.errors import RecipeError, RunFolderError
from dpo_xpu.files import apply_umask
from dpo_xpu.outputs.plotting import METRICS_FILE
from dpo_xpu.outputs.run_folder import (
    check_fingerprints,
    file_sha256,
    raise_if_disk_full_at_start,
    read_json,
    write_text_atomic,
)

logger = logging.getLogger(__name__)

MARKER_FILE = "COMPLETE"
CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
#: Recipe keys that do not change what training computes; they may differ when resuming.
NON_RESULT_KEYS = (
    *"output_dir device reference_device logging_steps save_steps eval_steps eval_samples num_eval_samples".split(),
    "max_new_tokens",
    "export",
    # TRL / transformers options that change where results go, not what is computed (logging_dir: transformers < 5)
    *"report_to run_name logging_dir logging_first_step save_total_limit save_only_model push_to_hub".split(),
    *"hub_model_id hub_strategy hub_private_repo dataloader_num_workers dataset_num_proc disable_tqdm".split(),
)
#: Files of the run folder holding one JSON row per step, trimmed back to the checkpoint on resume.
STEP_LOGS = ("metrics.jsonl", "eval_samples.jsonl")
#: A checkpoint's pickled files that ``Trainer`` loads on resume (``torch.load(..., weights_only=True)``);
#: ``training_args.bin`` is never loaded.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
NOT_LOADED = ("training_args.bin",)


def write_marker(checkpoint: str | Path, step: int) -> Path:
    """Write ``checkpoint/COMPLETE``, the step and every file's size and SHA-256, atomically; return its path."""
    checkpoint = Path(checkpoint)
    files = {
        str(path.relative_to(checkpoint)): {"size": path.stat().st_size, "sha256": file_sha256(path)}
        for path in sorted(checkpoint.rglob("*"))
        if path.is_file() and not path.name.startswith(MARKER_FILE)
    }
    write_text_atomic(checkpoint / MARKER_FILE, json.dumps({"step": step, "files": files}, indent=1))
    return checkpoint / MARKER_FILE


def unsafe_pickle(path: Path) -> str | None:
    """Why torch refuses to load ``path`` as plain tensors (``weights_only=True``, with the numpy types transformers
    allows for ``rng_state.pth``), in one line; ``None`` when it loads. Tensors are memory-mapped where the file
    allows it, so a large ``optimizer.pt`` is not read into memory."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    try:
        with safe_globals():
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                torch.load(path, map_location="cpu", weights_only=True)  # a legacy (not zip) file cannot be mapped
    except Exception as exc:  # noqa: BLE001 - any failure to load is the answer
        text = " ".join(str(exc).split())
        found = re.search(r"unsupported GLOBAL [\w.]+", text, re.IGNORECASE) or re.search(
            r"WeightsUnpickler error: (.+?)(?: Check the documentation|$)", text
        )
        return found.group(found.lastindex or 0) if found else f"{type(exc).__name__}: {text[:120]}"
    return None


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from, in one line (``None`` when it is complete): see the module."""
    checkpoint = Path(checkpoint)
    marker = checkpoint / MARKER_FILE
    if not marker.is_file():
        return f"no {MARKER_FILE} marker (interrupted while saving)"
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError):
        return f"unreadable {MARKER_FILE} marker"
    if "trainer_state.json" not in files:
        return "no trainer_state.json"
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"] or file_sha256(path) != expected["sha256"]:
            return f"{name} differs from its checksum"
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (ValueError, OSError):
        state = None
    if not isinstance(state, dict):
        return "trainer_state.json is not a JSON object (corrupt)"
    for path in sorted(checkpoint.iterdir()):
        if path.suffix in PICKLE_SUFFIXES and path.name not in NOT_LOADED and path.is_file():
            why = unsafe_pickle(path)
            if why is not None:
                return (
                    f"torch refuses to load {path.name} as plain tensors ({why}): it is corrupt or was replaced, "
                    f"and loading it could run code; delete {checkpoint.name}"
                )
    return None


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` folder in ``run_dir``, newest first."""
    found = []
    for path in Path(run_dir).glob("checkpoint-*"):
        match = CHECKPOINT_PATTERN.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def find_resume_checkpoint(run_dir: str | Path) -> Path:
    """The newest complete checkpoint in ``run_dir``; partial ones are logged and skipped.

    Raises:
        RunFolderError: ``run_dir`` holds no complete checkpoint.
    """
    skipped = []
    for _step, path in list_checkpoints(run_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            for name, why in skipped:
                logger.warning("Skipping checkpoint %s, which cannot be resumed from: %s", name, why)
            return path
        skipped.append((path.name, problem))
    details = "; ".join(f"{name}: {why}" for name, why in skipped) or "no checkpoint-N folder"
    raise RunFolderError(
        f"{run_dir} holds no complete checkpoint to resume from ({details}). Fix: start the run again with "
        "--overwrite (overwrite=True), or resume a run folder that holds one"
    )


def check_resume_recipe(recipe: Any, run_dir: str | Path) -> None:
    """Refuse to resume when ``recipe`` and the run's ``recipe.yaml`` differ on a key not in :data:`NON_RESULT_KEYS`.

    Raises:
        RunFolderError: no ``recipe.yaml`` in ``run_dir`` (nothing to resume).
        RecipeError: the recipes differ; the message names each differing key with both values.
    """
    from dpo_xpu.recipes import load_recipe

    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise RunFolderError(f"{path} does not exist: there is no run to resume in {run_dir}; train without --resume")
    saved, given = load_recipe(path).to_dict(), recipe.to_dict()
    keys = list(given) + [key for key in saved if key not in given]
    differ = [key for key in keys if key not in NON_RESULT_KEYS and given.get(key) != saved.get(key)]
    if differ:
        found = "; ".join(f"{key}: run has {saved.get(key)!r}, recipe has {given.get(key)!r}" for key in differ)
        raise RecipeError(
            f"cannot resume {run_dir}: the recipe differs from the run's {path.name} on keys that change the "
            f"result ({found}). Fix: use the run's values, or start a new run (another output_dir, or --overwrite)"
        )


def prepare_resume(recipe: Any, run_dir: str | Path) -> Path:
    """Check the recipe and the inputs' fingerprints, pick the newest complete checkpoint, remove the partial ones
    after it, trim the :data:`STEP_LOGS` to its step (the resumed run appends the later rows again) and rebuild the
    rows ``metrics.jsonl`` lost before it (:func:`restore_step_rows`).

    Returns:
        The checkpoint to pass to ``trainer.train(resume_from_checkpoint=...)``.

    Raises:
        RunFolderError: no run or no complete checkpoint to resume; inputs changed; a corrupt ``fingerprints.json``;
            a full disk (one line; the logs are rewritten atomically, so they stay whole).
        RecipeError: the recipe differs from the run's on a key that changes the result.
    """
    check_resume_recipe(recipe, run_dir)
    check_fingerprints(recipe, run_dir)
    checkpoint = find_resume_checkpoint(run_dir)
    step = int(CHECKPOINT_PATTERN.fullmatch(checkpoint.name).group(1))
    for later, path in list_checkpoints(run_dir):
        if later > step:
            shutil.rmtree(path)  # partial (find_resume_checkpoint picked the newest complete one)
    try:
        for name in STEP_LOGS:
            trim_step_log(Path(run_dir) / name, step)
        restored = restore_step_rows(Path(run_dir) / METRICS_FILE, checkpoint, step)
    except OSError as exc:
        raise_if_disk_full_at_start(run_dir, exc, resume=True)
        raise
    if restored:
        logger.warning(
            "%s had lost the rows of step(s) %s: rebuilt them from %s",
            METRICS_FILE,
            ", ".join(str(s) for s in sorted(set(restored))),
            checkpoint / "trainer_state.json",
        )
    logger.info("resuming %s from %s (step %d)", run_dir, checkpoint.name, step)  # a normal resume: no warning
    return checkpoint


def newest_complete_step(run_dir: str | Path) -> int | None:
    """The step of the newest complete checkpoint in ``run_dir``, or ``None`` when there is none."""
    return next((step for step, path in list_checkpoints(run_dir) if checkpoint_problem(path) is None), None)


def _step_rows(path: Path) -> list[tuple[str, dict[str, Any] | None]]:
    """Each line of a JSON-lines step log with its row, ``None`` where it is not an object with an integer ``step``."""
    out: list[tuple[str, dict[str, Any] | None]] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        ok = isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool)
        out.append((line, row if ok else None))
    return out


def trim_step_log(path: Path, step: int) -> int:
    """Drop the rows of a JSON-lines file whose ``step`` is after ``step``, and the lines that are not rows (cut off
    mid-write, or corrupt: logged); rewrite it atomically and return how many lines were dropped."""
    if not path.is_file():
        return 0
    lines = _step_rows(path)
    kept = [line + "\n" for line, row in lines if row is not None and row["step"] <= step]
    corrupt = [line for line, row in lines if row is None]
    if corrupt:
        logger.warning("%s: dropped %d line(s) that are not JSON rows, e.g. %.80r", path, len(corrupt), corrupt[0])
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(kept))
    return len(lines) - len(kept)


def _row_kind(row: dict[str, Any]) -> tuple[int, int]:
    """``(step, 0)`` for a train row, ``(step, 1)`` for an evaluation row: the order the callback writes them in."""
    return row["step"], 0 if "loss" in row else 1


def restore_step_rows(path: Path, checkpoint: Path, step: int) -> list[int]:
    """Rebuild the rows ``metrics.jsonl`` lost at or before ``step`` (a line cut off mid-write) from the log history
    of the checkpoint's ``trainer_state.json``, with :func:`~dpo_xpu.callbacks.metrics.metrics_row`; rewrite the file
    in step order, atomically, keeping the rows it holds.

    Returns:
        The steps of the rows rebuilt (empty when none was missing).

    Raises:
        RunFolderError: ``trainer_state.json`` is not valid JSON.
    """
    state = read_json(
        checkpoint / "trainer_state.json",
        f"delete {checkpoint.name} to resume from an older checkpoint, or start again with --overwrite",
    )
    history = state.get("log_history", []) if isinstance(state, dict) else []
    logged = [metrics_row(entry) for entry in history if isinstance(entry, dict)]
    logged = [row for row in logged if row is not None and isinstance(row["step"], int) and row["step"] <= step]
    rows = [row for _, row in _step_rows(path) if row is not None] if path.is_file() else []
    present = {_row_kind(row) for row in rows}
    missing = [row for row in logged if _row_kind(row) not in present]
    if missing:
        merged = sorted(rows + missing, key=_row_kind)  # stable: rows of the same step and kind keep their order
        write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in merged))
    return [row["step"] for row in missing]


class CheckpointCallback(TrainerCallback):
    """Mark each checkpoint complete once ``Trainer`` has written it."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from dpo_xpu.distributed import barrier

        barrier()  # under several processes, every rank has written its part (rng_state_N.pth) before the marker
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir() and state.is_world_process_zero:
            apply_umask(checkpoint)  # safetensors writes mode 600 whatever the umask
            write_marker(checkpoint, state.global_step)


class KeepTrainableDtypes(TrainerCallback):
    """Keep the trainable parameters in the dtypes they had when the trainer was built.

    TRL keeps a quantized model's LoRA weights in bfloat16 (QLoRA), but on resume PEFT's ``load_adapter`` upcasts
    them to float32, and the resumed run would no longer compute what the uninterrupted one did: they (and their
    optimizer moments) are cast back when training begins.

    Args:
        model: the trainer's model, after the trainer was built.
    """

    def __init__(self, model: Any) -> None:
        self.dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        optimizer = kwargs.get("optimizer")
        for name, param in model.named_parameters() if model is not None else ():
            dtype = self.dtypes.get(name)
            if dtype is None or param.dtype == dtype:
                continue
            param.data = param.data.to(dtype)
            # torch's load_state_dict cast the optimizer's moments to the upcast parameter: cast them back too
            moments = optimizer.state.get(param, {}) if optimizer is not None else {}
            for key, value in moments.items():
                if key != "step" and hasattr(value, "is_floating_point") and value.is_floating_point():
                    moments[key] = value.to(dtype)
