"""What each TRL generation offers, and how a recipe maps onto its ``DPOConfig``: TRL 1.x here, TRL 0.11's parts
in the ipex-llm backend (:mod:`dpo_xpu.models.backends.ipex_llm_config`).

The native backend runs TRL 1.x (``processing_class=``, no ``max_prompt_length``, ``loss_type`` a list); the
ipex-llm backend runs TRL 0.11 (``tokenizer=``, ``max_prompt_length``, ``label_smoothing``, ``reference_free``,
``rpo_alpha``). One recipe serves both: a value the installed TRL cannot honour is either supplied by dpo_xpu
(prompt truncation, the losses in :mod:`dpo_xpu.train.losses`) or refused with a :class:`~dpo_xpu.errors.RecipeError`
naming the field and the TRL version, never silently dropped.
"""

from __future__ import annotations

import copy
import enum
import re
import typing
import warnings
from typing import Any

from dpo_xpu.errors import RecipeError
from dpo_xpu.models.backends import ipex_llm_config
from dpo_xpu.recipes import TRL_DEFAULT_OVERRIDES, Recipe, recipe_keys, trl_option_types
from dpo_xpu.train.losses import OWN_LOSSES
from dpo_xpu.train.reference import ReferencePlan, reference_plan
from dpo_xpu.train.trl_internals import trl_generation  # noqa: F401 (tests and benchmarks import it from here)

#: Loss types each TRL generation computes itself (TRL 0.11's: :mod:`dpo_xpu.models.backends.ipex_llm_config`).
TRL_LOSS_TYPES = {
    "0.11": ipex_llm_config.LOSS_TYPES,
    "1.x": tuple(t for t in ipex_llm_config.LOSS_TYPES if t != "aot_pair")
    + ("aot_unpaired", "discopop", "sft", "sigmoid_norm"),
}
#: TRL's loss types that use ``DPOConfig.label_smoothing``, per generation (TRL >= 0.29 dropped it from sigmoid).
TRL_LABEL_SMOOTHING_LOSSES = {
    "0.11": ipex_llm_config.LABEL_SMOOTHING_LOSSES,
    "1.x": ("robust", "exo_pair", "aot", "aot_unpaired"),
}
#: Loss types only dpo_xpu computes (:data:`dpo_xpu.train.losses.OWN_LOSSES` that TRL 1.x lacks): native backend.
OWN_LOSS_TYPES = tuple(t for t in OWN_LOSSES if t not in TRL_LOSS_TYPES["1.x"])


def own_loss_type(loss_type: str, label_smoothing: float, generation: str) -> str | None:
    """The loss dpo_xpu computes itself (:mod:`dpo_xpu.train.losses`) for a recipe's ``loss_type`` and
    ``label_smoothing``, or ``None`` where TRL does.

    On TRL 1.x: ``simpo`` and ``dpo_norm`` always; ``sigmoid`` when ``label_smoothing`` > 0 (TRL's ``sigmoid`` has
    none). ``dpo_norm`` is dpo_xpu's even without label smoothing, where TRL's ``sigmoid_norm`` computes the same
    loss, because ``sigmoid_norm`` logs summed rewards while its loss acts on length-averaged ones: dpo_xpu's logs
    the averaged ones, whatever the label smoothing. On TRL 0.11 always ``None`` (its loss is TRL's own).
    """
    if generation == "0.11":
        return None
    if loss_type in ("simpo", "dpo_norm") or (loss_type == "sigmoid" and label_smoothing > 0):
        return loss_type
    return None


