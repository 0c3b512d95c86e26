"""Training: one recipe -> a TRL ``DPOTrainer`` for the installed TRL, and a whole run end to end.

TRL computes the DPO loss (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7)::

    L = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

and runs the loop; this module builds the trainer for the installed TRL generation (the mapping of recipe values
onto ``DPOConfig`` is in :mod:`dpo_xpu.train.trl_config`) and runs whole runs: run folder, data, models, training,
adapter and export.
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_xpu.data.truncation import truncate_prompts
from dpo_xpu.errors import RecipeError, RunFolderError, TrainingInterrupted
from dpo_xpu.outputs.run_folder import (
    MERGE_CHECK_FILE,
    StartedRun,
    disk_full,
    disk_full_message,
    lock_run_dir,
    prepare_run_dir,
    save_fingerprints,
    starting,
    undo_start,
    unlock_run_dir,
)
from dpo_xpu.recipes import Recipe
from dpo_xpu.train.prefix_sharing import prefix_sharing_decision
from dpo_xpu.train.reference import ReferencePlan, reference_plan
from dpo_xpu.train.step0 import Step0Check, expected_step0_loss, step0_causes
from dpo_xpu.train.trl_config import dpo_config_kwargs, own_loss_type, trl_generation, validate_recipe
from dpo_xpu.train.trl_internals import require_internals, score_answer_tokens_only_on_cpu

if TYPE_CHECKING:
    from collections.abc import Sequence

    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"


def make_dpo_trainer(
    recipe: Recipe,
    model: PreTrainedModel,
    ref_model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Dataset,
    eval_dataset: Dataset | None = None,
    callbacks: list[TrainerCallback] | None = None,
    live_plot: bool | None = None,
) -> Any:
    """Build ``trl.DPOTrainer`` (AdamW, bf16, the recipe's values) for the installed TRL generation.

    ``metrics.jsonl`` and ``reward_curves.png`` are written to ``recipe.output_dir`` at each logging step
    (:class:`~dpo_xpu.callbacks.metrics.MetricsLoggerCallback`,
    :class:`~dpo_xpu.callbacks.metrics.LiveRewardPlotCallback`).

    Args:
        recipe: the run's recipe.
        model: the policy (a PEFT model for ``adapter-off``).
        ref_model: a frozen reference for ``separate``; ``None`` for ``adapter-off`` and ``precomputed``.
        tokenizer: the tokenizer (passed as ``processing_class`` on TRL 1.x, ``tokenizer`` on TRL 0.11).
        train_dataset: rows with ``prompt``, ``chosen``, ``rejected`` strings (see ``format_orca_dataset``).
        eval_dataset: held-out rows of the same form, or ``None``.
        callbacks: more ``TrainerCallback`` objects.
        live_plot: redraw curves in the notebook; ``None`` detects a Jupyter kernel.

    Returns:
        A ready ``trl.DPOTrainer``; call ``.train()``. ``trainer.decisions`` holds one line each on the reference
        strategy and prefix sharing as resolved (``auto``), and, for a precomputed reference,
        ``trainer.reference_cache_info`` where its train log-probs came from (a ``CacheInfo``; one per split, datasets
        given to ``evaluate`` included, in ``trainer.reference_cache_by_split``).

    Raises:
        RecipeError: a recipe value the installed TRL cannot honour, or ``separate`` without a ``ref_model``.
    """
    import torch
    from trl import DPOConfig, DPOTrainer

    from dpo_xpu.callbacks.metrics import LiveRewardPlotCallback, use_step_lines
    from dpo_xpu.distributed import ddp_config_kwargs, main_process_first, world_size

    generation = trl_generation()
    plan = reference_plan(recipe, generation, rows=len(train_dataset), world_size=world_size())
    if plan.separate_model and ref_model is None:
        raise RecipeError("reference: 'separate' needs a reference model (load_reference_model)")
    if not plan.separate_model and ref_model is not None:
        raise RecipeError(f"reference: {plan.strategy!r} uses no separate model; pass ref_model=None")
    logger.info("%s", plan.why)
    device = next(model.parameters()).device
    config_kwargs = dpo_config_kwargs(
        recipe, generation, use_cpu=device.type == "cpu", has_eval_dataset=eval_dataset is not None
    )
    if generation == "1.x" and device.type == "cpu":
        score_answer_tokens_only_on_cpu()
    if device.type == "cpu":
        from dpo_xpu.train.host_memory import release_after_training_forward

        release_after_training_forward(model)  # freed activations leave the resident memory before the backward
    config_kwargs.update(ddp_config_kwargs(config_kwargs))
    config = DPOConfig(**config_kwargs)
    if generation == "1.x" and recipe.max_prompt_length is not None:
        train_dataset = truncate_prompts(train_dataset, tokenizer, recipe.max_prompt_length)
        if eval_dataset is not None:
            eval_dataset = truncate_prompts(eval_dataset, tokenizer, recipe.max_prompt_length)
    all_callbacks = _run_callbacks(recipe, plan, model, ref_model, tokenizer, eval_dataset, live_plot)
    all_callbacks += callbacks or []
    tokenizer_kw = "processing_class" if "processing_class" in inspect.signature(DPOTrainer).parameters else "tokenizer"
    torch.manual_seed(recipe.seed)
    prefix_sharing, why = prefix_sharing_decision(recipe.prefix_sharing, model, generation)
    logger.info("%s", why)
    trainer_class, extra = _trainer_class(recipe, plan, generation, prefix_sharing)
    trainer = trainer_class(
        model=model,
        ref_model=ref_model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        callbacks=all_callbacks,
        **{tokenizer_kw: tokenizer},
        **extra,
    )
    require_internals(trainer)  # a TRL release that renamed what dpo_xpu reaches into fails here, in one line
    if generation == "1.x" and recipe.max_prompt_length is not None:
        _truncate_evaluated_prompts(trainer, tokenizer, recipe.max_prompt_length)
    trainer.decisions = [plan.why, why]  # what `auto` chose, one line each, for notebooks and reports
    from dpo_xpu.callbacks.metrics import MetricsLoggerCallback
    from dpo_xpu.train.throughput import trainer_meter

    metrics_logger = next(c for c in all_callbacks if isinstance(c, MetricsLoggerCallback))
    metrics_logger.meter = trainer_meter(trainer, reference_forward=not (plan.precomputed_by or plan.reference_free))
    plot = next(c for c in all_callbacks if isinstance(c, LiveRewardPlotCallback))
    use_step_lines(trainer, notebook=plot.display)  # step lines where the curves are drawn in a notebook
    if generation == "1.x" and recipe.adapter_name_or_path:
        from dpo_xpu.train.trainer import match_reference_adapter_dtype

        match_reference_adapter_dtype(trainer.model)  # reference == starting policy at step 0
    if plan.precomputed_by == "dpo_xpu":  # computed and cached after construction, with the trainer's collator
        from dpo_xpu.train.reference_cache import attach_precomputed_reference

        # computed once, by rank 0; it sets trainer.reference_cache_info (the train split's CacheInfo, for reports)
        # and trainer.reference_cache_by_split, which evaluate(new_dataset) adds to
        info = main_process_first(attach_precomputed_reference, trainer, recipe)
        logger.info("reference log-probs %s: %s", "reused from cache" if info.hit else "computed", info.path)
    return trainer


def _truncate_evaluated_prompts(trainer: Any, tokenizer: PreTrainedTokenizerBase, max_prompt_length: int) -> None:
    """Cut the prompts of a data set given to ``trainer.evaluate`` as the run's own were cut (TRL 1.x has no
    ``max_prompt_length``: it would drop each new row whose prompt alone passes ``max_length``, without a word).
    Wraps this trainer's ``evaluate`` only (an instance attribute; nothing process-wide)."""
    evaluate = trainer.evaluate

    def evaluate_cut(eval_dataset: Any = None, *args: Any, **kwargs: Any) -> dict[str, float]:
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: truncate_prompts(v, tokenizer, max_prompt_length) for k, v in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = truncate_prompts(eval_dataset, tokenizer, max_prompt_length)
        return evaluate(eval_dataset, *args, **kwargs)

    trainer.evaluate = evaluate_cut


