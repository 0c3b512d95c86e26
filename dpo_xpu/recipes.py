"""Recipes: every setting of a run in one flat mapping, loadable from YAML.

A recipe holds dpo_xpu's own keys (model, data, backend, reference, prefix sharing, LoRA, export, samples, and the
loss keys dpo_xpu maps onto each TRL generation), declared in :class:`Recipe`, and any option of the installed TRL's
``DPOConfig`` (and transformers' ``TrainingArguments`` under it) under its own name, kept in ``trl_options`` and
passed to TRL as it is. TRL's options are converted by transformers' own ``HfArgumentParser``; where dpo_xpu keeps
the original recipe's value over TRL's default, :data:`TRL_DEFAULT_OVERRIDES` says so, with the reason. The recipe
is not a ``DPOConfig`` because one recipe serves both TRL generations (0.11 for ipex-llm, 1.x for the native
backend), whose fields differ.

    >>> recipe = load_recipe("recipes/cpu_demo.yaml", overrides=["max_steps=5"])
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import functools
import math
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from dpo_xpu.errors import RecipeError

#: The device names a recipe and :func:`dpo_xpu.device.select_device` accept: a kind, optionally with an index.
DEVICE_PATTERN = r"(auto|cpu|xpu|cuda)(?::(\d+))?"
#: The software stacks behind the one API (dpo_xpu.models.backends.<name>).
BACKENDS = ("native", "ipex-llm")
REFERENCE_STRATEGIES = ("auto", "adapter-off", "separate", "precomputed")
DATA_FORMATS = ("auto", "orca", "prompt-chosen-rejected", "conversational")
#: How training rows are written as text (dpo_xpu.data.preferences): the model's own chat template or ChatML.
CHAT_FORMATS = ("auto", "model", "chatml")
EXPORT_FORMATS = ("adapter", "merged")
QUANTIZATIONS = ("nf4", "none")
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ORIGINAL = "original recipe"
OURS = "dpo_xpu"

#: dpo_xpu's values for TRL options, over the installed TRL's defaults, each with its reason: the one table of them.
#: A recipe's own value wins. The first keys are the original recipe's training values (recipe keys, documented in
#: :data:`TRL_KEY_DOCS`); ``dpo-xpu train --help`` and the options page show TRL's default beside each that differs.
TRL_DEFAULT_OVERRIDES: dict[str, tuple[Any, str]] = {
    "output_dir": ("runs/dpo", OURS),
    "seed": (42, "transformers' default"),
    "bf16": (True, ORIGINAL),
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
    "bf16": ("bool", "bfloat16 compute (float32 when false; use false on CPUs without AMX)"),
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
#: How messages name the type a value should have.
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}


def _key(default: Any, unit: str, help: str, default_from: str) -> Any:
    """A dpo_xpu recipe key: its default, and in the field's metadata its unit or allowed values, meaning and the
    source of its default (:func:`key_docs`: ``dpo-xpu train --help``, the options page and the README's table)."""
    metadata = {"unit": unit, "help": help, "default_from": default_from}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _default(f: dataclasses.Field) -> Any:
    """A dataclass field's default (``None`` where it has none)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


@dataclass(init=False, eq=False)
class Recipe:
    """All settings of a DPO run. Defaults are the original recipe (Labonne, "Fine-tune a Mistral-7b model with
    DPO", as ported to Intel GPUs by ipex-llm's DPO example), except ``reference``.

    The fields are dpo_xpu's own keys. TRL's options (the training keys of :data:`TRL_KEY_DOCS` such as
    ``learning_rate``, and every other one: :func:`trl_option_names`) are given as top-level recipe keys under their
    own names (as keywords where :data:`TRL_DEFAULT_OVERRIDES` lists them), kept in ``trl_options`` and read as
    attributes: ``recipe.learning_rate`` is the recipe's value, else dpo_xpu's (:data:`TRL_DEFAULT_OVERRIDES`), else
    the installed TRL's default. :data:`MANAGED_TRL_OPTIONS` are refused with
    the key to use; ``warmup_ratio`` is accepted on every transformers and replaces ``warmup_steps``.

    Raises:
        RecipeError: a value out of range or not allowed, in one line naming the key.
        TypeError: a keyword that is neither a field nor in :data:`TRL_DEFAULT_OVERRIDES` (use ``trl_options``).
    """

    model_name_or_path: str = _key(
        "teknium/OpenHermes-2.5-Mistral-7B", "hub id, folder or `.gguf` file", "the base (SFT) model", ORIGINAL
    )
    dataset_name_or_path: str = _key(
        "Intel/orca_dpo_pairs",
        "hub id or file",
        "`Intel/orca_dpo_pairs` or a local `.jsonl` / `.json` / `.parquet` with its columns",
        ORIGINAL,
    )
    backend: str = _key("native", "`native` \\| `ipex-llm`", "the software stack (see [Backends](backends.md))", OURS)
    device: str = _key(
        "auto", "`auto` \\| `xpu` \\| `cuda` \\| `cpu`, optionally `:N`", "`auto` picks xpu, then cuda, then cpu", OURS
    )
    quantization: str = _key(
        "nf4", "`nf4` \\| `none`", "4-bit NormalFloat base weights (QLoRA, Dettmers et al. 2023)", ORIGINAL
    )
    reference: str = _key(
        "auto",
        "`auto` \\| `adapter-off` \\| `separate` \\| `precomputed`",
        "how reference log-probs are computed (see [reference strategies](how-dpo-works.md#reference-strategies)); "
        "`auto`: `precomputed` where it saves work, else what the other keys need, with the reason logged",
        f"{OURS} (the original loaded a `separate` NF4 copy)",
    )
    prefix_sharing: bool | str = _key(
        "auto",
        "`auto` \\| bool",
        "run each pair as one sequence with the prompt computed once, for policy and reference (see [prefix "
        "sharing](how-dpo-works.md#prefix-sharing)); native backend, sdpa or eager attention; `auto`: on where it "
        "runs, off with the reason logged elsewhere",
        f"{OURS} (TRL runs two sequences per pair), after Wang et al. 2024 (arXiv:2410.20305)",
    )
    limit: int | None = _key(
        None, "rows", "keep this many rows after a seeded shuffle; `null` keeps all", f"{OURS} (all rows)"
    )
    eval_fraction: float = _key(0.0, "fraction of rows, in [0, 1)", "rows held out for evaluation; 0 disables it", OURS)
    data_format: str = _key(
        "auto",
        "`auto` \\| `orca` \\| `prompt-chosen-rejected` \\| `conversational`",
        "the columns of the data: orca (`system`, `question`, `chosen`, `rejected`), plain `prompt`/`chosen`/"
        "`rejected` strings, or TRL's conversational format (`prompt`/`chosen`/`rejected` as lists of `{role, "
        "content}` messages, or only `chosen`/`rejected` holding whole conversations, whose shared start is the "
        "prompt), formatted with the tokenizer's chat template; `auto` decides from the columns",
        OURS,
    )
    chat_format: str = _key(
        "auto",
        "`auto` \\| `model` \\| `chatml`",
        "how rows become text: auto writes orca and plain rows in ChatML (the original recipe; a warning says when "
        "the model's own template is not ChatML) and conversational rows in the model's own chat template; model "
        "writes every row in the model's template; chatml writes every row in ChatML. A tokenizer without a chat "
        "template always gets ChatML",
        f"{ORIGINAL} (ChatML for orca rows)",
    )
    dataset_mixture: dict[str, float] | None = _key(
        None,
        "mapping source: proportion",
        "several sources mixed with these proportions (normalised) and `seed`, instead of `dataset_name_or_path`",
        f"{OURS} (off), as open-instruct's dataset mixer",
    )
    drop_long_rows: bool = _key(
        False,
        "bool",
        "drop pairs longer than `max_length` tokens (counts reported) instead of truncating them",
        f"{OURS} (off), as open-instruct's length filter",
    )
    sft_checkpoint: str | None = _key(
        None,
        "file or `null`",
        "an SFT state dict (`policy.pt`, key `state`) loaded into policy and reference before quantization",
        "the original DPO code's starting point (off)",
    )
    adapter_name_or_path: str | None = _key(
        None, "folder or `null`", "an existing LoRA adapter to continue training from", OURS
    )
    reference_device: str = _key(
        "same",
        "`same` \\| `cpu`",
        "`cpu` keeps a `separate` reference off the accelerator (less device memory, slower steps)",
        f"{OURS} (`same`), as OpenRLHF's reference offload",
    )
    lora_r: int = _key(16, "rank", "rank of the LoRA matrices (Hu et al. 2021)", ORIGINAL)
    lora_alpha: int = _key(16, "scale numerator", "the LoRA update is scaled by `lora_alpha / lora_r`", ORIGINAL)
    lora_dropout: float = _key(
        0.05,
        "probability",
        "dropout on the adapter input; TRL's DPO trainer sets every dropout to 0 (its `disable_dropout`, on by "
        "default in TRL 0.11 and 1.x), so it acts only where the adapter is trained outside DPO",
        ORIGINAL,
    )
    lora_target_modules: list[str] = _key(
        DEFAULT_LORA_TARGETS,
        "layer names",
        "linear layers that get adapters; names the model lacks are skipped",
        f"{ORIGINAL} (all attention and MLP projections)",
    )
    loss_type: str = _key(
        "sigmoid", "TRL loss name", "`sigmoid` is the DPO loss of eq. 7; others as TRL documents", "TRL's default"
    )
    label_smoothing: float = _key(
        0.0,
        "probability in [0, 0.5)",
        "conservative DPO: the assumed rate of flipped preference labels (Mitchell 2023)",
        "the original DPO code (0: plain DPO)",
    )
    reference_free: bool = _key(
        False, "bool", "take the reference log-probs as 0 (a uniform reference)", "the original DPO code (off)"
    )
    nll_loss_coef: float = _key(
        0.0,
        "weight",
        "adds this times the NLL of the chosen answers' tokens, averaged over all of them in the micro-batch (TRL's "
        "`sft` term; `rpo_alpha` on TRL 0.11)",
        "OpenRLHF (0: off)",
    )
    simpo_gamma: float = _key(
        0.5,
        "nats",
        "SimPO's target reward margin (Meng et al. 2024, eq. 6); used by `loss_type: simpo`",
        "SimPO's paper range, as TRL's CPO default (0.5)",
    )
    max_prompt_length: int | None = _key(
        None,
        "tokens",
        "longest prompt; longer prompts keep their end. `null` (unset): two thirds of `max_length`, so lowering "
        "`max_length` alone keeps a valid recipe (1024 of the default 1536); set, it must be below `max_length`",
        f"{ORIGINAL} (its ratio, 1024 of 1536)",
    )
    eval_steps: int | None = _key(
        None,
        "optimizer steps or `null`",
        "evaluate the held-out split every this many steps and at step 0; `null`: no evaluation during training",
        OURS,
    )
    eval_samples: bool = _key(
        True, "bool", "also generate policy and reference answers at each evaluation", f"{OURS} (on)"
    )
    num_eval_samples: int = _key(4, "prompts", "how many fixed eval prompts are answered at each evaluation", OURS)
    max_new_tokens: int = _key(64, "tokens", "length limit of each generated sample", OURS)
    export: str = _key(
        "adapter",
        "`adapter` \\| `merged`",
        "save the LoRA adapter only, or merged into a bf16 copy of the base (float32 where bf16 would move the "
        "logits on the run's prompts by more than 10% of the adapter's own effect, or change a greedy answer; the "
        "check in merge_check.json)",
        f"{OURS} (`adapter`), as OpenRLHF's LoRA-only save",
    )
    trl_options: dict[str, Any] = _key(
        {},
        "TRL option: value",
        "every other option of the installed TRL's `DPOConfig` (and transformers' `TrainingArguments`), written as a "
        "top-level key under its own name (`ld_alpha: 0.5`, `report_to: [tensorboard]`); `dpo-xpu train --help` "
        "lists them",
        "TRL's defaults",
    )

    def __init__(self, trl_options: dict[str, Any] | None = None, **values: Any) -> None:
        options = dict(trl_options or {})
        for name in [name for name in values if name not in _OWN_KEYS]:
            if name not in TRL_DEFAULT_OVERRIDES:
                raise TypeError(f"Recipe() got an unexpected keyword argument {name!r}: pass it in trl_options")
            options[name] = values.pop(name)
        for f in fields(self):
            object.__setattr__(self, f.name, values[f.name] if f.name in values else _default(f))
        object.__setattr__(self, "trl_options", _trl_values(options) if options else options)
        self._check()

    def __getattr__(self, name: str) -> Any:
        """A TRL option: the recipe's value, else dpo_xpu's (:data:`TRL_DEFAULT_OVERRIDES`), else TRL's default."""
        options = self.__dict__.get("trl_options")
        if options is None or name.startswith("_"):
            raise AttributeError(name)
        if name in options:
            return options[name]
        if name in TRL_DEFAULT_OVERRIDES:
            return TRL_DEFAULT_OVERRIDES[name][0]
        names = trl_option_names()
        if name in names:
            return names[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in TRL_DEFAULT_OVERRIDES:
            self.trl_options[name] = value
        else:
            object.__setattr__(self, name, value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and self.to_dict() == other.to_dict()

    def _check(self) -> None:
        for name, value in self.to_dict().items():
            _check_number(name, value)
        for name, choices in (
            ("backend", BACKENDS),
            ("quantization", QUANTIZATIONS),
            ("reference", REFERENCE_STRATEGIES),
            ("data_format", DATA_FORMATS),
            ("chat_format", CHAT_FORMATS),
            ("export", EXPORT_FORMATS),
            ("reference_device", ("same", "cpu")),
        ):
            if getattr(self, name) not in choices:
                raise RecipeError(f"{name}: {getattr(self, name)!r} is not one of {', '.join(choices)}")
        if self.prefix_sharing not in (True, False, "auto"):
            raise RecipeError(f"prefix_sharing: {self.prefix_sharing!r} is not one of auto, true, false")
        if self.prefix_sharing is True and self.backend == "ipex-llm":
            raise RecipeError(
                "prefix_sharing: needs the native backend (TRL 1.x's fused LM head); the ipex-llm stack pins TRL "
                "0.11. Set prefix_sharing: false, or backend: native"
            )
        if self.reference_device == "cpu" and self.reference not in ("separate", "auto"):
            raise RecipeError("reference_device: 'cpu' needs reference: separate (only a separate model can move)")
        if self.dataset_mixture is not None and (
            not self.dataset_mixture or any(w <= 0 for w in self.dataset_mixture.values())
        ):
            raise RecipeError(
                "dataset_mixture must map each source to a positive proportion. Expected format: "
                f"{{'Intel/orca_dpo_pairs': 0.7, 'my_pairs.jsonl': 0.3}}; found {self.dataset_mixture!r}"
            )
        if not re.fullmatch(DEVICE_PATTERN, self.device):
            raise RecipeError(f"device: {self.device!r} is not one of auto, xpu, cuda, cpu (optionally ':N')")
        r = self
        for name, ok, expected in [
            *[(name, getattr(r, name) > 0, "> 0") for name in _POSITIVE],
            ("label_smoothing", 0.0 <= r.label_smoothing < 0.5, "in [0, 0.5) (conservative DPO)"),
            ("nll_loss_coef", r.nll_loss_coef >= 0, ">= 0"),
            ("eval_fraction", 0.0 <= r.eval_fraction < 1.0, "in [0, 1)"),
            ("warmup_steps", r.warmup_steps >= 0, ">= 0 (optimizer steps of linear warmup)"),
            ("lora_dropout", 0.0 <= r.lora_dropout < 1.0, "in [0, 1) (a probability)"),
            (
                "max_steps",
                r.max_steps > 0 or r.max_steps == -1,
                "> 0, or -1 to train for num_train_epochs (0 and other negative values train nothing meaningful)",
            ),
            ("num_train_epochs", r.num_train_epochs > 0, "> 0 (passes over the data)"),
            ("save_steps", r.save_steps > 0, "> 0 (optimizer steps between checkpoints)"),
            ("eval_steps", r.eval_steps is None or r.eval_steps > 0, "> 0, or null for no evaluation"),
            ("limit", r.limit is None or r.limit > 0, "> 0 rows, or null for all"),
            ("num_eval_samples", r.num_eval_samples >= 0, ">= 0"),
            ("max_new_tokens", r.max_new_tokens > 0, "> 0 tokens"),
            ("max_prompt_length", r.max_prompt_length is None or r.max_prompt_length > 0, "> 0 tokens"),
            ("simpo_gamma", r.simpo_gamma >= 0, ">= 0 nats"),
            ("seed", r.seed >= 0, ">= 0"),
        ]:
            if not ok:
                raise RecipeError(f"{name}: must be {expected}, found {getattr(r, name)}")
        if self.max_prompt_length is None:  # the original recipe's ratio (1024 of 1536): lowering max_length composes
            self.max_prompt_length = max(1, self.max_length * 2 // 3)
        if self.max_prompt_length >= self.max_length:
            raise RecipeError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length "
                f"({self.max_length}), or the answers would be cut away"
            )

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a plain dict (YAML/JSON-serialisable) of every recipe key, in :func:`recipe_keys` order, then
        the other TRL options it sets (so the dict, and ``recipe.yaml``, read back through :func:`make_recipe`)."""
        return copy.deepcopy({**{key: getattr(self, key) for key in recipe_keys()[:-1]}, **self.trl_options})

    def save(self, path: str | Path) -> Path:
        """Write the recipe as YAML to ``path`` and return the path."""
        path = Path(path)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        return path


_OWN_KEYS = [f.name for f in fields(Recipe)]
#: Keys that must be > 0.
_POSITIVE = (
    "beta learning_rate max_length per_device_train_batch_size gradient_accumulation_steps lora_r lora_alpha "
    "logging_steps"
).split()

#: The recipe keys by topic, in the order ``dpo-xpu train --help`` and the options table show them (every key once).
KEY_TOPICS: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
    (topic, tuple(keys.split()))
    for topic, keys in (
        ("the run", "model_name_or_path dataset_name_or_path output_dir backend device seed"),
        (
            "model and LoRA",
            "quantization bf16 gradient_checkpointing lora_r lora_alpha lora_dropout lora_target_modules "
            "sft_checkpoint adapter_name_or_path",
        ),
        (
            "data",
            "data_format chat_format limit eval_fraction dataset_mixture max_length max_prompt_length drop_long_rows",
        ),
        (
            "DPO loss and reference",
            "beta loss_type label_smoothing nll_loss_coef simpo_gamma reference_free reference reference_device "
            "prefix_sharing",
        ),
        (
            "optimisation",
            "learning_rate lr_scheduler_type warmup_steps max_steps num_train_epochs per_device_train_batch_size "
            "gradient_accumulation_steps",
        ),
        (
            "logging, evaluation and outputs",
            "logging_steps save_steps eval_steps eval_samples num_eval_samples max_new_tokens export",
        ),
    )
)


def recipe_keys() -> list[str]:
    """The recipe keys dpo_xpu documents (its own and :data:`TRL_KEY_DOCS`), by topic, then ``trl_options``."""
    return [key for _, keys in KEY_TOPICS for key in keys] + ["trl_options"]


def key_docs() -> dict[str, dict[str, Any]]:
    """Every recipe key of :func:`recipe_keys`: ``{"default", "unit", "help", "default_from"}`` (the default as a
    recipe file would hold it)."""
    own = {f.name: f for f in fields(Recipe)}
    docs = {}
    for key in recipe_keys():
        if key in own:
            docs[key] = {"default": _default(own[key]), **own[key].metadata}
        else:
            (default, default_from), (unit, help) = TRL_DEFAULT_OVERRIDES[key], TRL_KEY_DOCS[key]
            docs[key] = {"default": default, "unit": unit, "help": help, "default_from": default_from}
    return docs


def trl_default_differences() -> dict[str, tuple[Any, Any]]:
    """The recipe keys whose default differs from the installed TRL's ``DPOConfig``: ``{key: (dpo_xpu's default,
    TRL's default)}``. Each is deliberate: the reason is the key's ``default_from``."""
    from trl import DPOConfig

    trl_defaults = {f.name: f.default for f in fields(DPOConfig) if f.default is not dataclasses.MISSING}
    return {
        name: (doc["default"], trl_defaults[name])
        for name, doc in key_docs().items()
        if name in trl_defaults and doc["default"] != trl_defaults[name]
    }


def _markdown_value(value: Any) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return f"`{', '.join(value)}`"
    return f"`{value}`"


def options_table(full: bool = True) -> str:
    """The recipe keys as a Markdown table: key, type, default, unit or values, meaning and where the default comes
    from, with TRL's default where it differs (:func:`trl_default_differences`). ``full=False`` gives the README's
    short table: key, default, unit or values, where the default comes from."""
    differs = trl_default_differences()
    types = {f.name: f.type for f in fields(Recipe)}
    header = ["key", "type", "default", "unit / values", "meaning", "default from"]
    if not full:
        header = ["key", "default", "unit / values", "default from"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, doc in key_docs().items():
        origin = doc["default_from"]
        if name in differs:
            origin += f"; TRL's default: {_markdown_value(differs[name][1])}"
        cells = {
            "key": f"`{name}`",
            # python-markdown does not split a cell at a pipe inside a code span
            "type": f"`{types.get(name, type(doc['default']).__name__)}`",
            "default": _markdown_value(doc["default"]),
            "unit / values": doc["unit"],
            "meaning": doc["help"],
            "default from": origin,
        }
        rows.append("| " + " | ".join(cells[h] for h in header) + " |")
    return "\n".join(rows)


def trl_option_names() -> dict[str, Any]:
    """The installed TRL's ``DPOConfig`` options a recipe sets under their own names in ``trl_options``, with TRL's
    defaults: every field but the recipe keys and :data:`MANAGED_TRL_OPTIONS`, plus :data:`TRL_OPTION_ALIASES`."""
    names = {name: default for name, (_, _, default) in _trl_fields().items() if name not in TRL_KEY_DOCS}
    return {**names, **{alias: 0.0 for alias in TRL_OPTION_ALIASES if alias not in names}}


def trl_option_types() -> dict[str, Any]:
    """The annotation of each installed ``DPOConfig`` field a recipe may set (``trl_options`` and recipe keys)."""
    return {name: annotation for name, (annotation, _, _) in _trl_fields().items()}


@functools.cache
def _trl_fields() -> dict[str, tuple[Any, bool, Any]]:
    """``{option: (annotation, whether null is allowed, TRL's default)}`` for the installed ``DPOConfig``'s fields
    a recipe may set (null where the annotation or the default allows it)."""
    from trl import DPOConfig

    hints = get_type_hints(DPOConfig)
    return {
        f.name: (hints.get(f.name, Any), f.default in (None, dataclasses.MISSING), _default(f))
        for f in fields(DPOConfig)
        if f.init and not f.name.startswith("_") and f.name not in _OWN_KEYS and f.name not in MANAGED_TRL_OPTIONS
    }


@functools.cache
def _trl_parser() -> Any:
    """transformers' ``HfArgumentParser`` over the installed ``DPOConfig``: its argparse actions convert values."""
    from transformers import HfArgumentParser
    from trl import DPOConfig

    return HfArgumentParser(DPOConfig, exit_on_error=False)


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


def _convert(name: str, value: Any, annotation: Any, nullable: bool = False, option: str | None = None) -> Any:
    """A YAML or ``--set`` value (PyYAML reads ``5e-5`` as a string; ``"a,b"`` is a list) converted to a key's
    annotation, or refused, so that ``save_total_limit: abc`` fails here rather than at the first checkpoint. The
    values of a TRL ``option`` go through the argparse action transformers' ``HfArgumentParser`` builds for its
    ``DPOConfig`` field (its type, choices and nargs); dpo_xpu's keys through Python's ``int``, ``float``, ``str``.

    Raises:
        RecipeError: a value the key cannot hold (with what it expects; for an enum, the closest value), ``null``
            where it needs one, or a number that is not finite.
    """
    import argparse

    kinds = {get_origin(m) or m for m in _members(annotation)}
    if value is None:
        if nullable or kinds & {type(None), Any}:
            return None
        raise RecipeError(f"{name}: null is not allowed (expected {_words(annotation)})")
    if Any in kinds or isinstance(value, dict) and dict in kinds and option:
        return value
    if isinstance(value, dict) and dict in kinds:  # dataset_mixture: source -> proportion
        return {str(k): _convert(f"{name}[{k!r}]", v, float) for k, v in value.items()}
    lists = [m for m in _members(annotation) if get_origin(m) in (list, tuple) or m in (list, tuple)]
    if lists and not (str in kinds and isinstance(value, str)):
        if not isinstance(value, (list, tuple)):
            value = [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else [value]
        element = (get_args(lists[0]) or (str,))[0]
        return [_convert(f"{name}[{i}]", item, element, option=option) for i, item in enumerate(value)]
    if isinstance(value, (list, tuple, dict)) or isinstance(value, bool) and not kinds & {bool, str}:
        raise RecipeError(f"{name}: expected {_words(annotation)}, found {value!r}")
    if str in kinds and bool in kinds and str(value).strip().lower() == "auto":
        return "auto"  # a key that takes `auto` beside its own type (prefix_sharing)
    integer = int in kinds and float not in kinds
    number = _float(value) if kinds & {int, float} else None
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


def _float(value: Any) -> float | None:
    """``value`` (a number or a string holding one) as a float, or ``None``."""
    try:
        return None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


def _closest(word: str, candidates: list[str]) -> str | None:
    """The candidate closest to ``word`` (difflib), or ``None`` where none is close."""
    found = difflib.get_close_matches(word.lower(), candidates, n=1)
    return found[0] if found else None


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


def _trl_values(options: dict[str, Any]) -> dict[str, Any]:
    """TRL options checked and converted by transformers' ``HfArgumentParser`` (:func:`_convert`).

    Raises:
        RecipeError: a managed TRL option (with the key to use), an unknown key (with the closest valid one), or a
            value the option cannot hold.
    """
    managed = sorted(set(options) & set(MANAGED_TRL_OPTIONS))
    if managed:
        raise RecipeError(
            "; ".join(f"{key}: dpo_xpu sets this TRL option itself: {MANAGED_TRL_OPTIONS[key]}" for key in managed)
        )
    known = set(trl_option_names()) | set(TRL_KEY_DOCS)
    unknown = sorted(set(options) - known, key=str)
    if unknown:
        import trl

        close = {k: _closest(k, recipe_keys() + sorted(known)) for k in unknown}
        named = [f"{k} (did you mean {close[k]}?)" if close[k] else k for k in unknown]
        raise RecipeError(
            f"unknown recipe key{'s' if len(unknown) > 1 else ''} {', '.join(named)}: neither dpo_xpu's nor an "
            f"option of the installed TRL {trl.__version__}'s DPOConfig; fix the name (dpo-xpu train --help lists "
            "every key)"
        )
    trl_fields = _trl_fields()
    converted = {}
    for key, value in options.items():
        annotation, nullable, _ = trl_fields.get(key, (float | None, True, None))  # an alias: a number
        converted[key] = _convert(key, value, annotation, nullable, option=key if key in trl_fields else None)
    return converted


def make_recipe(values: dict[str, Any]) -> Recipe:
    """Build a :class:`Recipe` from a dict, rejecting unknown keys and converting types: dpo_xpu's keys to their
    field's type, TRL's options by transformers' ``HfArgumentParser`` for the installed ``DPOConfig``.

    Raises:
        RecipeError: an unknown key (the message suggests the closest valid one), a managed TRL option (with the key
            to use), a value of the wrong type, a number that is not finite, or a value out of range.
    """
    values = dict(values)
    names = [key for key in values if not isinstance(key, str)]
    if names:
        raise RecipeError(f"recipe key {names[0]!r} is not a name: keys are names such as learning_rate (key: value)")
    options = {**(values.pop("trl_options", None) or {})}
    options.update({key: values.pop(key) for key in list(values) if key not in _OWN_KEYS})
    hints = get_type_hints(Recipe)
    return Recipe(**{key: _convert(key, value, hints[key]) for key, value in values.items()}, trl_options=options)


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping (PyYAML itself keeps the last silently)."""


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain values only, no tags such as ``!!python/object``) that also refuses a key
    given twice in one mapping, at any depth."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` merges may be overridden on purpose
            key = self.construct_object(key_node, deep=True)
            try:
                first = first_seen.setdefault(key, key_node)
            except TypeError:
                continue  # an unhashable key: PyYAML's own error follows
            if first is not key_node:
                raise _DuplicateKeyError(
                    None,
                    None,
                    f"key {key!r} is given twice, on lines {first.start_mark.line + 1} and "
                    f"{key_node.start_mark.line + 1}",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError, text: str) -> tuple[str, str, str]:
    """A PyYAML error as one line's parts: where (``", line 2, column 1"``, or ``""``), what, and the fix."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow, found before parsing
        problem = str(exc).splitlines()[0]
        where = f", line {text.count(chr(10), 0, exc.position) + 1}"
    problem = " ".join(str(problem or type(exc).__name__).split()).replace("tag:yaml.org,2002:", "!!")
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context not in problem and context_mark and mark and context_mark.line != mark.line:
        problem += f" ({context} that starts on line {context_mark.line + 1})"
    if isinstance(exc, _DuplicateKeyError):
        fix = "keep one of them (YAML would silently keep the last)"
    elif "'\\t'" in problem:
        fix = "indent with spaces: YAML does not allow tabs"
    elif "constructor for the tag" in problem:
        fix = "remove the tag: a recipe holds plain values (numbers, strings, true/false, lists, mappings)"
    elif isinstance(exc, yaml.reader.ReaderError):
        fix = "remove that character"
    else:
        fix = (
            "check the indentation of that line and the one before (top-level keys start in column 1, nested ones "
            "are indented with spaces), and quote values that hold ': ', ' #' or brackets"
        )
    return where, problem, fix


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """Parse ``["key=value", ...]`` (the CLI's ``--set``) into a dict; values are read as YAML scalars.

    Raises:
        RecipeError: an item without ``=``, or a value that is not valid YAML (``beta=[``).
    """
    result: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set expects key=value, found {item!r}")
        try:
            result[key.strip()] = yaml.load(raw, Loader=_RecipeLoader) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise RecipeError(
                f"--set {item}: the value is not valid YAML ({_yaml_problem(exc, raw)[1]}); quote it"
            ) from None
    return result


def load_recipe(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Recipe:
    """Load a recipe from a YAML file (a mapping of recipe keys, UTF-8) and apply overrides.

    Args:
        path: YAML file; ``None`` starts from the defaults.
        overrides: ``["key=value", ...]`` as given to ``--set``, or a dict; applied after the file.

    Raises:
        RecipeError: the file is missing, is not UTF-8 (the byte, its offset and line), is not valid YAML (the line,
            the problem and the fix), repeats a key, is not a YAML mapping, or has unknown keys or bad values; each
            in one line naming the file or the key, and the fix.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise RecipeError(
                f"recipe file {path} is not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line}) "
                "is not valid UTF-8 (a Latin-1 or Windows-1252 file?); save it as UTF-8 (iconv -f latin1 -t utf-8, "
                "or your editor's encoding setting)"
            ) from None
        try:
            loaded = yaml.load(text, Loader=_RecipeLoader)
        except yaml.YAMLError as exc:
            where, problem, fix = _yaml_problem(exc, text)
            raise RecipeError(f"recipe file {path}{where}: {problem}; {fix}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise RecipeError(
                f"recipe file {path} must be a mapping of recipe keys (key: value), found {type(loaded).__name__}"
            )
        values.update(loaded or {})
    values.update(overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    return make_recipe(values)
