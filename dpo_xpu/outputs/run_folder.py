"""The run folder (``recipe.output_dir``): one run, one process at a time, nothing a user produced lost or mixed.

A lock (``fcntl.flock``, dropped by the kernel when its process ends; none on Windows, with a warning); a folder of
the user's files is refused; ``overwrite`` moves the earlier run aside, and back when the start fails; a full disk
is one line saying what was kept. No package does run-folder bookkeeping for TRL, hence this module.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_xpu.errors import RunFolderError
from dpo_xpu.files import write_json
from dpo_xpu.outputs.fingerprints import FINGERPRINTS_FILE, input_fingerprints

if TYPE_CHECKING:
    from collections.abc import Callable

logger = logging.getLogger(__name__)

LOCK_FILE = ".dpo-xpu.lock"
#: What a start writes before the first step; alone, they do not make a run.
START_FILES = ("recipe.yaml", "environment.json", "data_report.json", FINGERPRINTS_FILE)
MERGE_CHECK_FILE = "merge_check.json"  # The report of ``export: merged``'s check of the merged logits.
#: What only training writes; any of them (or a ``checkpoint-N`` folder) means the folder holds a run.
TRAINED_FILES = ("metrics.jsonl", "reward_curves.png", "adapter", "eval_samples.jsonl", "merged", MERGE_CHECK_FILE)
#: What a run writes after training: the model card, and notebook 4's evaluation; moved aside with the run.
REPORT_FILES = ("README.md", "evaluation.json", "samples.jsonl")
#: Files only dpo_xpu writes: a folder holding one (or a checkpoint's ``COMPLETE`` marker) is a dpo_xpu run folder.
OWN_MARKERS = (LOCK_FILE, FINGERPRINTS_FILE)
#: What ``scripts/run_notebooks.py`` writes in the run folder before notebook 3 starts the run (the executed notebooks).
NOTEBOOKS_DIR = "notebooks"


def refuse_foreign(run_dir: str | Path) -> None:
    """Raise :class:`RunFolderError`, naming them, when ``run_dir`` holds files dpo_xpu did not write (hidden files
    and executed notebooks aside), unless it holds one of :data:`OWN_MARKERS` or a ``checkpoint-N/COMPLETE``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    if any((run_dir / name).exists() for name in OWN_MARKERS) or any(run_dir.glob("checkpoint-*/COMPLETE")):
        return
    foreign = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".") and p.name != NOTEBOOKS_DIR)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RunFolderError(
            f"{run_dir} is not a dpo_xpu run folder: it holds files dpo_xpu did not write ({shown}), which a run would "
            f"replace (its recipe.yaml, README.md) or mix with, and --overwrite moves only a dpo_xpu run. Fix: choose "
            "another output_dir (a new or empty folder); nothing was changed in this one"
        )


#: The lock file descriptors this process holds, by resolved run folder (a notebook keeps its lock until the kernel
#: ends; closing the descriptor drops the ``flock``).
_HELD: dict[Path, int] = {}


def _holder(path: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    return {}


def lock_run_dir(run_dir: str | Path) -> None:
    """Lock ``run_dir`` for this process (re-entrant) until :func:`unlock_run_dir` or the process's end;
    :class:`RunFolderError` naming the process that holds it, or when it is not a dpo_xpu run folder (no lock file is
    written among the user's files)."""
    run_dir = Path(run_dir)
    if run_dir.resolve() in _HELD:
        return
    refuse_foreign(run_dir)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        logger.warning("no fcntl on this platform: %s is not locked against a second process", run_dir)
        return
    path = run_dir / LOCK_FILE
    previous = _holder(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise_if_disk_full_at_start(run_dir, exc)
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        holder = _holder(path)
        raise RunFolderError(
            f"{run_dir} is in use by process {holder.get('pid', '?')} on {holder.get('host', '?')} "
            f"({holder.get('command', 'unknown command')}, since {holder.get('since', '?')}): wait until it "
            "ends or stop it, or use another output_dir"
        ) from None
    pid = previous.get("pid")
    if isinstance(pid, int) and pid != os.getpid():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            logger.warning("taking over the lock of %s left by process %d, no longer running", run_dir, pid)
        except PermissionError:  # alive, another user's
            pass
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:200]}
    info["since"] = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
    except OSError as exc:
        os.close(fd)  # drops the lock again
        raise_if_disk_full_at_start(run_dir, exc, writing=path)
        raise
    _HELD[run_dir.resolve()] = fd


def unlock_run_dir(run_dir: str | Path) -> None:
    """Release this process's lock on ``run_dir``, if it holds one (the lock file stays: deleting it would let two
    processes lock two files)."""
    fd = _HELD.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.ftruncate(fd, 0)  # no holder any more: only a process that died leaves its name behind
        os.close(fd)


def aside_name(run_dir: str | Path) -> Path:
    """The first free name of ``<run_dir>.previous``, ``.previous-2``, ..."""
    run_dir = Path(run_dir)
    names = (run_dir.name + ".previous" + (f"-{n}" if n > 1 else "") for n in itertools.count(1))
    return next(run_dir.with_name(name) for name in names if not os.path.lexists(run_dir.with_name(name)))


