"""Training: one recipe -> a TRL ``DPOTrainer`` for the installed TRL, and a whole run end to end.

TRL computes the DPO loss (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7)::

    L = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

and runs the loop; this module only maps recipe values onto ``DPOConfig`` for TRL 0.11 (ipex-llm) and
TRL 1.x (native), and refuses a value the installed TRL cannot honour instead of dropping it.
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from packaging.version import Version

from dpo_xpu.errors import RecipeError, RunFolderError
from dpo_xpu.recipes import Recipe

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

logger = logging.getLogger(__name__)

#: Loss types each TRL generation computes itself (``DPOConfig.loss_type``).
TRL_LOSS_TYPES = {
    "0.11": (
        "sigmoid",
        "hinge",
        "ipo",
        "exo_pair",
        "nca_pair",
        "robust",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_pair",
        "apo_zero",
        "apo_down",
    ),
    "1.x": (
        "sigmoid",
        "hinge",
        "ipo",
        "exo_pair",
        "nca_pair",
        "robust",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
        "discopop",
        "sft",
        "sigmoid_norm",
    ),
}

#: Files a finished or running run leaves in its folder; any of them present means "a run is here".
RUN_MARKERS = ("recipe.yaml", "metrics.jsonl", "environment.json", "reward_curves.png", "adapter")
ADAPTER_DIR = "adapter"


def trl_generation() -> str:
    """``"1.x"`` for TRL >= 0.12's API (``processing_class=``, no ``max_prompt_length``), else ``"0.11"``."""
    import trl

    return "1.x" if Version(trl.__version__) >= Version("0.12") else "0.11"