def _loss_kwargs(recipe: Recipe, plan: ReferencePlan) -> dict[str, Any]:
    """``DPOConfig``'s loss keywords for the TRL generation ``plan.generation``, after refusing loss settings
    neither it nor dpo_xpu can honour (see :func:`dpo_config_kwargs`). TRL 0.11:
    :func:`dpo_xpu.models.backends.ipex_llm_config.loss_kwargs`. TRL 1.x gets a ``loss_type`` list: the TRL loss or,
    for an own loss, a zero-weighted ``sigmoid`` placeholder, plus ``sft`` weighted by ``nll_loss_coef``."""
    import trl

    generation, loss_type, smoothing = plan.generation, recipe.loss_type, recipe.label_smoothing
    version = f"the installed TRL {trl.__version__} (TRL {generation})"
    own_types = OWN_LOSS_TYPES if generation == "1.x" else ()
    own = own_loss_type(loss_type, smoothing, generation)
    if loss_type not in TRL_LOSS_TYPES[generation] + own_types:
        hint = (
            f"; dpo_xpu computes {', '.join(OWN_LOSS_TYPES)} on TRL >= 0.12 only (the native backend)"
            if loss_type in OWN_LOSS_TYPES
            else ""
        )
        raise RecipeError(
            f"loss_type: {loss_type!r} is not computed by the installed TRL {trl.__version__} (TRL {generation}); it "
            f"offers {', '.join(TRL_LOSS_TYPES[generation] + own_types)}{hint}. Choose one of those, or use the "
            "environment whose TRL has it"
        )
    if smoothing > 0 and not (own or loss_type in TRL_LABEL_SMOOTHING_LOSSES[generation]):
        raise RecipeError(
            f"label_smoothing: {smoothing} has no effect on loss_type {loss_type!r} with {version}; it applies to "
            f"sigmoid, dpo_norm, simpo and TRL's {', '.join(TRL_LABEL_SMOOTHING_LOSSES[generation])}. "
            "Set label_smoothing: 0 or choose one of those"
        )
    if plan.reference_free and plan.strategy != "adapter-off":
        raise RecipeError(
            f"reference: {recipe.reference!r} loads or precomputes a reference that a reference-free loss "
            f"(reference_free: {recipe.reference_free}, loss_type: {loss_type!r}) never uses; set "
            "reference: adapter-off"
        )
    if generation == "0.11":
        if recipe.reference_device != "same":
            raise RecipeError(
                f"reference_device: {recipe.reference_device!r} needs TRL >= 0.12 (the native backend); {version} "
                "keeps the reference on the policy's device. Set reference_device: same"
            )
        return ipex_llm_config.loss_kwargs(loss_type, smoothing, recipe.reference_free, recipe.nll_loss_coef)
    types, weights = ["sigmoid" if own else loss_type], [0.0 if own else 1.0]
    if recipe.nll_loss_coef > 0:
        types.append("sft")
        weights.append(recipe.nll_loss_coef)
    kwargs: dict[str, Any] = {"loss_type": types}
    if weights != [1.0]:
        kwargs["loss_weights"] = weights
    if smoothing > 0 and not own:
        kwargs["label_smoothing"] = smoothing
    return kwargs