def _is_run_file(name: str) -> bool:
    return name in START_FILES or name in TRAINED_FILES or name in REPORT_FILES or name.startswith("checkpoint-")


def move_aside(run_dir: Path) -> Path:
    """Move the run's files (not the user's, nor the executed notebooks) into a new :func:`aside_name` folder."""
    aside = aside_name(run_dir)
    aside.mkdir()  # raises rather than reuse a folder another process created meanwhile
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
    """Lock the run folder and ready it for a new run: a run there is refused (:class:`RunFolderError`, as are a
    folder of the user's files, held, a file, not writable or on a full disk) or with ``overwrite`` moved aside; a
    start that never trained is reused. Returns a :class:`StartedRun` for :func:`undo_start`."""
    run_dir = Path(output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"output_dir {run_dir} is a file, not a folder: choose another output_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".dpo-xpu-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise_if_disk_full_at_start(run_dir, exc)
        raise RunFolderError(
            f"cannot write to output_dir {run_dir} ({exc.strerror or exc}): choose a folder you can write to"
        ) from None
    lock_run_dir(run_dir)  # refuses a folder of the user's before anything is written or moved
    trained = [run_dir / name for name in TRAINED_FILES]  # a run trained there; an empty metrics.jsonl does not count
    present = [path.name for path in trained if path.is_dir() or (path.is_file() and path.stat().st_size)]
    present += sorted(p.name for p in run_dir.glob("checkpoint-*") if p.is_dir())
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
    """Undo a start that failed before its first step: remove what it wrote, move an earlier run back."""
    run_dir = started.run_dir
    for entry in run_dir.iterdir() if run_dir.is_dir() else []:
        if _is_run_file(entry.name) and entry.name not in started.existed_before:  # never the lock file
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    if started.moved_to is not None and started.moved_to.is_dir():
        for entry in started.moved_to.iterdir():
            if not (run_dir / entry.name).exists():
                shutil.move(str(entry), str(run_dir / entry.name))
        if not any(started.moved_to.iterdir()):
            started.moved_to.rmdir()
        logger.warning("the start failed before its first step: the earlier run is back in %s", run_dir)


def start_run_folder(
    recipe: Any, environment: Callable[[], Any], overwrite: bool = False, resume: bool = False
) -> tuple[StartedRun, Any]:
    """Lock and prepare the run folder (with ``resume``, lock it only) and write the start's files: ``recipe.yaml``
    and ``fingerprints.json`` for a new run, ``environment.json`` (``environment().to_dict()``); when they fail, a new
    start is undone, and a full disk is one :class:`RunFolderError`. Returns what the start did and the report."""
    run_dir = Path(recipe.output_dir)
    if resume:
        lock_run_dir(run_dir)
    started = StartedRun(run_dir) if resume else prepare_run_dir(run_dir, overwrite=overwrite)
    try:
        if not resume:
            recipe.save(run_dir / "recipe.yaml")
            write_json(run_dir / FINGERPRINTS_FILE, input_fingerprints(recipe))
        report = environment()
        write_json(run_dir / "environment.json", report.to_dict())
    except BaseException as exc:
        if not resume:
            undo_start(started)  # a resume's folder is left as it is
        raise_if_disk_full_at_start(run_dir, exc, resume=resume)
        raise
    return started, report


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is the device running out of space (``ENOSPC``, or torch's zip writer's short write)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    text = str(exc)
    return "No space left on device" in text or ("unexpected pos" in text and "inline_container" in text)


def _space_note(run_dir: str | Path, exc: BaseException) -> str:
    """``"<free> MiB free; <the exception's first line>"``, for a full disk's message."""
    path, free = Path(run_dir), "?"
    while not path.exists() and path != path.parent:
        path = path.parent
    with contextlib.suppress(OSError):
        free = str(shutil.disk_usage(path).free // 2**20)
    return f"{free} MiB free; {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"


def disk_full_message(run_dir: str | Path, exc: BaseException, kept_step: int | None) -> str:
    """One line for a full disk: what was kept (``kept_step``: the newest complete checkpoint) and how to continue."""
    kept = f"the complete checkpoints up to step {kept_step}" if kept_step is not None else "no complete checkpoint yet"
    return (
        f"no space left on device while writing {run_dir} ({_space_note(run_dir, exc)}). Kept: {kept}, metrics.jsonl. "
        "Free some space, then continue with --resume (resume=True)"
    )


def raise_if_disk_full_at_start(
    run_dir: str | Path, exc: BaseException, writing: str | Path | None = None, resume: bool = False
) -> None:
    """In place of a full-disk ``exc`` before the first step, one :class:`RunFolderError`: what was being written
    (default the exception's file, else the folder), that nothing changed, and the fix."""
    if not (isinstance(exc, Exception) and disk_full(exc)):
        return
    writing = writing or getattr(exc, "filename", None) or run_dir
    again = "resume again (--resume)" if resume else "start again"
    kept = "the run is as it was" if resume else "nothing was trained and the folder is as it was"
    raise RunFolderError(
        f"no space left on device while writing {writing} before the first step ({_space_note(run_dir, exc)}): "
        f"{kept}. Fix: free some space on that disk (or choose an output_dir on another disk), then {again}"
    ) from None