def truncate_prompts(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_prompt_length: int) -> Dataset:
    """Cut each ``prompt`` to its last ``max_prompt_length`` tokens, as TRL 0.11's ``keep_end`` did.

    TRL 1.x dropped ``max_prompt_length``; this keeps the original recipe's behaviour there. The cut is
    made on a token boundary of the prompt text (via the fast tokenizer's offsets), so no token is split.

    Args:
        dataset: rows with a ``prompt`` string column.
        tokenizer: the run's tokenizer (a fast one, for offsets).
        max_prompt_length: tokens to keep, counted without special tokens added by the tokenizer.

    Returns:
        The dataset with long prompts shortened (others unchanged).
    """

    def cut(example: dict[str, Any]) -> dict[str, Any]:
        enc = tokenizer(example["prompt"], add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if len(offsets) <= max_prompt_length:
            return {"prompt": example["prompt"]}
        start = offsets[len(offsets) - max_prompt_length][0]
        return {"prompt": example["prompt"][start:]}

    before = dataset["prompt"]
    dataset = dataset.map(cut, desc="Truncating prompts (keep end)")
    cut_count = sum(a != b for a, b in zip(before, dataset["prompt"]))
    if cut_count:
        logger.info(
            "%d of %d prompts were longer than %d tokens and kept their end",
            cut_count,
            len(before),
            max_prompt_length,
        )
    return dataset


def dpo_config_kwargs(recipe: Recipe, generation: str | None = None, use_cpu: bool = False) -> dict[str, Any]:
    """Map a recipe onto ``trl.DPOConfig`` keyword arguments for a TRL generation.

    Args:
        recipe: the run's recipe.
        generation: ``"0.11"`` or ``"1.x"``; default the installed TRL's.
        use_cpu: train on the CPU even where an accelerator is visible.

    Raises:
        RecipeError: a recipe value the TRL generation cannot honour (for example a ``loss_type`` only TRL
            1.x has, asked of TRL 0.11); the message names the field and the TRL version.
    """
    generation = generation or trl_generation()
    if recipe.loss_type not in TRL_LOSS_TYPES[generation]:
        import trl

        raise RecipeError(
            f"loss_type: {recipe.loss_type!r} is not computed by the installed TRL {trl.__version__} "
            f"(TRL {generation}); it offers {', '.join(TRL_LOSS_TYPES[generation])}. Choose one of those, or use "
            "the environment whose TRL has it"
        )
    kwargs: dict[str, Any] = {
        "output_dir": recipe.output_dir,
        "beta": recipe.beta,
        "loss_type": recipe.loss_type if generation == "0.11" else [recipe.loss_type],
        "learning_rate": recipe.learning_rate,
        "lr_scheduler_type": recipe.lr_scheduler_type,
        "warmup_steps": recipe.warmup_steps,
        "max_steps": recipe.max_steps,
        "num_train_epochs": recipe.num_train_epochs,
        "per_device_train_batch_size": recipe.per_device_train_batch_size,
        "gradient_accumulation_steps": recipe.gradient_accumulation_steps,
        "max_length": recipe.max_length,
        "logging_steps": recipe.logging_steps,
        "save_strategy": "steps",
        "save_steps": recipe.save_steps,
        "seed": recipe.seed,
        "bf16": recipe.bf16,
        "gradient_checkpointing": recipe.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "optim": "adamw_torch",  # paged AdamW is not supported on XPU
        "precompute_ref_log_probs": recipe.reference == "precomputed",
        "report_to": [],
        "remove_unused_columns": False,
        "use_cpu": use_cpu,
    }
    if generation == "0.11":
        kwargs["max_prompt_length"] = recipe.max_prompt_length
    return kwargs


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
    (:class:`~dpo_xpu.callbacks.MetricsLoggerCallback`, :class:`~dpo_xpu.callbacks.LiveRewardPlotCallback`).

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
        A ready ``trl.DPOTrainer``; call ``.train()``.

    Raises:
        RecipeError: a recipe value the installed TRL cannot honour, or ``separate`` without a ``ref_model``.
    """
    import torch
    from trl import DPOConfig, DPOTrainer

    from dpo_xpu.callbacks import LiveRewardPlotCallback, MetricsLoggerCallback

    if recipe.reference == "separate" and ref_model is None:
        raise RecipeError("reference: 'separate' needs a reference model (load_reference_model)")
    if recipe.reference != "separate" and ref_model is not None:
        raise RecipeError(f"reference: {recipe.reference!r} uses no separate model; pass ref_model=None")
    generation = trl_generation()
    device = next(model.parameters()).device
    config = DPOConfig(**dpo_config_kwargs(recipe, generation, use_cpu=device.type == "cpu"))
    if generation == "1.x" and recipe.max_prompt_length is not None:
        train_dataset = truncate_prompts(train_dataset, tokenizer, recipe.max_prompt_length)
        if eval_dataset is not None:
            eval_dataset = truncate_prompts(eval_dataset, tokenizer, recipe.max_prompt_length)
    all_callbacks = [
        MetricsLoggerCallback(recipe.output_dir),
        LiveRewardPlotCallback(recipe.output_dir, display=live_plot),
        *(callbacks or []),
    ]
    tokenizer_kw = "processing_class" if "processing_class" in inspect.signature(DPOTrainer).parameters else "tokenizer"
    torch.manual_seed(recipe.seed)
    return DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        callbacks=all_callbacks,
        **{tokenizer_kw: tokenizer},
    )


def prepare_run_dir(output_dir: str | Path, overwrite: bool = False) -> Path:
    """Create the run folder, refusing to reuse one that already holds a run.

    Args:
        output_dir: the run folder.
        overwrite: remove the earlier run's files (only those this package writes) and start again.

    Raises:
        RunFolderError: the folder holds a run and ``overwrite`` is false.
    """
    run_dir = Path(output_dir)
    present = [name for name in RUN_MARKERS if (run_dir / name).exists()]
    if present and not overwrite:
        raise RunFolderError(
            f"{run_dir} already holds a run ({', '.join(present)}): choose another output_dir, or pass "
            "--overwrite (overwrite=True) to replace it"
        )
    for name in present:
        target = run_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    for stale in run_dir.glob("checkpoint-*") if overwrite else []:
        shutil.rmtree(stale)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


@dataclass
class RunResult:
    """What :func:`run_training` leaves: the folder, the logged rows and the trainer (for evaluation)."""

    run_dir: Path
    metrics: list[dict[str, Any]]
    adapter_dir: Path
    curves_png: Path
    trainer: Any


def load_run_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> tuple[Dataset, Dataset | None]:
    """Load, validate and ChatML-format the recipe's data; split off ``eval_fraction`` when > 0."""
    from dpo_xpu.data import format_orca_dataset, load_orca_dpo_pairs, train_eval_split

    rows = load_orca_dpo_pairs(recipe.dataset_name_or_path, limit=recipe.limit, seed=recipe.seed)
    formatted = format_orca_dataset(rows, tokenizer)
    if recipe.eval_fraction > 0:
        return train_eval_split(formatted, eval_fraction=recipe.eval_fraction, seed=recipe.seed)
    return formatted, None


def load_run_models(recipe: Recipe) -> tuple[PreTrainedModel, PreTrainedModel | None]:
    """Load the policy (with LoRA) and, for the ``separate`` strategy, the frozen reference."""
    import torch

    from dpo_xpu.environment import select_device
    from dpo_xpu.models import LoraSettings, load_policy_model, load_reference_model

    device = select_device(recipe.device)
    # bf16 compute on accelerators; float32 when bf16 is off (on CPUs without AMX, bf16 is emulated and
    # about 6x slower: 9.5 vs 1.6 s per step for stories260K, measured on the 2-core CI machine).
    dtype = torch.bfloat16 if recipe.bf16 else torch.float32
    lora = LoraSettings(recipe.lora_r, recipe.lora_alpha, recipe.lora_dropout, recipe.lora_target_modules)
    policy = load_policy_model(
        recipe.model_name_or_path,
        recipe.quantization,
        device,
        dtype=dtype,
        lora=lora,
        backend=recipe.backend,
        gradient_checkpointing=recipe.gradient_checkpointing,
    )
    reference = None
    if recipe.reference == "separate":
        reference = load_reference_model(
            recipe.model_name_or_path, recipe.quantization, device, dtype=dtype, backend=recipe.backend
        )
    return policy, reference


def save_adapter(trainer: Any, tokenizer: PreTrainedTokenizerBase, run_dir: str | Path) -> Path:
    """Save the LoRA adapter (``adapter_model.safetensors``, ``adapter_config.json``) and the tokenizer
    to ``<run_dir>/adapter`` and return that folder."""
    adapter_dir = Path(run_dir) / ADAPTER_DIR
    # Only the trained adapter: TRL may hold a frozen "ref" copy of it, which users do not need.
    trainer.model.save_pretrained(adapter_dir, selected_adapters=["default"])
    tokenizer.save_pretrained(adapter_dir)
    return adapter_dir


def run_training(
    recipe: Recipe,
    overwrite: bool = False,
    callbacks: list[TrainerCallback] | None = None,
    live_plot: bool | None = None,
) -> RunResult:
    """Run DPO end to end and write the run folder.

    The folder ``recipe.output_dir`` gets ``recipe.yaml`` (resolved), ``environment.json``,
    ``metrics.jsonl``, ``reward_curves.png`` and ``adapter/`` (LoRA adapter + tokenizer).

    Raises:
        RunFolderError: the folder already holds a run (see ``overwrite``).
        PreferenceDataError, ModelLoadError, DeviceNotAvailableError, RecipeError: bad input (clear message).
    """
    from dpo_xpu.environment import check_environment
    from dpo_xpu.models import load_tokenizer
    from dpo_xpu.plotting import CURVES_FILE, plot_reward_curves, read_metrics

    run_dir = prepare_run_dir(recipe.output_dir, overwrite=overwrite)
    recipe.save(run_dir / "recipe.yaml")
    report = check_environment(backend=recipe.backend)
    (run_dir / "environment.json").write_text(json.dumps(report.to_dict(), indent=2, default=str))
    tokenizer = load_tokenizer(recipe.model_name_or_path)
    train_dataset, eval_dataset = load_run_data(recipe, tokenizer)
    policy, reference = load_run_models(recipe)
    trainer = make_dpo_trainer(
        recipe,
        policy,
        reference,
        tokenizer,
        train_dataset,
        eval_dataset,
        callbacks=callbacks,
        live_plot=live_plot,
    )
    trainer.train()
    adapter_dir = save_adapter(trainer, tokenizer, run_dir)
    metrics = read_metrics(run_dir)
    plot_reward_curves(metrics, out_path=run_dir / CURVES_FILE)
    return RunResult(run_dir, metrics, adapter_dir, run_dir / CURVES_FILE, trainer)
