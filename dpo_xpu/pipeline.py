"""A training run, step by step: the run folder, the data, the models, the trainer, the adapter and the export.

:func:`run_training` runs the steps in order; a notebook calls them one by one (:func:`open_run`, ``load_run_data``,
``load_run_models`` (:mod:`dpo_xpu.train.factory`), :func:`make_dpo_trainer`, :func:`prepare_resume_of`, then
``save_adapter`` and ``export_merged`` (:mod:`dpo_xpu.outputs`)). Each decision is made once per run and passed
down: the TRL generation (:func:`dpo_xpu.train.trl_internals.trl_generation`) and the reference plan
(:func:`dpo_xpu.train.reference.reference_plan`, with the training rows and the world size once the data is loaded).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_xpu.errors import RecipeError, RunFolderError, TrainingInterrupted
from dpo_xpu.outputs.adapter import finished_adapter, save_adapter
from dpo_xpu.outputs.merge import export_merged, run_prompts
from dpo_xpu.outputs.run_folder import (
    StartedRun,
    disk_full,
    disk_full_message,
    lock_run_dir,
    start_run_folder,
    undo_start,
    unlock_run_dir,
)
from dpo_xpu.recipes import Recipe
from dpo_xpu.train.factory import build_trainer, cut_prompts, load_run_data, load_run_models
from dpo_xpu.train.reference import ReferencePlan, reference_plan
from dpo_xpu.train.step0 import Step0Check, expected_step0_loss, step0_causes
from dpo_xpu.train.trl_config import validate_recipe
from dpo_xpu.train.trl_internals import trl_generation

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What :func:`run_training` leaves: the folder, the logged rows and the trainer (for evaluation)."""

    run_dir: Path
    metrics: list[dict[str, Any]]
    adapter_dir: Path
    curves_png: Path
    trainer: Any  # ``None`` when ``resume`` found the run complete
    merged_dir: Path | None = None  # with ``export: merged``


