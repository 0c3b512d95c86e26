"""Recipes the tests share: small CPU runs on stories260K (or the demo model) that finish in seconds per step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from dpo_xpu.recipes import Recipe

ROOT = Path(__file__).resolve().parents[1]
#: Qwen2.5-0.5B's published config (the benchmark's default model size): the dimensions the memory planner reads.
QWEN05 = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
}


def config_kwargs(recipe: Recipe, generation: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """``dpo_config_kwargs`` with the recipe's reference plan for ``generation`` (default: the installed TRL's), as
    the trainer factory computes it."""
    from dpo_xpu.train.reference import reference_plan
    from dpo_xpu.train.trl_config import dpo_config_kwargs, trl_generation

    return dpo_config_kwargs(recipe, reference_plan(recipe, generation or trl_generation()), **kwargs)


def cpu_recipe(model: str | Path, data: str | Path, output_dir: str | Path, **overrides: Any) -> Recipe:
    """A recipe for a short CPU run: NF4 + LoRA, adapter-off, float32 compute (the tests' numbers; bf16 is emulated,
    about 6x slower, on CPUs without AVX512-BF16 or AMX), no checkpoints. Lengths suit stories260K on orca rows
    (~475-670 tokens with its 512-piece vocabulary); pass ``max_length=512, max_prompt_length=256`` for the demo
    model."""
    values: dict[str, Any] = dict(
        model_name_or_path=str(model),
        dataset_name_or_path=str(data),
        output_dir=str(output_dir),
        device="cpu",
        quantization="nf4",
        reference="adapter-off",
        learning_rate=5e-4,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        max_steps=20,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_length=1024,
        max_prompt_length=512,
        gradient_checkpointing=False,
        bf16=False,
        logging_steps=1,
        save_steps=1000,
        seed=42,
    )
    values.update(overrides)
    return Recipe(**values)


def set_args(**values: Any) -> list[str]:
    """``--set key=value`` arguments for ``dpo-xpu train``, one pair per keyword."""
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run ``dpo-xpu`` with this interpreter (hub offline, no progress bars) and capture its output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dpo_xpu.cli", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600
    )


def run_notebooks(params: dict[str, Any], *options: str, timeout: int) -> subprocess.CompletedProcess:
    """``scripts/run_notebooks.py`` with ``options`` and each of ``params`` as ``--param=key=<JSON>`` (JSON reads as
    YAML; paths as strings), from the project root; stdout and stderr captured."""
    import json

    command = [sys.executable, "scripts/run_notebooks.py", *options]
    values = {key: str(v) if isinstance(v, Path) else v for key, v in params.items()}
    command += [f"--param={key}={json.dumps(v)}" for key, v in values.items()]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def short_recipe(model: Path, rows: Path, out: Path, **overrides: Any) -> Recipe:
    """A 3-step run on 6 rows (batch 2, max_length 320, lr 1e-2, constant) for comparing strategies step by step."""
    values: dict[str, Any] = dict(
        limit=6,
        max_steps=3,
        max_length=320,
        max_prompt_length=192,
        learning_rate=1e-2,
        warmup_steps=0,
        lr_scheduler_type="constant",
        save_steps=10000,
    )
    values.update(overrides)
    return cpu_recipe(model, rows, out, **values)


def make_trainer(recipe: Recipe, tokenizer: Any = None) -> Any:
    """The run's tokenizer, data, models and TRL trainer, as ``run_training`` builds them (seeded)."""
    import torch

    from dpo_xpu.models.loading import load_tokenizer
    from dpo_xpu.pipeline import load_run_data, load_run_models, make_dpo_trainer

    tokenizer = tokenizer or load_tokenizer(recipe.model_name_or_path)
    train, _ = load_run_data(recipe, tokenizer)
    torch.manual_seed(recipe.seed)
    policy, reference = load_run_models(recipe)
    return make_dpo_trainer(recipe, policy, reference, tokenizer, train, live_plot=False)
