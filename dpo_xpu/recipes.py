"""Recipes: every setting of a run in one flat mapping, loadable from YAML.

A recipe holds dpo_xpu's own keys (model, data, backend, reference, LoRA, export, the loss keys it maps onto each
TRL generation ...: :class:`Recipe`) and any option of the installed TRL's ``DPOConfig`` (and transformers'
``TrainingArguments``) under its own name, passed to TRL as it is. It is not a ``DPOConfig``: one recipe serves both
TRL generations (0.11 for ipex-llm, 1.x for the native backend), whose fields differ. Values and dpo_xpu's defaults
over TRL's: :mod:`dpo_xpu.recipe_values`; the YAML files: :mod:`dpo_xpu.recipe_files`.

    >>> recipe = load_recipe("recipes/cpu_demo.yaml", overrides=["max_steps=5"])
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from dpo_xpu.errors import RecipeError
from dpo_xpu.recipe_files import read_recipe_file, recipe_mapping, with_overrides, write_recipe_file
from dpo_xpu.recipe_values import (  # the noqa names: other modules import them from here
    BACKENDS,
    CHAT_FORMATS,
    DEFAULT_LORA_TARGETS,
    DEVICE_PATTERN,  # noqa: F401
    KEY_TOPICS,  # noqa: F401
    ORIGINAL,
    OURS,
    TRL_DEFAULT_OVERRIDES,
    TRL_KEY_DOCS,
    TRL_OPTION_ALIASES,
    check_values,
    convert_value,
    field_default,
    merge_trl_options,
    recipe_keys,
    trl_fields,
    trl_values,
)


def _key(default: Any, unit: str | tuple, help: str, default_from: str) -> Any:
    """A dpo_xpu recipe key: its default, and in the field's metadata its unit or its allowed values (a tuple, kept as
    ``choices`` and checked by :class:`Recipe`), meaning and the source of its default (:func:`key_docs`:
    ``dpo-xpu train --help``, the options page and the README's table)."""
    metadata = {"unit": unit, "help": help, "default_from": default_from}
    if isinstance(unit, tuple):  # shown as `a` \| bool \| `b`
        words = dict.fromkeys("bool" if isinstance(c, bool) else f"`{c}`" for c in unit)
        metadata.update(unit=" \\| ".join(words), choices=unit)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(init=False, eq=False)
class Recipe:
    """All settings of a DPO run. Defaults are the original recipe (Labonne, "Fine-tune a Mistral-7b model with
    DPO", as ported to Intel GPUs by ipex-llm's DPO example), except ``reference``.

    The fields are dpo_xpu's own keys. TRL's options (the training keys of ``TRL_KEY_DOCS`` such as
    ``learning_rate``, and every other one: :func:`trl_option_names`) are keywords and attributes under their own
    names, kept in ``trl_options``: ``recipe.learning_rate`` is the recipe's value, else dpo_xpu's
    (``TRL_DEFAULT_OVERRIDES``), else the installed TRL's default. Assigning ``trl_options`` replaces the other
    options and keeps the training keys it does not name. The options ``recipe_values.MANAGED_TRL_OPTIONS`` lists are
    refused with the key to use; ``warmup_ratio`` is accepted on every transformers and replaces ``warmup_steps``.

    Raises:
        RecipeError: an unknown key (with the closest), a value of the wrong type (keywords and assignments are
            converted and checked as a recipe file's values are), out of range or not allowed.
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
    backend: str = _key("native", BACKENDS, "the software stack (see [Backends](backends.md))", OURS)
    device: str = _key(
        "auto", "`auto` \\| `xpu` \\| `cuda` \\| `cpu`, optionally `:N`", "`auto` picks xpu, then cuda, then cpu", OURS
    )
    quantization: str = _key(
        "nf4", ("nf4", "none"), "4-bit NormalFloat base weights (QLoRA, Dettmers et al. 2023)", ORIGINAL
    )
    reference: str = _key(
        "auto",
        ("auto", "adapter-off", "separate", "precomputed"),
        "how reference log-probs are computed (see [reference strategies](how-dpo-works.md#reference-strategies)); "
        "`auto`: `precomputed` where it saves work, else what the other keys need, with the reason logged",
        f"{OURS} (the original loaded a `separate` NF4 copy)",
    )
    prefix_sharing: bool | str = _key(
        "auto",
        ("auto", True, False, "unpacked"),
        "run each pair as one sequence with the prompt computed once, for policy and reference, several pairs per "
        "row with no padding (see [prefix sharing](how-dpo-works.md#prefix-sharing)); native backend, sdpa or eager "
        "attention; `auto`: on where it runs, off with the reason logged; one row per pair (logged) with eager "
        "attention or a reference precomputed in bf16; `unpacked`: always one row per pair",
        f"{OURS} (TRL runs two sequences per pair), after Wang et al. 2024 (arXiv:2410.20305)",
    )
    limit: int | None = _key(
        None, "rows", "keep this many rows after a seeded shuffle; `null` keeps all", f"{OURS} (all rows)"
    )
    eval_fraction: float = _key(0.0, "fraction of rows, in [0, 1)", "rows held out for evaluation; 0 disables it", OURS)
    data_format: str = _key(
        "auto",
        ("auto", "orca", "prompt-chosen-rejected", "conversational"),
        "the columns of the data: orca (`system`, `question`, `chosen`, `rejected`), plain `prompt`/`chosen`/"
        "`rejected` strings, or TRL's conversational format (`prompt`/`chosen`/`rejected` as lists of `{role, "
        "content}` messages, or only `chosen`/`rejected` holding whole conversations, whose shared start is the "
        "prompt), formatted with the tokenizer's chat template; `auto` decides from the columns",
        OURS,
    )
    chat_format: str = _key(
        "auto",
        CHAT_FORMATS,
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
        ("same", "cpu"),
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
        ("adapter", "merged"),
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
        top = {name: values.pop(name) for name in list(values) if name not in _OWN_KEYS}
        for f in fields(self):
            value = convert_value(f.name, values[f.name], _TYPES[f.name]) if f.name in values else field_default(f)
            object.__setattr__(self, f.name, value)
        object.__setattr__(self, "trl_options", merge_trl_options(trl_options, top, _OWN_KEYS))
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
        """A key's value, converted and checked as a recipe file's is; a TRL option goes into ``trl_options``;
        ``trl_options`` itself replaces the other options and keeps the training keys.

        Raises:
            RecipeError: an unknown name (with the closest key) or a refused value; the recipe is left unchanged.
        """
        if name.startswith("_"):
            return object.__setattr__(self, name, value)
        if name == "trl_options":
            kept = {key: v for key, v in self.trl_options.items() if key in TRL_KEY_DOCS}
            value = {**kept, **merge_trl_options(value, {}, _OWN_KEYS)}
        elif name in _OWN_KEYS:
            value = convert_value(name, value, _TYPES[name])
        else:  # a TRL option, or an unknown name: refused with the closest key
            name, value = "trl_options", {**self.trl_options, **trl_values({name: value}, _OWN_KEYS)}
        trial = copy.copy(self)  # checked as a whole before the recipe changes
        if name != "max_prompt_length" and self.__dict__.get("_derived_prompt_length"):
            object.__setattr__(trial, "max_prompt_length", None)  # derived from max_length again
        object.__setattr__(trial, name, value)
        trial._check()
        self.__dict__.update(trial.__dict__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and self.to_dict() == other.to_dict()

    def _check(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                words = ", ".join(str(c).lower() for c in choices)
                raise RecipeError(f"{f.name}: {getattr(self, f.name)!r} is not one of {words}")
        check_values(self.to_dict())
        object.__setattr__(self, "_derived_prompt_length", self.max_prompt_length is None)
        if self.max_prompt_length is None:  # the original recipe's ratio (1024 of 1536): lowering max_length composes
            object.__setattr__(self, "max_prompt_length", max(1, self.max_length * 2 // 3))
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
        return write_recipe_file(path, self.to_dict())


_TYPES = get_type_hints(Recipe)  # dpo_xpu's own keys and their annotations
_OWN_KEYS = list(_TYPES)


def key_docs() -> dict[str, dict[str, Any]]:
    """Every recipe key of :func:`recipe_keys`: ``{"default", "unit", "help", "default_from"}`` (the default as a
    recipe file would hold it), and ``"choices"`` where a key has them."""
    docs = {f.name: {"default": field_default(f), **f.metadata} for f in fields(Recipe)}
    for key, (unit, help) in TRL_KEY_DOCS.items():
        default, default_from = TRL_DEFAULT_OVERRIDES[key]
        docs[key] = {"default": default, "unit": unit, "help": help, "default_from": default_from}
    return {key: docs[key] for key in recipe_keys()}


def trl_default_differences() -> dict[str, tuple[Any, Any]]:
    """The recipe keys whose default differs from the installed TRL's ``DPOConfig``: ``{key: (dpo_xpu's default,
    TRL's default)}``. Each is deliberate: the reason is the key's ``default_from``."""
    from trl import DPOConfig

    trl_defaults = {f.name: f.default for f in dataclasses.fields(DPOConfig) if f.default is not dataclasses.MISSING}
    return {
        name: (doc["default"], trl_defaults[name])
        for name, doc in key_docs().items()
        if name in trl_defaults and doc["default"] != trl_defaults[name]
    }


def _markdown_value(value: Any) -> str:
    if isinstance(value, list):
        return f"`{', '.join(value)}`"
    return f"`{'null' if value is None else str(value).lower() if isinstance(value, bool) else value}`"


def options_table(full: bool = True) -> str:
    """The recipe keys as a Markdown table: key, type, default, unit or values, meaning and where the default comes
    from, with TRL's default where it differs (:func:`trl_default_differences`). ``full=False`` gives the README's
    short table: key, default, unit or values, where the default comes from."""
    differs, types = trl_default_differences(), {f.name: f.type for f in fields(Recipe)}
    header = ["key", "type", "default", "unit / values", "meaning", "default from"]
    header = header if full else ["key", "default", "unit / values", "default from"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, doc in key_docs().items():
        theirs = f"; TRL's default: {_markdown_value(differs[name][1])}" if name in differs else ""
        cells = {
            "key": f"`{name}`",
            "type": f"`{types.get(name, type(doc['default']).__name__)}`",  # no cell split at a code span's pipe
            "default": _markdown_value(doc["default"]),
            "unit / values": doc["unit"],
            "meaning": doc["help"],
            "default from": doc["default_from"] + theirs,
        }
        rows.append("| " + " | ".join(cells[h] for h in header) + " |")
    return "\n".join(rows)


def trl_option_names() -> dict[str, Any]:
    """The installed TRL's ``DPOConfig`` options a recipe sets under their own names in ``trl_options``, with TRL's
    defaults: every field but the recipe keys and the managed ones, plus ``TRL_OPTION_ALIASES``."""
    skip = {*TRL_KEY_DOCS, *_OWN_KEYS}
    names = {name: default for name, (_, _, default) in trl_fields().items() if name not in skip}
    return {**names, **{alias: 0.0 for alias in TRL_OPTION_ALIASES if alias not in names}}


def trl_option_types() -> dict[str, Any]:
    """The annotation of each installed ``DPOConfig`` field a recipe may set (``trl_options`` and recipe keys)."""
    return {name: annotation for name, (annotation, _, _) in trl_fields().items() if name not in _OWN_KEYS}


def make_recipe(values: dict[str, Any]) -> Recipe:
    """Build a :class:`Recipe` from a dict, rejecting unknown keys and converting types: dpo_xpu's keys to their
    field's type, TRL's options by transformers' ``HfArgumentParser`` for the installed ``DPOConfig``.

    Raises:
        RecipeError: not a mapping of key names, an unknown key (the message suggests the closest valid one), a
            managed TRL option (with the key to use), a value of the wrong type, not finite, or out of range, or a
            TRL option given both as a top-level key and in ``trl_options`` with different values.
    """
    values = recipe_mapping(values)
    top = {key: values.pop(key) for key in list(values) if key not in _OWN_KEYS}
    return Recipe(trl_options=merge_trl_options(values.pop("trl_options", None), top, _OWN_KEYS, once=True), **values)


def load_recipe(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Recipe:
    """Load a recipe from a YAML file (a mapping of recipe keys, UTF-8) and apply overrides.

    Args:
        path: YAML file; ``None`` starts from the defaults.
        overrides: ``["key=value", ...]`` as given to ``--set``, or a dict; applied after the file.

    Raises:
        RecipeError: ``path`` is not a path, the file is missing or a folder, is not UTF-8 (the byte, its offset and
            line), is not valid YAML (the line, the problem and the fix), repeats a key, is not a YAML mapping, has
            unknown keys or bad values, or ``overrides`` are not ``key=value`` strings; each in one line naming the
            file or the key, and the fix.
    """
    return make_recipe(with_overrides(read_recipe_file(path) if path is not None else {}, overrides))
