"""The model card of a run: ``<run>/README.md`` and ``<run>/adapter/README.md`` name the base model, the data, the
recipe and the final metrics.

TRL writes a card at every checkpoint save, but names the base model only when it is a hub id: for a local folder
it writes "a fine-tuned version of [None](https://huggingface.co/None)". PEFT's adapter card is an empty template.
dpo_xpu writes one card, with the Hub's metadata block (``base_model``, ``library_name: peft``, ``datasets``,
``tags``), in place of both when the adapter is saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Metrics of the last logged step quoted in the card, with their labels.
CARD_METRICS = (
    ("loss", "loss"),
    ("rewards/accuracies", "reward accuracy"),
    ("rewards/margins", "reward margin"),
    ("rewards/chosen", "chosen reward"),
    ("rewards/rejected", "rejected reward"),
)
#: Recipe keys listed in the card's training section.
CARD_KEYS = (
    "backend",
    "quantization",
    "reference",
    "loss_type",
    "beta",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "max_prompt_length",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
    "bf16",
    "seed",
)


def model_card(recipe: Any, metrics: list[dict[str, Any]]) -> str:
    """The card's Markdown text for a run.

    Args:
        recipe: the run's :class:`~dpo_xpu.recipes.Recipe`.
        metrics: the rows of its ``metrics.jsonl`` (the last training row is quoted).

    Returns:
        The card, starting with the Hub's YAML metadata block.
    """
    base = recipe.model_name_or_path
    sources = list(recipe.dataset_mixture) if recipe.dataset_mixture else [recipe.dataset_name_or_path]
    last = next((row for row in reversed(metrics) if "loss" in row), {})
    front = ["---", f"base_model: {base}", "library_name: peft", "pipeline_tag: text-generation", "datasets:"]
    front += [f"- {source}" for source in sources]
    front += ["tags:", "- dpo", "- lora", "- trl", "- dpo_xpu", "---", ""]
    body = [
        f"# DPO LoRA adapter for {Path(base).name}",
        "",
        f"A LoRA adapter (rank {recipe.lora_r}) trained with Direct Preference Optimization (Rafailov et al. 2023) "
        f"by dpo_xpu on top of the base model `{base}`, on the preference pairs of "
        + ", ".join(f"`{s}`" for s in sources)
        + ".",
        "",
        "## Use",
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "",
        'model = AutoPeftModelForCausalLM.from_pretrained("<this folder>")  # loads the base, then the adapter',
        "```",
        "",
        "or `dpo_xpu.load_trained_policy(base, adapter_dir)`, which loads the base as it was trained (NF4).",
        "",
        "## Training",
        "",
        "| key | value |",
        "|---|---|",
        *(f"| `{key}` | `{getattr(recipe, key)}` |" for key in CARD_KEYS),
        "",
    ]
    if last:
        body += [f"## Last logged step ({last.get('step')})", "", "| metric | value |", "|---|---|"]
        body += [f"| {label} | {last[key]:.4f} |" for key, label in CARD_METRICS if isinstance(last.get(key), float)]
        body.append("")
    return "\n".join(front + body)


def write_model_cards(recipe: Any, run_dir: str | Path, adapter_dir: str | Path) -> list[Path]:
    """Write :func:`model_card` to ``<run_dir>/README.md`` and ``<adapter_dir>/README.md``; return both paths."""
    from dpo_xpu.outputs.plotting import METRICS_FILE, read_metrics

    metrics_path = Path(run_dir) / METRICS_FILE
    text = model_card(recipe, read_metrics(metrics_path) if metrics_path.is_file() else [])
    paths = [Path(run_dir) / "README.md", Path(adapter_dir) / "README.md"]
    for path in paths:
        path.write_text(text, encoding="utf-8")
    return paths
