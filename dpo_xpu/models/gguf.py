"""GGUF checkpoints (llama.cpp's format) as models: accepted wherever a model is named, converted once and cached.

transformers reads a GGUF file but dequantizes it again at every load (tens of seconds) and marks the model
GGUF-quantized, which ``save_pretrained`` refuses; no library keeps a conversion, hence :func:`gguf_to_folder`. The
folder's :data:`GGUF_MARKER` keeps the file's metadata, so the adapter and the model card carry the file's name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from dpo_xpu.errors import ModelLoadError

logger = logging.getLogger(__name__)

#: The file of a converted folder that records its GGUF file, the file's metadata and the model's name.
GGUF_MARKER = "dpo_xpu_gguf.json"
#: The GGUF metadata keys (``general.<key>``) a model's name is taken from, the first one present.
NAME_KEYS = ("source.huggingface.repository", "name", "basename")


def dtype_kwarg(dtype: Any) -> dict[str, Any]:
    """``dtype=`` for transformers >= 4.56, ``torch_dtype=`` before (the keyword of ``from_pretrained`` and
    ``from_config``, renamed); here, in the leaf of :mod:`dpo_xpu.models`, for this module and the loaders."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def model_cache_dir() -> Path:
    """Where converted models are kept: ``$DPO_XPU_CACHE_DIR/models``, else ``~/.cache/dpo_xpu/models``."""
    from dpo_xpu.files import CACHE_DIR_ENV

    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() / "models" if env else Path.home() / ".cache" / "dpo_xpu" / "models"


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file a local path names: a ``.gguf`` file, or the one of a folder without ``config.json``; else
    ``None``. :class:`ModelLoadError` when such a folder holds several."""
    path = Path(path).expanduser()
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if len(ggufs) > 1:
        raise ModelLoadError(
            f"model folder {path} holds no config.json but several GGUF files ({', '.join(p.name for p in ggufs)}): "
            "give the one to train as model_name_or_path"
        )
    return ggufs[0] if ggufs else None


def _damaged_gguf(gguf_path: Path, exc: BaseException) -> str:
    """Why a GGUF file that fails to parse is refused, with the fix."""
    size = gguf_path.stat().st_size if gguf_path.is_file() else 0
    reason = (str(exc).strip().splitlines() or [""])[0][:160]
    kind = type(exc).__name__ if type(exc).__module__ == "builtins" else f"{type(exc).__module__}.{type(exc).__name__}"
    return (
        f"model {gguf_path} ({size:,} bytes) is a truncated or damaged GGUF file ({kind}: {reason}): "
        "download or copy it again (an interrupted download or copy cuts it short), and check its size or sha256 "
        "against its source"
    )


def _gguf_origin(gguf_path: Path) -> dict[str, Any]:
    """``{"gguf", "name", "metadata"}`` of a GGUF file: its ``general.*`` text and number fields without the prefix
    (none without the ``gguf`` package) and the model's name (:data:`NAME_KEYS`, else the file's stem);
    :class:`ModelLoadError` when the file is truncated or damaged."""
    metadata: dict[str, Any] = {}
    with contextlib.suppress(ImportError):
        from gguf import GGUFReader, GGUFValueType

        skipped = (GGUFValueType.ARRAY, GGUFValueType.BOOL)  # nested arrays, flags
        try:
            fields = GGUFReader(str(gguf_path)).fields
        except Exception as exc:  # noqa: BLE001 - a damaged file fails in the reader's parsing (struct, numpy, ...)
            raise ModelLoadError(_damaged_gguf(gguf_path, exc)) from None
        for key, field in fields.items():
            if key.startswith("general.") and field.types and field.types[-1] not in skipped:
                with contextlib.suppress(UnicodeDecodeError):  # a name that is no UTF-8: left out
                    metadata[key.removeprefix("general.")] = field.contents()
    names = [metadata[key].strip() for key in NAME_KEYS if isinstance(metadata.get(key), str)]
    name = next((name for name in names if name), gguf_path.stem)
    return {"gguf": str(gguf_path.resolve()), "name": name, "metadata": metadata}


def gguf_to_folder(gguf_path: str | Path, cache_dir: str | Path | None = None, dtype: str = "bfloat16") -> Path:
    """Convert a GGUF file once into a Hugging Face folder of ``dtype`` weights, ``<stem>-<sha256[:16]>-<dtype>`` in
    ``cache_dir`` (default :func:`model_cache_dir`), and return it; :class:`ModelLoadError` when it cannot (no gguf
    package, a truncated or damaged file: any failure of a GGUF reader on it, an architecture transformers lacks)."""
    import torch

    from dpo_xpu.files import apply_umask, default_cache_dir, weights_digest

    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise ModelLoadError(f"{gguf_path} does not exist: give the path of a .gguf file")
    cache = Path(cache_dir) if cache_dir is not None else model_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    # remembered: read once per file; by default in the memo the run's fingerprints read too (one hash, not two)
    memo = default_cache_dir() if cache_dir is None else cache
    sha256 = weights_digest(gguf_path, memo_dir=memo).removeprefix("sha256:")
    out = cache / f"{gguf_path.stem}-{sha256[:16]}-{dtype}"
    if model_origin(out) is not None:
        return out
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        raise ModelLoadError(
            f"model {gguf_path} is a GGUF file: reading it needs the gguf package (pip install gguf)"
        ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    marker = {**_gguf_origin(gguf_path), "sha256": sha256, "dtype": dtype}  # parses it all: damage named here
    logger.info("converting %s into a Hugging Face folder in %s, once (later runs read the folder)", gguf_path, out)
    as_dtype = dtype_kwarg(getattr(torch, dtype))
    # transformers >= 5 may keep the weights packed and warns that they compute fastest in float32: they are not
    # computed with here, only copied into the plain model below
    quantizer_log = logging.getLogger("transformers.quantizers.quantizer_gguf")
    level = quantizer_log.level
    quantizer_log.setLevel(logging.ERROR)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, **as_dtype)
    except Exception as exc:  # noqa: BLE001 - transformers' own GGUF reader fails on damage as it parses (struct)
        if not isinstance(exc, (OSError, ValueError, RuntimeError, KeyError)):
            raise ModelLoadError(_damaged_gguf(gguf_path, exc)) from None
        raise ModelLoadError(
            f"model {gguf_path}: transformers cannot read this GGUF file ({type(exc).__name__}: {exc}): give a GGUF "
            "file of an architecture transformers reads (Llama, Mistral, Qwen2, Gemma, Phi-3, ...) or a Hugging Face "
            "model folder"
        ) from None
    finally:
        quantizer_log.setLevel(level)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain tensors
    model = AutoModelForCausalLM.from_config(config, **as_dtype)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / GGUF_MARKER).write_text(json.dumps(marker, indent=1, default=str) + "\n")
    apply_umask(tmp)  # safetensors writes mode 600 whatever the umask
    if model_origin(out) is None:  # another process may have finished the same conversion meanwhile
        shutil.rmtree(out, ignore_errors=True)  # a conversion cut short is redone
        try:
            tmp.rename(out)  # complete folders only
        except OSError:
            if model_origin(out) is None:
                raise
    shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s to %s", gguf_path, out)
    return out


def model_origin(model_name_or_path: str | Path) -> dict[str, Any] | None:
    """``{"name", "gguf", "metadata", ...}`` of a GGUF file, a folder holding one or converted from one; else ``None``.
    Nothing is converted."""
    path = Path(str(model_name_or_path)).expanduser()
    marker = path / GGUF_MARKER
    if marker.is_file() and (path / "config.json").is_file():
        origin = None
        with contextlib.suppress(OSError, ValueError):
            origin = json.loads(marker.read_text(encoding="utf-8"))
        return origin if isinstance(origin, dict) and origin.get("name") else None
    try:
        gguf_path = find_gguf(path) if path.exists() else None
    except ModelLoadError:
        return None
    if gguf_path is None:
        return None
    return _gguf_origin(gguf_path)
