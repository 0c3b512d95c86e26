"""The trained LoRA adapter of a run: ``<run>/adapter`` with the tokenizer and the model card."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_xpu.files import apply_umask
from dpo_xpu.outputs.model_card import write_model_cards

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from dpo_xpu.recipes import Recipe

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
#: The files of an adapter that a checkpoint holds too.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def save_adapter(
    trainer: Any, tokenizer: PreTrainedTokenizerBase, run_dir: str | Path, recipe: Recipe | None = None
) -> Path:
    """Save the LoRA adapter, the tokenizer and the model card (also ``<run_dir>/README.md``; ``recipe`` default the
    run folder's ``recipe.yaml``, no card without one) to ``<run_dir>/adapter``; return it."""
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


def finished_adapter(recipe: Recipe, run_dir: Path, checkpoint: Path) -> Path | None:
    """For ``resume`` of a run whose checkpoint is its last step: its ``adapter/`` (saved again from the checkpoint
    if missing), saying nothing is left to train; ``None`` when steps are left."""
    from dpo_xpu.models.loading import load_tokenizer
    from dpo_xpu.outputs.merge import MERGED_DIR

    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    step, max_steps = state.get("global_step", 0), state.get("max_steps", 0)
    if not (max_steps > 0 and step >= max_steps):
        return None
    adapter_dir = run_dir / ADAPTER_DIR
    if not (adapter_dir / "adapter_config.json").is_file():
        adapter_dir.mkdir(exist_ok=True)
        for name in ADAPTER_FILES:
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, adapter_dir / name)
        load_tokenizer(recipe.model_name_or_path).save_pretrained(adapter_dir)
        write_model_cards(recipe, run_dir, adapter_dir)
        logger.warning("the run's adapter was missing: saved it again from %s to %s", checkpoint.name, adapter_dir)
    hint = f"to evaluate it: dpo-xpu evaluate {run_dir}; a merged model: dpo-xpu export {run_dir} --merged"
    if recipe.export == "merged" and not (run_dir / MERGED_DIR).is_dir():
        hint = f"export: merged is not applied to a finished run: run dpo-xpu export {run_dir} --merged"
    logger.warning("%s is complete (step %d of %d): nothing to train; %s", run_dir, step, max_steps, hint)
    return adapter_dir
