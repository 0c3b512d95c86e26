"""Recipes: every hyperparameter of a run in one flat dataclass, loadable from YAML.

A recipe names the model, the data, the backend and the training values. Training keys keep TRL's
names (``beta``, ``learning_rate``, ``max_length``, ...) and are mapped onto ``trl.DPOConfig`` by
:func:`dpo_xpu.pipeline.make_dpo_trainer`. The recipe is our own dataclass rather than a subclass of
``DPOConfig`` because one recipe must serve both TRL generations (0.11 for ipex-llm, 1.x for the native
backend), whose ``DPOConfig`` fields differ, and because it also holds model and data keys TRL lacks.

    >>> recipe = load_recipe("recipes/cpu_demo.yaml", overrides=["max_steps=5"])
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import re
import types
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


def _key(
    *, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING, unit: str, help: str, default_from: str
) -> Any:
    """A recipe key: its default and, in the field's metadata (as TRL's ``DPOConfig`` keeps its help), the unit or
    allowed values, the meaning, and where the default comes from. ``dpo-xpu train --help``, the docs' options page
    and the README's table are all made from this metadata (:func:`key_docs`)."""
    metadata = {"unit": unit, "help": help, "default_from": default_from}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Recipe:
    """All settings of a DPO run. Defaults are the original recipe (Labonne, "Fine-tune a Mistral-7b model
    with DPO", as ported to Intel GPUs by ipex-llm's DPO example), except ``reference``.

    Each key is declared once below, with its unit, meaning and the source of its default in the field's metadata
    (:func:`key_docs`; the docs' options page, the README's table and ``dpo-xpu train --help`` show them). Keys that
    TRL's ``DPOConfig`` also has keep TRL's names; where their default differs from TRL's,
    :func:`trl_default_differences` lists both, and the options page shows TRL's next to the reason for ours.

    TRL's other options: ``trl_options`` holds every other option of the installed TRL's ``DPOConfig`` (and of
        transformers' ``TrainingArguments`` under it), given as top-level recipe keys under their own names
        (``ld_alpha: 0.5``, ``use_weighting: true``, ``save_total_limit: 2``, ``report_to: [tensorboard]``, ...;
        see :func:`trl_option_names`), with TRL's defaults. They are passed to ``DPOConfig`` as they are, after the
        keys above, except those dpo_xpu sets from its own keys (:data:`MANAGED_TRL_OPTIONS`, refused with the key to
        use). ``warmup_ratio`` is accepted on every transformers (5.x has folded it into a fractional
        ``warmup_steps``) and replaces ``warmup_steps``.
    """

    model_name_or_path: str = _key(
        default="teknium/OpenHermes-2.5-Mistral-7B",
        unit="hub id, folder or `.gguf` file",
        help="the base (SFT) model",
        default_from=f"{ORIGINAL}",
    )
    dataset_name_or_path: str = _key(
        default="Intel/orca_dpo_pairs",
        unit="hub id or file",
        help="`Intel/orca_dpo_pairs` or a local `.jsonl` / `.json` / `.parquet` with its columns",
        default_from=f"{ORIGINAL}",
    )
    output_dir: str = _key(
        default="runs/dpo",
        unit="folder",
        help="the run folder (recipe, metrics, curves, adapter); never overwritten silently",
        default_from=f"{OURS}",
    )
    backend: str = _key(
        default="native",
        unit="`native` \\| `ipex-llm`",
        help="the software stack (see [Backends](backends.md))",
        default_from=f"{OURS}",
    )
    device: str = _key(
        default="auto",
        unit="`auto` \\| `xpu` \\| `cuda` \\| `cpu`, optionally `:N`",
        help="`auto` picks xpu, then cuda, then cpu",
        default_from=f"{OURS}",
    )
    quantization: str = _key(
        default="nf4",
        unit="`nf4` \\| `none`",
        help="4-bit NormalFloat base weights (QLoRA, Dettmers et al. 2023)",
        default_from=f"{ORIGINAL}",
    )
    reference: str = _key(
        default="auto",
        unit="`auto` \\| `adapter-off` \\| `separate` \\| `precomputed`",
        help=(
            "how reference log-probs are computed (see [reference strategies](how-dpo-works.md#reference-strategies)"
            "); `auto`: `precomputed` where it saves work, else what the other keys need, with the reason logged"
        ),
        default_from=f"{OURS} (the original loaded a `separate` NF4 copy)",
    )
    prefix_sharing: bool | str = _key(
        default="auto",
        unit="`auto` \\| bool",
        help=(
            "run each pair as one sequence with the prompt computed once, for policy and reference (see [prefix "
            "sharing](how-dpo-works.md#prefix-sharing)); native backend, sdpa or eager attention; `auto`: on where "
            "it runs, off with the reason logged elsewhere"
        ),
        default_from=f"{OURS} (TRL runs two sequences per pair), after Wang et al. 2024 (arXiv:2410.20305)",
    )
    limit: int | None = _key(
        default=None,
        unit="rows",
        help="keep this many rows after a seeded shuffle; `null` keeps all",
        default_from=f"{OURS} (all rows)",
    )
    eval_fraction: float = _key(
        default=0.0,
        unit="fraction of rows, in [0, 1)",
        help="rows held out for evaluation; 0 disables it",
        default_from=f"{OURS}",
    )
    data_format: str = _key(
        default="auto",
        unit="`auto` \\| `orca` \\| `prompt-chosen-rejected` \\| `conversational`",
        help=(
            "the columns of the data: orca (`system`, `question`, `chosen`, `rejected`), plain "
            "`prompt`/`chosen`/`rejected` strings, or TRL's conversational format (`prompt`/`chosen`/`rejected` as "
            "lists of `{role, content}` messages, or only `chosen`/`rejected` holding whole conversations, whose "
            "shared start is the prompt), formatted with the tokenizer's chat template; `auto` decides from the "
            "columns"
        ),
        default_from=f"{OURS}",
    )
    chat_format: str = _key(
        default="auto",
        unit="`auto` \\| `model` \\| `chatml`",
        help=(
            "how rows become text: auto writes orca and plain rows in ChatML (the original recipe; a warning says "
            "when the model's own template is not ChatML) and conversational rows in the model's own chat template; "
            "model writes every row in the model's template; chatml writes every row in ChatML. A tokenizer without "
            "a chat template always gets ChatML"
        ),
        default_from=f"{ORIGINAL} (ChatML for orca rows)",
    )
    dataset_mixture: dict[str, float] | None = _key(
        default=None,
        unit="mapping source: proportion",
        help="several sources mixed with these proportions (normalised) and `seed`, instead of `dataset_name_or_path`",
        default_from=f"{OURS} (off), as open-instruct's dataset mixer",
    )
    drop_long_rows: bool = _key(
        default=False,
        unit="bool",
        help="drop pairs longer than `max_length` tokens (counts reported) instead of truncating them",
        default_from=f"{OURS} (off), as open-instruct's length filter",
    )
    sft_checkpoint: str | None = _key(
        default=None,
        unit="file or `null`",
        help="an SFT state dict (`policy.pt`, key `state`) loaded into policy and reference before quantization",
        default_from="the original DPO code's starting point (off)",
    )
    adapter_name_or_path: str | None = _key(
        default=None,
        unit="folder or `null`",
        help="an existing LoRA adapter to continue training from",
        default_from=f"{OURS}",
    )
    reference_device: str = _key(
        default="same",
        unit="`same` \\| `cpu`",
        help="`cpu` keeps a `separate` reference off the accelerator (less device memory, slower steps)",
        default_from=f"{OURS} (`same`), as OpenRLHF's reference offload",
    )
    lora_r: int = _key(
        default=16, unit="rank", help="rank of the LoRA matrices (Hu et al. 2021)", default_from=f"{ORIGINAL}"
    )
    lora_alpha: int = _key(
        default=16,
        unit="scale numerator",
        help="the LoRA update is scaled by `lora_alpha / lora_r`",
        default_from=f"{ORIGINAL}",
    )
    lora_dropout: float = _key(
        default=0.05,
        unit="probability",
        help=(
            "dropout on the adapter input; TRL's DPO trainer sets every dropout to 0 (its `disable_dropout`, on by "
            "default in TRL 0.11 and 1.x), so it acts only where the adapter is trained outside DPO"
        ),
        default_from=f"{ORIGINAL}",
    )
    lora_target_modules: list[str] = _key(
        factory=lambda: list(DEFAULT_LORA_TARGETS),
        unit="layer names",
        help="linear layers that get adapters; names the model lacks are skipped",
        default_from=f"{ORIGINAL} (all attention and MLP projections)",
    )
    beta: float = _key(
        default=0.1,
        unit="dimensionless",
        help="strength of the pull towards the reference (Rafailov et al. 2023, eq. 7); rewards are scaled by it",
        default_from=f"{ORIGINAL} (also TRL's default)",
    )
    loss_type: str = _key(
        default="sigmoid",
        unit="TRL loss name",
        help="`sigmoid` is the DPO loss of eq. 7; others as TRL documents",
        default_from="TRL's default",
    )
    label_smoothing: float = _key(
        default=0.0,
        unit="probability in [0, 0.5)",
        help="conservative DPO: the assumed rate of flipped preference labels (Mitchell 2023)",
        default_from="the original DPO code (0: plain DPO)",
    )
    reference_free: bool = _key(
        default=False,
        unit="bool",
        help="take the reference log-probs as 0 (a uniform reference)",
        default_from="the original DPO code (off)",
    )
    nll_loss_coef: float = _key(
        default=0.0,
        unit="weight",
        help=(
            "adds this times the NLL of the chosen answers' tokens, averaged over all of them in the micro-batch "
            "(TRL's `sft` term; `rpo_alpha` on TRL 0.11)"
        ),
        default_from="OpenRLHF (0: off)",
    )
    simpo_gamma: float = _key(
        default=0.5,
        unit="nats",
        help="SimPO's target reward margin (Meng et al. 2024, eq. 6); used by `loss_type: simpo`",
        default_from="SimPO's paper range, as TRL's CPO default (0.5)",
    )
    learning_rate: float = _key(
        default=5e-5,
        unit="AdamW step size",
        help="peak learning rate, reached after the warmup",
        default_from=f"{ORIGINAL}",
    )
    lr_scheduler_type: str = _key(
        default="cosine",
        unit="scheduler name",
        help="learning-rate schedule after the warmup (transformers' names)",
        default_from=f"{ORIGINAL}",
    )
    warmup_steps: int = _key(
        default=100,
        unit="optimizer steps",
        help="linear warmup from 0; the first logged step has learning rate 0",
        default_from=f"{ORIGINAL}",
    )
    max_steps: int = _key(
        default=200,
        unit="optimizer steps",
        help="training length; `-1` uses `num_train_epochs`",
        default_from=f"{ORIGINAL}",
    )
    num_train_epochs: float = _key(
        default=1.0, unit="passes over the data", help="used only when `max_steps` is `-1`", default_from=f"{OURS}"
    )
    per_device_train_batch_size: int = _key(
        default=4, unit="preference pairs", help="pairs per device per forward pass", default_from=f"{ORIGINAL}"
    )
    gradient_accumulation_steps: int = _key(
        default=4,
        unit="micro-batches",
        help="micro-batches per optimizer step (pairs per update = batch size x this)",
        default_from=f"{ORIGINAL}",
    )
    max_length: int = _key(
        default=1536,
        unit="tokens",
        help="longest prompt + answer; longer sequences are cut",
        default_from=f"{ORIGINAL}",
    )
    max_prompt_length: int | None = _key(
        default=None,
        unit="tokens",
        help=(
            "longest prompt; longer prompts keep their end. `null` (unset): two thirds of `max_length`, so lowering "
            "`max_length` alone keeps a valid recipe (1024 of the default 1536); set, it must be below `max_length`"
        ),
        default_from=f"{ORIGINAL} (its ratio, 1024 of 1536)",
    )
    gradient_checkpointing: bool = _key(
        default=True,
        unit="bool",
        help="recompute activations in the backward pass: less memory, slower",
        default_from=f"{ORIGINAL}",
    )
    bf16: bool = _key(
        default=True,
        unit="bool",
        help="bfloat16 compute (float32 when false; use false on CPUs without AMX)",
        default_from=f"{ORIGINAL}",
    )
    logging_steps: int = _key(
        default=1,
        unit="optimizer steps",
        help="one `metrics.jsonl` row and one curve redraw every this many steps",
        default_from=f"{ORIGINAL}",
    )
    save_steps: int = _key(
        default=100,
        unit="optimizer steps",
        help="a checkpoint every this many steps",
        default_from=f"{OURS} (the original saved none)",
    )
    eval_steps: int | None = _key(
        default=None,
        unit="optimizer steps or `null`",
        help="evaluate the held-out split every this many steps and at step 0; `null`: no evaluation during training",
        default_from=f"{OURS}",
    )
    eval_samples: bool = _key(
        default=True,
        unit="bool",
        help="also generate policy and reference answers at each evaluation",
        default_from=f"{OURS} (on)",
    )
    num_eval_samples: int = _key(
        default=4,
        unit="prompts",
        help="how many fixed eval prompts are answered at each evaluation",
        default_from=f"{OURS}",
    )
    max_new_tokens: int = _key(
        default=64, unit="tokens", help="length limit of each generated sample", default_from=f"{OURS}"
    )
    export: str = _key(
        default="adapter",
        unit="`adapter` \\| `merged`",
        help="save the LoRA adapter only, or merged into a bf16 copy of the base (float32 where bf16 would move the "
        "logits on the run's prompts by more than 10% of the adapter's own effect, or change a greedy answer; the "
        "check in merge_check.json)",
        default_from=f"{OURS} (`adapter`), as OpenRLHF's LoRA-only save",
    )
    seed: int = _key(
        default=42,
        unit="integer",
        help="seed of the shuffle, the split and the LoRA initialisation",
        default_from="transformers' default",
    )
    trl_options: dict[str, Any] = _key(
        factory=dict,
        unit="TRL option: value",
        help=(
            "every other option of the installed TRL's `DPOConfig` (and transformers' `TrainingArguments`), written "
            "as a top-level key under its own name (`ld_alpha: 0.5`, `report_to: [tensorboard]`); `dpo-xpu train "
            "--help` lists them"
        ),
        default_from="TRL's defaults",
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name == "trl_options":
                for name, value in (self.trl_options or {}).items():
                    _check_number(name, value)
            else:
                _check_number(f.name, getattr(self, f.name))
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("quantization", self.quantization, QUANTIZATIONS)
        _check_choice("reference", self.reference, REFERENCE_STRATEGIES)
        _check_choice("data_format", self.data_format, DATA_FORMATS)
        _check_choice("chat_format", self.chat_format, CHAT_FORMATS)
        _check_choice("export", self.export, EXPORT_FORMATS)
        _check_choice("reference_device", self.reference_device, ("same", "cpu"))
        if not 0.0 <= self.label_smoothing < 0.5:
            raise RecipeError(f"label_smoothing: must be in [0, 0.5) (conservative DPO), found {self.label_smoothing}")
        if self.nll_loss_coef < 0:
            raise RecipeError(f"nll_loss_coef: must be >= 0, found {self.nll_loss_coef}")
        if self.prefix_sharing not in (True, False, "auto"):
            raise RecipeError(f"prefix_sharing: {self.prefix_sharing!r} is not one of auto, true, false")
        if self.prefix_sharing is True and self.backend == "ipex-llm":
            raise RecipeError(
                "prefix_sharing: needs the native backend (TRL 1.x's fused LM head); the ipex-llm stack pins TRL "
                "0.11. Set prefix_sharing: false, or backend: native"
            )
        if self.reference_device == "cpu" and self.reference not in ("separate", "auto"):
            raise RecipeError("reference_device: 'cpu' needs reference: separate (only a separate model can move)")
        if self.dataset_mixture is not None:
            if not self.dataset_mixture or any(w <= 0 for w in self.dataset_mixture.values()):
                raise RecipeError(
                    "dataset_mixture must map each source to a positive proportion. Expected format: "
                    f"{{'Intel/orca_dpo_pairs': 0.7, 'my_pairs.jsonl': 0.3}}; found {self.dataset_mixture!r}"
                )
        if not re.fullmatch(DEVICE_PATTERN, self.device):
            raise RecipeError(f"device: {self.device!r} is not one of auto, xpu, cuda, cpu (optionally ':N')")
        for name in (
            "beta",
            "learning_rate",
            "max_length",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "lora_r",
            "lora_alpha",
            "logging_steps",
        ):
            if getattr(self, name) <= 0:
                raise RecipeError(f"{name}: must be > 0, found {getattr(self, name)}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise RecipeError(f"eval_fraction: must be in [0, 1), found {self.eval_fraction}")
        _check_ranges(self)
        if self.max_prompt_length is None:
            # the original recipe's ratio (1024 of 1536), so that lowering max_length alone composes
            self.max_prompt_length = max(1, self.max_length * 2 // 3)
        if self.max_prompt_length >= self.max_length:
            raise RecipeError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length "
                f"({self.max_length}), or the answers would be cut away"
            )

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a plain dict (YAML/JSON-serialisable): dpo_xpu's keys, then TRL's options as top-level keys
        (so the dict, and ``recipe.yaml``, read back through :func:`make_recipe`)."""
        values = dataclasses.asdict(self)
        values.update(values.pop("trl_options"))
        return values

    def save(self, path: str | Path) -> Path:
        """Write the recipe as YAML to ``path`` and return the path."""
        path = Path(path)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        return path


#: transformers' learning-rate schedules, where ``transformers.SchedulerType`` cannot be imported.
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "greedy",
)


def lr_schedulers() -> tuple[str, ...]:
    """The learning-rate schedule names the installed transformers accepts (``transformers.SchedulerType``)."""
    try:
        from transformers.trainer_utils import SchedulerType
    except ImportError:  # pragma: no cover - transformers is a dependency
        return LR_SCHEDULERS
    return tuple(item.value for item in SchedulerType)


def _check_ranges(recipe: Recipe) -> None:
    """Range-check the numeric keys (and the schedule's name) before anything is loaded or written.

    Raises:
        RecipeError: the first key out of range, with the range and the fix.
    """
    checks = [
        ("warmup_steps", recipe.warmup_steps >= 0, ">= 0 (optimizer steps of linear warmup)"),
        ("lora_dropout", 0.0 <= recipe.lora_dropout < 1.0, "in [0, 1) (a probability)"),
        (
            "max_steps",
            recipe.max_steps > 0 or recipe.max_steps == -1,
            "> 0, or -1 to train for num_train_epochs (0 and other negative values train nothing meaningful)",
        ),
        ("num_train_epochs", recipe.num_train_epochs > 0, "> 0 (passes over the data)"),
        ("save_steps", recipe.save_steps > 0, "> 0 (optimizer steps between checkpoints)"),
        ("eval_steps", recipe.eval_steps is None or recipe.eval_steps > 0, "> 0, or null for no evaluation"),
        ("limit", recipe.limit is None or recipe.limit > 0, "> 0 rows, or null for all"),
        ("num_eval_samples", recipe.num_eval_samples >= 0, ">= 0"),
        ("max_new_tokens", recipe.max_new_tokens > 0, "> 0 tokens"),
        ("max_prompt_length", recipe.max_prompt_length is None or recipe.max_prompt_length > 0, "> 0 tokens"),
        ("simpo_gamma", recipe.simpo_gamma >= 0, ">= 0 nats"),
        ("seed", recipe.seed >= 0, ">= 0"),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise RecipeError(f"{name}: must be {expected}, found {getattr(recipe, name)}")
    schedules = lr_schedulers()
    if recipe.lr_scheduler_type not in schedules:
        raise RecipeError(
            f"lr_scheduler_type: {recipe.lr_scheduler_type!r} is not one of the installed transformers' schedules "
            f"({', '.join(schedules)})"
        )


#: dpo_xpu's recipe keys by topic, in the order ``dpo-xpu train --help`` shows them (every key once).
KEY_TOPICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("the run", ("model_name_or_path", "dataset_name_or_path", "output_dir", "backend", "device", "seed")),
    (
        "model and LoRA",
        (
            "quantization",
            "bf16",
            "gradient_checkpointing",
            "lora_r",
            "lora_alpha",
            "lora_dropout",
            "lora_target_modules",
            "sft_checkpoint",
            "adapter_name_or_path",
        ),
    ),
    (
        "data",
        (
            "data_format",
            "chat_format",
            "limit",
            "eval_fraction",
            "dataset_mixture",
            "max_length",
            "max_prompt_length",
            "drop_long_rows",
        ),
    ),
    (
        "DPO loss and reference",
        (
            "beta",
            "loss_type",
            "label_smoothing",
            "nll_loss_coef",
            "simpo_gamma",
            "reference_free",
            "reference",
            "reference_device",
            "prefix_sharing",
        ),
    ),
    (
        "optimisation",
        (
            "learning_rate",
            "lr_scheduler_type",
            "warmup_steps",
            "max_steps",
            "num_train_epochs",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
        ),
    ),
    (
        "logging, evaluation and outputs",
        ("logging_steps", "save_steps", "eval_steps", "eval_samples", "num_eval_samples", "max_new_tokens", "export"),
    ),
)


def recipe_keys() -> list[str]:
    """Names of dpo_xpu's own recipe keys, in declaration order (TRL's other options: :func:`trl_option_names`)."""
    return [f.name for f in fields(Recipe)]


def key_docs() -> dict[str, dict[str, Any]]:
    """Every dpo_xpu recipe key, in declaration order: ``{"default", "unit", "help", "default_from"}`` (the default
    as a recipe file would hold it)."""
    docs = {}
    for f in fields(Recipe):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        docs[f.name] = {"default": default, **f.metadata}
    return docs


def trl_default_differences() -> dict[str, tuple[Any, Any]]:
    """dpo_xpu's keys that the installed TRL's ``DPOConfig`` also has, with another default: ``{key: (dpo_xpu's
    default, TRL's default)}``. Each is deliberate: the original recipe's value (see each key's ``default_from``)."""
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
    """dpo_xpu's recipe keys as a Markdown table: key, type, default, unit or values, meaning and where the default
    comes from, with TRL's default where it differs (:func:`trl_default_differences`). ``full=False`` gives the
    README's short table: key, default, unit or values, where the default comes from."""
    differs = trl_default_differences()
    types = {f.name: f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "") for f in fields(Recipe)}
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
            "type": f"`{types[name]}`",  # python-markdown does not split a cell at a pipe inside a code span
            "default": _markdown_value(doc["default"]),
            "unit / values": doc["unit"],
            "meaning": doc["help"],
            "default from": origin,
        }
        rows.append("| " + " | ".join(cells[h] for h in header) + " |")
    return "\n".join(rows)


#: ``DPOConfig`` options that dpo_xpu sets from its own keys: the key to use instead, and why.
MANAGED_TRL_OPTIONS = {
    "precompute_ref_log_probs": "set reference: precomputed (dpo_xpu computes and caches them itself)",
    "use_cpu": "set device: cpu",
    "remove_unused_columns": "dpo_xpu keeps its columns (it needs false)",
    "model_init_kwargs": "dpo_xpu loads the models itself: use quantization, bf16 and device",
    "ref_model_init_kwargs": "dpo_xpu loads the models itself: use quantization, bf16 and device",
    "max_prompt_length": "set max_prompt_length (a dpo_xpu key on every TRL)",
}
#: TRL options whose default dpo_xpu changes, with the reason: the one table of them. A recipe's own value wins;
#: ``dpo_config_kwargs`` applies them, ``dpo-xpu train --help`` and the options page show them beside TRL's.
TRL_DEFAULT_OVERRIDES: dict[str, tuple[Any, str]] = {
    "save_total_limit": (
        2,
        "keep the two newest checkpoints, not every one (TRL keeps all): --resume continues from the newest, or from "
        "the one before where the newest is damaged",
    ),
}
#: Options accepted although the installed transformers may lack them (see the Recipe's docstring).
TRL_OPTION_ALIASES = ("warmup_ratio",)
#: The largest integer a recipe value may hold (PyTorch's int64).
MAX_INT = 2**63 - 1
#: How messages name the type a value should have.
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}


def trl_option_names() -> dict[str, Any]:
    """The installed TRL's ``DPOConfig`` options a recipe can set under their own names, with their defaults:
    every field but dpo_xpu's own keys and :data:`MANAGED_TRL_OPTIONS`, plus :data:`TRL_OPTION_ALIASES`."""
    from trl import DPOConfig

    own = set(recipe_keys())
    names = {
        f.name: f.default if f.default is not dataclasses.MISSING else None
        for f in fields(DPOConfig)
        if f.init and not f.name.startswith("_") and f.name not in own and f.name not in MANAGED_TRL_OPTIONS
    }
    for alias in TRL_OPTION_ALIASES:
        names.setdefault(alias, 0.0)
    return names


def trl_option_types() -> dict[str, Any]:
    """The type annotation of each option of :func:`trl_option_names` in the installed TRL's ``DPOConfig``
    (``float`` for :data:`TRL_OPTION_ALIASES` it lacks; ``None`` where the annotation cannot be resolved)."""
    from trl import DPOConfig

    try:
        hints = get_type_hints(DPOConfig)
    except Exception:  # an annotation this Python cannot evaluate: keep those that are objects already
        hints = {f.name: f.type for f in fields(DPOConfig) if not isinstance(f.type, str)}
    found = {name: hints.get(name) for name in trl_option_names()}
    for alias in TRL_OPTION_ALIASES:
        found[alias] = found.get(alias) or float
    return found


def _union_members(annotation: Any) -> tuple[Any, ...]:
    """The members of a ``Union`` / ``X | Y`` annotation, or the annotation alone."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        return get_args(annotation)
    return (annotation,)


def _describe(members: tuple[Any, ...]) -> str:
    """How a message names the values an annotation's members accept: ``"an integer"``, ``"a string or a list"``."""
    words = []
    for member in members:
        kind = get_origin(member) or member
        if member is type(None):
            continue
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            words.append(f"one of {', '.join(str(item.value) for item in kind)}")
        elif kind is typing.Literal:
            words.append(f"one of {', '.join(repr(arg) for arg in get_args(member))}")
        elif isinstance(kind, type) and issubclass(kind, dict):
            words.append("a mapping")
        else:
            words.append(_TYPE_WORDS.get(kind, getattr(kind, "__name__", str(kind))))
    return " or ".join(dict.fromkeys(words)) or "null"


def _closest(word: str, candidates: list[str]) -> str | None:
    """The candidate closest to ``word`` (difflib), or ``None`` where none is close."""
    found = difflib.get_close_matches(word.lower(), candidates, n=1)
    return found[0] if found else None


def _check_number(name: str, value: Any) -> None:
    """Refuse NaN, infinities and integers beyond :data:`MAX_INT` in a value, inside mappings and lists too.

    Raises:
        RecipeError: the first such number, named by its key (``dataset_mixture['a.jsonl']``, ``loss_weights[1]``).
    """
    if isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{name}: must be a finite number, found {value}: NaN and infinity are not accepted")
    if isinstance(value, int) and abs(value) > MAX_INT:
        raise RecipeError(f"{name}: must be at most 2**63 - 1, found an integer of {len(str(abs(value)))} digits")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_number(f"{name}[{key!r}]", item)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_number(f"{name}[{index}]", item)


def _to_int(name: str, value: Any) -> int:
    """``value`` as an integer: an int, an integral float, or a string holding either (``"1e3"``).

    Raises:
        RecipeError: a value that overflows to infinity or is not finite.
        ValueError: a value that is not an integer.
    """
    number = value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            number = float(value)
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ValueError(value)
    if isinstance(number, float):
        if not math.isfinite(number):
            raise RecipeError(f"{name}: expected a finite integer, found {value!r}")
        if not number.is_integer():
            raise ValueError(value)
    return int(number)


def _to_float(name: str, value: Any) -> float:
    """``value`` as a finite float (a number, or a string holding one, such as PyYAML's ``5e-5``).

    Raises:
        RecipeError: a value that is NaN or overflows to infinity (``1e999``).
        ValueError: a value that is not a number.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(value)
    number = float(value)
    if not math.isfinite(number):
        raise RecipeError(f"{name}: must be a finite number, found {value!r}: NaN and infinity are not accepted")
    return number


def _to_bool(value: Any) -> bool:
    """``value`` as a bool: a bool, or ``true``/``false``/``yes``/``no``/``1``/``0`` as a string.

    Raises:
        ValueError: any other value.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    raise ValueError(value)


def _check_enum(name: str, value: str, kind: type[enum.Enum]) -> str:
    """``value`` if it is one of the enum's values (transformers' ``OptimizerNames``, ``IntervalStrategy``, ...).

    Raises:
        RecipeError: another value; the message suggests the closest or lists them all.
    """
    choices = [str(item.value) for item in kind]
    if value in choices:
        return value
    close = _closest(value, choices)
    hint = f"did you mean {close!r}?" if close else f"use one of {', '.join(choices)}"
    raise RecipeError(f"{name}: {value!r} is not one of the installed transformers' {kind.__name__}: {hint}")


def _fit(name: str, value: Any, member: Any, convert: bool) -> tuple[bool, Any]:
    """Whether ``value`` fits one member of a TRL option's annotation, and the value as that member's type.
    ``convert=False`` accepts exact types only; ``True`` also converts (``"3"`` -> 3, 3 -> 3.0, ``"a,b"`` -> list).

    Raises:
        RecipeError: a list element or a number that cannot fit (named ``name[i]``).
    """
    kind = get_origin(member) or member
    if kind is typing.Literal:
        return value in get_args(member), value
    if not isinstance(kind, type):
        return True, value  # Any, a TypeVar, or an annotation dpo_xpu does not know: TRL checks it
    if kind in (list, tuple):
        if isinstance(value, str) and convert:
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, (list, tuple)):
            return False, value
        element = (get_args(member) or (Any,))[0]
        items = [_coerce_trl_option(f"{name}[{i}]", item, element, dataclasses.MISSING) for i, item in enumerate(value)]
        return True, items
    if kind not in (bool, int, float, str):
        return isinstance(value, kind) or convert and not issubclass(kind, (dict, enum.Enum)), value
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return True, value
    if not convert:
        return False, value
    try:
        if kind is int:
            return True, _to_int(name, value)
        if kind is float:
            return True, _to_float(name, value)
        if kind is bool:
            return True, _to_bool(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)  # a number where a string is expected (run_name: 2024)
    except (TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, RecipeError):
            raise
    return False, value


def _coerce_trl_option(name: str, value: Any, annotation: Any, default: Any) -> Any:
    """A TRL option's value converted to the type of its ``DPOConfig`` field (PyYAML reads ``5e-5`` as a string,
    ``--set`` gives strings), or refused, so that ``save_total_limit: abc`` fails here rather than at the first
    checkpoint. Values of a field's enum (``optim``, ``eval_strategy``, ...) are checked against it.

    Args:
        name: the option (or ``option[i]`` for a list's element), for the message.
        value: the recipe's value.
        annotation: the field's annotation (:func:`trl_option_types`); ``None`` passes the value through.
        default: the field's default (``None`` allows ``null`` whatever the annotation).

    Raises:
        RecipeError: a value the field's type cannot hold, with the type expected.
    """
    if annotation is None:
        return value
    members = _union_members(annotation)
    if value is None:
        if type(None) in members or default is None or Any in members:
            return None
        raise RecipeError(f"{name}: null is not allowed (expected {_describe(members)})")
    enums = [m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)]
    if enums and isinstance(value, str):
        return _check_enum(name, value, enums[0])
    for convert in (False, True):
        for member in members:
            if member is type(None):
                continue
            fits, converted = _fit(name, value, member, convert)
            if fits:
                return converted
    raise RecipeError(f"{name}: expected {_describe(members)}, found {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise RecipeError(f"{name}: {value!r} is not one of {', '.join(choices)}")


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML or ``--set`` value to the field's type (PyYAML reads ``5e-5`` as a string).

    Raises:
        RecipeError: a value of another type, ``null`` for a key that needs a value, or a number that is not finite.
    """
    args = [a for a in get_args(annotation) if a is not type(None)]
    if value is None:
        if type(None) in get_args(annotation):
            return None
        raise RecipeError(f"{name}: null is not allowed (expected {_describe((annotation,))})")
    target = args[0] if args and get_origin(annotation) not in (list, dict) else annotation
    if get_origin(target) is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{name}: expected a mapping (source: proportion), found {value!r}")
        try:
            return {str(k): _to_float(f"{name}[{k!r}]", v) for k, v in value.items()}
        except (TypeError, ValueError) as exc:
            if isinstance(exc, RecipeError):
                raise
            raise RecipeError(f"{name}: proportions must be numbers, found {value!r}") from None
    if get_origin(target) is list or target is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RecipeError(f"{name}: expected a list of strings, found {value!r}")
        return value
    if isinstance(value, str) and value.strip().lower() == "auto" and str in args:
        return "auto"  # a key that takes `auto` beside its own type (prefix_sharing)
    try:
        if target is bool:
            return _to_bool(value)
        if target is int:
            return _to_int(name, value)
        if target is float:
            return _to_float(name, value)
        if target is str:
            return str(value)
    except (TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, RecipeError):
            raise
    else:
        return value
    raise RecipeError(f"{name}: expected {_TYPE_WORDS.get(target, target.__name__)}, found {value!r}")


def _unknown_keys_message(unknown: list[str], known: list[str]) -> str:
    """One line for keys neither dpo_xpu nor the installed TRL knows, each with the closest known key if any."""
    import trl

    named = []
    for key in unknown:
        close = _closest(key, known)
        named.append(f"{key} (did you mean {close}?)" if close else key)
    return (
        f"unknown recipe key{'s' if len(unknown) > 1 else ''} {', '.join(named)}: neither dpo_xpu's nor an option of "
        f"the installed TRL {trl.__version__}'s DPOConfig; fix the name (dpo-xpu train --help lists every key)"
    )


def make_recipe(values: dict[str, Any]) -> Recipe:
    """Build a :class:`Recipe` from a dict, rejecting unknown keys and converting types: dpo_xpu's keys to their
    field's type, TRL's options to the type of their ``DPOConfig`` field (:func:`trl_option_types`).

    Raises:
        RecipeError: an unknown key (the message suggests the closest valid one), a value of the wrong type, a
            number that is not finite, or a value out of range.
    """
    valid = recipe_keys()
    values = dict(values)
    names = [key for key in values if not isinstance(key, str)]
    if names:
        raise RecipeError(f"recipe key {names[0]!r} is not a name: keys are names such as learning_rate (key: value)")
    options = dict(values.pop("trl_options", None) or {})
    others = sorted(set(values) - set(valid))
    if others or options:
        for key in others:
            options[key] = values.pop(key)
        managed = sorted(set(options) & set(MANAGED_TRL_OPTIONS))
        if managed:
            raise RecipeError(
                "; ".join(f"{key}: dpo_xpu sets this TRL option itself: {MANAGED_TRL_OPTIONS[key]}" for key in managed)
            )
        trl_names = trl_option_names()
        unknown = sorted(set(options) - set(trl_names), key=str)
        if unknown:
            raise RecipeError(_unknown_keys_message(unknown, valid + sorted(trl_names)))
        annotations = trl_option_types()
        options = {
            key: _coerce_trl_option(key, value, annotations.get(key), trl_names[key]) for key, value in options.items()
        }
    hints = get_type_hints(Recipe)
    recipe = Recipe(**{k: _coerce(k, v, hints[k]) for k, v in values.items()}, trl_options=options)
    return recipe


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
            _, problem, _ = _yaml_problem(exc, raw)
            raise RecipeError(f"--set {item}: the value is not valid YAML ({problem}); quote it") from None
    return result


def _read_recipe_file(path: Path) -> Any:
    """The YAML document in ``path``, read as UTF-8 with :class:`_RecipeLoader`.

    Raises:
        RecipeError: the file is not UTF-8 (the byte, its offset and line), or not valid YAML (the line, the
            problem and the fix), or repeats a key.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RecipeError(
            f"recipe file {path} is not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line}) is "
            "not valid UTF-8 (a Latin-1 or Windows-1252 file?); save it as UTF-8 (iconv -f latin1 -t utf-8, or your "
            "editor's encoding setting)"
        ) from None
    try:
        return yaml.load(text, Loader=_RecipeLoader)
    except yaml.YAMLError as exc:
        where, problem, fix = _yaml_problem(exc, text)
        raise RecipeError(f"recipe file {path}{where}: {problem}; {fix}") from None


def load_recipe(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Recipe:
    """Load a recipe from a YAML file (a mapping of recipe keys) and apply overrides.

    Args:
        path: YAML file (UTF-8); ``None`` starts from the defaults.
        overrides: ``["key=value", ...]`` as given to ``--set``, or a dict; applied after the file.

    Raises:
        RecipeError: the file is missing, is not UTF-8, is not valid YAML, repeats a key, is not a YAML mapping, or
            has unknown keys or bad values; each in one line naming the file or the key, and the fix.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        loaded = _read_recipe_file(path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise RecipeError(
                f"recipe file {path} must be a mapping of recipe keys (key: value), found {type(loaded).__name__}"
            )
        values.update(loaded)
    values.update(overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    return make_recipe(values)
