"""Whether a Hugging Face Hub id can be loaded here, decided at once instead of after the hub client's retries.

With no network, ``from_pretrained("org/name")`` and ``load_dataset("org/name")`` retry for over a minute, then
raise a traceback. :func:`check_hub_id` answers in well under a second: the id is in the hub cache (its folder,
named by huggingface_hub's ``repo_folder_name``, holds a snapshot), or the hub is switched off or cannot be
reached, and then one line says how to pass a local file or folder instead. ``HF_HUB_OFFLINE`` is read at each
call (huggingface_hub's constant is fixed when it is imported, before a notebook may set it); the reachability
probe (one TCP connection, 3 s at most) is ours, as the library has none that does not retry.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from dpo_xpu.errors import DpoXpuError

#: Seconds the reachability probe waits for the hub's host.
PROBE_TIMEOUT_S = 3.0


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _cached(repo_id: str, repo_type: str) -> bool:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    snapshots = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type) / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


@functools.lru_cache(maxsize=8)
def _probe(host: str, port: int) -> str | None:
    """Connect once per process to the hub's host (a run resolves its model several times)."""
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"the hub ({host}) cannot be reached ({type(exc).__name__}: {exc})"
    return None


def hub_unreachable_reason() -> str | None:
    """Why the Hugging Face Hub cannot be reached from here, or ``None`` when its host accepts a connection (the
    probe's answer is kept for the process)."""
    if _offline():
        return "the hub is switched off here (HF_HUB_OFFLINE=1)"
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    return _probe(url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80))


def check_hub_id(repo_id: str, repo_type: str, error: type[DpoXpuError], key: str) -> None:
    """Raise ``error`` at once when the hub id ``repo_id`` can neither come from the cache nor from the hub.

    Args:
        repo_id: the id, ``name`` or ``org/name``.
        repo_type: ``"model"`` or ``"dataset"``.
        error: the error class to raise (``ModelLoadError``, ``PreferenceDataError``).
        key: the recipe key that named it (``model_name_or_path``, ``dataset_name_or_path``), quoted in the message.

    Raises:
        error: the id is not cached and the hub is off or unreachable; the message says how to pass a local path.
    """
    if _cached(repo_id, repo_type):
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