def _run_callbacks(
    recipe: Recipe,
    plan: ReferencePlan,
    model: PreTrainedModel,
    ref_model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    eval_dataset: Dataset | None,
    live_plot: bool | None,
) -> list[TrainerCallback]:
    """dpo_xpu's callbacks of a run: metrics (with the step-0 check, unless reference-free), live curves,
    checkpoint markers, the stop at a NaN step, and policy-vs-reference samples at each evaluation when the recipe
    asks for them."""
    from dpo_xpu.callbacks.checkpoints import CheckpointCallback
    from dpo_xpu.callbacks.interrupts import StopOnDivergence
    from dpo_xpu.callbacks.metrics import EvalSamplesCallback, LiveRewardPlotCallback, MetricsLoggerCallback

    step0 = None
    if not plan.reference_free:
        step0 = Step0Check(
            beta=recipe.beta,
            expected_loss=expected_step0_loss(recipe.loss_type, recipe.beta, recipe.nll_loss_coef),
            causes=step0_causes(recipe, model, ref_model, next(model.parameters()).device.type),
        )
    out: list[TrainerCallback] = [
        MetricsLoggerCallback(recipe.output_dir, step0=step0),
        LiveRewardPlotCallback(recipe.output_dir, display=live_plot),
        CheckpointCallback(),
        StopOnDivergence(),  # after the row is written and the checkpoint marked: it stops before a NaN save
    ]
    if recipe.eval_steps and recipe.eval_samples and eval_dataset is not None and recipe.num_eval_samples > 0:
        prompts = list(eval_dataset["prompt"][: recipe.num_eval_samples])
        out.append(
            EvalSamplesCallback(recipe.output_dir, tokenizer, prompts, recipe.max_new_tokens, reference=ref_model)
        )
    return out


