"""Recipes the tests share: small CPU runs on stories260K (or the demo model) that finish in seconds per step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpo_xpu.recipes import Recipe


def cpu_recipe(model: str | Path, data: str | Path, output_dir: str | Path, **overrides: Any) -> Recipe:
    """A recipe for a short CPU run: NF4 + LoRA, adapter-off, float32 compute (bf16 is emulated on this CPU and
    about 6x slower), no checkpoints. Lengths suit stories260K on orca rows (~475-670 tokens with its 512-piece
    vocabulary); pass ``max_length=512, max_prompt_length=256`` for the demo model."""
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
