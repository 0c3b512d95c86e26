"""What the model loaders and both backends share: LoRA settings, the model path, ``from_pretrained`` with one-line
errors. transformers raises a damaged file, a folder that is no model, a model needing its own code, a pickle that
could run code or an unknown model type as a traceback of its own wording: :func:`loading` makes each one
:class:`ModelLoadError` line naming the file and the fix, and lets anything else (a bug) through.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_xpu.errors import ModelLoadError
from dpo_xpu.models.gguf import dtype_kwarg, find_gguf, gguf_to_folder, model_origin  # noqa: F401 - re-exported
from dpo_xpu.recipes import DEFAULT_LORA_TARGETS

#: The files of a folder holding only a tokenizer (one of them is enough).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
#: The files of a model folder that transformers reads and that :func:`resolve_model_path` checks before any load.
_CHECKED_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "*.safetensors")
_REDOWNLOAD = "it is damaged or was cut short (an interrupted download or copy): download or copy it again"


@dataclass
class LoraSettings:
    """LoRA adapter settings (Hu et al. 2021): the update ``B @ A`` (``B``: out x ``r``, ``A``: ``r`` x in) is scaled
    by ``alpha / r``; ``dropout`` on the adapter input; ``target_modules``: layer names (names the model lacks are
    skipped) or PEFT's ``"all-linear"``. Defaults: the original recipe's."""

    r: int = 16
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))

    def peft_config(self, target_modules: list[str] | str | None = None) -> Any:
        """PEFT's ``LoraConfig`` of these settings for a causal LM (no bias), on ``target_modules`` if given."""
        from peft import LoraConfig

        targets = target_modules or self.target_modules
        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets, task_type="CAUSAL_LM"
        )


def resolve_model_path(model_name_or_path: str | Path, check_hub: bool = True, tokenizer_only: bool = False) -> str:
    """A local model folder as an absolute path, checked (``config.json``, or with ``tokenizer_only`` a tokenizer;
    readable files; a model type transformers ships); a GGUF file as its converted folder; a hub id (``name`` or
    ``org/name``, ``org`` no local folder) unchanged, refused at once when neither cached nor reachable
    (``check_hub``). Else one :class:`ModelLoadError` line naming the file and the fix."""
    text = str(model_name_or_path)
    path = Path(text).expanduser()
    gguf = find_gguf(path) if path.exists() else None
    if gguf is not None:
        return str(gguf_to_folder(gguf))
    if path.exists():
        _check_local(path.resolve(), tokenizer_only)
        return str(path.resolve())
    parent_is_local = text.count("/") == 1 and Path(text.split("/", 1)[0]).expanduser().is_dir()
    looks_local = text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text or parent_is_local
    if looks_local:
        hint = f" (for the demo model: make demo, or dpo-xpu demo-model {text})" if "demo-model" in text else ""
        hint = " (for the demo's SmolLM2: make demo)" if "demo-smollm2" in text else hint
        raise ModelLoadError(
            f"model folder {text} does not exist (looked in {path.resolve()}){hint}: give an existing local folder "
            "(with config.json and the weights) or a hub id such as 'teknium/OpenHermes-2.5-Mistral-7B'"
        )
    if check_hub:
        from dpo_xpu.hub import check_hub_id

        check_hub_id(text, "model", ModelLoadError, "model_name_or_path")
    return text


def _check_local(path: Path, tokenizer_only: bool) -> None:
    """Refuse an existing ``path`` that is no model folder (or no tokenizer's) that loads."""
    if path.is_file():
        raise ModelLoadError(f"model {path} is a file, not a model folder: give the folder that holds its config.json")
    if (path / "config.json").is_file() and not tokenizer_only:
        _check_model_folder(path)
        return
    if (path / "config.json").is_file() or (tokenizer_only and any((path / f).is_file() for f in TOKENIZER_FILES)):
        return
    held = sorted(p.name for p in path.iterdir())
    listing = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "") if held else "nothing"
    wanted = "neither a tokenizer (tokenizer_config.json, tokenizer.json) nor" if tokenizer_only else "no"
    raise ModelLoadError(
        f"model folder {path} holds {wanted} config.json (it holds {listing}): give a Hugging Face model folder "
        "(config.json, the weights and the tokenizer files, as save_pretrained or hf download writes them), "
        "or a GGUF file"
    )


