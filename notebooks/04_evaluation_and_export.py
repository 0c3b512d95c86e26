# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 4. Evaluation and export
#
# This notebook measures what training changed, on the pairs held out from training: how often the trained policy
# prefers the chosen answer (its reward accuracy), by how much (the margin), and how far it drifted from the
# reference. It then shows the policy's and the reference's answers side by side, and merges the adapter into a bf16
# copy of the base that loads without PEFT or bitsandbytes.

# %% tags=["parameters"]
preset = None  # None: the values below (an Intel GPU); "demo": the tiny offline demo on CPU (recipes/cpu_demo.yaml)
model_name_or_path = "Qwen/Qwen2.5-1.5B-Instruct"  # hub id or local folder of the base (SFT) chat model
dataset_name_or_path = "Intel/orca_dpo_pairs"  # hub id, or a local .jsonl/.json/.parquet file in the same columns
output_dir = "../runs/qwen2.5-1.5b-dpo"  # the run folder: 03 writes it, 04 reads it
device = "auto"  # "auto" (xpu, then cuda, then cpu), "xpu", "cuda" or "cpu"
backend = "native"  # "native" (PyTorch XPU + bitsandbytes + PEFT + TRL 1.x) or "ipex-llm"
limit = None  # keep this many rows (seeded shuffle); None keeps all 12,859
eval_fraction = 0.1  # share of rows held out from training, evaluated in 04
seed = 42  # shuffle and split seed
bf16 = True  # bf16 compute (Intel GPUs); False computes in float32 (CPU: bf16 is emulated, ~6x slower)
max_eval_pairs = 200  # evaluate at most this many held-out pairs
batch_size = 4  # sequences per forward pass
num_samples = 4  # held-out prompts answered by policy and reference
max_new_tokens = 128  # tokens per generated answer, at most
merge_rtol = 0.1  # the merge may move the logits by this share of the adapter's own effect on them

# %%
# preset = "demo", for a CPU-only or offline machine: the parameters above that still have these
# defaults take the values of recipes/cpu_demo.yaml (the tiny demo model, built offline if missing;
# the shipped sample; CPU settings), with 10% of the pairs held out and 3 answers of at most 48 tokens
# for notebook 4. A parameter you changed above keeps your value.
from dpo_xpu import apply_preset

defaults = dict(
    model_name_or_path="Qwen/Qwen2.5-1.5B-Instruct", dataset_name_or_path="Intel/orca_dpo_pairs",
    output_dir="../runs/qwen2.5-1.5b-dpo", device="auto", backend="native", limit=None, eval_fraction=0.1, seed=42,
    bf16=True, num_samples=4, max_new_tokens=128,
)
changed = apply_preset(preset, defaults, globals())  # {} with preset None

# %% [markdown]
# ## The run and its held-out pairs
#
# The run's `recipe.yaml` (written by notebook 3) gives back the exact split: the same data, `limit`, `seed` and
# `eval_fraction` select the same held-out rows, none of which was trained on. The parameters above must match the
# run's; a mismatch stops here rather than evaluating on training rows.

# %%
from pathlib import Path

import pandas as pd
import torch

from dpo_xpu import (
    evaluate_preferences, generate_samples, load_run_data, load_run_recipe, load_tokenizer,
    load_trained_policy, merge_checked, write_evaluation,
)

run_dir = Path(output_dir)
recipe = load_run_recipe(run_dir, model_name_or_path=model_name_or_path, dataset_name_or_path=dataset_name_or_path,
                         limit=limit, eval_fraction=eval_fraction, seed=seed)
tokenizer = load_tokenizer(run_dir / "adapter")
_, heldout = load_run_data(recipe, tokenizer)
heldout = heldout.select(range(min(max_eval_pairs, len(heldout))))
print(f"{len(heldout)} held-out pairs from {run_dir.resolve()}")

# %% [markdown]
# ## The trained policy
#
# The base is loaded as in training (NF4) with the saved adapter on top. Switching the adapter off gives the
# reference, so both are measured with the same weights and the same kernels.

# %%
dtype = torch.bfloat16 if bf16 else torch.float32
adapter_dir = run_dir / "adapter"
policy = load_trained_policy(recipe.model_name_or_path, adapter_dir, recipe.quantization, device, dtype, backend)

