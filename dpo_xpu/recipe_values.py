"""A recipe's values: the keys by topic, dpo_xpu's defaults over TRL's (:data:`TRL_DEFAULT_OVERRIDES`, the one
table, with reasons), the TRL options dpo_xpu sets itself, range checks, and a YAML or ``--set`` value converted to
its key's type: TRL's options by the argparse actions of transformers' ``HfArgumentParser`` for the installed
``DPOConfig``, dpo_xpu's keys by ``int``, ``float``, ``str``. Ours is what no parser does: NaN and infinity refused,
``5e-5`` (a string to PyYAML) read as a number, one line naming the key, what it expects and the closest value.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import functools
import math
import re
import reprlib
import typing
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any, get_args, get_origin, get_type_hints

from dpo_xpu.errors import RecipeError

# Values that other modules read too (the other keys' choices are declared in their ``Recipe`` field).
#: The device names a recipe and :func:`dpo_xpu.device.select_device` accept: a kind, optionally with an index.
DEVICE_PATTERN = r"(auto|cpu|xpu|cuda)(?::(\d+))?"
#: The software stacks behind the one API (dpo_xpu.models.backends.<name>).
BACKENDS = ("native", "ipex-llm")
#: How training rows are written as text (dpo_xpu.data.preferences): the model's own chat template or ChatML.
CHAT_FORMATS = ("auto", "model", "chatml")
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Where a default comes from (the options table's last column).
ORIGINAL = "original recipe"
OURS = "dpo_xpu"

#: dpo_xpu's values for TRL options, over the installed TRL's defaults, each with its reason: the one table of them.
#: A recipe's own value wins. The keys are recipe keys (documented in :data:`TRL_KEY_DOCS`); ``dpo-xpu train
#: --help`` and the options page show TRL's default beside each that differs.
TRL_DEFAULT_OVERRIDES: dict[str, tuple[Any, str]] = {
    "output_dir": ("runs/dpo", OURS),
    "seed": (42, "transformers' default"),
    "bf16": (
        "auto",
        f"{OURS}: bfloat16 where the device computes it natively (GPUs, CPUs with AVX512-BF16 or AMX), float32 where "
        "it would be emulated (the original recipe's: true)",
    ),
    "gradient_checkpointing": (True, ORIGINAL),
    "max_length": (1536, ORIGINAL),
    "beta": (0.1, f"{ORIGINAL} (also TRL's default)"),
    "learning_rate": (5e-5, ORIGINAL),
    "lr_scheduler_type": ("cosine", ORIGINAL),
    "warmup_steps": (100, ORIGINAL),
    "max_steps": (200, ORIGINAL),
    "num_train_epochs": (1.0, OURS),
    "per_device_train_batch_size": (4, ORIGINAL),
    "gradient_accumulation_steps": (4, ORIGINAL),
    "logging_steps": (1, ORIGINAL),
    "save_steps": (100, f"{OURS} (the original saved none)"),
    "save_total_limit": (
        2,
        "keep the two newest checkpoints, not every one (TRL keeps all): --resume continues from the newest, or from "
        "the one before where the newest is damaged",
    ),
}
#: The TRL options that are recipe keys (shown among dpo_xpu's own by topic): their unit and meaning.
TRL_KEY_DOCS: dict[str, tuple[str, str]] = {
    "output_dir": ("folder", "the run folder (recipe, metrics, curves, adapter); never overwritten silently"),
    "seed": ("integer", "seed of the shuffle, the split and the LoRA initialisation"),
    "bf16": (
        "auto, true or false",
        "bfloat16 compute (float32 when false); auto: on where the device computes bf16 natively (dpo-xpu env says)",
    ),
    "gradient_checkpointing": ("bool", "recompute activations in the backward pass: less memory, slower"),
    "max_length": ("tokens", "longest prompt + answer; longer sequences are cut"),
    "beta": (
        "dimensionless",
        "strength of the pull towards the reference (Rafailov et al. 2023, eq. 7); rewards are scaled by it",
    ),
    "learning_rate": ("AdamW step size", "peak learning rate, reached after the warmup"),
    "lr_scheduler_type": ("scheduler name", "learning-rate schedule after the warmup (transformers' names)"),
    "warmup_steps": ("optimizer steps", "linear warmup from 0; the first logged step has learning rate 0"),
    "max_steps": ("optimizer steps", "training length; `-1` uses `num_train_epochs`"),
    "num_train_epochs": ("passes over the data", "used only when `max_steps` is `-1`"),
    "per_device_train_batch_size": ("preference pairs", "pairs per device per forward pass"),
    "gradient_accumulation_steps": (
        "micro-batches",
        "micro-batches per optimizer step (pairs per update = batch size x this)",
    ),
    "logging_steps": ("optimizer steps", "one `metrics.jsonl` row and one curve redraw every this many steps"),
    "save_steps": ("optimizer steps", "a checkpoint every this many steps"),
}
#: ``DPOConfig`` options that dpo_xpu sets from its own keys: the key to use instead, and why.
MANAGED_TRL_OPTIONS = {
    "precompute_ref_log_probs": "set reference: precomputed (dpo_xpu computes and caches them itself)",
    "use_cpu": "set device: cpu",
    "remove_unused_columns": "dpo_xpu keeps its columns (it needs false)",
    "model_init_kwargs": "dpo_xpu loads the models itself: use quantization, bf16 and device",
    "ref_model_init_kwargs": "dpo_xpu loads the models itself: use quantization, bf16 and device",
    "max_prompt_length": "set max_prompt_length (a dpo_xpu key on every TRL)",
}
#: Options accepted although the installed transformers may lack them (5.x reads a fractional ``warmup_steps``).
TRL_OPTION_ALIASES = ("warmup_ratio",)
#: The recipe keys by topic, in the order ``dpo-xpu train --help`` and the options table show them (every key once).
KEY_TOPICS: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
    (topic, tuple(keys.split()))
    for topic, keys in {
        "the run": "model_name_or_path dataset_name_or_path output_dir backend device seed",
        "model and LoRA": "quantization bf16 gradient_checkpointing lora_r lora_alpha lora_dropout lora_target_modules "
        "sft_checkpoint adapter_name_or_path",
        "data": "data_format chat_format limit eval_fraction dataset_mixture max_length max_prompt_length "
        "drop_long_rows",
        "DPO loss and reference": "beta loss_type label_smoothing nll_loss_coef simpo_gamma reference_free reference "
        "reference_device prefix_sharing",
        "optimisation": "learning_rate lr_scheduler_type warmup_steps max_steps num_train_epochs "
        "per_device_train_batch_size gradient_accumulation_steps",
        "logging, evaluation and outputs": "logging_steps save_steps eval_steps eval_samples num_eval_samples "
        "max_new_tokens export",
    }.items()
)


def recipe_keys() -> list[str]:
    """The recipe keys dpo_xpu documents (its own and :data:`TRL_KEY_DOCS`), by topic, then ``trl_options``."""
    return [key for _, keys in KEY_TOPICS for key in keys] + ["trl_options"]


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}


def field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default (``None`` where it has none)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


@functools.cache
def trl_fields() -> dict[str, tuple[Any, bool, Any]]:
    """``{option: (annotation, whether null is allowed, TRL's default)}`` for the installed ``DPOConfig``'s public
    init fields but :data:`MANAGED_TRL_OPTIONS` (null where the annotation or the default allows it)."""
    from trl import DPOConfig

    hints = get_type_hints(DPOConfig)
    return {
        f.name: (hints.get(f.name, Any), f.default in (None, dataclasses.MISSING), field_default(f))
        for f in dataclasses.fields(DPOConfig)
        if f.init and not f.name.startswith("_") and f.name not in MANAGED_TRL_OPTIONS
    }


@functools.cache
def _trl_parser() -> Any:
    """transformers' ``HfArgumentParser`` over the installed ``DPOConfig``: its argparse actions convert values."""
    from transformers import HfArgumentParser
    from trl import DPOConfig

    return HfArgumentParser(DPOConfig, exit_on_error=False)


def _closest(word: str, candidates: list[str]) -> str | None:
    """The candidate closest to ``word`` (difflib), or ``None`` where none is close."""
    found = difflib.get_close_matches(word.lower(), candidates, n=1)
    return found[0] if found else None


def trl_values(options: dict[str, Any], own_keys: list[str]) -> dict[str, Any]:
    """TRL options checked and converted (:func:`convert_value`); ``own_keys`` (dpo_xpu's) are not TRL's here.

    Raises:
        RecipeError: a name that is not a string, one of ``own_keys`` (give it as a top-level key), a managed TRL
            option (with the key to use), an unknown key (with the closest valid one, among ``own_keys`` too), or a
            value the option cannot hold.
    """
    if not options:
        return {}
    for key in options:
        if not isinstance(key, str):
            raise RecipeError(f"trl_options: option name {key!r} is not a name: write name: value (ld_alpha: 0.5)")
        if key in own_keys:
            raise RecipeError(f"{key}: a dpo_xpu key, not a TRL option: give it as a top-level key, not in trl_options")
    managed = sorted(set(options) & set(MANAGED_TRL_OPTIONS))
    if managed:
        raise RecipeError(
            "; ".join(f"{key}: dpo_xpu sets this TRL option itself: {MANAGED_TRL_OPTIONS[key]}" for key in managed)
        )
    fields = trl_fields()
    known = (set(fields) | set(TRL_OPTION_ALIASES)) - set(own_keys)
    unknown = sorted(set(options) - known, key=str)
    if unknown:
        import trl

        close = {k: _closest(k, own_keys + sorted(known)) for k in unknown}
        named = [f"{k} (did you mean {close[k]}?)" if close[k] else k for k in unknown]
        raise RecipeError(
            f"unknown recipe key{'s' if len(unknown) > 1 else ''} {', '.join(named)}: neither dpo_xpu's nor an "
            f"option of the installed TRL {trl.__version__}'s DPOConfig; fix the name (dpo-xpu train --help lists "
            "every key)"
        )
    converted = {}
    for key, value in options.items():
        annotation, nullable, _ = fields.get(key, (float | None, True, None))  # an alias: a number
        converted[key] = convert_value(key, value, annotation, nullable, option=key if key in fields else None)
    return converted


def merge_trl_options(nested: Any, top: dict[str, Any], own_keys: list[str], once: bool = False) -> dict[str, Any]:
    """TRL options given in ``trl_options`` (``nested``: a mapping, or null for none) and as top-level keys
    (``top``, which win: ``dataclasses.replace(recipe, output_dir=...)``), converted and checked (:func:`trl_values`).

    Raises:
        RecipeError: ``nested`` is not a mapping of option names, an option is refused by :func:`trl_values`, or
            (``once``: as in a recipe file) one is given both ways with different values.
    """
    if nested is not None and not isinstance(nested, Mapping):
        raise RecipeError(
            "trl_options: expected a mapping of TRL option names to values (trl_options: {ld_alpha: 0.5}, or each "
            f"as a top-level key), found {type(nested).__name__} {reprlib.repr(nested)}"
        )
    nested, top = trl_values(dict(nested or {}), own_keys), trl_values(top, own_keys)
    for key in sorted(nested.keys() & top.keys()):
        if once and nested[key] != top[key]:
            raise RecipeError(
                f"{key}: given twice, as a top-level key ({top[key]!r}) and in trl_options ({nested[key]!r}); give "
                "it once"
            )
    return {**nested, **top}


def _check_number(name: str, value: Any) -> None:
    """Refuse NaN, infinities and integers beyond PyTorch's int64 in a value, inside mappings and lists too.

    Raises:
        RecipeError: the first such number, named by its key (``dataset_mixture['a.jsonl']``, ``loss_weights[1]``).
    """
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{name}: must be a finite number, found {value}: NaN and infinity are not accepted")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**63 - 1:
        raise RecipeError(f"{name}: must be at most 2**63 - 1, found an integer of {len(str(abs(value)))} digits")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        _check_number(f"{name}[{key!r}]" if isinstance(value, dict) else f"{name}[{key}]", item)


def _members(annotation: Any) -> tuple[Any, ...]:
    """The members of a ``Union`` / ``X | Y`` annotation, or the annotation alone."""
    return get_args(annotation) if get_origin(annotation) in (typing.Union, type(int | None)) else (annotation,)


def _words(annotation: Any) -> str:
    """How a message names what an annotation accepts: ``"an integer"``, ``"a string or a list"``."""
    words = []
    for member in _members(annotation):
        kind = get_origin(member) or member
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            words.append(f"one of {', '.join(str(item.value) for item in kind)}")
        elif kind is typing.Literal:
            words.append(f"one of {', '.join(map(repr, get_args(member)))}")
        elif kind is not type(None):
            words.append("a mapping" if kind is dict else _TYPE_WORDS.get(kind, getattr(kind, "__name__", str(kind))))
    return " or ".join(dict.fromkeys(words)) or "null"


def convert_value(name: str, value: Any, annotation: Any, nullable: bool = False, option: str | None = None) -> Any:
    """A YAML or ``--set`` value (PyYAML reads ``5e-5`` as a string; ``"a,b"`` is a list) converted to a key's
    annotation, or refused, so that ``save_total_limit: abc`` fails here rather than at the first checkpoint. A TRL
    ``option``'s value goes through its ``HfArgumentParser`` action; a dpo_xpu key's through ``int``, ``float``,
    ``str``. A key typed ``bool | str`` takes ``auto`` beside true and false.

    Raises:
        RecipeError: a value the key cannot hold (with what it expects; for an enum, the closest value), ``null``
            where it needs one, or a number that is not finite.
    """
    kinds = {get_origin(m) or m for m in _members(annotation)}
    if value is None:
        if nullable or kinds & {type(None), Any}:
            return None
        raise RecipeError(f"{name}: null is not allowed (expected {_words(annotation)})")
    if Any in kinds or isinstance(value, dict) and dict in kinds and option:
        return value
    if isinstance(value, dict) and dict in kinds:  # dataset_mixture: source -> proportion
        return {str(k): convert_value(f"{name}[{k!r}]", v, float) for k, v in value.items()}
    lists = [m for m in _members(annotation) if get_origin(m) in (list, tuple) or m in (list, tuple)]
    if lists and not (str in kinds and isinstance(value, str)):
        if not isinstance(value, (list, tuple)):
            value = [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else [value]
        element = (get_args(lists[0]) or (str,))[0]
        return [convert_value(f"{name}[{i}]", item, element, option=option) for i, item in enumerate(value)]
    if isinstance(value, (list, tuple, dict)) or isinstance(value, bool) and not kinds & {bool, str}:
        raise RecipeError(f"{name}: expected {_words(annotation)}, found {value!r}")
    if (str in kinds and bool in kinds or option == "bf16") and str(value).strip().lower() == "auto":
        return "auto"  # bf16: settled per device by dpo_xpu.device.use_bf16
    integer = int in kinds and float not in kinds
    try:
        number = float(value) if kinds & {int, float} and not isinstance(value, bool) else None
    except (TypeError, ValueError):  # a YAML date, a word
        number = None
    if number is not None and not math.isfinite(number):
        if integer:
            raise RecipeError(f"{name}: expected a finite integer, found {value!r}")
        raise RecipeError(f"{name}: must be a finite number, found {value!r}: NaN and infinity are not accepted")
    if integer and number is not None and number.is_integer() and not re.fullmatch(r"\s*[-+]?\d+\s*", str(value)):
        value = int(number)  # 1e3, 100.0
    text = str(value).lower() if isinstance(value, bool) else str(value)
    try:
        if option:  # output_dir first: TRL 0.11's DPOConfig requires it (a later --output_dir=... wins for itself)
            parsed = getattr(_trl_parser().parse_known_args(["--output_dir=.", f"--{option}={text}"])[0], option)
            parsed = parsed[0] if isinstance(parsed, list) else parsed  # a list field's action (nargs="+") got one
            # an integer stays one where the field is a float (logging_steps: 1, not 1.0, as written)
            return int(parsed) if isinstance(parsed, float) and re.fullmatch(r"[-+]?\d+", text.strip()) else parsed
        if bool in kinds and text.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            return text.strip().lower() in ("true", "yes", "1")
        kind = next(k for k in (int, float, str) if k in kinds)
        return kind(text)
    except (argparse.ArgumentError, StopIteration, ValueError):
        enums = [k for k in kinds if isinstance(k, type) and issubclass(k, enum.Enum)]
        if enums and isinstance(value, str):
            choices = [str(item.value) for item in enums[0]]
            close = _closest(value, choices)
            hint = f"did you mean {close!r}?" if close else f"use one of {', '.join(choices)}"
            raise RecipeError(
                f"{name}: {value!r} is not one of the installed transformers' {enums[0].__name__}: {hint}"
            ) from None
        raise RecipeError(f"{name}: expected {_words(annotation)}, found {value!r}") from None


#: Keys that must be > 0.
_POSITIVE = (
    "beta learning_rate max_length per_device_train_batch_size gradient_accumulation_steps lora_r lora_alpha "
    "logging_steps"
).split()

#: Keys that must be a non-empty string (a path or hub id): what they hold.
_PATHS = {
    "model_name_or_path": "a hub id, folder or .gguf file (the base model)",
    "dataset_name_or_path": "a hub id or a data file",
    "output_dir": "a folder path (the run folder)",
}


def check_values(values: dict[str, Any]) -> None:
    """Refuse what a recipe's keys may not hold (``values``: :meth:`dpo_xpu.recipes.Recipe.to_dict`): a number that
    is not finite or out of range, a device that is not one, a path that is null or empty, no LoRA layer, keys that
    cannot work together.

    Raises:
        RecipeError: the first such value, in one line naming its key.
    """
    for name, value in values.items():
        _check_number(name, value)
    for name, expected in _PATHS.items():
        if not isinstance(values[name], str) or not values[name].strip():
            raise RecipeError(
                f"{name}: must be {expected}, found {'null' if values[name] is None else reprlib.repr(values[name])}"
            )
    r = SimpleNamespace(**values)
    if not r.lora_target_modules or not all(str(m).strip() for m in r.lora_target_modules):
        found = reprlib.repr(r.lora_target_modules)
        raise RecipeError(f"lora_target_modules: must name at least one layer (q_proj, v_proj, ...), found {found}")
    if r.prefix_sharing in (True, "unpacked") and r.backend == "ipex-llm":
        raise RecipeError(
            "prefix_sharing: needs the native backend (TRL 1.x's fused LM head); the ipex-llm stack pins TRL "
            "0.11. Set prefix_sharing: false, or backend: native"
        )
    if r.reference_device == "cpu" and r.reference not in ("separate", "auto"):
        raise RecipeError("reference_device: 'cpu' needs reference: separate (only a separate model can move)")
    if r.dataset_mixture is not None and (not r.dataset_mixture or any(w <= 0 for w in r.dataset_mixture.values())):
        raise RecipeError(
            "dataset_mixture must map each source to a positive proportion. Expected format: "
            f"{{'Intel/orca_dpo_pairs': 0.7, 'my_pairs.jsonl': 0.3}}; found {r.dataset_mixture!r}"
        )
    if not re.fullmatch(DEVICE_PATTERN, r.device):
        raise RecipeError(f"device: {r.device!r} is not one of auto, xpu, cuda, cpu (optionally ':N')")
    for name, ok, expected in [
        *[(name, values[name] > 0, "> 0") for name in _POSITIVE],
        ("label_smoothing", 0.0 <= r.label_smoothing < 0.5, "in [0, 0.5) (conservative DPO)"),
        ("nll_loss_coef", r.nll_loss_coef >= 0, ">= 0"),
        ("eval_fraction", 0.0 <= r.eval_fraction < 1.0, "in [0, 1)"),
        ("warmup_steps", r.warmup_steps >= 0, ">= 0 (optimizer steps of linear warmup)"),
        ("lora_dropout", 0.0 <= r.lora_dropout < 1.0, "in [0, 1) (a probability)"),
        ("max_steps", r.max_steps > 0 or r.max_steps == -1, "> 0, or -1 to train for num_train_epochs"),
        ("num_train_epochs", r.num_train_epochs > 0, "> 0 (passes over the data)"),
        ("save_steps", r.save_steps > 0, "> 0 (optimizer steps between checkpoints)"),
        ("eval_steps", r.eval_steps is None or r.eval_steps > 0, "> 0, or null for no evaluation"),
        ("limit", r.limit is None or r.limit > 0, "> 0 rows, or null for all"),
        ("num_eval_samples", r.num_eval_samples >= 0, ">= 0"),
        ("max_new_tokens", r.max_new_tokens > 0, "> 0 tokens"),
        ("max_prompt_length", r.max_prompt_length is None or r.max_prompt_length > 0, "> 0 tokens"),
        ("simpo_gamma", r.simpo_gamma >= 0, ">= 0 nats"),
        ("seed", r.seed >= 0, ">= 0"),
        ("warmup_ratio", values.get("warmup_ratio") is None or 0 <= values["warmup_ratio"] <= 1, "in [0, 1]"),
    ]:
        if not ok:
            raise RecipeError(f"{name}: must be {expected}, found {values[name]}")
