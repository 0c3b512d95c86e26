"""dpo_xpu: Direct Preference Optimization of chat models with NF4 + LoRA on Intel GPUs.

The public API is re-exported here and imported lazily, so ``import dpo_xpu`` (and ``dpo-xpu --help``)
stays fast: torch, transformers and TRL load on first use of a function that needs them.

    >>> import dpo_xpu
    >>> report = dpo_xpu.check_environment()
    >>> device = dpo_xpu.select_device("auto")   # xpu, then cuda, then cpu
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from dpo_xpu.log_filters import install as _filter_known_noise

__version__ = "0.1.0"
_filter_known_noise()  # known-harmless messages of the stack, by their exact text (dpo_xpu.log_filters)

_EXPORTS = {
    # environment
    "check_environment": "environment",
    "select_device": "device",
    "EnvironmentReport": "environment",
    # data
    "load_orca_dpo_pairs": "data.preferences",
    "chatml_format": "data.preferences",
    "format_orca_dataset": "data.preferences",
    "train_eval_split": "data.preferences",
    "DEMO_SAMPLE_PATH": "data.preferences",
    "load_preference_pairs": "data.sources",
    "mix_sources": "data.sources",
    "drop_long_pairs": "data.lengths",
    # checkpoints and resume
    "find_resume_checkpoint": "callbacks.checkpoints",
    "EvalSamplesCallback": "callbacks.metrics",
    # models
    "load_tokenizer": "models.loading",
    "load_policy_model": "models.loading",
    "load_reference_model": "models.loading",
    "LoraSettings": "models.base",
    "load_trained_policy": "models.loading",
    "load_sft_state_dict": "models.loading",
    # recipes and training
    "Recipe": "recipes",
    "load_recipe": "recipes",
    "make_dpo_trainer": "pipeline",
    "run_training": "pipeline",
    "launch_training": "launch",
    "prepare_run_dir": "outputs.run_folder",
    "start_run": "pipeline",
    "open_run": "pipeline",
    "prepare_resume_of": "pipeline",
    "load_run_data": "train.factory",
    "load_run_models": "train.factory",
    "save_adapter": "outputs.adapter",
    "export_merged": "outputs.merge",
    "sigmoid_loss": "train.losses",
    "dpo_norm_loss": "train.losses",
    "simpo_loss": "train.losses",
    "make_recipe": "recipes",
    # callbacks and plots
    "MetricsLoggerCallback": "callbacks.metrics",
    "LiveRewardPlotCallback": "callbacks.metrics",
    "read_metrics": "outputs.plotting",
    "plot_reward_curves": "outputs.plotting",
    "describe_step0": "train.step0",
    "Step0Check": "train.step0",
    # data inspection
    "token_lengths": "data.lengths",
    "length_summary": "data.lengths",
    "plot_token_lengths": "data.lengths",
    # evaluation and export
    "sequence_log_probs": "eval.heldout",
    "evaluate_preferences": "eval.heldout",
    "generate_samples": "eval.heldout",
    "load_run_recipe": "eval.heldout",
    "write_evaluation": "eval.heldout",
    "merge_and_save": "outputs.merge",
    "check_merged_logits": "outputs.merge",
    "merge_checked": "outputs.merge",
    "evaluate_run": "finished_run",
    "export_run": "finished_run",
    # demo assets
    "build_demo_model": "demo",
    "notebook_recipe": "demo",
    "gguf_to_folder": "models.gguf",
    # performance: cached reference log-probs, memory planner
    "attach_precomputed_reference": "train.reference_cache",
    "estimate_memory": "train.memory",
    "recipe_fits": "train.memory",
    # errors
    "DpoXpuError": "errors",
    "PreferenceDataError": "errors",
    "DeviceNotAvailableError": "errors",
    "RecipeError": "errors",
    "ModelLoadError": "errors",
    "RunFolderError": "errors",
    "TrainingInterrupted": "errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dpo_xpu' has no attribute {name!r}")
    value = getattr(import_module(f"dpo_xpu.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
