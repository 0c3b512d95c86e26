"""The steps after training, on a finished run folder: evaluate it, export it (``dpo-xpu evaluate``, ``dpo-xpu
export``, notebook 4). The folder's ``recipe.yaml`` and ``adapter/`` give everything else (the model, the very rows
training held out, ``beta``), so only the evaluation's own settings are arguments.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dpo_xpu.callbacks.checkpoints import newest_complete_step
from dpo_xpu.device import compute_dtype
from dpo_xpu.errors import RecipeError, RunFolderError
from dpo_xpu.eval.heldout import (
    EVALUATION_FILE,
    evaluate_preferences,
    generate_samples,
    load_run_recipe,
    write_evaluation,
)
from dpo_xpu.files import atomic_write_bytes, read_json_report, write_json
from dpo_xpu.outputs.adapter import ADAPTER_DIR
from dpo_xpu.outputs.fingerprints import check_fingerprints
from dpo_xpu.outputs.merge import MERGE_RTOL, MERGED_DIR, export_merged, merge_mismatch, run_prompts
from dpo_xpu.outputs.run_folder import MERGE_CHECK_FILE
from dpo_xpu.train.factory import load_run_data

#: The rows :func:`evaluate_run` can score: the held-out split (``eval``) or the rows trained on (``train``).
SPLITS = ("eval", "train")
#: Characters of a prompt and of an answer shown per line by :meth:`RunEvaluation.comparison`.
PROMPT_CHARS, ANSWER_CHARS = 100, 240
#: Written by an export into its ``--out`` folder: ``--overwrite`` replaces only a folder holding it (or ``merged/``).
EXPORT_MARKER = ".dpo-xpu-export"
UNCHANGED_WHY = "too few steps or too low a learning rate; the rewards can move before the argmax tokens do"


def _finished_run_recipe(run_dir: Path) -> Any:
    """The recipe of a finished run; :class:`RunFolderError` when there is none or no adapter yet."""
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir} is not a folder: give a run folder written by dpo-xpu train or notebook 3")
    recipe = load_run_recipe(run_dir)
    if not (run_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        then = (
            f"dpo-xpu train --recipe {run_dir / 'recipe.yaml'} --resume"
            if newest_complete_step(run_dir) is not None
            else f"it has no complete checkpoint to resume, so train it again: dpo-xpu train --recipe "
            f"{run_dir / 'recipe.yaml'} --overwrite"
        )
        raise RunFolderError(
            f"{run_dir} is not a finished run: it has no {ADAPTER_DIR}/adapter_config.json yet. Finish training "
            f"first: {then}"
        )
    return recipe


def samples_verdict(differ: int, total: int) -> str:
    """``"samples_differ: k of n ..."``, saying plainly when no policy answer changed yet."""
    if total == 0:
        return "samples_differ: no samples were generated (num_eval_samples 0)"
    if differ == 0:
        return (
            f"samples_differ: 0 of {total}: the policy's greedy answers did not change yet, each equals the "
            f"reference's ({UNCHANGED_WHY})"
        )
    return f"samples_differ: {differ} of {total} policy answers differ from the reference's"


def _user_turn(prompt: str) -> str:
    """The last user message of a ChatML prompt (else the prompt), on one line."""
    found = re.findall(r"<\|im_start\|>user\n(.*?)(?:<\|im_end\|>|$)", prompt, flags=re.S)
    return " ".join((found[-1] if found else prompt).split())


def _cut(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return '""' if not text else text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class RunEvaluation:
    """What :func:`evaluate_run` measured and wrote: ``metrics`` as in ``evaluation.json``, ``samples`` as in
    ``samples.jsonl``."""

    run_dir: Path
    metrics: dict[str, Any]
    samples: list[dict[str, Any]]
    evaluation_path: Path
    samples_path: Path

    def verdict(self) -> str:
        """:func:`samples_verdict` for these samples."""
        return samples_verdict(self.metrics["samples_differ"], self.metrics["n_samples"])

    def summary(self) -> str:
        """A few lines: the figures, where they were written, and the samples' verdict."""
        m = self.metrics
        rows = "held-out" if m["split"] == "eval" else "training"
        return "\n".join(
            [
                f"evaluated {self.run_dir} on {m['n_pairs']} {rows} pairs (beta {m['beta']})",
                f"  reward accuracy {m['reward_accuracy']:.3f}, margin {m['mean_margin']:.4f} (chosen "
                f"{m['mean_chosen_reward']:.4f}, rejected {m['mean_rejected_reward']:.4f}), drift "
                f"{m['drift_chosen_logratio']:.4f} nats",
                f"  evaluation: {self.evaluation_path}",
                f"  samples:    {self.samples_path}",
                self.verdict(),
            ]
        )

    def comparison(self) -> str:
        """Each prompt with the policy's and the reference's answers, marked identical or different (cut short)."""
        lines = []
        for number, sample in enumerate(self.samples, 1):
            lines.append(f"[{number}] {'identical' if sample['identical'] else 'different'}")
            lines.append(f"  prompt:    {_cut(_user_turn(sample['prompt']), PROMPT_CHARS)}")
            shown = [("both", "policy")] if sample["identical"] else [("policy", "policy"), ("reference", "reference")]
            lines += [f"  {label + ':':<11}{_cut(sample[key], ANSWER_CHARS)}" for label, key in shown]
        return "\n".join(lines)


