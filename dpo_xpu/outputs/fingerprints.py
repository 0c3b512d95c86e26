"""Fingerprints of a run's inputs (``fingerprints.json``), so that ``resume`` refuses data or a model that changed in
content, not only in path."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from dpo_xpu.errors import RunFolderError

logger = logging.getLogger(__name__)

FINGERPRINTS_FILE = "fingerprints.json"


def file_sha256(path: Path) -> str:
    """The SHA-256 hex digest of a file's bytes (``hashlib.file_digest`` needs Python 3.11)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _digest(path: Path) -> str:
    """``"sha256:..."`` of a file, or of a folder's files (their relative names and digests, in name order)."""
    if not path.is_dir():
        return "sha256:" + file_sha256(path)
    lines = [f"{p.relative_to(path)}:{file_sha256(p)}" for p in sorted(path.rglob("*")) if p.is_file()]
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()


def input_fingerprints(recipe: Any) -> dict[str, str]:
    """``{key: "sha256:..."}`` of a recipe's local inputs (the model by :func:`dpo_xpu.files.weights_digest`, the
    rest by all their bytes); hub ids as ``"hub:<id>"``."""
    from dpo_xpu.files import default_cache_dir, weights_digest

    out = {"model_name_or_path": f"hub:{recipe.model_name_or_path}"}
    model = Path(recipe.model_name_or_path).expanduser()
    if model.exists():
        try:
            out["model_name_or_path"] = weights_digest(model, memo_dir=default_cache_dir())
        except (OSError, ValueError):
            out["model_name_or_path"] = _digest(model)
    sources = list(recipe.dataset_mixture) if recipe.dataset_mixture else [recipe.dataset_name_or_path]
    for source in sources:
        path = Path(source).expanduser()
        out[f"data:{source}"] = _digest(path) if path.exists() else f"hub:{source}"
    for key in ("sft_checkpoint", "adapter_name_or_path"):
        value = getattr(recipe, key)
        if value and Path(value).expanduser().exists():
            out[key] = _digest(Path(value).expanduser())
    return out


#: What each step after the start would do with inputs that changed (``check_fingerprints``' ``doing``).
CHANGED_INPUTS_RISK = {
    "resume": "Resuming would train its remaining steps on other data or another model",
    "evaluate": "Its held-out rows would be other rows (some perhaps trained on), or its base another model",
    "export": "The merge would use another base model, checked on other prompts",
}


def check_fingerprints(recipe: Any, run_dir: str | Path, doing: str = "resume") -> None:
    """Refuse to ``doing`` (a key of :data:`CHANGED_INPUTS_RISK`; :class:`RunFolderError` naming each input) when a
    local input changed in content since the run started, or ``fingerprints.json`` is corrupt; without the file, a
    warning."""
    path = Path(run_dir) / FINGERPRINTS_FILE
    if not path.is_file():
        logger.warning("%s has no %s: cannot check that the data and model are unchanged", run_dir, FINGERPRINTS_FILE)
        return
    why = "not a mapping of input names to fingerprints"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        saved, why = None, f"not UTF-8 text (byte {exc.start})"
    except json.JSONDecodeError as exc:
        saved, why = None, f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
    if not isinstance(saved, dict) or not all(isinstance(v, str) for v in saved.values()):
        raise RunFolderError(
            f"{path} is corrupt: {why}. Fix: restore it from a copy, or delete it to {doing} without checking that the "
            "model and data are unchanged (a warning says so), or start a new run (another output_dir, or --overwrite)"
        )
    now = input_fingerprints(recipe)
    changed = [key for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]
    if changed:
        names = ", ".join(key.removeprefix("data:") for key in changed)
        raise RunFolderError(
            f"cannot {doing} {run_dir}: these inputs changed in content since the run started: {names}. "
            f"{CHANGED_INPUTS_RISK[doing]}. Fix: restore them, or start a new run (another output_dir, or --overwrite)"
        )