# %% [markdown]
# ## Reward accuracy, margin and drift
#
# For each held-out pair the implicit rewards $r = \beta \log \frac{\pi_\theta(y \mid x)}{\pi_\mathrm{ref}(y \mid x)}$
# (Rafailov et al. 2023, eq. 5) of both answers are computed from summed answer-token log-probabilities. `reward_accuracy`
# is the fraction of pairs whose chosen reward is higher (0.5 is chance); `mean_margin` the mean of chosen minus
# rejected reward. `drift_chosen_logratio`, the mean $\log \pi_\theta(y_w \mid x) - \log \pi_\mathrm{ref}(y_w \mid x)$ in
# nats, is a one-sample estimate of how far the policy moved from the reference (the KL divergence that $\beta$
# penalises); it is exact only for answers sampled from the policy, so read it as an indicator.

# %%
metrics = evaluate_preferences(policy, tokenizer, heldout, beta=recipe.beta, batch_size=batch_size,
                               max_length=recipe.max_length, max_prompt_length=recipe.max_prompt_length)
pd.Series(metrics).to_frame("held out")

# %% [markdown]
# ## Policy and reference, side by side
#
# Greedy answers (no sampling, so they are reproducible) of the trained policy and of the reference to the first
# held-out prompts. Numbers say how often; these say how: look for the preferred style (steps, brevity, no refusal)
# and for damage (repetition, broken endings), which a too-high learning rate or too-small `beta` causes.
#
# **With `preset = "demo"`** the policy answers `""` to every prompt (in `samples.jsonl` too), and the reference
# answers random pieces of words. Both are what the demo's model can do, not a fault of the evaluation. The
# reference is the untrained demo model: random weights, so random tokens. The policy emits the space token at
# every one of its 48 steps, and answers are shown stripped of surrounding whitespace, hence `""`. That is the
# shortcut the deliberately high learning rate found: in the shipped sample the chosen answers are longer than the
# rejected ones (about 66 tokens against 40) and hold more lone spaces (4.5 against 1.7 per answer), so raising
# the space token's probability everywhere raises the chosen answers' reward more than the rejected ones', and a
# random model has nothing better to go on. A real model at a real learning rate answers in words; empty or
# repeated answers there are the damage described above.

# %%
samples = generate_samples(policy, tokenizer, heldout["prompt"][:num_samples], max_new_tokens=max_new_tokens)
pd.DataFrame(samples).style.set_properties(**{"white-space": "pre-wrap", "text-align": "left"})

# %% [markdown]
# ## Merge the adapter into a bf16 model
#
# For use without PEFT and bitsandbytes, the adapter is merged into the base loaded in bf16 (not NF4: 4-bit weights
# would round the small update away). The merged model is saved in `<output_dir>/merged`, reloaded from disk, and its
# logits compared with the adapter applied to the same bf16 base, both computed in float32. What differs is the one
# rounding of the merged weights to bf16, and it is judged against `adapter_effect`, how much the adapter moves the
# logits at all: a merge that keeps the update moves them by a small share of that (`effect_ratio`). Both models also
# continue each prompt greedily for a few tokens (`greedy_same` of `greedy_texts` identical). Where the rounding
# moves the logits by more than `merge_rtol` of the adapter's effect (a small update on a deep model: a third of it
# on SmolLM2 after a few steps) or changes a greedy continuation, the merge is saved in float32 instead and
# `fallback` says why.

# %%
merged_dir, merge = merge_checked(adapter_dir, recipe.model_name_or_path, run_dir / "merged", heldout["prompt"][:2],
                                  rtol=merge_rtol)
merge

# %% [markdown]
# ## Write the results
#
# `evaluation.json` holds the figures above under their names (the merge check under `merge`), and `samples.jsonl`
# one line per prompt with the policy's and the reference's answers, in the run folder next to the training record.
# The merged model loads anywhere: `AutoModelForCausalLM.from_pretrained("<output_dir>/merged")`.

# %%
paths = write_evaluation(run_dir, {**metrics, "merge": merge}, samples)
assert merge["matches"], f"merged model's logits differ from the adapter model's: {merge}"
[str(path) for path in paths]
