"""Checkpoints a run can resume from, and the checks that make resuming safe.

transformers' ``Trainer`` writes ``checkpoint-N/``; :class:`CheckpointCallback` then adds a ``COMPLETE`` marker,
written last and atomically, listing every file's size and SHA-256. A checkpoint without a valid marker, with a
``trainer_state.json`` that is not JSON, or with a pickle torch refuses to load as plain tensors (a corrupt or hostile
``optimizer.pt``) is skipped with the reason and never loaded. On resume the step logs are trimmed to the checkpoint
and the rows ``metrics.jsonl`` lost are rebuilt from its ``log_history``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from dpo_xpu.callbacks.metrics import EVAL_SAMPLES_FILE, metrics_row
from dpo_xpu.errors import RecipeError, RunFolderError
from dpo_xpu.files import apply_umask, atomic_write_bytes
from dpo_xpu.outputs.fingerprints import check_fingerprints, file_sha256
from dpo_xpu.outputs.plotting import METRICS_FILE
from dpo_xpu.outputs.run_folder import raise_if_disk_full_at_start

logger = logging.getLogger(__name__)

MARKER_FILE = "COMPLETE"
CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
#: Recipe keys that do not change what training computes; they may differ when resuming.
#: Then TRL / transformers options that change where results go (``logging_dir``: transformers < 5).
NON_RESULT_KEYS = tuple(
    "output_dir device reference_device logging_steps save_steps eval_steps eval_samples num_eval_samples "
    "max_new_tokens export report_to run_name logging_dir logging_first_step save_total_limit save_only_model "
    "push_to_hub hub_model_id hub_strategy hub_private_repo dataloader_num_workers dataset_num_proc "
    "disable_tqdm".split()
)
#: A checkpoint's pickled files, which ``Trainer`` loads on resume (all but ``training_args.bin``).
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")


def write_marker(checkpoint: str | Path, step: int) -> None:
    """Write ``checkpoint/COMPLETE``: the step and every file's size and SHA-256."""
    checkpoint = Path(checkpoint)
    files = {
        str(path.relative_to(checkpoint)): {"size": path.stat().st_size, "sha256": file_sha256(path)}
        for path in sorted(checkpoint.rglob("*"))
        if path.is_file() and not path.name.startswith(MARKER_FILE)
    }
    atomic_write_bytes(checkpoint / MARKER_FILE, json.dumps({"step": step, "files": files}, indent=1).encode())


