"""Held-out preference metrics and policy-vs-reference samples of a policy.

The implicit DPO reward is ``r(x, y) = beta * (log pi_theta(y|x) - log pi_ref(y|x))`` (Rafailov et al. 2023, eq. 5),
the reference by default the policy with its LoRA adapters disabled. Not ``DPOTrainer.evaluate``: this scores a
finished policy on raw text pairs, without a trainer or its tokenized data, in both TRL generations.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from dpo_xpu.data.truncation import answer_tokens
from dpo_xpu.files import atomic_write_bytes, write_json
from dpo_xpu.train.trl_internals import selective_log_softmax

EVALUATION_FILE = "evaluation.json"
SAMPLES_FILE = "samples.jsonl"


def _token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    selective = selective_log_softmax()  # TRL >= 0.14: memory-efficient log_softmax + gather
    if selective is None:
        return torch.gather(logits.log_softmax(-1), -1, labels.unsqueeze(-1)).squeeze(-1)
    return selective(logits, labels)


@torch.no_grad()
def sequence_log_probs(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 4,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    on_batch: Callable[[int], Any] | None = None,
) -> torch.Tensor:
    """``log pi(y|x)`` of each pair, summed over the answer's tokens cut as TRL cuts them
    (:func:`dpo_xpu.data.truncation.answer_tokens`): shape `[N]`, float32 on the CPU, nats. ``on_batch`` gets each
    batch's number of sequences. `ValueError` when `prompts` and `answers` differ in length."""
    if len(prompts) != len(answers):
        raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers: give one answer per prompt")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    out = []
    for begin in range(0, len(prompts), batch_size):
        pieces = [
            answer_tokens(tokenizer, p, a, max_length, max_prompt_length)
            for p, a in zip(prompts[begin : begin + batch_size], answers[begin : begin + batch_size])
        ]
        ids = pad_sequence([torch.tensor(p + a, dtype=torch.long) for p, a in pieces], True, pad_id)
        attention = pad_sequence([torch.ones(len(p) + len(a), dtype=torch.long) for p, a in pieces], True)
        answer_mask = pad_sequence([torch.tensor([0] * len(p) + [1] * len(a)) for p, a in pieces], True)
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float()
        # the logits at position t predict token t + 1
        token_lp = _token_log_probs(logits[:, :-1], ids[:, 1:].to(device)).cpu()
        out.append((token_lp * answer_mask[:, 1:]).sum(-1))
        if on_batch is not None:
            on_batch(len(pieces))
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def _reference_context(policy: torch.nn.Module, reference: torch.nn.Module | None):
    return contextlib.nullcontext() if reference is not None else policy.disable_adapter()


def evaluate_preferences(
    policy: torch.nn.Module,
    tokenizer: Any,
    dataset: Any,
    beta: float = 0.1,
    reference: torch.nn.Module | None = None,
    batch_size: int = 4,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    progress: bool = False,
) -> dict[str, float | int]:
    """Reward accuracy (share of pairs whose chosen reward beats the rejected one's), mean margin, chosen and
    rejected rewards (nats, scaled by ``beta``), and ``drift_chosen_logratio``: the mean of ``log pi(y_w|x) - log
    pi_ref(y_w|x)`` (nats), a drift indicator, not an exact KL (the chosen answers are not sampled from the policy).
    ``reference``: a separate model (``None``: the policy's adapters off); also returns `beta`, `n_pairs`."""
    from tqdm.auto import tqdm

    prompts, answers = list(dataset["prompt"]), {c: list(dataset[c]) for c in ("chosen", "rejected")}
    with tqdm(total=4 * len(prompts), desc="scoring pairs", unit="seq", disable=not progress) as bar:
        kwargs = {"batch_size": batch_size, "max_length": max_length, "max_prompt_length": max_prompt_length}
        kwargs["on_batch"] = bar.update
        logps = {c: sequence_log_probs(policy, tokenizer, prompts, a, **kwargs) for c, a in answers.items()}
        with _reference_context(policy, reference):
            ref_model = reference if reference is not None else policy
            ref = {c: sequence_log_probs(ref_model, tokenizer, prompts, a, **kwargs) for c, a in answers.items()}
    chosen, rejected = beta * (logps["chosen"] - ref["chosen"]), beta * (logps["rejected"] - ref["rejected"])
    return {
        "reward_accuracy": (chosen > rejected).float().mean().item(),
        "mean_margin": (chosen - rejected).mean().item(),
        "mean_chosen_reward": chosen.mean().item(),
        "mean_rejected_reward": rejected.mean().item(),
        "drift_chosen_logratio": (logps["chosen"] - ref["chosen"]).mean().item(),
        "beta": beta,
        "n_pairs": len(prompts),
    }


