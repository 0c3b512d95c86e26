"""A GGUF checkpoint (llama.cpp's format) as a Hugging Face model folder, converted once and cached.

transformers reads a GGUF file (``from_pretrained(folder, gguf_file=name)``, with the ``gguf`` package) and
dequantizes it, but marks the model as GGUF-quantized, which ``save_pretrained`` refuses, and it redoes the
dequantization (tens of seconds) at every load, for the policy and again for a reference. :func:`gguf_to_folder`
dequantizes once into a plain folder (``config.json``, ``model.safetensors``, the tokenizer with its chat
template) that every loader of this package (NF4 included) and any ``from_pretrained`` then read directly. No
library keeps such a conversion, hence this module.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from dpo_xpu.errors import ModelLoadError

logger = logging.getLogger(__name__)


def gguf_to_folder(gguf_path: str | Path, cache_dir: str | Path | None = None, dtype: str = "bfloat16") -> Path:
    """Convert a GGUF file into a Hugging Face folder once, and return the folder.

    Args:
        gguf_path: the ``.gguf`` file.
        cache_dir: where converted folders are kept (one per file content and dtype); default
            ``<dpo_xpu cache>/gguf`` (see :func:`dpo_xpu.train.reference_cache.default_cache_dir`).
        dtype: the weights' dtype in the folder, ``"bfloat16"`` (default; half the size of float32) or ``"float32"``.

    Returns:
        The folder, loadable with ``AutoModelForCausalLM.from_pretrained`` and as ``model_name_or_path``.

    Raises:
        ModelLoadError: the file is missing, the ``gguf`` package is not installed, or transformers cannot read it.
    """
    import torch

    from dpo_xpu.models.base import dtype_kwarg
    from dpo_xpu.outputs.run_folder import file_sha256
    from dpo_xpu.train.reference_cache import default_cache_dir

    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise ModelLoadError(f"{gguf_path} does not exist: give the path of a .gguf file")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "gguf"
    out = cache / f"{gguf_path.stem}-{file_sha256(gguf_path)[:16]}-{dtype}"
    if (out / "config.json").is_file() and (out / "dpo_xpu_gguf.json").is_file():
        return out
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        raise ModelLoadError(f"reading {gguf_path.name} needs the gguf package: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, **dtype_kwarg(torch_dtype)
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"transformers cannot read {gguf_path} ({type(exc).__name__}: {exc})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain tensors
    model = AutoModelForCausalLM.from_config(config, **dtype_kwarg(torch_dtype))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "dpo_xpu_gguf.json").write_text(json.dumps({"gguf": str(gguf_path), "dtype": dtype}) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # complete folders only: a conversion cut short is redone
    logger.info("converted %s to %s", gguf_path, out)
    return out
