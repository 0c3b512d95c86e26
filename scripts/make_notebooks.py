"""Write the four tutorial notebooks in notebooks/ from the cell texts below (clean: no outputs).

Edit a notebook's text here, then regenerate all four, so the notebooks stay consistent and output-free:

    .venv/bin/python scripts/make_notebooks.py            # writes notebooks/0*.ipynb
    .venv/bin/python scripts/make_notebooks.py --check    # exit 1 when a notebook differs from this script

Each notebook: a title and what the step does, one cell tagged ``parameters`` (literals only, overridden by
papermill) that starts with ``preset``, the preset cell written by :func:`preset_cell` right after it, then
sections of two or three sentences and one short code cell calling ``dpo_xpu``.
Relative paths in the parameters are relative to notebooks/, where Jupyter and scripts/run_notebooks.py run them.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"

# Defaults shared by the notebooks: a real user on an Intel GPU, the small-model recipe
# (recipes/arc_16gb_qwen2.5_1.5b.yaml). Paths are relative to notebooks/.
MODEL = '"Qwen/Qwen2.5-1.5B-Instruct"  # hub id or local folder of the base (SFT) chat model'
DATA = '"Intel/orca_dpo_pairs"  # hub id, or a local .jsonl/.json/.parquet file in the same columns'
OUTPUT = '"../runs/qwen2.5-1.5b-dpo"  # the run folder: 03 writes it, 04 reads it'
DEVICE = '"auto"  # "auto" (xpu, then cuda, then cpu), "xpu", "cuda" or "cpu"'
BACKEND = '"native"  # "native" (PyTorch XPU + bitsandbytes + PEFT + TRL 1.x) or "ipex-llm"'
LIMIT = "None  # keep this many rows (seeded shuffle); None keeps all 12,859"
SEED = "42  # shuffle and split seed"
EVAL_FRACTION = "0.1  # share of rows held out from training, evaluated in 04"
MAX_LENGTH = "1024  # tokens, prompt + answer"
MAX_PROMPT_LENGTH = "512  # tokens; longer prompts keep their end"
BF16 = "True  # bf16 compute (Intel GPUs); False computes in float32 (CPU: bf16 is emulated, ~6x slower)"
PRESET = 'None  # None: the values below (an Intel GPU); "demo": the tiny offline demo on CPU (recipes/cpu_demo.yaml)'

#: preset = "demo": recipes/cpu_demo.yaml (relative to notebooks/), plus what the recipe does not set but the
#: notebooks need: pairs held out for notebook 4, and how many answers it generates, how long.
DEMO_RECIPE = "../recipes/cpu_demo.yaml"
DEMO_EXTRAS = {"eval_fraction": 0.1, "num_samples": 3, "max_new_tokens": 48}
#: Parameters named like recipe keys; the preset sets these (and DEMO_EXTRAS), never the notebooks' own extras.
RECIPE_PARAMETERS = (
    "model_name_or_path", "dataset_name_or_path", "output_dir", "max_steps", "device", "backend", "limit",
    "eval_fraction", "seed", "max_length", "max_prompt_length", "learning_rate", "beta", "bf16",
    "per_device_train_batch_size", "gradient_accumulation_steps", "warmup_steps", "gradient_checkpointing",
    "max_new_tokens",
)  # fmt: skip


def params(**values: str) -> str:
    """The parameters cell: ``preset`` first, then ``name = value  # comment`` lines."""
    return "\n".join(f"{name} = {value}" for name, value in {"preset": PRESET, **values}.items())


def _literal(value: object) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