def start_run(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> Path:
    """Open the run folder: lock it for this process (until :func:`dpo_xpu.outputs.run_folder.unlock_run_dir` or the
    process ends) and make it ready (:func:`dpo_xpu.outputs.run_folder.prepare_run_dir`); save ``recipe.yaml``,
    ``fingerprints.json`` and the environment report with the recipe's memory verdict (``environment.json``).

    Args:
        overwrite: move an earlier run in the folder aside (to ``<output_dir>.previous``) and start again.
        resume: continue the run already there: its ``recipe.yaml`` is kept, ``environment.json`` rewritten.

    Raises:
        RunFolderError: the folder holds a run and neither ``overwrite`` nor ``resume`` is set; another process
            holds the folder; it is a file or not writable.
    """
    return _start(recipe, overwrite=overwrite, resume=resume).run_dir


def _start(recipe: Recipe, overwrite: bool = False, resume: bool = False, generation: str | None = None) -> StartedRun:
    from dpo_xpu.environment import check_environment

    # before the data: the plan without the rows (they choose only between precomputed and adapter-off, which the
    # memory total does not depend on); the run's own plan is made once the rows are known
    plan = reference_plan(recipe, generation or trl_generation())
    environment = functools.partial(check_environment, backend=recipe.backend, recipe=recipe, plan=plan)
    started, report = start_run_folder(recipe, environment, overwrite=overwrite, resume=resume)
    for verdict in report.verdicts:  # the planned memory, before anything is loaded (the time: after step 1)
        if verdict.topic == "memory":
            logger.log(logging.INFO if verdict.level == "ok" else logging.WARNING, "memory %s", verdict.message)
    return started


def open_run(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> tuple[Path, Path | None]:
    """Open the run folder for training step by step (notebook 03): :func:`start_run` for a new run, or, with
    ``resume``, the run already there, checked and trimmed to its newest complete checkpoint. Settles ``bf16:
    auto`` on ``recipe`` for its device, as :func:`run_training` does.

    Returns:
        ``(run_dir, checkpoint)``: the checkpoint to pass to :func:`prepare_resume_of` and to
        ``trainer.train(resume_from_checkpoint=...)``, or ``None`` for a new run.

    Raises:
        RunFolderError: as :func:`start_run`; with ``resume``, a folder without a run or without a complete
            checkpoint, or a run that is already complete (nothing to train: evaluate it, or train longer in a new run).
    """
    from dpo_xpu.device import select_device, use_bf16

    run_dir = Path(recipe.output_dir)
    if resume and overwrite:
        raise RunFolderError("resume and overwrite exclude each other: resume continues the run, overwrite replaces it")
    recipe.bf16, why = use_bf16(recipe.bf16, select_device(recipe.device))  # auto -> a bool, as run_training
    logger.info(why)
    opened = _open_run(recipe, run_dir, overwrite, resume)
    if isinstance(opened, RunResult):
        raise RunFolderError(
            f"{run_dir} is complete: nothing to train. Evaluate it (notebook 04, or dpo-xpu evaluate {run_dir}), or "
            "raise max_steps in a new run (another output_dir, or overwrite=True)"
        )
    return run_dir, opened[1]


def _open_run(
    recipe: Recipe, run_dir: Path, overwrite: bool, resume: bool, generation: str | None = None
) -> RunResult | tuple[StartedRun, Path | None]:
    """Lock and prepare the run folder: the finished run for ``resume`` on a complete one, else what the start did
    and the checkpoint to resume from (``None`` for a new run)."""
    from dpo_xpu.callbacks.checkpoints import prepare_resume

    checkpoint = None
    if resume:
        if run_dir.is_dir():
            lock_run_dir(run_dir)  # before prepare_resume trims the folder's logs
        checkpoint = prepare_resume(recipe, run_dir)
        adapter_dir = finished_adapter(recipe, run_dir, checkpoint)
        if adapter_dir is not None:  # the run is complete: nothing to train
            from dpo_xpu.outputs.plotting import CURVES_FILE, read_metrics

            return RunResult(run_dir, read_metrics(run_dir), adapter_dir, run_dir / CURVES_FILE, None)
    return _start(recipe, overwrite=overwrite, resume=resume, generation=generation), checkpoint


def make_dpo_trainer(
    recipe: Recipe,
    model: PreTrainedModel,
    ref_model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Dataset,
    eval_dataset: Dataset | None = None,
    callbacks: list[TrainerCallback] | None = None,
    live_plot: bool | None = None,
    plan: ReferencePlan | None = None,
) -> Any:
    """The run's ``trl.DPOTrainer`` (:func:`dpo_xpu.train.factory.build_trainer`) with dpo_xpu's callbacks:
    ``metrics.jsonl`` and ``reward_curves.png`` in ``recipe.output_dir`` at each logging step, the step-0 check,
    checkpoint markers, the stop at a NaN step, and samples at each evaluation when the recipe asks for them.

    Args:
        model, ref_model: the policy (with LoRA), and a frozen reference for ``separate`` (else ``None``).
        train_dataset, eval_dataset: rows with ``prompt``, ``chosen``, ``rejected`` strings (``load_run_data``).
        callbacks: more ``TrainerCallback`` objects.
        live_plot: redraw curves in the notebook; ``None`` detects a Jupyter kernel.
        plan: the run's reference plan; default one made here from the rows and the world size.

    Returns:
        A ready trainer (``.train()``); ``trainer.decisions`` says what ``auto`` chose, and a precomputed reference
        where its log-probs came from (``trainer.reference_cache_info``, per split in ``reference_cache_by_split``).

    Raises:
        RecipeError: a recipe value the installed TRL cannot honour, or ``separate`` without a ``ref_model``.
    """
    from dpo_xpu.callbacks.metrics import LiveRewardPlotCallback, MetricsLoggerCallback, use_step_lines
    from dpo_xpu.distributed import world_size
    from dpo_xpu.train.throughput import trainer_meter

    plan = plan or reference_plan(recipe, trl_generation(), rows=len(train_dataset), world_size=world_size())
    train_dataset = cut_prompts(recipe.max_prompt_length, plan.generation, tokenizer, train_dataset)
    eval_dataset = cut_prompts(recipe.max_prompt_length, plan.generation, tokenizer, eval_dataset)
    own = _run_callbacks(recipe, plan, model, ref_model, tokenizer, eval_dataset, live_plot)
    trainer = build_trainer(
        recipe, plan, model, ref_model, tokenizer, train_dataset, eval_dataset, own + (callbacks or [])
    )
    metrics_logger = next(c for c in own if isinstance(c, MetricsLoggerCallback))
    metrics_logger.meter = trainer_meter(trainer, reference_forward=not (plan.precomputed_by or plan.reference_free))
    plot = next(c for c in own if isinstance(c, LiveRewardPlotCallback))
    use_step_lines(trainer, notebook=plot.display)  # step lines where the curves are drawn in a notebook
    return trainer


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
            causes=step0_causes(
                model,
                ref_model,
                next(model.parameters()).device.type,
                backend=recipe.backend,
                reference_device=recipe.reference_device,
                gradient_checkpointing=recipe.gradient_checkpointing,
                bf16=recipe.bf16,
            ),
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


def run_training(
    recipe: Recipe,
    overwrite: bool = False,
    callbacks: list[TrainerCallback] | None = None,
    live_plot: bool | None = None,
    resume: bool = False,
) -> RunResult:
    """Run DPO end to end and write the run folder ``recipe.output_dir``: ``recipe.yaml``, ``environment.json``,
    ``data_report.json``, ``metrics.jsonl``, ``reward_curves.png``, ``checkpoint-N/`` every ``save_steps`` and at the
    last step, ``adapter/`` and, with ``export: merged``, ``merged/`` and ``merge_check.json``. SIGINT / SIGTERM save
    a checkpoint at the end of the current step, then stop.

    Args:
        recipe: the run's recipe; its ``bf16: auto`` is settled in place for the device
            (:func:`dpo_xpu.device.use_bf16`, the reason logged at INFO), so that TRL's ``DPOConfig``, the models
            and the run folder's ``recipe.yaml`` see what runs.
        resume: continue the run in ``recipe.output_dir`` from its newest complete checkpoint; the recipe must
            match the run's on every key that changes the result.

    Raises:
        RunFolderError: the folder already holds a run (see ``overwrite``), or, with ``resume``, holds no run
            or no complete checkpoint.
        TrainingInterrupted: a signal stopped training; a checkpoint was saved and the message says how to resume.
        PreferenceDataError, ModelLoadError, DeviceNotAvailableError, RecipeError: bad input (clear message); a
            ``recipe`` that is no Recipe (a dict, a path: :func:`launch_training` takes those).
    """
    from dpo_xpu.callbacks.interrupts import StopOnSignal
    from dpo_xpu.callbacks.metrics import FirstStepCallback
    from dpo_xpu.device import select_device, use_bf16
    from dpo_xpu.distributed import (
        check_engine,
        global_batch_line,
        init_distributed,
        is_distributed,
        is_main_process,
        on_every_rank,
        on_rank_zero,
    )
    from dpo_xpu.models.base import resolve_model_path
    from dpo_xpu.outputs.plotting import CURVES_FILE, read_metrics

    if not isinstance(recipe, Recipe):
        raise RecipeError(
            f"run_training takes a Recipe, found {type(recipe).__name__}: build it with dpo_xpu.load_recipe(path) or "
            "dpo_xpu.make_recipe(dict), or call dpo_xpu.launch_training, which takes either"
        )
    if resume and overwrite:
        raise RunFolderError("resume and overwrite exclude each other: resume continues the run, overwrite replaces it")
    device = select_device(recipe.device)  # an absent device fails here, before anything is loaded or written
    recipe.bf16, why = use_bf16(recipe.bf16, device)  # auto -> a bool, once: TRL, the models, recipe.yaml see it
    logger.info(why)
    init_distributed(device)  # several processes (torchrun, accelerate launch): join their group (dpo_xpu.distributed)
    check_engine(recipe.quantization, recipe.trl_options)
    generation = trl_generation()  # once per run, passed down (with the reference plan, once the data is loaded)
    validate_recipe(recipe, use_cpu=device.type == "cpu", generation=generation)  # every TRL option, before writing
    on_every_rank(resolve_model_path, recipe.model_name_or_path)  # so does a missing model or hub id, on any node
    run_dir = Path(recipe.output_dir)
    try:
        # rank 0 alone locks and prepares the folder; every rank gets its decision, or its error
        opened = on_rank_zero(_open_run, recipe, run_dir, overwrite, resume, generation)
        if isinstance(opened, RunResult):
            return opened
        started, checkpoint = opened
        if is_main_process():
            logger.log(
                logging.WARNING if is_distributed() else logging.INFO,
                global_batch_line(recipe.per_device_train_batch_size, recipe.gradient_accumulation_steps),
            )
        first_step = FirstStepCallback()
        try:
            trainer, tokenizer = _build(recipe, run_dir, callbacks, live_plot, generation)
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


def _save_outputs(
    recipe: Recipe, trainer: Any, tokenizer: PreTrainedTokenizerBase, run_dir: Path
) -> tuple[Path, Path | None]:
    """Save the adapter and, with ``export: merged``, the merged model (rank 0 alone under several processes)."""
    try:
        adapter_dir = save_adapter(trainer, tokenizer, run_dir, recipe)
        if recipe.export != "merged":
            return adapter_dir, None
        return adapter_dir, export_merged(recipe, adapter_dir, run_dir, run_prompts(trainer, tokenizer))
    except Exception as exc:
        _raise_if_disk_full(run_dir, exc)
        raise


def _raise_if_disk_full(run_dir: Path, exc: BaseException) -> None:
    """Raise the one-line :class:`RunFolderError` for a full disk (what was kept, how to resume) in place of ``exc``."""
    from dpo_xpu.callbacks.checkpoints import newest_complete_step

    if isinstance(exc, Exception) and disk_full(exc):
        raise RunFolderError(disk_full_message(run_dir, exc, newest_complete_step(run_dir))) from None


def _build(
    recipe: Recipe, run_dir: Path, callbacks: list[TrainerCallback] | None, live_plot: bool | None, generation: str
) -> tuple[Any, PreTrainedTokenizerBase]:
    """The run's tokenizer, data, reference plan (once: from the rows and the world size), models and trainer,
    seeded as a fresh process would be."""
    from transformers import set_seed

    from dpo_xpu.distributed import is_main_process, on_every_rank, world_size
    from dpo_xpu.models.loading import load_tokenizer

    tokenizer = load_tokenizer(recipe.model_name_or_path)
    report = run_dir / "data_report.json" if is_main_process() else None  # rank 0 alone writes the run folder
    train_dataset, eval_dataset = on_every_rank(
        load_run_data, recipe, tokenizer, report_path=report
    )  # a node without the data stops all
    plan = reference_plan(recipe, generation, rows=len(train_dataset), world_size=world_size())
    set_seed(recipe.seed)  # LoRA's random init draws from the global RNG: same seed, same run, in any process
    policy, reference = load_run_models(recipe, plan)
    trainer = make_dpo_trainer(
        recipe, policy, reference, tokenizer, train_dataset, eval_dataset, callbacks, live_plot=live_plot, plan=plan
    )
    return trainer, tokenizer
