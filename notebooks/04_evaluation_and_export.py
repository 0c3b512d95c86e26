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
# The run notebook 3 trained: its recipe file, or its folder (None: the recipe's output_dir). As in notebook 3.
recipe_file = "../recipes/arc_16gb_qwen2.5_1.5b.yaml"  # Qwen2.5-1.5B on an Intel GPU; CPU: "../recipes/cpu_demo.yaml"
output_dir = None  # the run folder: 03 writes it, 04 reads it (recipe.yaml, adapter/)
device = None  # "auto" (xpu, then cuda, then cpu), "xpu", "cuda" or "cpu"; None: the run's
split = "eval"  # "eval": the pairs held out from training; "train": the trained pairs (a run with eval_fraction 0)
max_eval_pairs = 200  # evaluate at most this many pairs
batch_size = 4  # sequences per forward pass, prompts per generation
num_eval_samples = None  # prompts answered by policy and reference; None: the run's
max_new_tokens = None  # tokens per generated answer, at most; None: the run's
merge_rtol = 0.1  # the merge may move the logits by this share of the adapter's own effect on them

# %% [markdown]
# ## The run
#
# Everything about the run comes from its folder, so nothing is given twice: `recipe.yaml` (written by notebook 3)
# names the model, the data, `limit`, `seed` and `eval_fraction`, which select the very rows training held out (none
# of them trained on), `bf16`, `backend` and `beta`, with which the policy is loaded and scored, and the samples'
# `num_eval_samples` and `max_new_tokens`; `adapter/` holds the trained LoRA adapter and the tokenizer. The run
# folder is `output_dir`, or the recipe file's. The same steps run from a terminal: `dpo-xpu evaluate <output_dir>`
# and `dpo-xpu export <output_dir> --merged`.

# %%
import pandas as pd

from dpo_xpu import evaluate_run, export_run, load_run_recipe, notebook_recipe

run_dir = notebook_recipe(recipe_file, output_dir=output_dir).output_dir
recipe = load_run_recipe(run_dir)
keys = ("model_name_or_path", "dataset_name_or_path", "limit", "seed", "eval_fraction", "beta", "bf16", "backend")
pd.Series({key: getattr(recipe, key) for key in keys}, dtype=object).to_frame("recipe.yaml")

# %% [markdown]
# ## Reward accuracy, margin and drift
#
# The base is loaded as in training (NF4) with the saved adapter on top; switching the adapter off gives the
# reference, so both are measured with the same weights and the same kernels.
#
# For each pair the implicit rewards $r = \beta \log \frac{\pi_\theta(y \mid x)}{\pi_\mathrm{ref}(y \mid x)}$
# (Rafailov et al. 2023, eq. 5) of both answers are computed from summed answer-token log-probabilities. `reward_accuracy`
# is the fraction of pairs whose chosen reward is higher (0.5 is chance); `mean_margin` the mean of chosen minus
# rejected reward. `drift_chosen_logratio`, the mean $\log \pi_\theta(y_w \mid x) - \log \pi_\mathrm{ref}(y_w \mid x)$ in
# nats, is a one-sample estimate of how far the policy moved from the reference (the KL divergence that $\beta$
# penalises); it is exact only for answers sampled from the policy, so read it as an indicator.

# %%
evaluation = evaluate_run(run_dir, max_eval_pairs=max_eval_pairs, num_eval_samples=num_eval_samples,
                          max_new_tokens=max_new_tokens, batch_size=batch_size, device=device, split=split)
pd.Series(evaluation.metrics, dtype=object).drop("merge", errors="ignore").to_frame(f"{split} pairs")

# %% [markdown]
# ## Policy and reference, side by side
#
# Greedy answers (no sampling, so they are reproducible) of the trained policy and of the reference to the first
# prompts of the split. Numbers say how often; these say how: look for the preferred style (steps, brevity, no
# refusal) and for damage (repetition, broken endings), which a too-high learning rate or too-small `beta` causes.
# `identical` marks the prompts where training has not changed the greedy answer yet; when every one is identical,
# the line above the table says so: after a few steps, or at a low learning rate, the rewards move before the most
# likely tokens do.
#
# **With `recipes/cpu_demo.yaml`** policy and reference are SmolLM2-135M-Instruct with and without the adapter. After 12
# steps at a deliberately high learning rate their greedy answers differ on the held-out prompts: the same opening,
# then other reasoning. A 135M-parameter model gets the arithmetic wrong either way: the demo shows DPO moving the
# model, not 12 steps making it better. (With `recipes/cpu_tiny.yaml`, the tests' random model, the policy answers `""`:
# see Troubleshooting, "The tiny run's policy answers".)

# %%
print(evaluation.verdict())
pd.DataFrame(evaluation.samples).style.set_properties(**{"white-space": "pre-wrap", "text-align": "left"})

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
#
# Running this notebook again replaces that merged model (`overwrite=True`); from a terminal,
# `dpo-xpu export <output_dir> --merged` refuses to unless given `--overwrite`.

# %%
exported = export_run(run_dir, merged=True, overwrite=True, rtol=merge_rtol)
print(exported.summary())
exported.check

# %% [markdown]
# ## The results
#
# `evaluation.json` holds the figures above under their names (the merge check under `merge`, also in
# `merge_check.json`), and `samples.jsonl` one line per prompt with the policy's and the reference's answers, in the
# run folder next to the training record. The merged model loads anywhere:
# `AutoModelForCausalLM.from_pretrained("<output_dir>/merged")`.

# %%
assert exported.matches, f"merged model's logits differ from the adapter model's: {exported.check}"
[str(path) for path in (evaluation.evaluation_path, evaluation.samples_path, exported.check_path)]