def preset_cell(parameters: str) -> str:
    """The code cell after the parameters: ``preset = "demo"`` gives the demo's values to the parameters that
    still have their defaults (listed in the cell), so a value set above or passed by papermill is kept."""
    defaults = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(parameters).body}
    names = [name for name in defaults if name in RECIPE_PARAMETERS or name in DEMO_EXTRAS]
    lines, line = [], "   "
    for item in (f"{name}={_literal(defaults[name])}," for name in names):
        if len(line) + 1 + len(item) > 116:
            lines.append(line)
            line = "   "
        line += " " + item
    lines.append(line)
    extras = ", ".join(f'"{key}": {_literal(value)}' for key, value in DEMO_EXTRAS.items())
    return "\n".join(
        [
            '# preset = "demo", for a CPU-only or offline machine: the parameters above that still have these',
            "# defaults take the values of recipes/cpu_demo.yaml (the tiny demo model, built offline if missing;",
            "# the shipped sample; CPU settings), with 10% of the pairs held out and 3 answers of at most 48 tokens",
            "# for notebook 4. A parameter you changed above keeps your value.",
            "defaults = dict(",
            *lines,
            ")",
            'if preset == "demo":',
            "    from pathlib import Path",
            "",
            "    from dpo_xpu import build_demo_model, load_recipe",
            "",
            f'    demo = load_recipe("{DEMO_RECIPE}").to_dict()',
            f"    demo.update({{{extras}}})",
            '    for key in ("model_name_or_path", "dataset_name_or_path", "output_dir"):',
            '        demo[key] = str(Path("..", demo[key]).resolve())  # the recipe\'s paths start at the project root',
            "    changed = {}",
            "    for name, default in defaults.items():",
            "        if globals()[name] == default != demo[name]:  # still at its default, and the demo's differs",
            "            changed[name] = globals()[name] = demo[name]",
            '    if "model_name_or_path" in changed:',
            "        build_demo_model(model_name_or_path)  # offline, in seconds; reused once built",
            '    print("preset demo:", ", ".join(f"{name}={value!r}" for name, value in changed.items()))',
            "elif preset is not None:",
            "    raise ValueError(f'preset = {preset!r}: use None (the defaults above) or \"demo\"')",
        ]
    )


ENVIRONMENT = [
    (
        "md",
        """# 1. Environment check

Before training anything, check that this machine can run the job: which versions of PyTorch, Transformers, TRL,
PEFT and bitsandbytes are installed, which accelerators PyTorch sees, whether Intel oneAPI is set up, and which of
the two backends can run here. Every problem the check finds comes with its fix; the check changes nothing.

The two backends: `native` (the default) uses PyTorch's own `xpu` device with bitsandbytes NF4, PEFT and TRL 1.x, and
needs only the GPU driver; `ipex-llm` is the original recipe's stack (intel-extension-for-pytorch, TRL < 0.12), which
needs oneAPI sourced before Python starts.""",
    ),
    (
        "params",
        params(
            model_name_or_path=MODEL,
            device=DEVICE,
            backend=BACKEND,
            max_length=MAX_LENGTH,
            max_prompt_length=MAX_PROMPT_LENGTH,
            bf16=BF16,
            per_device_train_batch_size="2  # pairs per forward pass",
            gradient_checkpointing="True  # recompute activations: less memory, ~30% slower",
        ),
    ),
    (
        "md",
        """## The report

`check_environment` gathers the facts (package versions, devices, oneAPI variables, `sycl-ls`) and judges them for
the chosen backend. Given the training settings above, it also estimates the peak memory of one DPO step (NF4
weights, LoRA and AdamW state, activations, the chunked log-prob tiles) and says whether it fits the device that
would train: the `memory` verdict. The table lists everything it found; the verdicts at the end say what is wrong
and how to fix it.""",
    ),
    (
        "code",
        """import pandas as pd

from dpo_xpu import check_environment, make_recipe, select_device

recipe = make_recipe(dict(
    model_name_or_path=model_name_or_path, device=device, backend=backend, max_length=max_length,
    max_prompt_length=max_prompt_length, bf16=bf16, per_device_train_batch_size=per_device_train_batch_size,
    gradient_checkpointing=gradient_checkpointing,
))
report = check_environment(backend=backend, recipe=recipe)
print(report.to_table())""",
    ),
    (
        "md",
        """## Verdicts and their fixes

The same verdicts as a table: `error` stops a run, `warning` lets it run slower or with a limitation, `ok` is a
check that passed. Fix the errors before going on to notebook 3.""",
    ),
    ("code", """pd.DataFrame(report.to_dict()["verdicts"]).style.set_properties(**{"text-align": "left"})"""),
    (
        "md",
        """## Which device will be used

`select_device("auto")` picks an Intel GPU (`xpu`) first, then an NVIDIA GPU (`cuda`), then the CPU. Asking for a
device that is not there (say `device = "xpu"` on a machine without one) stops here with an error that says what is
missing and how to install it, rather than silently training on the CPU.""",
    ),
    (
        "code",
        """chosen_device = select_device(device)
print(f"device={device!r} -> {chosen_device}; errors in the report: {report.has_errors}")""",
    ),
    (
        "md",
        """## No XPU on Intel Tiber AI Cloud (or another Intel GPU machine)?

1. **Kernel.** Pick **Python (dpo_xpu)**: `make kernel` registers it for this project's `.venv`, where
   `make setup TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/xpu"` put PyTorch's XPU wheels
   (reload the JupyterLab page if it is not listed yet). Not a plain "Python 3" kernel from another environment:
   it may have a CPU-only PyTorch, and the report then says `torch.version.xpu=None`. The preinstalled
   **PyTorch GPU** kernel carries Intel's older stack (intel-extension-for-pytorch): use it only with the
   ipex-llm backend, after `source setup_oneapi.sh max` in the terminal that starts Jupyter (point 4).
2. **Driver.** In a terminal, `sycl-ls` (or `xpu-smi discovery`) must list a Level Zero GPU and `/dev/dri/renderD*`
   must exist and be readable by you (`groups` shows `render`). If not, install Intel's GPU driver
   (dgpu-docs.intel.com) or ask the cloud's support to attach the GPU.
3. **PyTorch.** The native backend needs PyTorch's XPU wheels:
   `pip install torch --index-url https://download.pytorch.org/whl/xpu`, then `torch.xpu.is_available()` is `True`.
4. **ipex-llm backend only.** Run `source setup_oneapi.sh` (with `arc`, `flex`, `max` or `igpu`) in a terminal and
   start Jupyter from that shell: the oneAPI variables must exist before the kernel process starts, so restarting
   the kernel from a Jupyter started elsewhere is not enough.

Then restart the kernel and run this notebook again.""",
    ),
]

