"""Export: the LoRA adapter merged into an unquantized copy of the base, checked; loads without PEFT or bitsandbytes."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dpo_xpu.files import apply_umask, write_json
from dpo_xpu.models.base import dtype_kwarg
from dpo_xpu.outputs.run_folder import MERGE_CHECK_FILE

if TYPE_CHECKING:
    from dpo_xpu.recipes import Recipe

logger = logging.getLogger(__name__)
MERGED_DIR = "merged"
#: The merged logits' largest distance from the adapter model's, as a share of the adapter's own effect on them. A
#: share of the largest logit would hide a lost update: on SmolLM2-135M-Instruct a bf16 merge moved the logits by
#: 0.42 (1% of the largest logit), 60% of the adapter's effect.
MERGE_RTOL = 0.1
GREEDY_TOKENS = 16


def _adapter_source(adapter: Any, scratch: Path) -> Path:
    if isinstance(adapter, (str, Path)):
        return Path(adapter)
    adapter.save_pretrained(scratch, selected_adapters=["default"])  # a PeftModel in memory
    return scratch


def _base_with_adapter(adapter_dir: Path, base: str | Path | None, dtype: torch.dtype, device: str) -> Any:
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base = base or PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    model = AutoModelForCausalLM.from_pretrained(str(base), **dtype_kwarg(dtype), device_map={"": device})
    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()


def merge_and_save(
    adapter: str | Path | Any,
    base_model_name_or_path: str | Path | None = None,
    out_dir: str | Path = "merged",
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
) -> Path:
    """Merge a LoRA adapter (folder or ``PeftModel``) into the base (default the adapter config's) loaded in
    ``dtype``, not NF4, which would round the update away; save it with the tokenizer to ``out_dir``, returned."""
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        adapter_dir = _adapter_source(adapter, Path(scratch))
        model = _base_with_adapter(adapter_dir, base_model_name_or_path, dtype, device)
        base = model.peft_config["default"].base_model_name_or_path
        model.merge_and_unload().save_pretrained(out_dir)
        has_tokenizer = any((adapter_dir / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))
        tokenizer_source = adapter_dir if has_tokenizer else base_model_name_or_path or base
        AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(out_dir)
    apply_umask(out_dir)  # safetensors writes mode 600 whatever the umask
    logger.info("merged model (%s) saved to %s", dtype, out_dir)
    return out_dir


def _greedy(model: Any, tokenizer: Any, texts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
    """The ids ``model`` generates greedily after each text (one at a time: no padding to differ)."""
    out, settings = [], {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)
        out.append(generated[0, ids.shape[1] :].tolist())
    return out


@torch.no_grad()
def check_merged_logits(
    merged_dir: str | Path,
    adapter_dir: str | Path,
    texts: Sequence[str],
    base_model_name_or_path: str | Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    compute_dtype: torch.dtype = torch.float32,
    greedy_tokens: int = GREEDY_TOKENS,
) -> dict[str, Any]:
    """Compare the reloaded merged model with the adapter on the base loaded in ``dtype``, both computing in
    ``compute_dtype``, so only the merged weights' rounding remains: ``max_abs_diff`` of the logits, against
    ``adapter_effect`` (adapter model vs base; ``effect_ratio``), ``greedy_same`` of ``greedy_texts`` continuations
    (``greedy_tokens`` each; ``greedy_first_difference``), ``max_abs_logit``, ``compute_dtype``, ``weights_dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(list(texts), add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt")
    mask = batch["attention_mask"].bool()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), **dtype_kwarg(compute_dtype)).eval()
    merged_logits = merged(**batch).logits[mask]
    merged_text = _greedy(merged, tokenizer, texts, greedy_tokens) if greedy_tokens > 0 else []
    del merged
    adapted = _base_with_adapter(Path(adapter_dir), base_model_name_or_path, dtype, "cpu").to(compute_dtype)
    adapter_logits = adapted(**batch).logits[mask]
    adapter_text = _greedy(adapted, tokenizer, texts, greedy_tokens) if greedy_tokens > 0 else []
    with adapted.disable_adapter():
        base_logits = adapted(**batch).logits[mask]
    diff = (merged_logits - adapter_logits).abs().max().item()
    effect = (adapter_logits - base_logits).abs().max().item()
    first_difference = [
        next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))
        for a, b in zip(merged_text, adapter_text)
    ]
    return {
        "max_abs_diff": diff,
        "adapter_effect": effect,
        "effect_ratio": diff / effect if effect > 0 else (0.0 if diff == 0 else float("inf")),
        "max_abs_logit": adapter_logits.abs().max().item(),
        "greedy_texts": len(merged_text),
        "greedy_same": sum(d is None for d in first_difference),
        "greedy_first_difference": first_difference,
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "weights_dtype": str(dtype).removeprefix("torch."),
    }


