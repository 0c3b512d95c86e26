"""The run folder: one process at a time, nothing a user produced lost or mixed.

A run folder (``recipe.output_dir``) holds one run: its recipe, environment report, data report, fingerprints of
its inputs, ``metrics.jsonl``, checkpoints and adapter. This module decides what counts as a run and guards it:

- **a lock** (:class:`RunLock`): an exclusive ``flock`` on ``<run>/.dpo-xpu.lock``, held while a process uses the
  folder. A second ``train``, ``--resume`` or ``--overwrite`` on it is refused with a line naming the process that
  holds it. The kernel drops the lock when that process ends, however it ends, so a lock left by a dead process is
  taken over (and said so);
- **only a run that trained is a run**: a folder whose earlier start failed before its first step (it holds only
  ``recipe.yaml``, ``environment.json``, ``data_report.json`` or ``fingerprints.json``) is reused as it is;
- **overwrite moves aside**: ``overwrite`` moves the earlier run into ``<run>.previous`` (``.previous-2``, ... when
  taken), never deletes it, and a start that fails before its first step moves it back (:func:`undo_start`);
- **fingerprints** of the inputs (model weights, data files, SFT checkpoint, starting adapter) in
  ``fingerprints.json``, so that ``resume`` refuses data or a model that changed in content, not only in path.

The standard library's ``fcntl.flock`` does the locking; no package does run-folder bookkeeping for TRL, hence
this module. Where ``fcntl`` is missing (Windows), the folder is not locked and a warning says so.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_xpu.errors import RunFolderError

logger = logging.getLogger(__name__)

LOCK_FILE = ".dpo-xpu.lock"
FINGERPRINTS_FILE = "fingerprints.json"
#: What a start writes before the first step; alone, they do not make a run.
START_FILES = ("recipe.yaml", "environment.json", "data_report.json", FINGERPRINTS_FILE)
#: The report of ``export: merged``'s check of the merged logits (:func:`dpo_xpu.pipeline.export_merged`).
MERGE_CHECK_FILE = "merge_check.json"
#: What only training writes; any of them (or a ``checkpoint-N`` folder) means the folder holds a run.
TRAINED_FILES = ("metrics.jsonl", "reward_curves.png", "adapter", "eval_samples.jsonl", "merged", MERGE_CHECK_FILE)


def trained_markers(run_dir: str | Path) -> list[str]:
    """The names in ``run_dir`` that show a run trained there (an empty ``metrics.jsonl`` does not)."""
    run_dir = Path(run_dir)
    found = []
    for name in TRAINED_FILES:
        path = run_dir / name
        if path.is_file() and path.stat().st_size == 0:
            continue
        if path.exists():
            found.append(name)
    found += sorted(p.name for p in run_dir.glob("checkpoint-*") if p.is_dir())
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run folder, held by this process until :meth:`release` or its end.

    Args:
        run_dir: the run folder (created if absent).

    Raises:
        RunFolderError: from :meth:`acquire`, when another process holds the lock (the message names its pid,
            command and start time).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`RunFolderError` naming the process that holds it."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            logger.warning("no fcntl on this platform: %s is not locked against a second process", self.run_dir)
            return self
        previous = self._holder()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = self._holder()
            raise RunFolderError(
                f"{self.run_dir} is in use by process {holder.get('pid', '?')} on {holder.get('host', '?')} "
                f"({holder.get('command', 'unknown command')}, since {holder.get('since', '?')}): wait until it "
                "ends or stop it, or use another output_dir"
            ) from None
        pid = previous.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid):
            logger.warning("taking over the lock of %s left by process %d, no longer running", self.run_dir, pid)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(sys.argv)[:200],
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the lock file stays: deleting it would let two processes lock two files)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # no holder any more: only a process that died leaves its name behind
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None


#: Locks this process holds, by resolved run folder (a notebook's start_run keeps its lock until the kernel ends).
_HELD: dict[Path, RunLock] = {}


def lock_run_dir(run_dir: str | Path) -> RunLock:
    """Lock ``run_dir`` for this process (re-entrant: a folder this process already holds is returned as is).

    Raises:
        RunFolderError: another process holds it.
    """
    key = Path(run_dir).resolve()
    lock = _HELD.get(key)
    if lock is None or not lock.held:
        lock = RunLock(run_dir).acquire()
        _HELD[key] = lock
    return lock


def unlock_run_dir(run_dir: str | Path) -> None:
    """Release this process's lock on ``run_dir``, if it holds one."""
    lock = _HELD.pop(Path(run_dir).resolve(), None)
    if lock is not None:
        lock.release()