DATA_NB = [
    (
        "md",
        """# 2. Preference data

DPO learns from pairs: for one prompt, an answer people preferred (`chosen`) and one they did not (`rejected`).
This notebook loads Intel/orca_dpo_pairs (or a local file in its columns), looks at a few rows, turns them into the
ChatML text the model is trained on, and measures how long they are in tokens, which sets `max_length`.""",
    ),
    (
        "params",
        params(
            model_name_or_path=MODEL,
            dataset_name_or_path=DATA,
            limit=LIMIT,
            seed=SEED,
            max_length=MAX_LENGTH,
            max_prompt_length=MAX_PROMPT_LENGTH,
            num_examples="3  # raw rows shown",
        ),
    ),
    (
        "md",
        """## Load the pairs

`load_orca_dpo_pairs` reads the hub dataset or a local `.jsonl`/`.json`/`.parquet` file and checks every row; a bad
row stops here with its line number, its column and the fix. `limit` keeps a seeded random subset. Offline or on a
CPU-only machine, set `preset = "demo"` in the parameters cell: the shipped sample and the tiny demo model, nothing
to download.""",
    ),
    (
        "code",
        """%matplotlib inline
import pandas as pd

from dpo_xpu import (
    format_orca_dataset, length_summary, load_orca_dpo_pairs, load_tokenizer, plot_token_lengths, token_lengths,
)

rows = load_orca_dpo_pairs(dataset_name_or_path, limit=limit, seed=seed)
rows""",
    ),
    (
        "md",
        """## A few raw rows

The columns: `system` is the system prompt (it may be empty), `question` the user's request, `chosen` the preferred
answer (from GPT-4 or GPT-3.5, as in the OpenOrca data) and `rejected` a worse one (generated by Llama-2-13B-chat for
Intel's set). Nothing marks why one answer is better: the model has to learn it from many pairs.""",
    ),
    (
        "code",
        """pd.set_option("display.max_colwidth", 300)
rows.select(range(min(num_examples, len(rows)))).to_pandas()""",
    ),
    (
        "md",
        """## ChatML formatting

`chatml_format` writes the system and user turns with the chat template, then opens the assistant turn
(`<|im_start|>assistant`); each answer ends with `<|im_end|>`. A model that speaks ChatML has one token for each of
these markers; a tokenizer without them (like a tiny test model's) splits them into ordinary pieces. The check inside
stops a row whose prompt's last token would merge with its answer's first token.""",
    ),
    (
        "code",
        """tokenizer = load_tokenizer(model_name_or_path)
pairs = format_orca_dataset(rows, tokenizer)
example = pairs[0]
for column in ("prompt", "chosen", "rejected"):
    print(f"----- {column} -----\\n{example[column]}")""",
    ),
    (
        "md",
        """The same prompt as the model sees it: the last tokens of the prompt, special tokens included.""",
    ),
    (
        "code",
        """prompt_ids = tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
print(len(prompt_ids), "prompt tokens, ending", tokenizer.convert_ids_to_tokens(prompt_ids)[-8:])""",
    ),
    (
        "md",
        """## Token lengths

Memory and time grow with the sequence length, so long pairs are cut: the prompt keeps its last `max_prompt_length`
tokens, and prompt + answer its first `max_length` tokens (an answer then loses its end). The histograms show how
long prompts and answers are, with the limits marked.""",
    ),
    (
        "code",
        """lengths = token_lengths(pairs, tokenizer)
summary = length_summary(lengths, max_length, max_prompt_length)
display(pd.DataFrame(summary["stats"]))
plot_token_lengths(lengths, max_length, max_prompt_length)""",
    ),
    (
        "md",
        """## What `max_length` keeps

A row is kept whole when its (cut) prompt and its longer answer fit in `max_length`. Truncated rows still train,
on the beginning of their answers; rows whose prompt alone fills `max_length` are dropped by TRL. If many rows are
truncated, raise `max_length` (more memory) or filter long rows out.""",
    ),
    (
        "code",
        """print(f"{summary['kept_whole']} of {summary['rows']} rows fit whole in max_length={max_length}; "
      f"{summary['prompt_cut']} prompts cut to {max_prompt_length} tokens; "
      f"{summary['truncated']} rows truncated; {summary['dropped']} dropped")""",
    ),
]

