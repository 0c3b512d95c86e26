"""The trainer factory: one recipe -> its data, its models and a TRL ``DPOTrainer`` for the installed TRL generation.

TRL computes the DPO loss (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7)::

    L = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

and runs the loop. This module picks the trainer class and builds it from the recipe (the mapping onto ``DPOConfig``
is :mod:`dpo_xpu.train.trl_config`), with the generation and the reference plan decided once by the caller. The
run's callbacks (metrics, curves, checkpoints) live in a layer above and are passed in by
:func:`dpo_xpu.pipeline.make_dpo_trainer`.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_xpu.data.truncation import truncate_prompts
from dpo_xpu.errors import RecipeError
from dpo_xpu.train.packing import packing_budget
from dpo_xpu.train.pair_attention import install_pair_attention, pair_attention_decision
from dpo_xpu.train.prefix_sharing import prefix_sharing_decision
from dpo_xpu.train.reference import reference_plan
from dpo_xpu.train.trl_config import dpo_config_kwargs, own_loss_type
from dpo_xpu.train.trl_internals import cpu_lm_head_for, require_internals, trl_generation

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

    from dpo_xpu.recipes import Recipe
    from dpo_xpu.train.reference import ReferencePlan

logger = logging.getLogger(__name__)


def cut_prompts(
    max_prompt_length: int | None, generation: str, tokenizer: PreTrainedTokenizerBase, dataset: Any
) -> Any:
    """``dataset`` with its prompts cut to ``max_prompt_length`` tokens on TRL 1.x (which has no such option); as it
    is otherwise (TRL 0.11 cuts them itself), and for ``None``."""
    if dataset is None or generation != "1.x" or max_prompt_length is None:
        return dataset
    return truncate_prompts(dataset, tokenizer, max_prompt_length)


def load_run_data(
    recipe: Recipe, tokenizer: PreTrainedTokenizerBase, report_path: str | Path | None = None
) -> tuple[Dataset, Dataset | None]:
    """The recipe's data, loaded (or the ``dataset_mixture`` drawn), ``limit`` rows kept, ChatML-formatted, long
    rows dropped with ``drop_long_rows``, and ``eval_fraction`` split off: ``(train, eval or None)``. What each step
    kept is logged and, with ``report_path``, written there as JSON (``data_report.json``)."""
    from dpo_xpu.data.lengths import drop_long_pairs
    from dpo_xpu.data.preferences import format_orca_dataset, train_eval_split
    from dpo_xpu.data.sources import load_preference_pairs, mix_sources

    report: dict[str, Any] = {"data_format": recipe.data_format}
    if recipe.dataset_mixture:
        rows, report["mixture"] = mix_sources(recipe.dataset_mixture, recipe.limit, recipe.seed, recipe.data_format)
    else:
        rows = load_preference_pairs(
            recipe.dataset_name_or_path, recipe.data_format, limit=recipe.limit, seed=recipe.seed
        )
    report["rows"] = len(rows)
    formatted = format_orca_dataset(rows, tokenizer, chat_format=recipe.chat_format, max_length=recipe.max_length)
    if recipe.drop_long_rows:
        formatted, report["length_filter"] = drop_long_pairs(formatted, tokenizer, recipe.max_length)
    splits = (formatted, None)
    if recipe.eval_fraction > 0:
        splits = train_eval_split(formatted, eval_fraction=recipe.eval_fraction, seed=recipe.seed)
    report.update(train_rows=len(splits[0]), eval_rows=len(splits[1]) if splits[1] is not None else 0)
    logger.info("Data: %s", report)
    if report_path is not None:
        Path(report_path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return splits


def load_run_models(
    recipe: Recipe, plan: ReferencePlan | None = None
) -> tuple[PreTrainedModel, PreTrainedModel | None]:
    """Load the policy (with LoRA) and, for the ``separate`` strategy, the frozen reference; ``plan`` is the run's
    reference plan (default: the one without the rows, which never changes whether a reference is loaded)."""

    from dpo_xpu.device import compute_dtype, select_device
    from dpo_xpu.models.base import LoraSettings
    from dpo_xpu.models.loading import load_policy_model, load_reference_model, load_sft_state_dict

    if recipe.adapter_name_or_path and recipe.reference == "separate":
        raise RecipeError(
            "adapter_name_or_path with reference: separate is not supported: use reference: adapter-off, whose "
            "reference is then a frozen copy of the starting adapter (the starting policy), as DPO's reference is"
        )
    plan = plan or reference_plan(recipe, trl_generation())
    device = select_device(recipe.device)
    dtype = compute_dtype(recipe.bf16, device)
    lora = LoraSettings(recipe.lora_r, recipe.lora_alpha, recipe.lora_dropout, recipe.lora_target_modules)
    # One SFT state dict (read once) for both models, applied before quantization.
    sft = load_sft_state_dict(recipe.sft_checkpoint, recipe.model_name_or_path) if recipe.sft_checkpoint else None
    policy = load_policy_model(
        recipe.model_name_or_path,
        recipe.quantization,
        device,
        dtype=dtype,
        lora=lora,
        backend=recipe.backend,
        gradient_checkpointing=recipe.gradient_checkpointing,
        sft_state_dict=sft,
        adapter_name_or_path=recipe.adapter_name_or_path,
    )
    if not plan.separate_model:
        return policy, None
    reference = load_reference_model(
        recipe.model_name_or_path,
        recipe.quantization,
        select_device(plan.device) if plan.device else device,
        dtype=dtype,
        backend=recipe.backend,
        sft_state_dict=sft,
    )
    return policy, reference


def build_trainer(
    recipe: Recipe,
    plan: ReferencePlan,
    model: PreTrainedModel,
    ref_model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Dataset,
    eval_dataset: Dataset | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> Any:
    """Build ``trl.DPOTrainer`` (AdamW, the recipe's values) or dpo_xpu's subclass where the recipe needs it.

    Args:
        plan: the run's reference plan (:func:`dpo_xpu.train.reference.reference_plan`), for the installed TRL
            generation (``plan.generation``).
        train_dataset, eval_dataset: rows with ``prompt``, ``chosen``, ``rejected``, prompts already cut
            (:func:`cut_prompts`).
        callbacks: ``TrainerCallback`` objects, in order.

    Returns:
        The trainer, its ``decisions`` set (one line each on the reference and prefix sharing) and, for a reference
        precomputed by dpo_xpu, its log-probs attached (``trainer.reference_cache_info``). On a CPU under TRL 1.x
        only answer tokens are scored during its ``train``/``evaluate``/``predict`` (restored after each).

    Raises:
        RecipeError: a value the installed TRL cannot honour; ``separate`` without a ``ref_model``, or a
            ``ref_model`` for another strategy.
    """
    import torch
    from trl import DPOConfig, DPOTrainer

    from dpo_xpu.distributed import ddp_config_kwargs, main_process_first

    if plan.separate_model and ref_model is None:
        raise RecipeError("reference: 'separate' needs a reference model (load_reference_model)")
    if not plan.separate_model and ref_model is not None:
        raise RecipeError(f"reference: {plan.strategy!r} uses no separate model; pass ref_model=None")
    logger.info("%s", plan.why)
    generation = plan.generation
    device_type = next(model.parameters()).device.type
    on_cpu = device_type == "cpu"
    config_kwargs = dpo_config_kwargs(recipe, plan, use_cpu=on_cpu, has_eval_dataset=eval_dataset is not None)
    if on_cpu:
        from dpo_xpu.train.host_memory import release_after_training_forward

        release_after_training_forward(model)  # freed activations leave the resident memory before the backward
    config_kwargs.update(ddp_config_kwargs(config_kwargs))
    tokenizer_kw = "processing_class" if "processing_class" in inspect.signature(DPOTrainer).parameters else "tokenizer"
    torch.manual_seed(recipe.seed)
    prefix_sharing, why = prefix_sharing_decision(recipe.prefix_sharing, model, generation)
    row_tokens = None
    if prefix_sharing:
        batch, max_length = recipe.per_device_train_batch_size, recipe.max_length
        in_bf16 = plan.precomputed_by is not None and bool(config_kwargs.get("bf16"))
        row_tokens, packing_why = packing_budget(recipe.prefix_sharing, model, batch, max_length, in_bf16)
        pairwise, attention_why = pair_attention_decision(model, device_type)
        for pair_model in (model, ref_model) if pairwise else ():
            if pair_model is not None:
                install_pair_attention(pair_model)
        why = f"{why}; {packing_why}; {attention_why}"
    logger.info("%s", why)
    own = own_loss_type(recipe.loss_type, recipe.label_smoothing, generation)
    trainer_class, extra = _trainer_class(
        plan, own, recipe.loss_type == "ipo", prefix_sharing, row_tokens, recipe.label_smoothing, recipe.simpo_gamma
    )
    trainer = trainer_class(
        model=model,
        ref_model=ref_model,
        args=DPOConfig(**config_kwargs),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        callbacks=list(callbacks),
        **{tokenizer_kw: tokenizer},
        **extra,
    )
    require_internals(trainer)  # a TRL release that renamed what dpo_xpu reaches into fails here, in one line
    trainer.decisions = [plan.why, why]  # what `auto` chose, one line each, for notebooks and reports
    if generation == "1.x" and recipe.max_prompt_length is not None:
        _truncate_evaluated_prompts(trainer, recipe.max_prompt_length, generation, tokenizer)
    if generation == "1.x" and on_cpu:
        cpu_lm_head_for(trainer)  # TRL's LM head switched for this trainer's passes alone, restored after
    if generation == "1.x" and recipe.adapter_name_or_path:
        from dpo_xpu.train.trainer import match_reference_adapter_dtype

        match_reference_adapter_dtype(trainer.model)  # reference == starting policy at step 0
    if plan.precomputed_by == "dpo_xpu":  # computed and cached after construction, with the trainer's collator
        from dpo_xpu.train.reference_cache import attach_precomputed_reference

        # by rank 0 alone; sets trainer.reference_cache_info and .reference_cache_by_split (evaluate adds to it)
        info = main_process_first(attach_precomputed_reference, trainer, recipe)
        logger.info("reference log-probs %s: %s", "reused from cache" if info.hit else "computed", info.path)
    return trainer


def _truncate_evaluated_prompts(trainer: Any, max_prompt_length: int, generation: str, tokenizer: Any) -> None:
    """Cut the prompts of data given to ``trainer.evaluate`` as the run's own were cut (TRL 1.x would drop each new
    row whose prompt alone passes ``max_length``, without a word). Wraps this trainer's ``evaluate`` only."""
    evaluate = trainer.evaluate

    def evaluate_cut(eval_dataset: Any = None, *args: Any, **kwargs: Any) -> dict[str, float]:
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                k: cut_prompts(max_prompt_length, generation, tokenizer, v) for k, v in eval_dataset.items()
            }
        else:
            eval_dataset = cut_prompts(max_prompt_length, generation, tokenizer, eval_dataset)
        return evaluate(eval_dataset, *args, **kwargs)

    trainer.evaluate = evaluate_cut