def check_writable(run_dir: Path) -> None:
    """Create ``run_dir`` if needed and check that it is a folder this process can write to.

    Raises:
        RunFolderError: it is a file, or it cannot be created or written to (read-only, permissions).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"output_dir {run_dir} is a file, not a folder: choose another output_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".dpo-xpu-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RunFolderError(
            f"cannot write to output_dir {run_dir} ({exc.strerror or exc}): choose a folder you can write to"
        ) from None


def _aside_name(run_dir: Path) -> Path:
    candidate = run_dir.with_name(run_dir.name + ".previous")
    n = 2
    while candidate.exists():
        candidate = run_dir.with_name(f"{run_dir.name}.previous-{n}")
        n += 1
    return candidate


def _is_run_file(name: str) -> bool:
    return name in START_FILES or name in TRAINED_FILES or name.startswith("checkpoint-")


def move_aside(run_dir: Path) -> Path:
    """Move the run's files (those dpo_xpu writes; the user's own files stay) into a new ``<run_dir>.previous``
    folder; return that folder."""
    aside = _aside_name(run_dir)
    aside.mkdir()
    for entry in run_dir.iterdir():
        if _is_run_file(entry.name):
            shutil.move(str(entry), str(aside / entry.name))
    return aside


@dataclass
class StartedRun:
    """What :func:`prepare_run_dir` did to the folder, so that :func:`undo_start` can put it back."""

    run_dir: Path
    moved_to: Path | None = None
    existed_before: set[str] = field(default_factory=set)


def prepare_run_dir(output_dir: str | Path, overwrite: bool = False) -> StartedRun:
    """Lock the run folder and make it ready for a new run.

    A folder holding a run (see :func:`trained_markers`) is refused, or with ``overwrite`` moved aside to
    ``<output_dir>.previous`` (logged). Files of an earlier start that never trained are reused.

    Args:
        output_dir: the run folder.
        overwrite: move an earlier run aside instead of refusing.

    Returns:
        A :class:`StartedRun` (pass it to :func:`undo_start` when the start fails before its first step).

    Raises:
        RunFolderError: the folder holds a run and ``overwrite`` is false; another process holds it; it is a file
            or not writable.
    """
    run_dir = Path(output_dir)
    check_writable(run_dir)
    lock_run_dir(run_dir)
    present = trained_markers(run_dir)
    started = StartedRun(run_dir)
    if present and not overwrite:
        raise RunFolderError(
            f"{run_dir} already holds a run ({', '.join(present)}): choose another output_dir, continue it with "
            "--resume (resume=True), or pass --overwrite (overwrite=True) to move it aside and start again"
        )
    if present:
        started.moved_to = move_aside(run_dir)
        logger.warning("the earlier run in %s was moved to %s", run_dir, started.moved_to)
    leftovers = [name for name in START_FILES if (run_dir / name).exists()]
    if leftovers:
        logger.info("reusing %s: it holds only an earlier start that never trained (%s)", run_dir, ", ".join(leftovers))
    started.existed_before = {p.name for p in run_dir.iterdir()}
    return started


def undo_start(started: StartedRun) -> None:
    """Put the folder back as it was before a start that failed before its first step: remove what the start
    wrote, and move an earlier run that ``overwrite`` moved aside back in place."""
    run_dir = started.run_dir
    for entry in run_dir.iterdir() if run_dir.is_dir() else []:
        if entry.name == LOCK_FILE or entry.name in started.existed_before:
            continue
        if _is_run_file(entry.name):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    if started.moved_to is not None and started.moved_to.is_dir():
        for entry in started.moved_to.iterdir():
            if not (run_dir / entry.name).exists():
                shutil.move(str(entry), str(run_dir / entry.name))
        if not any(started.moved_to.iterdir()):
            started.moved_to.rmdir()
        logger.warning("the start failed before its first step: the earlier run is back in %s", run_dir)


def file_sha256(path: Path) -> str:
    """The SHA-256 hex digest of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    """``"sha256:..."`` of a file, or of a folder's files (their relative names and digests, in name order)."""
    if not path.is_dir():
        return "sha256:" + file_sha256(path)
    lines = [f"{p.relative_to(path)}:{file_sha256(p)}" for p in sorted(path.rglob("*")) if p.is_file()]
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()