TRAINING = [
    (
        "md",
        """# 3. DPO training

This notebook trains the policy with Direct Preference Optimization: a 4-bit NF4 copy of the base model with small
trainable LoRA adapters learns to give preferred answers more probability than rejected ones, relative to the
frozen base. It writes the run folder `output_dir` (recipe, environment, metrics, reward curves, adapter), which
notebook 4 evaluates.""",
    ),
    (
        "md",
        r"""## The DPO objective

DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
eq. 7) minimises, over pairs of a prompt $x$, a chosen answer $y_w$ and a rejected answer $y_l$:

$$
\mathcal{L}_\mathrm{DPO}(\pi_\theta; \pi_\mathrm{ref}) = -\,\mathbb{E}_{(x, y_w, y_l) \sim \mathcal{D}}
\left[ \log \sigma \left( \beta \log \frac{\pi_\theta(y_w \mid x)}{\pi_\mathrm{ref}(y_w \mid x)}
- \beta \log \frac{\pi_\theta(y_l \mid x)}{\pi_\mathrm{ref}(y_l \mid x)} \right) \right]
$$

$\pi_\theta$ is the policy being trained, $\pi_\mathrm{ref}$ the frozen starting model (here: the same NF4 base with
the adapters switched off) and $\sigma$ the logistic function. Each term $\beta \log \frac{\pi_\theta(y \mid x)}
{\pi_\mathrm{ref}(y \mid x)}$ is the answer's implicit *reward* (eq. 5). $\beta$ is the strength of the KL penalty
that keeps the policy near the reference (eq. 3): a small $\beta$ (0.1 here, as in the original recipe) lets the
policy move further from the reference; a large one keeps it close and makes the rewards grow faster per nat moved.""",
    ),
    (
        "params",
        params(
            model_name_or_path=MODEL,
            dataset_name_or_path=DATA,
            output_dir=OUTPUT,
            max_steps="200  # optimizer steps",
            device=DEVICE,
            backend=BACKEND,
            limit=LIMIT,
            eval_fraction=EVAL_FRACTION,
            seed=SEED,
            max_length=MAX_LENGTH,
            max_prompt_length=MAX_PROMPT_LENGTH,
            learning_rate="5e-5  # AdamW",
            beta="0.1  # DPO beta (KL strength)",
            bf16=BF16,
            per_device_train_batch_size="2  # pairs per forward pass",
            gradient_accumulation_steps="8  # pairs per step: batch size x accumulation",
            warmup_steps="50",
            gradient_checkpointing="True  # recompute activations: less memory, ~30% slower",
            overwrite="False  # True replaces a run already in output_dir",
            recipe_overrides=(
                "{}  # any other recipe key (docs: Recipes and options), e.g. "
                '{"loss_type": "ipo", "eval_steps": 20}, or the fastest: '
                '{"reference": "precomputed", "prefix_sharing": True}'
            ),
        ),
    ),
    (
        "md",
        """## The recipe and the run folder

Every setting goes into one recipe (the parameters above; LoRA rank 16, alpha 16, cosine schedule and the
adapter-off reference are the recipe's defaults; TRL turns dropout off for DPO). The run folder gets the recipe
and the environment report first, so a run can always be traced back to what produced it. An existing run is
never overwritten silently.""",
    ),
    (
        "code",
        """%matplotlib inline
import pandas as pd

from dpo_xpu import (
    DpoXpuError, describe_step0, load_run_data, load_run_models, load_tokenizer, make_dpo_trainer, make_recipe,
    plot_reward_curves, read_metrics, save_adapter, start_run,
)

recipe = make_recipe(dict(
    model_name_or_path=model_name_or_path, dataset_name_or_path=dataset_name_or_path, output_dir=output_dir,
    max_steps=max_steps, device=device, backend=backend, limit=limit, eval_fraction=eval_fraction, seed=seed,
    max_length=max_length, max_prompt_length=max_prompt_length, learning_rate=learning_rate, beta=beta, bf16=bf16,
    per_device_train_batch_size=per_device_train_batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
    warmup_steps=warmup_steps, gradient_checkpointing=gradient_checkpointing, **recipe_overrides,
))
run_dir = start_run(recipe, overwrite=overwrite)  # recipe.yaml and environment.json first
print(run_dir.resolve())""",
    ),
    (
        "md",
        """## Data

The pairs are loaded and ChatML-formatted as in notebook 2, then split with a fixed seed: training sees only the
`train` part; the `eval_fraction` held out is what notebook 4 evaluates, and it finds the same rows again from the
recipe saved above.

The tokenizer here and the model below come from `model_name_or_path`. A hub id is downloaded on first use into
the Hugging Face cache (`~/.cache/huggingface`; Qwen2.5-1.5B-Instruct is about 3.1 GB). **Offline or on a
CPU-only machine, set `preset = "demo"` in the parameters cell**: the tiny demo model and the shipped sample, no
download. Without a network a hub id fails here, after about a minute of retries, with one line that says what
to do; `HF_HUB_OFFLINE=1` in the environment that starts Jupyter makes it fail at once.""",
    ),
    (
        "code",
        """try:
    tokenizer = load_tokenizer(recipe.model_name_or_path)
except DpoXpuError as error:  # e.g. a hub id without network: show its message alone, not a traceback
    error._render_traceback_ = lambda line=f"{type(error).__name__}: {error}": [line]  # what IPython displays
    raise
train_pairs, heldout_pairs = load_run_data(recipe, tokenizer)
print(f"{len(train_pairs)} training pairs, {len(heldout_pairs) if heldout_pairs is not None else 0} held out")""",
    ),
    (
        "md",
        """## Models: the NF4 policy with LoRA, and the reference

The base is loaded with its linear layers in 4-bit NormalFloat (NF4, Dettmers et al. 2023), which cuts weight
memory about 4x, and LoRA adapters (Hu et al. 2021) are added to the attention and MLP projections: only they are
trained. The reference is the same model with the adapters switched off, so no second copy is loaded.""",
    ),
    (
        "code",
        """policy, reference = load_run_models(recipe)
policy.print_trainable_parameters()
print("device:", next(policy.parameters()).device, "| reference:", recipe.reference)""",
    ),
    (
        "md",
        """## The trainer

`make_dpo_trainer` maps the recipe onto TRL's `DPOConfig` (AdamW, the learning-rate schedule, lengths, bf16) and
builds TRL's `DPOTrainer`, which computes the loss above. It adds two callbacks: one appends every logged step to
`metrics.jsonl`, the other redraws the reward curves below the training cell and saves them as `reward_curves.png`.""",
    ),
    (
        "code",
        """# the held-out pairs are evaluated during training only when the recipe sets eval_steps
eval_pairs = heldout_pairs if recipe.eval_steps else None
trainer = make_dpo_trainer(recipe, policy, reference, tokenizer, train_pairs, eval_pairs)""",
    ),
    (
        "md",
        """## Train

The progress bar counts optimizer steps; the curves under it update at every logged step while training runs.
Stopping the cell keeps what was logged so far in `metrics.jsonl`.""",
    ),
    ("code", """train_output = trainer.train()"""),
    (
        "md",
        """## The final curves

Redrawn from `metrics.jsonl`, the record of the run (the same picture is in `reward_curves.png`).

How to read them:
- **Loss** starts at $\\ln 2 \\approx 0.693$: at step 0 the policy equals the reference, both log-ratios are 0 and
  $-\\log\\sigma(0) = \\ln 2$. It should fall below that line.
- **Rewards** start at 0 for the same reason. The *margin* (chosen minus rejected) should grow. The chosen reward
  itself often *falls*: the policy lowers the probability of both answers, the rejected one faster. That is normal
  for DPO, as long as the margin grows.
- **Accuracy** is the fraction of pairs whose chosen reward beats the rejected one. It is 0 at the first step
  (both rewards are exactly 0, and a tie does not count), then rises. Stuck near 0.5 for many steps: the adapters
  are not learning (learning rate, frozen weights). At 1.0 within a few steps: the task is too easy or the policy
  is moving too far (learning rate too high, `beta` too small); check the samples in notebook 4.

**With `preset = "demo"`** the accuracy reaches 1.0 within about five steps, which the point above calls a learning
rate too high. Here that is deliberate: the demo model is tiny (about 0.2M parameters) and random, and
`recipes/cpu_demo.yaml` sets `learning_rate: 2.0e-3`, 40 times a real run's 5e-5, so that the margin opens clearly
within 30 steps on a CPU. With 2 pairs per step the accuracy can only be 0, 0.5 or 1. Do not take that learning
rate to a real model.

The line under the curves is the **step-0 check**: at the first step the rewards must be 0 (and the loss ln 2).
When they are not, the reference does not compute what the policy computes (another dtype, device or kernel),
every reward above is biased by the gap it prints, and it names the likely cause.""",
    ),
    (
        "code",
        """metrics = read_metrics(run_dir)
display(plot_reward_curves(metrics))
print(describe_step0(metrics))
pd.DataFrame(metrics).iloc[[0, -1]]""",
    ),
    (
        "md",
        """## Save the adapter

Only the LoRA adapter is saved (a few MB, not the base), with the tokenizer, in `<output_dir>/adapter`. Notebook 4
loads it on top of the base, evaluates it and merges it into a standalone bf16 model.""",
    ),
    (
        "code",
        """adapter_dir = save_adapter(trainer, tokenizer, run_dir)
sorted(path.name for path in run_dir.iterdir())""",
    ),
]