def _trainer_class(
    recipe: Recipe, plan: ReferencePlan, generation: str, prefix_sharing: bool = False
) -> tuple[type, dict[str, Any]]:
    """The trainer class for a recipe and its extra keywords: TRL's ``DPOTrainer``, unless the recipe needs
    :class:`~dpo_xpu.train.trainer.DpoXpuTrainer` (TRL 1.x: an own loss, reference-free, a CPU reference, prefix
    sharing, ipo's averaged rewards) or the ipex-llm backend's reference-free trainer (TRL 0.11)."""
    from trl import DPOTrainer

    if generation == "0.11":
        if recipe.reference_free:
            from dpo_xpu.models.backends.ipex_llm_trainer import ReferenceFreeDPOTrainer

            return ReferenceFreeDPOTrainer, {}
        return DPOTrainer, {}
    own = own_loss_type(recipe, generation)
    ipo = recipe.loss_type == "ipo"
    if not (own or plan.reference_free or plan.device is not None or prefix_sharing or ipo):
        return DPOTrainer, {}
    from dpo_xpu.train.trainer import DpoXpuTrainer

    return DpoXpuTrainer, dict(
        own_loss_type=own,
        reference_free=plan.reference_free,
        label_smoothing=recipe.label_smoothing,
        simpo_gamma=recipe.simpo_gamma,
        reference_device=plan.device,
        prefix_sharing=prefix_sharing,
        length_normalised_rewards=ipo,
    )