def _check_model_folder(folder: Path) -> None:
    """Refuse a model folder whose files transformers reads are damaged, or whose model type transformers lacks."""
    from transformers import CONFIG_MAPPING

    damaged = _unreadable_files(folder, _CHECKED_FILES)
    if damaged:
        raise ModelLoadError(f"model {folder}: {_damaged(damaged)}")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ModelLoadError(f"model {folder}: config.json holds no JSON object: {_REDOWNLOAD}")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type in CONFIG_MAPPING:
        return  # a known type: transformers' own code builds it (it ignores auto_map then); none: see _load_failure
    entries = ", ".join(f"{key} -> {value}" for key, value in (config.get("auto_map") or {}).items())
    raise ModelLoadError(
        f"model {folder}: {_unsupported(None if entries else model_type, f'config.json auto_map: {entries}')}"
    )


def _unsupported(model_type: str | None, custom_code: str = "") -> str:
    """Why a model transformers does not build is refused: it names ``model_type``, else needs ``custom_code``."""
    import transformers

    version = transformers.__version__
    shipped = f"use a model whose architecture transformers {version} ships (Llama, Qwen2, Mistral, Gemma, Phi-3, ...)"
    if model_type is not None:
        return (
            f"config.json names the model type {model_type!r}, which transformers {version} does not know: if the "
            f"model is newer than it, upgrade transformers (pip install -U transformers); else {shipped}"
        )
    return (
        f"it needs its own Python code ({custom_code}), which dpo_xpu never runs (trust_remote_code: the code would "
        f"run with your rights on this machine): {shipped}"
    )


def _unreadable_files(path: Path, patterns: tuple[str, ...] = ("*.json", "*.safetensors")) -> dict[str, str]:
    """name -> why, for the files of ``path`` (or matching ``patterns`` in it) that are no valid JSON/safetensors."""
    from safetensors import SafetensorError, safe_open

    files = [path] if path.is_file() else sorted({f for pattern in patterns for f in path.glob(pattern) if f.is_file()})
    unreadable = {}
    for file in files:
        try:
            if file.suffix == ".json":
                json.loads(file.read_text(encoding="utf-8"))
            elif file.suffix == ".safetensors":
                with safe_open(file, "pt"):
                    pass
        except (UnicodeDecodeError, json.JSONDecodeError, SafetensorError) as exc:
            unreadable[file.name] = _first_line(exc)
    return unreadable


def _damaged(files: dict[str, str]) -> str:
    return f"{', '.join(files)} cannot be read ({'; '.join(files.values())}): {_REDOWNLOAD}"