def merge_checked(
    adapter: str | Path | Any,
    base_model_name_or_path: str | Path | None,
    out_dir: str | Path,
    texts: Sequence[str],
    rtol: float = MERGE_RTOL,
    dtype: torch.dtype = torch.bfloat16,
    greedy_tokens: int = GREEDY_TOKENS,
) -> tuple[Path, dict[str, Any]]:
    """:func:`merge_and_save` in ``dtype``, checked by :func:`check_merged_logits` on ``texts``, merged again in
    float32 where the rounding moved the logits by more than ``rtol`` of the adapter's effect or changed a greedy
    text (on SmolLM2-135M after 6 steps, bf16 moved them by 35%, float32 matched within 1e-4). Returns ``(out_dir,
    report)``: the check's report, plus ``rtol``, ``matches`` and ``fallback`` (why float32, or ``None``)."""
    reason = None
    with tempfile.TemporaryDirectory() as scratch:
        adapter_dir = _adapter_source(adapter, Path(scratch))
        for weights in (dtype, torch.float32):
            merged = merge_and_save(adapter_dir, base_model_name_or_path, out_dir, dtype=weights)
            report = check_merged_logits(
                merged, adapter_dir, texts, base_model_name_or_path, weights, greedy_tokens=greedy_tokens
            )
            report["fallback"] = reason
            changed = merge_mismatch(report, rtol)
            if not changed or weights == torch.float32:
                break
            reason = f"merged weights saved in float32: rounding them to {report['weights_dtype']} {changed}"
            logger.info("%s", reason)  # handled: the report and the summary say so
    report.update(rtol=rtol, matches=not changed)
    return Path(out_dir), report


def merge_mismatch(report: dict[str, Any], rtol: float) -> str:
    """What a :func:`check_merged_logits` report shows the merge changed, as the end of a sentence; ``""`` where the
    logits moved by at most ``rtol`` of the adapter's effect and every greedy text is the same (a faithful merge)."""
    said = []
    if report["effect_ratio"] > rtol:
        said.append(
            f"moved the logits by {report['max_abs_diff']:.3g}, {report['effect_ratio']:.0%} of the adapter's own "
            f"effect ({report['adapter_effect']:.3g}; at most {rtol:.0%} allowed)"
        )
    if report["greedy_same"] < report["greedy_texts"]:
        said.append(
            f"changed the greedy text of {report['greedy_texts'] - report['greedy_same']} of "
            f"{report['greedy_texts']} prompts"
        )
    return " and ".join(said)


def export_merged(
    recipe: Recipe,
    adapter_dir: str | Path,
    run_dir: str | Path,
    texts: Sequence[str] | None = None,
    rtol: float = MERGE_RTOL,
    out_dir: str | Path | None = None,
) -> Path:
    """Merge the run's adapter into a bf16 copy of its base (with ``sft_checkpoint``, the SFT weights) on the CPU,
    into ``out_dir`` (default ``<run>/merged``), returned: :func:`merge_checked` on ``texts`` (the run's prompts,
    :func:`run_prompts`; report in ``<run>/merge_check.json``), or without
    ``texts`` :func:`merge_and_save`."""
    from dpo_xpu.models.backends import get_backend
    from dpo_xpu.models.base import resolve_model_path
    from dpo_xpu.models.loading import load_sft_state_dict

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / MERGED_DIR
    base = resolve_model_path(recipe.model_name_or_path)
    with tempfile.TemporaryDirectory(prefix="dpo-xpu-sft-base-") as scratch:
        if recipe.sft_checkpoint:  # the base the adapter was trained on: the SFT weights, written once in bf16
            state = load_sft_state_dict(recipe.sft_checkpoint, base)
            sft_base = get_backend("native").load_base(base, "none", torch.device("cpu"), torch.bfloat16, state)
            sft_base.save_pretrained(scratch)
            base, sft_base, state = scratch, None, None
        if not texts:
            return merge_and_save(adapter_dir, base, out_dir=out_dir)
        merged, report = merge_checked(adapter_dir, base, out_dir, list(texts), rtol=rtol)
    check = run_dir / MERGE_CHECK_FILE
    write_json(check, report)
    trouble = "" if report["matches"] else f"; the merge {merge_mismatch(report, report['rtol'])}: check {check}"
    logger.log(
        logging.INFO if report["matches"] else logging.WARNING,
        f"merged model in {merged} ({report['weights_dtype']}): logits within {report['max_abs_diff']:.3g} of the "
        f"adapter model's ({100 * report['effect_ratio']:.0f}% of the adapter's effect), greedy text the same on "
        f"{report['greedy_same']} of {report['greedy_texts']} prompts{trouble}",
    )
    return merged


def run_prompts(trainer: Any, tokenizer: Any, n: int = 4) -> list[str]:
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
