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

from dpo_xpu.noise import install as _filter_known_noise

__version__ = "0.1.0"
_filter_known_noise()  # known-harmless messages of the stack, by their exact text (dpo_xpu.noise)

_EXPORTS = {
    # environment
    "check_environment": "environment",
    "select_device": "environment",
    "EnvironmentReport": "environment",
    # data
    "load_orca_dpo_pairs": "data",
    "chatml_format": "data",
    "format_orca_dataset": "data",
    "train_eval_split": "data",
    "DEMO_SAMPLE_PATH": "data",
    "load_preference_pairs": "sources",
    "mix_sources": "sources",
    "drop_long_pairs": "length_filter",
    # checkpoints and resume
    "find_resume_checkpoint": "checkpoints",
    "EvalSamplesCallback": "callbacks",
    # models
    "load_tokenizer": "models",
    "load_policy_model": "models",
    "load_reference_model": "models",
    "LoraSettings": "models",
    "load_trained_policy": "models",
    "load_sft_state_dict": "models",
    # recipes and training
    "Recipe": "recipes",
    "load_recipe": "recipes",
    "make_dpo_trainer": "training",
    "run_training": "training",
    "prepare_run_dir": "run_folder",
    "start_run": "training",
    "load_run_data": "training",
    "load_run_models": "training",
    "save_adapter": "training",
    "export_merged": "training",
    "sigmoid_loss": "losses",
    "dpo_norm_loss": "losses",
    "simpo_loss": "losses",
    "make_recipe": "recipes",
    # callbacks and plots
    "MetricsLoggerCallback": "callbacks",
    "LiveRewardPlotCallback": "callbacks",
    "read_metrics": "plotting",
    "plot_reward_curves": "plotting",
    "describe_step0": "step0",
    "Step0Check": "step0",
    # data inspection
    "token_lengths": "lengths",
    "length_summary": "lengths",
    "plot_token_lengths": "lengths",
    # evaluation and export
    "sequence_log_probs": "evaluation",
    "evaluate_preferences": "evaluation",
    "generate_samples": "evaluation",
    "load_run_recipe": "evaluation",
    "write_evaluation": "evaluation",
    "merge_and_save": "export",
    "check_merged_logits": "export",
    # demo assets
    "build_demo_model": "demo",
    "apply_preset": "presets",
    "gguf_to_folder": "gguf_import",
    # performance: cached reference log-probs, memory planner
    "attach_precomputed_reference": "reference_cache",
    "estimate_memory": "memory",
    "recipe_fits": "memory",
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
