"""Files (a leaf below every step): modes under the user's umask, atomic writes, weight digests, the cache folder.

safetensors writes mode 600 whatever the umask, so :func:`apply_umask` gives a saved folder the umask's mode (no
library offers it); :func:`weights_digest` identifies a model by its weights' sha256, remembered until a file changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

CACHE_DIR_ENV = "DPO_XPU_CACHE_DIR"  # the cache folder (default ~/.cache/dpo_xpu/reference-logps)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SAMPLE_BYTES = 64 * 1024  # of each end of a weight file, hashed into its memo entry
WEIGHTS_MEMO_FILE = "weights-memo.json"

logger = logging.getLogger(__name__)


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back: the only portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: str | Path) -> None:
    """Give every file under ``folder`` (or the one file) the mode ``0o666 & ~umask``, where we may."""
    mode = 0o666 & ~current_umask()
    root = Path(folder)
    for path in [root] if root.is_file() else root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(PermissionError):
                path.chmod(mode)


def default_cache_dir() -> Path:
    """``$DPO_XPU_CACHE_DIR`` if set, else ``~/.cache/dpo_xpu/reference-logps``."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dpo_xpu" / "reference-logps"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and a rename: never a partial file, and a full
    disk leaves the old file whole and no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, value: Any) -> Path:
    """Write ``value`` as indented JSON (UTF-8, a final newline) with :func:`atomic_write_bytes`; return the path."""
    atomic_write_bytes(path, (json.dumps(value, indent=2, default=str, ensure_ascii=False) + "\n").encode())
    return Path(path)


def read_json_report(path: str | Path) -> Any | None:
    """The value of a JSON report dpo_xpu wrote (``evaluation.json``, ``merge_check.json``), ``None`` where there is
    none; a damaged one (not UTF-8 or not JSON: edited by hand, or cut off by a process killed before its writes were
    atomic) is ``None`` too, with a warning naming it, and left as it is."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        logger.warning("%s is damaged (%s): ignored and left as it is; delete it to write a new one", path, exc)
        return None


def _file_signature(path: Path) -> dict[str, Any]:
    """What identifies a file's bytes without reading them all: inode, size, mtime, ctime (changed by a rewrite even
    when ``os.utime`` sets mtime back), and a sha256 of its first and last :data:`SAMPLE_BYTES`."""
    stat = path.stat()
    sample = hashlib.sha256()
    with path.open("rb") as handle:
        sample.update(handle.read(SAMPLE_BYTES))
        if stat.st_size > SAMPLE_BYTES:
            handle.seek(max(SAMPLE_BYTES, stat.st_size - SAMPLE_BYTES))
            sample.update(handle.read(SAMPLE_BYTES))
    times = {"mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}
    return {"inode": stat.st_ino, "size": stat.st_size, **times, "sample": sample.hexdigest()}


def _hash_weight_files(files: list[Path], total: int) -> str:
    """``"sha256:<hex>"`` over each file's name and bytes, in order."""
    from tqdm.auto import tqdm

    h = hashlib.sha256()
    with tqdm(total=total, unit="B", unit_scale=True, desc="Hashing model weights") as bar:
        for p in files:
            h.update(p.name.encode())
            with p.open("rb") as handle:
                while chunk := handle.read(1 << 24):
                    h.update(chunk)
                    bar.update(len(chunk))
    return "sha256:" + h.hexdigest()


def weights_digest(model_name_or_path: str | Path, revision: str | None = None, memo_dir: Path | None = None) -> str:
    """``"sha256:<hex>"`` over a local folder's (or file's) weight files, names and bytes in name order, remembered
    in ``<memo_dir>/weights-memo.json`` until a file's signature changes (14 GB take tens of seconds to read;
    ``memo_dir=None``: not remembered); ``"hub:<id>@<revision>"`` for a hub id. `ValueError` without weight files."""
    path = Path(model_name_or_path).expanduser()
    if not path.exists():
        return f"hub:{model_name_or_path}@{revision or 'unknown'}"
    files = sorted(p for p in (path.iterdir() if path.is_dir() else [path]) if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise ValueError(f"{path} holds no weight file ({', '.join(WEIGHT_SUFFIXES)}): cannot identify the model")
    signature = [[p.name, str(p.resolve()), _file_signature(p)] for p in files]
    memo_file = memo_dir / WEIGHTS_MEMO_FILE if memo_dir is not None else None
    memo: dict[str, Any] = {}
    if memo_file is not None and memo_file.is_file():
        with contextlib.suppress(OSError, ValueError):
            memo = json.loads(memo_file.read_text())
    folder = str(path.resolve())
    entry = memo.get(folder)
    if isinstance(entry, dict) and entry.get("files") == signature and "digest" in entry:
        return str(entry["digest"])
    digest = _hash_weight_files(files, sum(s[2]["size"] for s in signature))
    if memo_file is not None:
        memo[folder] = {"files": signature, "digest": digest}  # one entry per folder: its latest content
        atomic_write_bytes(memo_file, json.dumps(memo, indent=1).encode())
    return digest