def _first_line(exc: BaseException) -> str:
    """``"Type: first sentence"`` of an exception (at most 200 characters)."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {re.split(r'(?<=[.])[ ]', text.splitlines()[0])[0][:200]}"


#: Pickled checkpoints (read with torch.load), as opposed to safetensors and JSON files.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _load_failure(exc: BaseException, path: Path) -> str | None:
    """What a user's file did wrong to raise ``exc`` while loading ``path``, with the fix; ``None`` if unknown."""
    from safetensors import SafetensorError

    text = str(exc)
    if path.is_file():
        pickled = "the file"
    else:
        names = [p.name for p in sorted(path.glob("*")) if p.suffix in _PICKLE_SUFFIXES] if path.is_dir() else []
        pickled = ", ".join(names) or f"a pickled file of {path}"
    if isinstance(exc, pickle.UnpicklingError) and "weights only load failed" in text.lower():
        named = re.search(r"GLOBAL ([\w.]+)", text)
        what = f"names {named.group(1)}" if named else "holds Python objects besides tensors"
        return (
            f"{pickled} is refused: it is a pickle that {what}, which PyTorch's weights-only loading refuses (loading "
            "it fully could run code on this machine): use safetensors weights instead, or a file of tensors only "
            "(torch.save(model.state_dict(), ...)) from a source you trust"
        )
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    innermost = tb.tb_frame.f_code.co_filename if tb is not None else ""
    torch_frame = isinstance(exc, KeyError) and re.search(r"torch[/\\].*(serialization|unpickler)", innermost)
    damaged_pickle = (
        isinstance(exc, (pickle.UnpicklingError, EOFError))
        or torch_frame
        or (isinstance(exc, RuntimeError) and "PytorchStreamReader" in text)
    )
    if damaged_pickle:
        return _damaged({pickled: _first_line(exc)})
    damaged_text = isinstance(exc, (SafetensorError, json.JSONDecodeError, UnicodeDecodeError)) or (
        isinstance(exc, OSError) and "is not a valid JSON file" in text
    )
    if damaged_text:
        return _damaged((_unreadable_files(path) if path.exists() else {}) or {"a file of it": _first_line(exc)})
    if isinstance(exc, RuntimeError) and re.search(r"size mismatch|ignore_mismatched_sizes", text):
        return _shape_mismatch(path)
    if isinstance(exc, ValueError) and "contains custom code" in text:
        return _unsupported(None, "auto_map in its config files")
    unknown = re.search(r"model type `([^`]+)` but Transformers does not recognize", text)
    if isinstance(exc, ValueError) and unknown:
        return _unsupported(unknown.group(1))
    if isinstance(exc, ValueError) and "Should have a `model_type` key" in text:
        return (
            "config.json names no model_type, so it is no transformers model config: give a Hugging Face model "
            "folder (as save_pretrained or hf download writes it)"
        )
    if isinstance(exc, OSError) and path.is_dir() and re.search(r"no file named|does not appear to have a file", text):
        return (
            f"a file it needs is missing ({_first_line(exc)}): copy the model's files (config.json, the weights "
            "model.safetensors or its shards with model.safetensors.index.json, the tokenizer files) into it"
        )
    return None


def _shape_mismatch(path: Path) -> str:
    """Why weights of other shapes than the config's are refused, naming a differing tensor where it can."""
    if (path / "adapter_config.json").is_file():
        return (
            "its tensors do not fit this base model's layers with the settings of its adapter_config.json: it was "
            "trained on another model (see base_model_name_or_path there), or its files do not belong together: "
            "give the base it was trained on, or copy the adapter/ folder again from its run"
        )
    weights = sorted(path.glob("*.safetensors"))
    example = ""
    with contextlib.suppress(Exception):  # the example is a help, not the error
        import torch
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        expected = {k: list(v.shape) for k, v in skeleton.state_dict().items()}
        for file in weights:
            with safe_open(file, "pt") as tensors:
                shapes = {key: tensors.get_slice(key).get_shape() for key in tensors.keys()}  # noqa: SIM118
            key = next((k for k, shape in shapes.items() if expected.get(k, shape) != shape), None)
            if key is not None:
                example = f" (e.g. {key}: {shapes[key]} in {file.name}, {expected[key]} by config.json)"
                break
    return (
        f"config.json does not match the weights file {', '.join(p.name for p in weights) or 'of the folder'}: the "
        f"tensors' shapes differ{example}, so config.json describes another model size: copy the config.json that "
        "came with these weights (or the weights of this config)"
    )


@contextmanager
def loading(what: str, path: str | Path, fallback: str | None = None) -> Iterator[None]:
    """Turn a user's file that fails to load in the block into one :class:`ModelLoadError` line, ``"{what} {path}:
    {problem}: {fix}"``, for the known failures; with ``fallback`` (a fix), for any ``OSError``, ``ValueError``,
    ``KeyError`` or ``TypeError`` too (a file of the wrong structure, met deep inside a library's reader)."""
    from safetensors import SafetensorError

    try:
        yield
    except (
        SafetensorError,
        pickle.UnpicklingError,
        EOFError,
        KeyError,
        RuntimeError,
        OSError,
        ValueError,
        TypeError,
    ) as exc:
        if isinstance(exc, ModelLoadError):
            raise
        problem = _load_failure(exc, Path(str(path)).expanduser())
        if problem is None and fallback is not None and isinstance(exc, (OSError, ValueError, KeyError, TypeError)):
            problem = f"{_first_line(exc)}: {fallback}"
        if problem is None:
            raise
        raise ModelLoadError(f"{what} {path}: {problem}") from None