def evaluate_run(
    run_dir: str | Path,
    max_eval_pairs: int = 200,
    num_eval_samples: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 4,
    device: str | None = None,
    split: str = "eval",
    progress: bool = True,
) -> RunEvaluation:
    """Evaluate a finished run from its folder alone: reward accuracy, margin and drift on the first
    ``max_eval_pairs`` held-out rows (``split="train"``: the rows trained on), and ``num_eval_samples`` greedy answers
    of the policy (base + ``adapter/``) and the reference (adapter off); ``None``: the recipe's values. Returns them,
    also written to ``evaluation.json`` and ``samples.jsonl``. :class:`RunFolderError`: not a finished run, or its
    inputs changed since training; :class:`RecipeError`: an unknown ``split``, a count below 1 (``num_eval_samples``:
    0), ``eval`` without held-out rows, a run from ``sft_checkpoint`` or ``adapter_name_or_path``."""
    from dpo_xpu.models.loading import load_tokenizer, load_trained_policy

    run_dir = Path(run_dir)
    recipe = _finished_run_recipe(run_dir)
    if split not in SPLITS:
        raise RecipeError(f"split: {split!r} is not a split: use 'eval' (the held-out rows) or 'train'")
    for name, value, least in [
        ("max_eval_pairs", max_eval_pairs, 1),
        ("batch_size", batch_size, 1),
        ("num_eval_samples", num_eval_samples, 0),
        ("max_new_tokens", max_new_tokens, 1),
    ]:
        if value is not None and (type(value) is not int or value < least):
            raise RecipeError(f"{name} (--{name.replace('_', '-')}): must be an integer >= {least}, found {value!r}")
    if split == "eval" and not recipe.eval_fraction:
        raise RecipeError(
            f"{run_dir} held no rows out (eval_fraction: {recipe.eval_fraction}): evaluate the rows it "
            "trained on with --split train (split='train'), which measures what it learnt, not how it generalises, "
            "or train again with eval_fraction > 0"
        )
    if recipe.sft_checkpoint or recipe.adapter_name_or_path:
        key = "sft_checkpoint" if recipe.sft_checkpoint else "adapter_name_or_path"
        raise RecipeError(
            f"{run_dir} was trained with {key}: evaluating it is not supported yet (the policy is loaded on "
            "the plain base, and its reference would be the base rather than the run's starting model); use the "
            "evaluation during training (eval_steps) instead"
        )
    check_fingerprints(recipe, run_dir, "evaluate")
    tokenizer = load_tokenizer(run_dir / ADAPTER_DIR)
    train, heldout = load_run_data(recipe, tokenizer)  # the rows as training split them
    rows = heldout if split == "eval" else train
    rows = rows.select(range(min(max_eval_pairs, len(rows))))
    policy = load_trained_policy(
        recipe.model_name_or_path,
        run_dir / ADAPTER_DIR,
        recipe.quantization,
        device or recipe.device,
        compute_dtype(recipe.bf16, device or recipe.device),
        recipe.backend,
    )
    shared = {"batch_size": batch_size, "progress": progress}
    cut = {"max_length": recipe.max_length, "max_prompt_length": recipe.max_prompt_length}
    metrics: dict[str, Any] = evaluate_preferences(policy, tokenizer, rows, beta=recipe.beta, **cut, **shared)
    count = recipe.num_eval_samples if num_eval_samples is None else num_eval_samples
    new_tokens = max_new_tokens or recipe.max_new_tokens
    samples = generate_samples(policy, tokenizer, rows["prompt"][:count], max_new_tokens=new_tokens, **shared)
    for sample in samples:
        sample["identical"] = sample["policy"] == sample["reference"]
    metrics.update(split=split, samples_differ=sum(not s["identical"] for s in samples), n_samples=len(samples))
    check = read_json_report(run_dir / MERGE_CHECK_FILE)
    if check is not None:  # exported merged before: the check belongs to the run's results
        metrics["merge"] = check
    evaluation_path, samples_path = write_evaluation(run_dir, metrics, samples)
    return RunEvaluation(run_dir, metrics, samples, evaluation_path, samples_path)