def input_fingerprints(recipe: Any) -> dict[str, str]:
    """Content fingerprints of a recipe's local inputs: ``{key: "sha256:..."}``; hub ids as ``"hub:<id>"``.

    The model is identified by its weight files (:func:`dpo_xpu.train.reference_cache.weights_digest`, remembered
    against each file's size and modification time, so a 14 GB model is read once); data files, an SFT checkpoint
    and a starting adapter by all their bytes.
    """
    from dpo_xpu.train.reference_cache import default_cache_dir, weights_digest

    out: dict[str, str] = {}
    model = Path(recipe.model_name_or_path).expanduser()
    if model.exists():
        try:
            out["model_name_or_path"] = weights_digest(model, memo_dir=default_cache_dir())
        except (OSError, ValueError):
            out["model_name_or_path"] = _file_digest(model)
    else:
        out["model_name_or_path"] = f"hub:{recipe.model_name_or_path}"
    sources = list(recipe.dataset_mixture) if recipe.dataset_mixture else [recipe.dataset_name_or_path]
    for source in sources:
        path = Path(source).expanduser()
        out[f"data:{source}"] = _file_digest(path) if path.exists() else f"hub:{source}"
    for key in ("sft_checkpoint", "adapter_name_or_path"):
        value = getattr(recipe, key)
        if value and Path(value).expanduser().exists():
            out[key] = _file_digest(Path(value).expanduser())
    return out


def save_fingerprints(recipe: Any, run_dir: str | Path) -> Path:
    """Write :func:`input_fingerprints` to ``<run_dir>/fingerprints.json``; return the path."""
    path = Path(run_dir) / FINGERPRINTS_FILE
    path.write_text(json.dumps(input_fingerprints(recipe), indent=1) + "\n", encoding="utf-8")
    return path


def check_fingerprints(recipe: Any, run_dir: str | Path) -> None:
    """Refuse to resume when a local input changed in content since the run started.

    A run folder written before fingerprints were kept is resumed with a warning.

    Raises:
        RunFolderError: the model, a data file, the SFT checkpoint or the starting adapter differs; the message
            names each one.
    """
    path = Path(run_dir) / FINGERPRINTS_FILE
    if not path.is_file():
        logger.warning("%s has no %s: cannot check that the data and model are unchanged", run_dir, FINGERPRINTS_FILE)
        return
    saved = json.loads(path.read_text(encoding="utf-8"))
    now = input_fingerprints(recipe)
    changed = [key for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]
    if changed:
        names = ", ".join(key.removeprefix("data:") for key in changed)
        raise RunFolderError(
            f"cannot resume {run_dir}: these inputs changed in content since the run started: {names}. Resuming "
            "would train its remaining steps on other data or another model. Fix: restore them, or start a new run "
            "(another output_dir, or --overwrite)"
        )


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is the device running out of space (``ENOSPC``, also as torch's ``unexpected pos``)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    text = str(exc)
    # torch's zip writer reports a short write as "[enforce fail at inline_container.cc] unexpected pos A vs B"
    return "No space left on device" in text or ("unexpected pos" in text and "inline_container" in text)


def disk_full_message(run_dir: str | Path, exc: BaseException, kept_step: int | None) -> str:
    """One line for a full disk: what was kept (``kept_step``: the newest complete checkpoint) and how to continue."""
    kept = f"the complete checkpoints up to step {kept_step}" if kept_step is not None else "no complete checkpoint yet"
    try:
        free = shutil.disk_usage(run_dir).free // 2**20
    except OSError:
        free = "?"
    return (
        f"no space left on device while writing {run_dir} ({free} MiB free; {type(exc).__name__}: "
        f"{str(exc).splitlines()[0][:120]}). Kept: {kept}, metrics.jsonl. Free some space, then continue with "
        "--resume (resume=True)"
    )
