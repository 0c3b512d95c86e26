"""File modes: files the libraries write with a private mode get the user's umask, as every other file of a run.

safetensors writes ``*.safetensors`` with mode 600 whatever the umask (through a private temporary file), so a
run's adapter, checkpoints and merged model could not be read by the user's group where the rest of the run folder
can. No library offers this; it is one ``chmod`` per file.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back: the only portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: str | Path) -> None:
    """Give every file under ``folder`` (recursively) the mode a new file gets under the process's umask
    (``0o666 & ~umask``), keeping execute bits off. Files that are not ours to change are left as they are.

    Args:
        folder (`str` or `Path`): a folder written by ``save_pretrained`` (or a single file).
    """
    mode = 0o666 & ~current_umask()
    root = Path(folder)
    for path in [root] if root.is_file() else root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                path.chmod(mode)
            except PermissionError:
                pass