EVALUATION = [
    (
        "md",
        """# 4. Evaluation and export

This notebook measures what training changed, on the pairs held out from training: how often the trained policy
prefers the chosen answer (its reward accuracy), by how much (the margin), and how far it drifted from the
reference. It then shows the policy's and the reference's answers side by side, and merges the adapter into a bf16
copy of the base that loads without PEFT or bitsandbytes.""",
    ),
    (
        "params",
        params(
            model_name_or_path=MODEL,
            dataset_name_or_path=DATA,
            output_dir=OUTPUT,
            device=DEVICE,
            backend=BACKEND,
            limit=LIMIT,
            eval_fraction=EVAL_FRACTION,
            seed=SEED,
            bf16=BF16,
            max_eval_pairs="200  # evaluate at most this many held-out pairs",
            batch_size="4  # sequences per forward pass",
            num_samples="4  # held-out prompts answered by policy and reference",
            max_new_tokens="128  # tokens per generated answer, at most",
            merge_rtol="0.02  # merged and adapter logits may differ by this share of the largest logit",
        ),
    ),
    (
        "md",
        """## The run and its held-out pairs

The run's `recipe.yaml` (written by notebook 3) gives back the exact split: the same data, `limit`, `seed` and
`eval_fraction` select the same held-out rows, none of which was trained on. The parameters above must match the
run's; a mismatch stops here rather than evaluating on training rows.""",
    ),
    (
        "code",
        """from pathlib import Path

import pandas as pd
import torch

from dpo_xpu import (
    check_merged_logits, evaluate_preferences, generate_samples, load_run_data, load_run_recipe, load_tokenizer,
    load_trained_policy, merge_and_save, write_evaluation,
)

run_dir = Path(output_dir)
recipe = load_run_recipe(run_dir, model_name_or_path=model_name_or_path, dataset_name_or_path=dataset_name_or_path,
                         limit=limit, eval_fraction=eval_fraction, seed=seed)
tokenizer = load_tokenizer(run_dir / "adapter")
_, heldout = load_run_data(recipe, tokenizer)
heldout = heldout.select(range(min(max_eval_pairs, len(heldout))))
print(f"{len(heldout)} held-out pairs from {run_dir.resolve()}")""",
    ),
    (
        "md",
        """## The trained policy

The base is loaded as in training (NF4) with the saved adapter on top. Switching the adapter off gives the
reference, so both are measured with the same weights and the same kernels.""",
    ),
    (
        "code",
        """dtype = torch.bfloat16 if bf16 else torch.float32
adapter_dir = run_dir / "adapter"
policy = load_trained_policy(recipe.model_name_or_path, adapter_dir, recipe.quantization, device, dtype, backend)""",
    ),
    (
        "md",
        r"""## Reward accuracy, margin and drift

For each held-out pair the implicit rewards $r = \beta \log \frac{\pi_\theta(y \mid x)}{\pi_\mathrm{ref}(y \mid x)}$
(Rafailov et al. 2023, eq. 5) of both answers are computed from summed answer-token log-probabilities. `reward_accuracy`
is the fraction of pairs whose chosen reward is higher (0.5 is chance); `mean_margin` the mean of chosen minus
rejected reward. `drift_chosen_logratio`, the mean $\log \pi_\theta(y_w \mid x) - \log \pi_\mathrm{ref}(y_w \mid x)$ in
nats, is a one-sample estimate of how far the policy moved from the reference (the KL divergence that $\beta$
penalises); it is exact only for answers sampled from the policy, so read it as an indicator.""",
    ),
    (
        "code",
        """metrics = evaluate_preferences(policy, tokenizer, heldout, beta=recipe.beta, batch_size=batch_size,
                               max_length=recipe.max_length, max_prompt_length=recipe.max_prompt_length)
pd.Series(metrics).to_frame("held out")""",
    ),
    (
        "md",
        """## Policy and reference, side by side

Greedy answers (no sampling, so they are reproducible) of the trained policy and of the reference to the first
held-out prompts. Numbers say how often; these say how: look for the preferred style (steps, brevity, no refusal)
and for damage (repetition, broken endings), which a too-high learning rate or too-small `beta` causes.

**With `preset = "demo"`** the policy answers `""` to every prompt (in `samples.jsonl` too), and the reference
answers random pieces of words. Both are what the demo's model can do, not a fault of the evaluation. The
reference is the untrained demo model: random weights, so random tokens. The policy emits the space token at
every one of its 48 steps, and answers are shown stripped of surrounding whitespace, hence `""`. That is the
shortcut the deliberately high learning rate found: in the shipped sample the chosen answers are longer than the
rejected ones (about 66 tokens against 40) and hold more lone spaces (4.5 against 1.7 per answer), so raising
the space token's probability everywhere raises the chosen answers' reward more than the rejected ones', and a
random model has nothing better to go on. A real model at a real learning rate answers in words; empty or
repeated answers there are the damage described above.""",
    ),
    (
        "code",
        """samples = generate_samples(policy, tokenizer, heldout["prompt"][:num_samples], max_new_tokens=max_new_tokens)
pd.DataFrame(samples).style.set_properties(**{"white-space": "pre-wrap", "text-align": "left"})""",
    ),
    (
        "md",
        """## Merge the adapter into a bf16 model

For use without PEFT and bitsandbytes, the adapter is merged into the base loaded in bf16 (not NF4: 4-bit weights
would round the small update away). The merged model is saved in `<output_dir>/merged`, reloaded from disk, and its
logits compared with the adapter applied to the same bf16 base, both computed in float32. What differs is the one
rounding of the merged weights to bf16, so expect about 1e-2 of the logits' scale, not 1e-6; `adapter_effect`
says how much the adapter moves the logits at all.""",
    ),
    (
        "code",
        """merged_dir = merge_and_save(adapter_dir, recipe.model_name_or_path, run_dir / "merged")
merge = check_merged_logits(merged_dir, adapter_dir, heldout["prompt"][:2], recipe.model_name_or_path)
merge["matches"] = merge["max_abs_diff"] <= merge_rtol * merge["max_abs_logit"]
merge""",
    ),
    (
        "md",
        """## Write the results

`evaluation.json` holds the figures above under their names (the merge check under `merge`), and `samples.jsonl`
one line per prompt with the policy's and the reference's answers, in the run folder next to the training record.
The merged model loads anywhere: `AutoModelForCausalLM.from_pretrained("<output_dir>/merged")`.""",
    ),
    (
        "code",
        """paths = write_evaluation(run_dir, {**metrics, "merge": merge}, samples)
assert merge["matches"], f"merged model's logits differ from the adapter model's: {merge}"
[str(path) for path in paths]""",
    ),
]