def _start(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> StartedRun:
    from dpo_xpu.environment import check_environment

    run_dir = Path(recipe.output_dir)
    if resume:
        lock_run_dir(run_dir)
        started = StartedRun(run_dir)
    else:
        started = prepare_run_dir(run_dir, overwrite=overwrite)
    with starting(started, new=not resume):  # a failed start is undone; a full disk is one line
        if not resume:
            recipe.save(run_dir / "recipe.yaml")
            save_fingerprints(recipe, run_dir)
        report = check_environment(backend=recipe.backend, recipe=recipe)
        (run_dir / "environment.json").write_text(json.dumps(report.to_dict(), indent=2, default=str))
    for verdict in report.verdicts:  # the planned memory, before anything is loaded (the time: after step 1)
        if verdict.topic == "memory":
            logger.log(logging.INFO if verdict.level == "ok" else logging.WARNING, "memory %s", verdict.message)
    return started


def start_run(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> Path:
    """Open the run folder: lock it for this process and make it ready (see
    :func:`dpo_xpu.outputs.run_folder.prepare_run_dir`), save the resolved recipe as ``recipe.yaml``, the inputs'
    fingerprints as ``fingerprints.json`` and the environment report (with the recipe's memory verdict) as
    ``environment.json``. The lock is held until :func:`dpo_xpu.outputs.run_folder.unlock_run_dir` or the process ends
    (in a notebook: the kernel).

    Args:
        recipe: the run's recipe; ``recipe.output_dir`` is the folder.
        overwrite: move an earlier run in the folder aside (to ``<output_dir>.previous``) and start again.
        resume: continue the run already there: its ``recipe.yaml`` is kept, ``environment.json`` rewritten.

    Raises:
        RunFolderError: the folder holds a run and neither ``overwrite`` nor ``resume`` is set; another process
            holds the folder; it is a file or not writable.
    """
    return _start(recipe, overwrite=overwrite, resume=resume).run_dir


@dataclass
class RunResult:
    """What :func:`run_training` leaves: the folder, the logged rows and the trainer (for evaluation)."""

    run_dir: Path
    metrics: list[dict[str, Any]]
    adapter_dir: Path
    curves_png: Path
    trainer: Any  # ``None`` when ``resume`` found the run complete
    merged_dir: Path | None = None  # with ``export: merged``


def load_run_data(
    recipe: Recipe, tokenizer: PreTrainedTokenizerBase, report_path: str | Path | None = None
) -> tuple[Dataset, Dataset | None]:
    """Load, validate and ChatML-format the recipe's data; split off ``eval_fraction`` when > 0.

    The steps, in order: load ``dataset_name_or_path`` in ``data_format`` (or draw the ``dataset_mixture``,
    see :func:`dpo_xpu.data.sources.mix_sources`), keeping ``limit`` rows; ChatML formatting; with ``drop_long_rows``,
    the length filter (:func:`dpo_xpu.data.lengths.drop_long_pairs`); the eval split. What each step kept is
    logged and, with ``report_path``, written there as JSON (``data_report.json`` in the run folder).
    """
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


def load_run_models(recipe: Recipe) -> tuple[PreTrainedModel, PreTrainedModel | None]:
    """Load the policy (with LoRA) and, for the ``separate`` strategy, the frozen reference."""
    import torch

    from dpo_xpu.device import select_device
    from dpo_xpu.models.base import LoraSettings
    from dpo_xpu.models.loading import load_policy_model, load_reference_model, load_sft_state_dict

    if recipe.adapter_name_or_path and recipe.reference == "separate":
        raise RecipeError(
            "adapter_name_or_path with reference: separate is not supported: use reference: adapter-off, whose "
            "reference is then a frozen copy of the starting adapter (the starting policy), as DPO's reference is"
        )
    device = select_device(recipe.device)
    # bf16 compute on accelerators; float32 when bf16 is off (on CPUs without AMX, bf16 is emulated and
    # about 6x slower: 9.5 vs 1.6 s per step for stories260K, measured on the 2-core CI machine).
    dtype = torch.bfloat16 if recipe.bf16 else torch.float32
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
    reference = None
    plan = reference_plan(recipe, trl_generation())
    if plan.separate_model:
        ref_device = select_device(plan.device) if plan.device else device
        reference = load_reference_model(
            recipe.model_name_or_path,
            recipe.quantization,
            ref_device,
            dtype=dtype,
            backend=recipe.backend,
            sft_state_dict=sft,
        )
    return policy, reference


def save_adapter(
    trainer: Any, tokenizer: PreTrainedTokenizerBase, run_dir: str | Path, recipe: Recipe | None = None
) -> Path:
    """Save the LoRA adapter (``adapter_model.safetensors``, ``adapter_config.json``), the tokenizer and the model
    card (:mod:`dpo_xpu.outputs.model_card`: base model, data, recipe, last metrics; also as ``<run_dir>/README.md``) to
    ``<run_dir>/adapter`` and return that folder.

    Args:
        recipe: the run's recipe; default the run folder's ``recipe.yaml`` (no card when there is none).
    """
    from dpo_xpu.files import apply_umask
    from dpo_xpu.outputs.model_card import write_model_cards
    from dpo_xpu.recipes import load_recipe

    adapter_dir = Path(run_dir) / ADAPTER_DIR
    # Only the trained adapter: TRL may hold a frozen "ref" copy of it, which users do not need.
    trainer.model.save_pretrained(adapter_dir, selected_adapters=["default"])
    tokenizer.save_pretrained(adapter_dir)
    if recipe is None and (Path(run_dir) / "recipe.yaml").is_file():
        recipe = load_recipe(Path(run_dir) / "recipe.yaml")
    if recipe is not None:
        write_model_cards(recipe, run_dir, adapter_dir, getattr(trainer, "decisions", None))
    apply_umask(adapter_dir)  # safetensors writes mode 600 whatever the umask
    return adapter_dir


def export_merged(
    recipe: Recipe,
    adapter_dir: str | Path,
    run_dir: str | Path,
    texts: Sequence[str] | None = None,
    rtol: float | None = None,
) -> Path:
    """Merge the run's adapter into a bf16 copy of the base and save it, with the tokenizer, to ``<run>/merged``.

    The merge is :func:`dpo_xpu.outputs.merge.merge_and_save` (unquantized base in bf16, PEFT ``merge_and_unload``), on
    the CPU. With ``texts`` it is :func:`dpo_xpu.outputs.merge.merge_checked`: the merged model's logits on them are
    compared with the adapter model's, and where rounding to bf16 moved them by more than
    :data:`~dpo_xpu.outputs.merge.MERGE_RTOL` (10%) of the adapter's own effect, or changed a greedy continuation, the
    weights are saved in float32 instead, saying why in the log; the check's report goes to
    ``<run>/merge_check.json``. With ``sft_checkpoint``, the base the adapter
    was trained on is the SFT weights: they are written once in bf16 to a temporary folder, which is then the merge's
    base.

    Args:
        texts: a few inputs for the check (the run's prompts); ``None`` merges without it.
        rtol: the check's bound (:data:`~dpo_xpu.outputs.merge.MERGE_RTOL` when ``None``).

    Returns:
        The folder, loadable with ``AutoModelForCausalLM.from_pretrained`` (no PEFT, no bitsandbytes needed).
    """
    import tempfile

    import torch

    from dpo_xpu.models.backends import get_backend
    from dpo_xpu.models.base import resolve_model_path
    from dpo_xpu.models.loading import load_sft_state_dict

    out_dir = Path(run_dir) / MERGED_DIR
    base = resolve_model_path(recipe.model_name_or_path)
    if not recipe.sft_checkpoint:
        return _merge(adapter_dir, base, out_dir, Path(run_dir), texts, rtol)
    state = load_sft_state_dict(recipe.sft_checkpoint, base)
    with tempfile.TemporaryDirectory(prefix="dpo-xpu-sft-base-") as scratch:
        sft_base = get_backend("native").load_base(base, "none", torch.device("cpu"), torch.bfloat16, state)
        sft_base.save_pretrained(scratch)
        del sft_base, state
        return _merge(adapter_dir, scratch, out_dir, Path(run_dir), texts, rtol)


def _merge(
    adapter_dir: str | Path,
    base: str | Path,
    out_dir: Path,
    run_dir: Path,
    texts: Sequence[str] | None,
    rtol: float | None = None,
) -> Path:
    """:func:`~dpo_xpu.outputs.merge.merge_checked` where there are ``texts`` (its report in ``merge_check.json``), else
    :func:`~dpo_xpu.outputs.merge.merge_and_save`."""
    from dpo_xpu.outputs.merge import MERGE_RTOL, merge_and_save, merge_checked

    if not texts:
        return merge_and_save(adapter_dir, base, out_dir=out_dir)
    merged, report = merge_checked(adapter_dir, base, out_dir, list(texts), rtol=MERGE_RTOL if rtol is None else rtol)
    (run_dir / MERGE_CHECK_FILE).write_text(json.dumps(report, indent=2, default=str))
    from dpo_xpu.outputs.merge import merge_mismatch

    logger.log(
        logging.INFO if report["matches"] else logging.WARNING,
        "merged model in %s (%s): logits within %.3g of the adapter model's (%.0f%% of the adapter's effect), greedy "
        "text the same on %d of %d prompts%s",
        merged,
        report["weights_dtype"],
        report["max_abs_diff"],
        100 * report["effect_ratio"],
        report["greedy_same"],
        report["greedy_texts"],
        ""
        if report["matches"]
        else f"; the merge {merge_mismatch(report, report['rtol'])}: check {run_dir / MERGE_CHECK_FILE}",
    )
    return merged


def run_prompts(trainer: Any, tokenizer: PreTrainedTokenizerBase, n: int = 4) -> list[str]:
    """The first ``n`` prompts the trainer holds (held-out ones first), as text: inputs for the merge check."""
    texts: list[str] = []
    for dataset in (getattr(trainer, "eval_dataset", None), getattr(trainer, "train_dataset", None)):
        if isinstance(dataset, dict):  # several eval sets: the first
            dataset = next(iter(dataset.values()), None)
        if dataset is None or len(texts) >= n:
            continue
        columns = getattr(dataset, "column_names", None) or []
        for row in dataset.select(range(min(n - len(texts), len(dataset)))):
            if "prompt_ids" in columns:
                texts.append(tokenizer.decode(row["prompt_ids"]))
            elif isinstance(row.get("prompt"), str):
                texts.append(row["prompt"])
    return texts


def run_training(
    recipe: Recipe,
    overwrite: bool = False,
    callbacks: list[TrainerCallback] | None = None,
    live_plot: bool | None = None,
    resume: bool = False,
) -> RunResult:
    """Run DPO end to end and write the run folder.

    The folder ``recipe.output_dir`` gets ``recipe.yaml`` (resolved), ``environment.json``,
    ``data_report.json``, ``metrics.jsonl``, ``reward_curves.png``, ``checkpoint-N/`` every ``save_steps`` and
    at the last step, ``adapter/`` (LoRA adapter + tokenizer) and, with ``export: merged``, ``merged/`` and
    ``merge_check.json`` (:func:`export_merged`). SIGINT / SIGTERM during training save a checkpoint at the end
    of the current step, then stop (:class:`~dpo_xpu.callbacks.interrupts.StopOnSignal`).

    Args:
        resume: continue the run in ``recipe.output_dir`` from its newest complete checkpoint
            (:func:`dpo_xpu.callbacks.checkpoints.prepare_resume`); the recipe must match the run's on every key that
            changes the result.

    Raises:
        RunFolderError: the folder already holds a run (see ``overwrite``), or, with ``resume``, holds no run
            or no complete checkpoint.
        TrainingInterrupted: a signal stopped training; a checkpoint was saved and the message says how to resume.
        PreferenceDataError, ModelLoadError, DeviceNotAvailableError, RecipeError: bad input (clear message).
    """
    from dpo_xpu.callbacks.interrupts import StopOnSignal
    from dpo_xpu.callbacks.metrics import FirstStepCallback
    from dpo_xpu.device import select_device
    from dpo_xpu.distributed import (
        check_engine,
        global_batch_line,
        init_distributed,
        is_distributed,
        is_main_process,
        on_rank_zero,
    )
    from dpo_xpu.models.base import resolve_model_path
    from dpo_xpu.outputs.plotting import CURVES_FILE, read_metrics

    if resume and overwrite:
        raise RunFolderError("resume and overwrite exclude each other: resume continues the run, overwrite replaces it")
    device = select_device(recipe.device)  # an absent device fails here, before anything is loaded or written
    init_distributed(device)  # several processes (torchrun, accelerate launch): join their group (dpo_xpu.distributed)
    check_engine(recipe)
    validate_recipe(recipe, use_cpu=device.type == "cpu")  # every TRL option by value, before anything is written
    resolve_model_path(recipe.model_name_or_path)  # so does a missing model folder or an unreachable hub id
    run_dir = Path(recipe.output_dir)
    try:
        # rank 0 alone locks and prepares the folder; every rank gets its decision, or its error
        opened = on_rank_zero(_open_run, recipe, run_dir, overwrite, resume)
        if isinstance(opened, RunResult):
            return opened
        started, checkpoint = opened
        if is_main_process():
            logger.log(logging.WARNING if is_distributed() else logging.INFO, global_batch_line(recipe))
        first_step = FirstStepCallback()
        try:
            trainer, tokenizer = _build(recipe, run_dir, callbacks, live_plot)
            trainer.add_callback(first_step)
            prepare_resume_of(trainer, checkpoint)
            stopper = StopOnSignal()
            trainer.add_callback(stopper)
            # reward_curves.png is drawn from the last logged row by make_dpo_trainer's LiveRewardPlotCallback at
            # the end of training, interrupted or not
            with stopper:
                trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
        except BaseException as exc:
            if not resume and not first_step.done and is_main_process():
                undo_start(started)  # nothing trained: leave the folder as it was, so the retry is not blocked
            _raise_if_disk_full(run_dir, exc)
            raise
        if stopper.signum is not None and trainer.state.global_step < trainer.state.max_steps:
            raise TrainingInterrupted(
                f"training stopped by {stopper.signal_name} at step {trainer.state.global_step}; a checkpoint is in "
                f"{run_dir / f'checkpoint-{trainer.state.global_step}'}. Continue with: dpo-xpu train --recipe FILE "
                "--resume (the same recipe), or run_training(recipe, resume=True)",
                exit_code=stopper.exit_code,
            )
        adapter_dir, merged_dir = on_rank_zero(_save_outputs, recipe, trainer, tokenizer, run_dir)
        return RunResult(run_dir, read_metrics(run_dir), adapter_dir, run_dir / CURVES_FILE, trainer, merged_dir)
    finally:
        unlock_run_dir(run_dir)


def _open_run(
    recipe: Recipe, run_dir: Path, overwrite: bool, resume: bool
) -> RunResult | tuple[StartedRun, Path | None]:
    """Lock and prepare the run folder (rank 0 alone under several processes): the finished run for ``resume`` on
    a complete one, else what the start did and the checkpoint to resume from (``None`` for a new run)."""
    from dpo_xpu.callbacks.checkpoints import prepare_resume

    checkpoint = None
    if resume:
        if run_dir.is_dir():
            lock_run_dir(run_dir)  # before prepare_resume trims the folder's logs
        checkpoint = prepare_resume(recipe, run_dir)
        finished = _finished_run(recipe, run_dir, checkpoint)
        if finished is not None:
            return finished
    return _start(recipe, overwrite=overwrite, resume=resume), checkpoint


def open_run(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> tuple[Path, Path | None]:
    """Open the run folder for training step by step (notebook 03): :func:`start_run` for a new run, or, with
    ``resume``, the run already there, checked and trimmed to its newest complete checkpoint.

    Returns:
        ``(run_dir, checkpoint)``: the checkpoint to pass to :func:`prepare_resume_of` and to
        ``trainer.train(resume_from_checkpoint=...)``, or ``None`` for a new run.

    Raises:
        RunFolderError: as :func:`start_run`; with ``resume``, a folder without a run or without a complete
            checkpoint, or a run that is already complete (nothing to train: evaluate it, or train longer in a new run).
    """
    run_dir = Path(recipe.output_dir)
    if resume and overwrite:
        raise RunFolderError("resume and overwrite exclude each other: resume continues the run, overwrite replaces it")
    opened = _open_run(recipe, run_dir, overwrite, resume)
    if isinstance(opened, RunResult):
        raise RunFolderError(
            f"{run_dir} is complete: nothing to train. Evaluate it (notebook 04, or dpo-xpu evaluate {run_dir}), or "
            "raise max_steps in a new run (another output_dir, or overwrite=True)"
        )
    return run_dir, opened[1]


def prepare_resume_of(trainer: Any, checkpoint: str | Path | None) -> None:
    """Make ``trainer`` ready to continue from ``checkpoint`` (nothing for ``None``): no evaluation at the start (the
    checkpoint's step was evaluated, if due, before it was saved), and the LoRA weights cast back to their training
    dtype after the checkpoint reloads them (before DDP builds its buckets under several processes)."""
    from dpo_xpu.callbacks.checkpoints import KeepTrainableDtypes
    from dpo_xpu.distributed import is_distributed
    from dpo_xpu.train.trl_internals import keep_dtypes_before_ddp

    if checkpoint is None:
        return
    trainer.args.eval_on_start = False
    keeper = KeepTrainableDtypes(trainer.model)
    trainer.add_callback(keeper)
    if is_distributed():
        keep_dtypes_before_ddp(trainer, keeper)


def _save_outputs(
    recipe: Recipe, trainer: Any, tokenizer: PreTrainedTokenizerBase, run_dir: Path
) -> tuple[Path, Path | None]:
    """Save the adapter and, with ``export: merged``, the merged model (rank 0 alone under several processes)."""
    try:
        adapter_dir = save_adapter(trainer, tokenizer, run_dir, recipe)
        merged_dir = (
            export_merged(recipe, adapter_dir, run_dir, run_prompts(trainer, tokenizer))
            if recipe.export == "merged"
            else None
        )
    except Exception as exc:
        _raise_if_disk_full(run_dir, exc)
        raise
    return adapter_dir, merged_dir


def _raise_if_disk_full(run_dir: Path, exc: BaseException) -> None:
    """Raise the one-line :class:`RunFolderError` for a full disk (what was kept, how to resume) in place of ``exc``."""
    from dpo_xpu.callbacks.checkpoints import newest_complete_step

    if isinstance(exc, Exception) and disk_full(exc):
        raise RunFolderError(disk_full_message(run_dir, exc, newest_complete_step(run_dir))) from None


def _build(
    recipe: Recipe, run_dir: Path, callbacks: list[TrainerCallback] | None, live_plot: bool | None
) -> tuple[Any, PreTrainedTokenizerBase]:
    """The run's tokenizer, data, models and trainer (seeded as a fresh process would be)."""
    from transformers import set_seed

    from dpo_xpu.distributed import is_main_process
    from dpo_xpu.models.loading import load_tokenizer

    tokenizer = load_tokenizer(recipe.model_name_or_path)
    report = run_dir / "data_report.json" if is_main_process() else None  # rank 0 alone writes the run folder
    train_dataset, eval_dataset = load_run_data(recipe, tokenizer, report_path=report)
    set_seed(recipe.seed)  # LoRA's random init draws from the global RNG: same seed, same run, in any process
    policy, reference = load_run_models(recipe)
    trainer = make_dpo_trainer(
        recipe, policy, reference, tokenizer, train_dataset, eval_dataset, callbacks=callbacks, live_plot=live_plot
    )
    return trainer, tokenizer


def _finished_run(recipe: Recipe, run_dir: Path, checkpoint: Path) -> RunResult | None:
    """For ``resume`` on a run whose newest checkpoint is its last step: train nothing, re-save the final adapter
    from that checkpoint if it is missing, and return the run; ``None`` when the run has steps left."""
    from dpo_xpu.models.loading import load_tokenizer
    from dpo_xpu.outputs.plotting import CURVES_FILE, read_metrics

    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    step, max_steps = state.get("global_step", 0), state.get("max_steps", 0)
    if not (max_steps > 0 and step >= max_steps):
        return None
    adapter_dir = run_dir / ADAPTER_DIR
    if not (adapter_dir / "adapter_config.json").is_file():
        adapter_dir.mkdir(exist_ok=True)
        for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, adapter_dir / name)
        load_tokenizer(recipe.model_name_or_path).save_pretrained(adapter_dir)
        from dpo_xpu.outputs.model_card import write_model_cards

        write_model_cards(recipe, run_dir, adapter_dir)
        logger.warning("the run's adapter was missing: saved it again from %s to %s", checkpoint.name, adapter_dir)
    hint = f"to evaluate it: dpo-xpu evaluate {run_dir}; a merged model: dpo-xpu export {run_dir} --merged"
    if recipe.export == "merged" and not (run_dir / MERGED_DIR).is_dir():
        hint = f"export: merged is not applied to a finished run: run dpo-xpu export {run_dir} --merged"
    logger.warning("%s is complete (step %d of %d): nothing to train; %s", run_dir, step, max_steps, hint)
    return RunResult(run_dir, read_metrics(run_dir), adapter_dir, run_dir / CURVES_FILE, None)