@dataclass
class RunExport:
    """What :func:`export_run` wrote: the adapter (or its copy), the merged model, and the merge check's report."""

    run_dir: Path
    adapter_dir: Path
    merged_dir: Path | None = None
    check: dict[str, Any] | None = None
    check_path: Path | None = None

    @property
    def matches(self) -> bool:
        """Whether the merged model does what the adapter model does (``True`` when nothing was merged)."""
        return self.check is None or bool(self.check["matches"])

    def summary(self) -> str:
        """Where the adapter and the merged model are, and the merge check's verdict."""
        lines = [f"adapter:      {self.adapter_dir} (LoRA adapter, tokenizer and model card; loads with PEFT)"]
        c = self.check
        if self.merged_dir is None:
            lines.append(f"a model without PEFT or bitsandbytes: dpo-xpu export {self.run_dir} --merged")
        else:
            dtype = f" ({c['weights_dtype']})" if c else ""
            lines.append(f"merged model: {self.merged_dir}{dtype}, loads with AutoModelForCausalLM.from_pretrained")
        if c is not None:
            verdict = (
                f"matches: logits within {c['max_abs_diff']:.3g} of the adapter model's ({100 * c['effect_ratio']:.2g}"
                f"% of the adapter's own effect, at most {c['rtol']:.0%}), greedy text the same on {c['greedy_same']} "
                f"of {c['greedy_texts']} prompts"
                if c["matches"]
                else f"DIFFERS: the merge {merge_mismatch(c, c['rtol'])}"
            )
            lines += [f"merge check:  {verdict}", *([f"              {c['fallback']}"] if c.get("fallback") else [])]
            lines.append(f"              {self.check_path}")
        return "\n".join(lines)


def _taken(out: Path, overwrite: bool, run_dir: Path | None = None) -> bool:
    """Whether ``out`` holds something to replace. Refused (:class:`RunFolderError`, nothing changed): ``out`` is the
    run folder, holds it, or lies in its adapter or a checkpoint; it holds something and ``overwrite`` is off; or
    ``overwrite`` would replace what no export wrote (a run being trained, a model, the user's files): only a folder
    holding :data:`EXPORT_MARKER`, or the run's own ``merged/``, is replaced."""
    target = out.resolve()
    if run_dir is not None:
        run = run_dir.resolve()
        inside = [run / ADAPTER_DIR, *run.glob("checkpoint-*")]
        if target == run or run.is_relative_to(target) or any(target.is_relative_to(p) for p in inside):
            raise RunFolderError(
                f"--out {out} would replace the run folder {run_dir} or part of it (its adapter, a checkpoint): "
                "choose a folder outside it (a new or empty one), or leave --out out for the default"
            )
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else [out.name] if out.exists() else []
    if not held:
        return False
    shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
    if not overwrite:
        raise RunFolderError(
            f"{out} already holds files ({shown}): replace it with --overwrite (overwrite=True), or choose another "
            "--out"
        )
    ours = (out / EXPORT_MARKER).is_file() or (run_dir is not None and target == (run_dir / MERGED_DIR).resolve())
    if not (out.is_dir() and ours):
        raise RunFolderError(
            f"{out} holds files no dpo-xpu export wrote ({shown}), so --overwrite does not replace them: choose "
            "another --out (a new or empty folder); nothing was changed"
        )
    return True