NOTEBOOKS = {
    "01_environment_check.ipynb": ENVIRONMENT,
    "02_preference_data.ipynb": DATA_NB,
    "03_dpo_training.ipynb": TRAINING,
    "04_evaluation_and_export.ipynb": EVALUATION,
}


def build(cells: list[tuple[str, str]], stem: str) -> object:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    expanded = []
    for kind, text in cells:
        expanded.append((kind, text))
        if kind == "params":  # every parameters cell is followed by its preset cell
            expanded.append(("code", preset_cell(text)))
    for index, (kind, text) in enumerate(expanded):
        cell_id = f"{stem}-{index:02d}"
        if kind == "md":
            nb.cells.append(nbformat.v4.new_markdown_cell(text, id=cell_id))
        else:
            cell = nbformat.v4.new_code_cell(text, id=cell_id)
            if kind == "params":
                cell.metadata["tags"] = ["parameters"]
            nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def main(argv: list[str] | None = None) -> int:
    import nbformat

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a notebook differs from this script")
    args = parser.parse_args(argv)
    stale = []
    for name, cells in NOTEBOOKS.items():
        text = nbformat.writes(build(cells, name[:2])) + "\n"
        path = NOTEBOOKS_DIR / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(path)
    if stale:
        print(f"out of date: {', '.join(stale)}. Fix: python scripts/make_notebooks.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
