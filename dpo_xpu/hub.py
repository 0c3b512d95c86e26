"""Whether a Hugging Face Hub id can be loaded here, decided at once instead of after the hub client's retries
(over a minute without network). ``HF_HUB_OFFLINE`` is read at each call (huggingface_hub's constant is fixed at its
import, before a notebook may set it); the probe (one TCP connection) is ours: the library has none without retries.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from dpo_xpu.errors import DpoXpuError

PROBE_TIMEOUT_S = 3.0


@functools.lru_cache(maxsize=8)
def _probe(host: str, port: int) -> str | None:
    """Connect once per process to the hub's host."""
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"the hub ({host}) cannot be reached ({type(exc).__name__}: {exc})"
    return None


def hub_unreachable_reason() -> str | None:
    """Why the Hugging Face Hub cannot be reached from here, or ``None``."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "the hub is switched off here (HF_HUB_OFFLINE=1)"
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    return _probe(url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80))


def check_hub_id(repo_id: str, repo_type: str, error: type[DpoXpuError], key: str) -> None:
    """Raise ``error`` (naming the recipe ``key`` and how to pass a local path instead) when the hub id ``repo_id``
    (``repo_type`` ``"model"`` or ``"dataset"``) is neither in the cache nor reachable."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    snapshots = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type) / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return
    reason = hub_unreachable_reason()
    if reason is None:
        return
    what = "folder (with config.json and the weights)" if repo_type == "model" else ".jsonl/.json/.parquet file"
    download = f"hf download {'--repo-type dataset ' if repo_type == 'dataset' else ''}{repo_id}"  # huggingface_hub CLI
    raise error(
        f"{key}: {repo_id!r} is a hub id, {reason}, and it is not in the local cache. Fix: give a local {what} "
        f"as {key}, or download it on a machine that reaches the hub ({download} --local-dir DIR) and give DIR"
    )