#: The keys of a LoRA adapter's config PEFT computes with, and their kinds.
_LORA_KEYS = {"r": (int,), "lora_alpha": (int, float), "target_modules": (list, str)}


def check_adapter_folder(adapter_dir: str | Path, what: str = "adapter") -> Path:
    """``adapter_dir`` as a path once its ``adapter_config.json`` is a LoRA config PEFT reads (a JSON object with
    ``peft_type`` ``"LORA"`` and :data:`_LORA_KEYS` of their kinds); else :class:`ModelLoadError` naming the folder,
    the key and the fix."""
    from peft import PeftConfig

    adapter_dir = Path(adapter_dir).expanduser()
    file = adapter_dir / "adapter_config.json"
    fix = "give a run's adapter/ folder as training saved it (copy it again from the run folder)"
    if not file.is_file():
        raise ModelLoadError(f"{what} {adapter_dir} holds no LoRA adapter (adapter_config.json): {fix}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"{what} {adapter_dir}: adapter_config.json cannot be read ({_first_line(exc)}): {fix}"
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        found = f"the keys {sorted(config)[:8]}" if isinstance(config, dict) else f"a JSON {type(config).__name__}"
        raise ModelLoadError(
            f"{what} {adapter_dir}: adapter_config.json is no PEFT adapter config (an object with 'peft_type', "
            f"'r', 'lora_alpha', 'target_modules', ...; it holds {found}): {fix}"
        )
    if config["peft_type"] != "LORA":
        raise ModelLoadError(f"{what} {adapter_dir}: a {config['peft_type']} adapter, not LoRA (peft_type): {fix}")
    for key, kinds in _LORA_KEYS.items():
        if not isinstance(config.get(key), kinds) or isinstance(config.get(key), bool):
            found = repr(config[key])[:40] if key in config else "nothing"
            raise ModelLoadError(
                f"{what} {adapter_dir}: adapter_config.json key {key!r} holds {found}, not "
                f"{' or '.join(k.__name__ for k in kinds)}: {fix}"
            )
    with loading(what, adapter_dir, fallback=f"adapter_config.json is damaged: {fix}"):
        PeftConfig.from_pretrained(str(adapter_dir))
    return adapter_dir


#: The fix for a local tokenizer whose files parse as JSON but not as a tokenizer (wrong structure).
_TOKENIZER_FIX = (
    "its tokenizer files (tokenizer.json, tokenizer_config.json) are not what transformers reads: copy them again "
    "from the model's source"
)


def from_pretrained(loader: Any, model_name_or_path: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` with ``trust_remote_code=False``; a damaged or refused file, or a hub id the hub did
    not provide, is one :class:`ModelLoadError`. A model converted from GGUF is named as the file names it."""
    what = "tokenizer" if "Tokenizer" in getattr(loader, "__name__", "") else "model"
    fallback = _TOKENIZER_FIX if what == "tokenizer" and Path(model_name_or_path).is_dir() else None
    try:
        with loading(what, model_name_or_path, fallback):
            loaded = loader.from_pretrained(model_name_or_path, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ModelLoadError) or Path(model_name_or_path).exists():
            raise
        raise ModelLoadError(
            f"could not load {model_name_or_path!r}: no local folder of that name, and the hub did not "
            f"provide it ({_first_line(exc)}). Check the id and your network, "
            "or download the model and give its local folder"
        ) from None
    origin = model_origin(model_name_or_path)
    if origin is not None and what == "model" and "name_or_path" in vars(loaded):  # a model (a config has none)
        loaded.name_or_path = origin["name"]  # PEFT reads it (the config keeps the folder, for transformers)
        # PEFT looks for config.json under that name at each save, to see whether the vocabulary was resized, and
        # warns that it finds none: it was not resized (it is the GGUF file's), so that warning says nothing here
        warnings.filterwarnings("ignore", message=f"Could not find a config file in {re.escape(origin['name'])} - ")
    return loaded
