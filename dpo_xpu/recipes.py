"""Recipes: every hyperparameter of a run in one flat dataclass, loadable from YAML.

A recipe names the model, the data, the backend and the training values. Training keys keep TRL's
names (``beta``, ``learning_rate``, ``max_length``, ...) and are mapped onto ``trl.DPOConfig`` by
:func:`dpo_xpu.training.make_dpo_trainer`. The recipe is our own dataclass rather than a subclass of
``DPOConfig`` because one recipe must serve both TRL generations (0.11 for ipex-llm, 1.x for the native
backend), whose ``DPOConfig`` fields differ, and because it also holds model and data keys TRL lacks.

    >>> recipe = load_recipe("recipes/cpu_demo.yaml", overrides=["max_steps=5"])
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from dpo_xpu.errors import RecipeError

REFERENCE_STRATEGIES = ("adapter-off", "separate", "precomputed")
#: Loss types dpo_xpu computes itself where the installed TRL does not (see dpo_xpu.losses).
OWN_LOSS_TYPES = ("dpo_norm", "simpo")
DATA_FORMATS = ("auto", "orca", "prompt-chosen-rejected", "conversational")
EXPORT_FORMATS = ("adapter", "merged")
QUANTIZATIONS = ("nf4", "none")
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Recipe:
    """All settings of a DPO run. Defaults are the original recipe (Labonne, "Fine-tune a Mistral-7b model
    with DPO", as ported to Intel GPUs by ipex-llm's DPO example), except ``reference``.

    Model and data:
        model_name_or_path: hub id or local folder of the base (SFT) model.
        dataset_name_or_path: hub id (``Intel/orca_dpo_pairs``) or a local ``.jsonl``/``.json``/``.parquet``.
        limit: keep this many rows (seeded shuffle), ``None`` for all.
        eval_fraction: fraction of rows held out for evaluation (the eval split; 0 disables evaluation).
        data_format: ``"orca"`` (system, question, chosen, rejected), ``"prompt-chosen-rejected"`` (plain
            prompt/chosen/rejected strings), ``"conversational"`` (TRL's conversational preference format:
            message lists, with an explicit or implicit prompt), or ``"auto"`` (decided from the columns).
        dataset_mixture: several sources with proportions (``{source: weight}``, normalised to sum 1),
            instead of ``dataset_name_or_path``; mixed with ``seed``.
        drop_long_rows: drop pairs longer than ``max_length`` tokens (reported) instead of truncating them.
        sft_checkpoint: an SFT state dict file (``policy.pt``, a dict under the key ``state``, as written by
            the original DPO code) applied to both policy and reference before quantization.
        adapter_name_or_path: an existing LoRA adapter to continue training from.
        reference_device: ``"same"`` as the policy, or ``"cpu"`` to keep a ``separate`` reference off the
            accelerator.
        output_dir: the run folder (metrics, picture, adapter).
    Stack and device:
        backend: ``"native"`` (bitsandbytes + PEFT + TRL 1.x) or ``"ipex-llm"`` (the original stack).
        device: ``"auto"`` (xpu, then cuda, then cpu), ``"xpu"``, ``"cuda"``, ``"cpu"`` (optionally ``:N``).
        quantization: ``"nf4"`` (4-bit NormalFloat, Dettmers et al. 2023) or ``"none"`` (bf16 weights).
        reference: ``"adapter-off"`` (policy's base with LoRA disabled; one copy of the weights),
            ``"separate"`` (a second frozen copy, as the original recipe) or ``"precomputed"``
            (reference log-probs computed once before training).
        prefix_sharing: run each pair as one sequence with the prompt computed once (Wang et al. 2024,
            arXiv:2410.20305), for the policy and the reference; same log-probs up to float rounding. Native
            backend (TRL 1.x) with sdpa or eager attention.
    LoRA (Hu et al. 2021): ``lora_r`` rank, ``lora_alpha`` scaling numerator (update scaled by alpha / r),
        ``lora_dropout``, ``lora_target_modules`` (names of linear layers; those absent from the model are
        skipped).
    DPO and optimisation (TRL's names): ``beta`` (the KL strength of Rafailov et al. 2023, eq. 7),
        ``loss_type`` (``sigmoid`` = DPO, ``ipo``, ``hinge``, ``dpo_norm``, ``simpo`` and TRL's others),
        ``label_smoothing`` (conservative DPO's epsilon), ``reference_free`` (a uniform reference),
        ``nll_loss_coef`` (weight of an NLL term on the chosen answers), ``simpo_gamma`` (SimPO's target
        margin), ``eval_steps`` (evaluate every so many steps and at step 0; ``None``: no evaluation during
        training), ``eval_samples`` / ``num_eval_samples`` / ``max_new_tokens`` (generated samples per
        evaluation), ``export`` (``adapter`` or ``merged`` into a bf16 copy of the base),
        ``learning_rate`` (AdamW), ``lr_scheduler_type``, ``warmup_steps``, ``max_steps``
        (-1: use ``num_train_epochs``), ``num_train_epochs``, ``per_device_train_batch_size`` (pairs),
        ``gradient_accumulation_steps``, ``max_length`` (tokens, prompt + answer), ``max_prompt_length``
        (tokens; longer prompts keep their end; unset: two thirds of ``max_length``, the original recipe's
        1024 of 1536), ``gradient_checkpointing``, ``bf16``, ``logging_steps``,
        ``save_steps``, ``seed``.
    TRL's other options: ``trl_options`` holds every other option of the installed TRL's ``DPOConfig`` (and of
        transformers' ``TrainingArguments`` under it), given as top-level recipe keys under their own names
        (``ld_alpha: 0.5``, ``use_weighting: true``, ``save_total_limit: 2``, ``report_to: [tensorboard]``, ...;
        see :func:`trl_option_names`), with TRL's defaults. They are passed to ``DPOConfig`` as they are, after the
        keys above, except those dpo_xpu sets from its own keys (:data:`MANAGED_TRL_OPTIONS`, refused with the key to
        use). ``warmup_ratio`` is accepted on every transformers (5.x has folded it into a fractional
        ``warmup_steps``) and replaces ``warmup_steps``.
    """

    model_name_or_path: str = "teknium/OpenHermes-2.5-Mistral-7B"
    dataset_name_or_path: str = "Intel/orca_dpo_pairs"
    output_dir: str = "runs/dpo"
    backend: str = "native"
    device: str = "auto"
    quantization: str = "nf4"
    reference: str = "adapter-off"
    prefix_sharing: bool = False
    limit: int | None = None
    eval_fraction: float = 0.0
    data_format: str = "auto"
    dataset_mixture: dict[str, float] | None = None
    drop_long_rows: bool = False
    sft_checkpoint: str | None = None
    adapter_name_or_path: str | None = None
    reference_device: str = "same"
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    reference_free: bool = False
    nll_loss_coef: float = 0.0
    simpo_gamma: float = 0.5
    learning_rate: float = 5e-5
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 100
    max_steps: int = 200
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 4
    max_length: int = 1536
    max_prompt_length: int | None = None
    gradient_checkpointing: bool = True
    bf16: bool = True
    logging_steps: int = 1
    save_steps: int = 100
    eval_steps: int | None = None
    eval_samples: bool = True
    num_eval_samples: int = 4
    max_new_tokens: int = 64
    export: str = "adapter"
    seed: int = 42
    trl_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_choice("backend", self.backend, ("native", "ipex-llm"))
        _check_choice("quantization", self.quantization, QUANTIZATIONS)
        _check_choice("reference", self.reference, REFERENCE_STRATEGIES)
        _check_choice("data_format", self.data_format, DATA_FORMATS)
        _check_choice("export", self.export, EXPORT_FORMATS)
        _check_choice("reference_device", self.reference_device, ("same", "cpu"))
        if not 0.0 <= self.label_smoothing < 0.5:
            raise RecipeError(f"label_smoothing: must be in [0, 0.5) (conservative DPO), found {self.label_smoothing}")
        if self.nll_loss_coef < 0:
            raise RecipeError(f"nll_loss_coef: must be >= 0, found {self.nll_loss_coef}")
        if self.prefix_sharing and self.backend == "ipex-llm":
            raise RecipeError(
                "prefix_sharing: needs the native backend (TRL 1.x's fused LM head); the ipex-llm stack pins TRL "
                "0.11. Set prefix_sharing: false, or backend: native"
            )
        if self.reference_device == "cpu" and self.reference != "separate":
            raise RecipeError("reference_device: 'cpu' needs reference: separate (only a separate model can move)")
        if self.dataset_mixture is not None:
            if not self.dataset_mixture or any(w <= 0 for w in self.dataset_mixture.values()):
                raise RecipeError(
                    "dataset_mixture must map each source to a positive proportion. Expected format: "
                    f"{{'Intel/orca_dpo_pairs': 0.7, 'my_pairs.jsonl': 0.3}}; found {self.dataset_mixture!r}"
                )
        if not re.fullmatch(r"(auto|cpu|xpu|cuda)(:\d+)?", self.device):
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


def recipe_keys() -> list[str]:
    """Names of dpo_xpu's own recipe keys, in declaration order (TRL's other options: :func:`trl_option_names`)."""
    return [f.name for f in fields(Recipe)]


#: ``DPOConfig`` options that dpo_xpu sets from its own keys: the key to use instead, and why.
MANAGED_TRL_OPTIONS = {
    "precompute_ref_log_probs": "set reference: precomputed (dpo_xpu computes and caches them itself)",
    "use_cpu": "set device: cpu",
    "remove_unused_columns": "dpo_xpu keeps its columns (it needs false)",
    "model_init_kwargs": "dpo_xpu loads the models itself: use quantization, bf16 and device",
    "ref_model_init_kwargs": "dpo_xpu loads the models itself: use quantization, bf16 and device",
    "max_prompt_length": "set max_prompt_length (a dpo_xpu key on every TRL)",
}
#: Options accepted although the installed transformers may lack them (see the Recipe's docstring).
TRL_OPTION_ALIASES = ("warmup_ratio",)


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


def _coerce_trl_option(name: str, value: Any, default: Any) -> Any:
    """A ``--set`` value for a TRL option, converted to the type of its default where that is a plain scalar
    (PyYAML reads ``5e-5`` as a string)."""
    if isinstance(value, str) and isinstance(default, (bool, int, float)) and not isinstance(default, str):
        return _coerce(name, value, type(default))
    return value


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise RecipeError(f"{name}: {value!r} is not one of {', '.join(choices)}")


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML or ``--set`` value to the field's type (PyYAML reads ``5e-5`` as a string)."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if value is None:
        if type(None) in get_args(annotation):
            return None
        raise RecipeError(f"{name}: null is not allowed (expected {getattr(annotation, '__name__', annotation)})")
    target = args[0] if args and get_origin(annotation) not in (list, dict) else annotation
    if get_origin(target) is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{name}: expected a mapping (source: proportion), found {value!r}")
        try:
            return {str(k): float(v) for k, v in value.items()}
        except (TypeError, ValueError):
            raise RecipeError(f"{name}: proportions must be numbers, found {value!r}") from None
    if get_origin(target) is list or target is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RecipeError(f"{name}: expected a list of strings, found {value!r}")
        return value
    try:
        if target is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if isinstance(value, bool):
                return value
            raise ValueError
        if target is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) else int(value)
        if target is float:
            return float(value)
        if target is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise RecipeError(f"{name}: expected {target.__name__}, found {value!r}")


def make_recipe(values: dict[str, Any]) -> Recipe:
    """Build a :class:`Recipe` from a dict, rejecting unknown keys and converting types.

    Raises:
        RecipeError: an unknown key (the message lists the valid ones), a value of the wrong type,
            or a value out of range.
    """
    valid = recipe_keys()
    values = dict(values)
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
        unknown = sorted(set(options) - set(trl_names))
        if unknown:
            import trl

            raise RecipeError(
                f"unknown recipe key(s) {', '.join(unknown)}: neither dpo_xpu's nor an option of the installed TRL "
                f"{trl.__version__}'s DPOConfig. Valid keys: {', '.join(valid)}, and TRL's options (dpo-xpu train "
                "--help lists them)"
            )
        options = {key: _coerce_trl_option(key, value, trl_names[key]) for key, value in options.items()}
    hints = get_type_hints(Recipe)
    recipe = Recipe(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})
    recipe.trl_options = options
    return recipe


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """Parse ``["key=value", ...]`` (the CLI's ``--set``) into a dict; values are read as YAML scalars.

    Raises:
        RecipeError: an item without ``=``.
    """
    result: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set expects key=value, found {item!r}")
        result[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return result


def load_recipe(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Recipe:
    """Load a recipe from a YAML file (a mapping of recipe keys) and apply overrides.

    Args:
        path: YAML file; ``None`` starts from the defaults.
        overrides: ``["key=value", ...]`` as given to ``--set``, or a dict; applied after the file.

    Raises:
        RecipeError: the file is missing, is not a YAML mapping, or has unknown keys or bad values.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe file {path} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise RecipeError(
                f"recipe file {path} must be a mapping of recipe keys (key: value), found {type(loaded).__name__}"
            )
        values.update(loaded)
    values.update(overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    return make_recipe(values)
