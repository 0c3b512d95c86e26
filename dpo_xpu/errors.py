"""Errors a user can cause, each saying what was wrong and how to fix it: one line on the CLI (exit 2) and notebook."""

from __future__ import annotations


class DpoXpuError(Exception):
    """Base class for errors caused by user input or the machine's set-up (not by a bug); IPython shows it as one
    line through ``_render_traceback_``."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class PreferenceDataError(DpoXpuError, ValueError):
    """A preference data set is malformed: the message names the row, the column and the fix."""


class DeviceNotAvailableError(DpoXpuError, RuntimeError):
    """The requested device (``xpu``, ``cuda``) is not visible to PyTorch: the message says how to fix it."""


class RecipeError(DpoXpuError, ValueError):
    """A recipe has an unknown key, a bad value, or a value the installed TRL cannot honour."""


class ModelLoadError(DpoXpuError, OSError):
    """A model or tokenizer path does not exist or cannot be loaded."""


class RunFolderError(DpoXpuError, FileExistsError):
    """A run folder already holds a run and would be overwritten."""


class TrainingInterrupted(DpoXpuError):
    """Training stopped on SIGINT or SIGTERM after saving a checkpoint; ``exit_code`` is the shell's (130, 143)."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TrainingDiverged(DpoXpuError, FloatingPointError):
    """Training stopped at the first non-finite loss or weight: the message names the step, the values, the likely
    cause and the last good checkpoint."""