def _stop_ids(tokenizer: Any) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in ids:
        ids.append(im_end)  # ChatML ends the assistant turn with <|im_end|>
    return ids


@torch.no_grad()
def generate_samples(
    policy: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    reference: torch.nn.Module | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> list[dict[str, str]]:
    """One `{"prompt", "policy", "reference"}` per formatted prompt: the greedy answers (at most ``max_new_tokens``,
    stopping at EOS and ``<|im_end|>``), ``batch_size`` prompts at a time (``None``: all); ``reference`` as
    :func:`evaluate_preferences`."""
    from tqdm.auto import tqdm

    if not prompts:
        return []
    prompts = list(prompts)
    device = next(policy.parameters()).device
    settings = {"max_new_tokens": max_new_tokens, "do_sample": False, "eos_token_id": _stop_ids(tokenizer)}
    settings["pad_token_id"] = tokenizer.pad_token_id
    step = batch_size or len(prompts)

    def answers(model: torch.nn.Module, bar: Any) -> list[str]:
        was_training = model.training
        model.eval()
        out = []
        for begin in range(0, len(prompts), step):
            chunk = prompts[begin : begin + step]
            batch = tokenizer(chunk, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
            ids = model.generate(**batch.to(device), **settings)[:, batch["input_ids"].shape[1] :]
            out += [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]
            bar.update(len(chunk))
        model.train(was_training)
        return out

    with tqdm(total=2 * len(prompts), desc="generating answers", unit="answer", disable=not progress) as bar:
        policy_answers = answers(policy, bar)
        with _reference_context(policy, reference):
            reference_answers = answers(reference if reference is not None else policy, bar)
    return [{"prompt": p, "policy": a, "reference": b} for p, a, b in zip(prompts, policy_answers, reference_answers)]


def load_run_recipe(run_dir: str | Path, **expected: Any) -> Any:
    """The recipe a run saved (it gives back exactly the rows it held out), checked against `expected` values:
    :class:`RunFolderError` without one, :class:`RecipeError` when a value differs."""
    from dpo_xpu.errors import RecipeError, RunFolderError
    from dpo_xpu.recipes import load_recipe

    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise RunFolderError(f"{path} does not exist: train first (notebook 03 or dpo-xpu train) with this output_dir")
    recipe = load_recipe(path)
    differ = {k: (getattr(recipe, k), v) for k, v in expected.items() if getattr(recipe, k) != v}
    if differ:
        found = ", ".join(f"{k}: run has {a!r}, given {b!r}" for k, (a, b) in differ.items())
        raise RecipeError(f"{path} does not match these settings ({found}): use the run's values, or retrain")
    return recipe


def write_evaluation(
    run_dir: str | Path, metrics: dict[str, Any], samples: Sequence[dict[str, Any]] = ()
) -> tuple[Path, Path]:
    """Write `metrics` to `<run_dir>/evaluation.json` and `samples` to `<run_dir>/samples.jsonl`; return both paths
    (`ValueError` for a metric that is NaN or infinite)."""
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise ValueError(f"metrics {bad} are not finite ({[metrics[k] for k in bad]}): check the run before saving")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    eval_path, samples_path = run_dir / EVALUATION_FILE, run_dir / SAMPLES_FILE
    write_json(eval_path, metrics)  # atomic: a process killed here leaves the earlier files whole
    atomic_write_bytes(samples_path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples).encode())
    return eval_path, samples_path