def _trainer_class(
    plan: ReferencePlan,
    own: str | None,
    ipo: bool,
    prefix_sharing: bool,
    row_tokens: int | None,
    label_smoothing: float,
    simpo_gamma: float,
) -> tuple[type, dict[str, Any]]:
    """The trainer class and its extra keywords: TRL's ``DPOTrainer``, unless the run needs
    :class:`~dpo_xpu.train.trainer.DpoXpuTrainer` (TRL 1.x: an own loss ``own``, reference-free, a CPU reference,
    prefix sharing, ``ipo``'s averaged rewards) or the ipex-llm backend's reference-free trainer (TRL 0.11)."""
    from trl import DPOTrainer

    if plan.generation == "0.11":
        if plan.reference_free:
            from dpo_xpu.models.backends.ipex_llm_trainer import ReferenceFreeDPOTrainer

            return ReferenceFreeDPOTrainer, {}
        return DPOTrainer, {}
    if not (own or plan.reference_free or plan.device is not None or prefix_sharing or ipo):
        return DPOTrainer, {}
    from dpo_xpu.train.trainer import DpoXpuTrainer

    return DpoXpuTrainer, dict(
        own_loss_type=own,
        reference_free=plan.reference_free,
        label_smoothing=label_smoothing,
        simpo_gamma=simpo_gamma,
        reference_device=plan.device,
        prefix_sharing=prefix_sharing,
        packing_row_tokens=row_tokens,
        length_normalised_rewards=ipo,
    )