def _unsafe_pickle(path: Path) -> str | None:
    """Why torch refuses to load ``path`` as plain tensors (as ``Trainer`` loads it; memory-mapped where possible)."""
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
    """Why ``checkpoint`` cannot be resumed from, in one line (``None`` when it is complete)."""
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
    state = None
    with contextlib.suppress(ValueError, OSError):
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    if not isinstance(state, dict):
        return "trainer_state.json is not a JSON object (corrupt)"
    for path in sorted(checkpoint.iterdir()):
        if path.suffix in PICKLE_SUFFIXES and path.name != "training_args.bin" and path.is_file():
            why = _unsafe_pickle(path)
            if why is not None:
                return (
                    f"torch refuses to load {path.name} as plain tensors ({why}): it is corrupt or was replaced, "
                    f"and loading it could run code; delete {checkpoint.name}"
                )
    return None


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` folder in ``run_dir``, newest first."""
    matches = ((CHECKPOINT_PATTERN.fullmatch(p.name), p) for p in Path(run_dir).glob("checkpoint-*") if p.is_dir())
    return sorted(((int(match.group(1)), path) for match, path in matches if match), reverse=True)


def find_resume_checkpoint(run_dir: str | Path) -> Path:
    """The newest complete checkpoint in ``run_dir`` (partial ones are logged and skipped); else
    :class:`RunFolderError`."""
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
    """Refuse to resume (:class:`RecipeError` naming each key with both values) when ``recipe`` and the run's
    ``recipe.yaml`` differ on a key not in :data:`NON_RESULT_KEYS`; :class:`RunFolderError` without one."""
    from dpo_xpu.recipes import load_recipe

    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise RunFolderError(f"{path} does not exist: there is no run to resume in {run_dir}; train without --resume")
    saved, given = load_recipe(path).to_dict(), recipe.to_dict()
    differ = [key for key in {**given, **saved} if key not in NON_RESULT_KEYS and given.get(key) != saved.get(key)]
    if differ:
        found = "; ".join(f"{key}: run has {saved.get(key)!r}, recipe has {given.get(key)!r}" for key in differ)
        raise RecipeError(
            f"cannot resume {run_dir}: the recipe differs from the run's {path.name} on keys that change the "
            f"result ({found}). Fix: use the run's values, or start a new run (another output_dir, or --overwrite)"
        )


def prepare_resume(recipe: Any, run_dir: str | Path) -> Path:
    """Check the recipe (:class:`RecipeError`) and the inputs, remove the partial checkpoints after the newest
    complete one, trim the step logs to its step and rebuild lost rows (:func:`trim_step_log`); return it, for
    ``trainer.train(resume_from_checkpoint=)``. :class:`RunFolderError`: nothing to resume, inputs changed, disk full.
    """
    check_resume_recipe(recipe, run_dir)
    check_fingerprints(recipe, run_dir)
    checkpoint = find_resume_checkpoint(run_dir)
    step = int(CHECKPOINT_PATTERN.fullmatch(checkpoint.name).group(1))
    for later, path in list_checkpoints(run_dir):
        if later > step:
            shutil.rmtree(path)  # partial (find_resume_checkpoint picked the newest complete one)
    try:
        trim_step_log(Path(run_dir) / EVAL_SAMPLES_FILE, step)
        restored = trim_step_log(Path(run_dir) / METRICS_FILE, step, checkpoint)
    except OSError as exc:
        raise_if_disk_full_at_start(run_dir, exc, resume=True)
        raise
    if restored:
        steps, source = ", ".join(str(s) for s in sorted(set(restored))), checkpoint / "trainer_state.json"
        logger.warning(f"{METRICS_FILE} had lost the rows of step(s) {steps}: rebuilt them from {source}")
    logger.info("resuming %s from %s (step %d)", run_dir, checkpoint.name, step)  # a normal resume: no warning
    return checkpoint


def newest_complete_step(run_dir: str | Path) -> int | None:
    """The step of the newest complete checkpoint in ``run_dir``, or ``None`` when there is none."""
    return next((step for step, path in list_checkpoints(run_dir) if checkpoint_problem(path) is None), None)


def _row_kind(row: dict[str, Any]) -> tuple[int, int]:
    """``(step, 0)`` for a train row, ``(step, 1)`` for an evaluation row: the order they are written in."""
    return row["step"], 0 if "loss" in row else 1


def trim_step_log(path: Path, step: int, checkpoint: Path | None = None) -> list[int]:
    """Drop a step log's rows after ``step`` and its lines that are not rows (logged); with a complete
    ``checkpoint``, add the rows of its ``log_history`` (:func:`metrics_row`) up to ``step`` that the log lost, in
    step order. Returns the steps of the rows added."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []
    kept, corrupt = [], []
    for line in filter(str.strip, lines):
        row = None
        with contextlib.suppress(ValueError):
            row = json.loads(line)
        if not (isinstance(row, dict) and type(row.get("step")) is int):  # not bool either
            corrupt.append(line)
        elif row["step"] <= step:
            kept.append((_row_kind(row), line))
    if corrupt:
        logger.warning("%s: dropped %d line(s) that are not JSON rows, e.g. %.80r", path, len(corrupt), corrupt[0])
    history = []
    if checkpoint is not None:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        history = [metrics_row(entry) for entry in state.get("log_history", []) if isinstance(entry, dict)]
    present = {kind for kind, _ in kept}
    missing = [row for row in history if row and type(row["step"]) is int and row["step"] <= step]
    missing = [row for row in missing if _row_kind(row) not in present]
    if missing or len(kept) != len(lines):
        kept += [(_row_kind(row), json.dumps(row)) for row in missing]
        kept.sort(key=lambda pair: pair[0])  # stable: rows of the same step and kind keep their order
        atomic_write_bytes(path, "".join(line + "\n" for _, line in kept).encode())
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
    """Keep the trainable parameters (and their optimizer moments) in the dtypes they had when the trainer was
    built: on resume PEFT's ``load_adapter`` upcasts TRL's bfloat16 QLoRA weights to float32, and the resumed run
    would no longer compute what the uninterrupted one did."""

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