def _trl_options(trl_options: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A recipe's TRL options (``recipe.trl_options``) as ``DPOConfig`` keywords, over ``kwargs``.

    ``warmup_ratio`` replaces ``warmup_steps``; transformers >= 5 has no ``warmup_ratio`` and reads a fractional
    ``warmup_steps`` as the ratio instead.

    Raises:
        RecipeError: ``loss_weights`` where dpo_xpu weighs TRL's loss terms itself (an own loss or ``nll_loss_coef``).
    """
    import dataclasses

    from trl import DPOConfig

    options = dict(trl_options)
    if "loss_weights" in options and "loss_weights" in kwargs:
        raise RecipeError(
            "loss_weights: dpo_xpu weighs TRL's loss terms itself for this recipe (an own loss, or nll_loss_coef): "
            "remove loss_weights, or use a TRL loss without nll_loss_coef"
        )
    if options.get("use_liger_kernel"):
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            raise RecipeError(
                "use_liger_kernel: needs the liger-kernel package, which is not installed (pip install liger-kernel; "
                "its Triton kernels run on CUDA and XPU, not on the CPU). Set use_liger_kernel: false"
            )
    if "warmup_ratio" in options:
        ratio = float(options.pop("warmup_ratio"))
        if "warmup_ratio" in {f.name for f in dataclasses.fields(DPOConfig)}:
            options.update(warmup_ratio=ratio, warmup_steps=0)
        else:
            options["warmup_steps"] = ratio  # transformers >= 5: a float in [0, 1) is the ratio of total steps
    return options


def dpo_config_kwargs(
    recipe: Recipe,
    plan: ReferencePlan,
    use_cpu: bool = False,
    has_eval_dataset: bool | None = None,
) -> dict[str, Any]:
    """Map a recipe onto ``trl.DPOConfig`` keyword arguments for a TRL generation: dpo_xpu's values for TRL options
    (:data:`~dpo_xpu.recipes.TRL_DEFAULT_OVERRIDES`) under the recipe's own (``trl_options``), as they are, plus
    what dpo_xpu's keys mean for that generation (loss, optimizer, reference, evaluation); ``bf16: auto`` as a bool
    (:func:`dpo_xpu.device.use_bf16`).

    Args:
        recipe: the run's recipe.
        plan: the run's reference plan (:func:`dpo_xpu.train.reference.reference_plan`), made for the TRL
            generation it maps onto (``plan.generation``); TRL precomputes the reference log-probs where
            ``plan.trl_precomputes``.
        use_cpu: train on the CPU even where an accelerator is visible.
        has_eval_dataset: whether the trainer gets an eval split; ``None``: ``recipe.eval_fraction > 0``.
            With one and ``recipe.eval_steps``, evaluation runs every ``eval_steps`` and at step 0
            (transformers' ``eval_on_start``), with the training batch size.

    Raises:
        RecipeError: a recipe value the TRL generation cannot honour (for example a ``loss_type`` only TRL
            1.x has, asked of TRL 0.11); the message names the field and the TRL version.
    """
    kwargs: dict[str, Any] = {
        **{name: value for name, (value, _) in TRL_DEFAULT_OVERRIDES.items()},
        **_loss_kwargs(recipe, plan),
        "save_strategy": "steps",
        # TRL 1.x: PyTorch's AdamW, and the non-reentrant checkpointing PyTorch recommends (no input needs grad)
        **(
            ipex_llm_config.config_kwargs(recipe.max_prompt_length)
            if plan.generation == "0.11"
            else {"optim": "adamw_torch", "gradient_checkpointing_kwargs": {"use_reentrant": False}}
        ),
        "precompute_ref_log_probs": plan.trl_precomputes,
        "report_to": [],
        "remove_unused_columns": False,
        "use_cpu": use_cpu,
    }
    kwargs.update(_trl_options(recipe.trl_options, kwargs))
    if kwargs.get("bf16") == "auto":  # a run settles it where it resolves the device (pipeline.settle_bf16)
        from dpo_xpu.device import select_device, use_bf16

        kwargs["bf16"] = use_bf16("auto", "cpu" if use_cpu else select_device(recipe.device))[0]
    if recipe.eval_steps and (recipe.eval_fraction > 0 if has_eval_dataset is None else has_eval_dataset):
        kwargs.update(
            eval_strategy="steps",
            eval_steps=recipe.eval_steps,
            eval_on_start=True,
            per_device_eval_batch_size=recipe.per_device_train_batch_size,
        )
    return kwargs


def validate_recipe(recipe: Recipe, use_cpu: bool = False, *, generation: str) -> None:
    """Check the whole recipe by value against the installed TRL and transformers, before anything is loaded or
    written: build their ``DPOConfig`` from it (:func:`dpo_config_kwargs`), whose ``__post_init__`` checks the
    optimizer, the schedules, the strategies and their combinations. To build it, this makes a reference plan
    without the data (:func:`~dpo_xpu.train.reference.reference_plan`); the run's own plan is made once the rows are
    known. Building it creates no folder; it sets up accelerate's process state as the trainer's later
    ``DPOConfig`` does (so call it after :func:`dpo_xpu.distributed.init_distributed`). Its warnings are left for
    that later ``DPOConfig``.

    Args:
        recipe: the run's recipe.
        use_cpu: train on the CPU (as the run will: ``bf16`` on a CPU is refused without it).
        generation: ``"0.11"`` or ``"1.x"`` (:func:`dpo_xpu.train.trl_internals.trl_generation`).

    Raises:
        RecipeError: a value the installed TRL or transformers refuses, in one line naming the key(s) where the
            message lets them be found, else quoting transformers' message; a ``report_to`` tracker not installed.
    """
    from transformers.integrations import get_reporting_integration_callbacks
    from trl import DPOConfig

    kwargs = dpo_config_kwargs(recipe, reference_plan(recipe, generation), use_cpu=use_cpu)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = DPOConfig(**copy.deepcopy(kwargs))
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise RecipeError(_refusal(recipe.trl_options, kwargs, exc)) from None
    for tracker in get_reporting_integration_callbacks(config.report_to):
        try:
            tracker()  # as the Trainer builds it: a tracker that is not installed is refused now, not after loading
        except RuntimeError as exc:
            raise RecipeError(f"report_to: {exc}, or remove it from report_to ({config.report_to})") from None


def _refusal(trl_options: dict[str, Any], kwargs: dict[str, Any], exc: Exception) -> str:
    """``DPOConfig``'s refusal of a recipe as one line: the recipe keys its message names (by name, as
    ``--name``, or by the enum of their field: ``OptimizerNames`` -> ``optim``), its message, and the fix."""
    import transformers
    import trl

    text = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
    if len(text) > 400:
        text = text[:397] + "..."
    given = list(trl_options) + [key for key in recipe_keys() if key in kwargs]
    named = [key for key in given if re.search(rf"(?<![A-Za-z0-9_]){re.escape(key)}(?![A-Za-z0-9_])", text)]
    if not named:  # by the enum of their field (OptimizerNames -> optim)
        types, words = trl_option_types(), set(re.findall(r"\w+", text))
        named = [key for key in trl_options if _enum_names(types.get(key)) & words]
    versions = f"the installed TRL {trl.__version__} / transformers {transformers.__version__}"
    if named:
        keys = ", ".join(dict.fromkeys(named))
        return f"{keys}: {versions} refuses this recipe: {text}. Change {keys} (dpo-xpu train --help lists the options)"
    return f"{versions} refuses this recipe's DPOConfig: {text}. Change the TRL option it names"


def _enum_names(annotation: Any) -> set[str]:
    """The names of the enums in an annotation (``OptimizerNames | str`` -> ``{"OptimizerNames"}``)."""
    return {m.__name__ for m in typing.get_args(annotation) or (annotation,) if isinstance(m, enum.EnumMeta)}
