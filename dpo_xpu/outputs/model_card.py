"""The model card of a run (``<run>/README.md``, ``<run>/adapter/README.md``): base model, data, recipe, metrics.

TRL's card names a local base "[None](https://huggingface.co/None)" and PEFT's is an empty template, so dpo_xpu writes
one, with the Hub's metadata block, in place of both; a GGUF base is named as the file names it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_xpu.files import atomic_write_bytes

if TYPE_CHECKING:
    from dpo_xpu.recipes import Recipe

#: Metrics of the last logged step quoted in the card, with their labels.
CARD_METRICS = (
    ("loss", "loss"),
    ("rewards/accuracies", "reward accuracy"),
    ("rewards/margins", "reward margin"),
    ("rewards/chosen", "chosen reward"),
    ("rewards/rejected", "rejected reward"),
)
#: GGUF metadata keys (``general.<key>``) quoted in the card, in this order, where the file has them.
GGUF_KEYS = ("name", "organization", "basename", "finetune", "size_label", "license", "source.url")
_USE_SECTION = """## Use

```python
from peft import AutoPeftModelForCausalLM

model = AutoPeftModelForCausalLM.from_pretrained("<this folder>")  # loads the base, then the adapter
```

or `dpo_xpu.load_trained_policy(base, adapter_dir)`, which loads the base as it was trained (NF4).
"""
#: Recipe keys listed in the card's training section.
CARD_KEYS = tuple(
    "backend quantization reference loss_type beta learning_rate lr_scheduler_type warmup_steps max_steps "
    "per_device_train_batch_size gradient_accumulation_steps max_length max_prompt_length lora_r lora_alpha "
    "lora_target_modules bf16 seed".split()
)


def model_card(values: Mapping[str, Any], metrics: list[dict[str, Any]], decisions: Sequence[str] | None = None) -> str:
    """The card's Markdown for a run's recipe values (``Recipe.to_dict()``) and ``metrics.jsonl`` rows (the last
    training row is quoted)."""
    from dpo_xpu.models.gguf import model_origin

    base = str(values["model_name_or_path"])
    origin = model_origin(base)
    name = origin["name"] if origin else base
    sources = list(values.get("dataset_mixture") or [values["dataset_name_or_path"]])
    last = next((row for row in reversed(metrics) if "loss" in row), {})
    hub_id = not origin or name == origin.get("metadata", {}).get("source.huggingface.repository")
    front = ["---", *([f"base_model: {name}"] if hub_id else []), "library_name: peft", "pipeline_tag: text-generation"]
    front += ["datasets:", *(f"- {source}" for source in sources)]
    front += ["tags:", "- dpo", "- lora", "- trl", "- dpo_xpu", "---", ""]
    body = [
        f"# DPO LoRA adapter for {Path(name).name}",
        "",
        f"A LoRA adapter (rank {values['lora_r']}) trained with Direct Preference Optimization (Rafailov et al. 2023) "
        f"by dpo_xpu on top of the base model `{name}`, on the preference pairs of "
        + ", ".join(f"`{s}`" for s in sources)
        + ".",
        "",
        *(_gguf_section(origin) if origin else _USE_SECTION.split("\n")),
        "## Training",
        "",
        "| key | value |",
        "|---|---|",
        *(f"| `{key}` | `{values[key]}` |" for key in CARD_KEYS),
        "",
    ]
    if decisions:  # what the recipe's `auto` values resolved to in this run, as the log said
        body += ["What the run chose:", "", *(f"- {line}" for line in decisions), ""]
    if last:
        body += [f"## Last logged step ({last.get('step')})", "", "| metric | value |", "|---|---|"]
        body += [f"| {label} | {last[key]:.4f} |" for key, label in CARD_METRICS if isinstance(last.get(key), float)]
        body.append("")
    return "\n".join(front + body)


def _gguf_section(origin: dict[str, Any]) -> list[str]:
    metadata = origin.get("metadata") or {}
    said = [f"| `general.{key}` | {metadata[key]} |" for key in GGUF_KEYS if metadata.get(key) not in (None, "")]
    lines = [
        "## Base model",
        "",
        f"The base model was given as the GGUF file (llama.cpp's format) `{origin['gguf']}`, which dpo_xpu converted "
        "(dequantized) into a Hugging Face folder to train on; its name above is the one the file states. The "
        "adapter's `base_model_name_or_path` holds that name too, which may not name a model on the Hub.",
        "",
    ]
    if said:
        lines += ["| GGUF metadata | value |", "|---|---|", *said, ""]
    return lines + [
        "## Use",
        "",
        f'`dpo_xpu.load_trained_policy("{origin["gguf"]}", adapter_dir)` loads the base as it was trained (NF4), '
        "converting the file again where its conversion is no longer cached.",
        "",
    ]


def write_model_cards(
    recipe: Recipe, run_dir: str | Path, adapter_dir: str | Path, decisions: Sequence[str] | None = None
) -> list[Path]:
    """Write :func:`model_card` (``decisions``: what ``auto`` chose) to ``<run_dir>/README.md`` and
    ``<adapter_dir>/README.md``; return both paths."""
    from dpo_xpu.outputs.plotting import METRICS_FILE, read_metrics

    metrics_path = Path(run_dir) / METRICS_FILE
    text = model_card(recipe.to_dict(), read_metrics(metrics_path) if metrics_path.is_file() else [], decisions)
    paths = [Path(run_dir) / "README.md", Path(adapter_dir) / "README.md"]
    for path in paths:
        atomic_write_bytes(path, text.encode("utf-8"))
    return paths