@contextlib.contextmanager
def _replacing(out: Path, overwrite: bool, run_dir: Path | None = None) -> Iterator[None]:
    """Write ``out`` in the block (checked by :func:`_taken`); what it held is deleted once the block succeeded, put
    back if it fails; a written ``out`` gets :data:`EXPORT_MARKER`."""
    taken = _taken(out, overwrite, run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    aside = out.rename(Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent)) / out.name) if taken else None
    try:
        yield
    except BaseException:
        if aside is not None:
            shutil.rmtree(out, ignore_errors=True)
            aside.rename(out)
            aside.parent.rmdir()
        raise
    write_json(out / EXPORT_MARKER, {"written_by": "dpo-xpu export"})
    if aside is not None:
        shutil.rmtree(aside.parent)


def export_run(
    run_dir: str | Path,
    merged: bool = False,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    rtol: float = MERGE_RTOL,
) -> RunExport:
    """Export a finished run: the adapter is in ``<run_dir>/adapter`` (or copied to ``out_dir``); ``merged`` merges
    it as ``export: merged`` does (:func:`dpo_xpu.outputs.merge.export_merged`) into ``out_dir`` (default
    ``<run_dir>/merged``), its check also under ``merge`` in an ``evaluation.json``. ``overwrite`` replaces ``out_dir``
    (else :class:`RunFolderError`, as for a run that did not finish)."""
    from dpo_xpu.models.loading import load_tokenizer

    run_dir = Path(run_dir)
    recipe = _finished_run_recipe(run_dir)
    adapter_dir = run_dir / ADAPTER_DIR
    if not merged:
        if out_dir is None:
            return RunExport(run_dir, adapter_dir)
        with _replacing(Path(out_dir), overwrite, run_dir):
            shutil.copytree(adapter_dir, out_dir, dirs_exist_ok=True)
        return RunExport(run_dir, Path(out_dir))
    out = Path(out_dir) if out_dir is not None else run_dir / MERGED_DIR
    _taken(out, overwrite, run_dir)  # refused before anything is loaded
    check_fingerprints(recipe, run_dir, "export")
    tokenizer = load_tokenizer(adapter_dir)
    train, heldout = load_run_data(recipe, tokenizer)
    texts = run_prompts(SimpleNamespace(eval_dataset=heldout, train_dataset=train), tokenizer)
    check_path = run_dir / MERGE_CHECK_FILE
    earlier = check_path.read_bytes() if check_path.is_file() else None
    check_path.unlink(missing_ok=True)  # a check of an earlier merge must not pass for this one's
    try:
        with _replacing(out, overwrite, run_dir):
            export_merged(recipe, adapter_dir, run_dir, texts, rtol=rtol, out_dir=out)
    except BaseException:
        if earlier is not None:  # the earlier merged model is back: so is its check
            atomic_write_bytes(check_path, earlier)
        raise
    check = read_json_report(check_path)
    evaluation = run_dir / EVALUATION_FILE
    results = read_json_report(evaluation) if check is not None else None
    if isinstance(results, dict):  # the run's results hold the check of its merged model
        write_json(evaluation, {**results, "merge": check})
    return RunExport(run_dir, adapter_dir, out, check, check_path if check is not None else None)
