"""DPO step benchmark: throughput, peak memory, losses and MFU of each reference strategy, on one machine.

Each strategy runs in its own process (this script again, ``--in-process``), in ``--rounds`` interleaved rounds
(round 1 runs every strategy once, then round 2, ...), and the fastest round of each is reported, with every
round's pairs/s beside it: this machine is noisy (identical runs differ by up to 40%), and a fresh process per run
gives every strategy the same cold start (no reused allocator pages, no dataset or reference cache of an earlier
strategy). The strategies, on the same model, rows, batch and step count:

- ``defaults``: dpo_xpu's default recipe (``reference: auto``, ``prefix_sharing: auto``: on this stack the
  precomputed reference, cold, and prefix sharing), as ``dpo-xpu train`` runs it;
- ``original``: a separate frozen NF4 reference, loaded as the original recipe does (``reference: separate``);
- ``adapter-off``: the policy's own NF4 base with its LoRA adapters disabled (one copy of the weights);
- ``precomputed-cold``: reference log-probs computed first (time included) and written to an empty cache,
  then training runs the policy only (``dpo_xpu.train.reference_cache``);
- ``precomputed-warm``: the same, reading the cache the cold run of the same round wrote (a separate row: only a
  rerun on the same data gets it);
- ``prefix-sharing-cold`` / ``prefix-sharing-warm``: ``precomputed`` (cold, then warm cache) plus prefix sharing
  (``prefix_sharing: true``, :mod:`dpo_xpu.train.prefix_sharing`): each pair runs as one sequence, the prompt computed
  once, in the precompute and in training;
- ``ipex-llm``: the original stack (``backend: ipex-llm``, separate reference), only when ``import ipex_llm``
  works in the running environment; skipped otherwise;
- the peers, TRL as a skilled user would run it, from public APIs only (transformers' ``BitsAndBytesConfig``
  NF4 model, PEFT's ``prepare_model_for_kbit_training`` and ``LoraConfig`` passed to ``DPOTrainer`` as
  ``peft_config``, TRL's own loop and CPU path): ``trl-peft`` (the reference is the policy with its adapter
  disabled) and ``trl-precompute`` (plus ``precompute_ref_log_probs=True``, TRL's fastest option; TRL computes
  them in ``DPOTrainer.__init__``, inside the timed part). Same rows, prompts cut to ``max_prompt_length`` as
  dpo_xpu cuts them, same LoRA, optimizer and schedule. On CPUs with AVX512-BF16 the peers keep bitsandbytes from
  repacking NF4 weights for its inference kernel, without which TRL's training after its precompute gets no
  gradient through the NF4 layers (:func:`build_trl_peer`; ``--trl-cpu-repack`` runs TRL as it is).

Commands (from the project root)::

    python benchmarks/dpo_step.py                            # CPU: SmolLM2-135M-Instruct, 12 pairs, 3 rounds
    python benchmarks/dpo_step.py --quick                    # CPU, one round, 3 steps of batch 1
    python benchmarks/dpo_step.py --model qwen2-0.5b         # the 0.5B-size, 151,936-token vocabulary case
    python benchmarks/dpo_step.py --device xpu               # Intel GPU: 20 steps, batch 2, max_length 1024
    python benchmarks/dpo_step.py --device cuda --steps 20   # same path on a CUDA GPU
    python benchmarks/dpo_step.py --model tiny --steps 2     # seconds: the tests run this end to end
    python benchmarks/dpo_step.py --device xpu --nproc 2     # also 2 data-parallel processes (torchrun)

With ``--nproc N`` (N > 1) each strategy also runs under ``torchrun --standalone --nproc_per_node N`` (DDP, one
device per process, the same per-device batch: N times the pairs per step) and each row gets
``nproc_pairs_per_s`` and ``scaling_efficiency`` = ``nproc_pairs_per_s / (N x pairs_per_s)``: 1.0 is perfect
scaling. On a CPU the processes share the same cores, so there the figure checks that the path works (and costs
what the all-reduce costs), not a speed-up.

The default model is the real SmolLM2-135M-Instruct (Llama architecture, 30 layers, vocabulary 49,152, ChatML
template; ``../shared``'s GGUF file, converted once under ``.cache/benchmark-models/``, with its own tokenizer),
NF4-quantized at load time, on the real orca rows from ``../shared`` (``DPO_XPU_SHARED``): by default (``--rows
fit``) the first ``steps x batch`` rows, in file order, whose prompt and both answers fit whole in ``max_length``
(so nothing is truncated), on the CPU 12 pairs of at most 320 tokens, batch 2, 6 steps. ``--model qwen2-0.5b``
is the Qwen2 architecture at the size of Qwen2.5-0.5B (hidden 896, 24 layers, 14 heads, 2 key-value heads,
intermediate 4864, vocabulary 151,936, tied embeddings) with random weights (seed 0) and the real Qwen2
tokenizer; ``--rows first`` takes the first rows after the recipe's seeded shuffle and truncates them, ``--rows
longest`` the longest rows cut to ``max_length`` (``benchmarks/scaling.py``'s, so that batches reach it). Results go
to a JSON file (``--out``, default ``benchmarks/results/dpo_step-<device>[-quick].json``) and a table on stdout.

Measurements:

- ``pairs_per_s``: preference pairs trained / wall seconds of the timed part: from model loading to the end of
  ``trainer.train()`` (the trainer's construction, any precompute and the training steps included).
  ``tokens_per_s``: non-padding tokens (prompt + answer, both answers) the same way, counted in TRL's
  two-sequence layout for every strategy (prefix sharing runs fewer: ``prefix_token_ratio``).
- ``peak_memory_mib``: on CPU, the highest process RSS during the timed part, sampled every 10 ms by a thread
  (psutil), minus the RSS before the strategy loaded its models, with glibc's mmap threshold fixed at 1 MiB so
  that freed tensors leave the RSS (:func:`fix_malloc_mmap_threshold`; ``--keep-malloc`` turns that off); the
  sampler can miss a spike shorter than 10 ms. On a GPU, the allocator's peak (``max_memory_allocated`` after
  ``reset_peak_memory_stats`` before loading; dpo_xpu's trainers reset it at each logged step, so the largest of the
  setup's, each step's ``perf/peak_memory_mib`` and the rest's).
- ``mfu``: model FLOPs per second / the matrix-multiply ceiling of the compute dtype measured here
  (``mfu_ceiling_gflops``: ``matmul_bf16_gflops`` for bf16 runs, ``matmul_fp32_gflops`` for float32 ones; best of a
  few ``n x n`` matmuls; a CPU without bf16 instructions emulates bf16 far below its float32 speed). Model FLOPs
  follow Kaplan et al. 2020 (sec. 2.1) and PaLM (Chowdhery et al. 2022, appendix B): ``6 N T`` for the policy's
  forward and backward plus ``2 N T`` per reference forward (each step for ``original``/``adapter-off``, once in the
  precompute for the cold cache, none for the warm cache), with the attention term ``12 L H Q S`` per token (``4 L H
  Q S`` forward only), ``N`` the parameters of the matrix multiplies (transformer layers and the output head;
  embeddings tied to the head count once), ``T`` the non-padding tokens (with prefix sharing, the tokens actually
  run: the prompt once per pair), ``S`` the mean sequence length (a token's context, unchanged by prefix sharing).
  Recompute by gradient checkpointing is not counted (that would be hardware FLOPs utilisation), and neither is the
  fact that the frozen NF4 base needs no weight gradient (the executed work of the policy is nearer ``4 N T``): the
  standard formula keeps numbers comparable across strategies and machines.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import logging
import os
import platform
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dpo_xpu.train.throughput import matmul_gflops, model_flops, synchronize

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DPO_XPU_SHARED", PROJECT_ROOT.parent / "shared")).resolve()
ORCA_ROWS = SHARED / "data" / "orca_dpo_pairs" / "sample-284.jsonl"
QWEN2_TOKENIZER = SHARED / "tokenizers" / "qwen2"
#: Real chat models (``--model`` keys): a GGUF file in ../shared, converted once into a Hugging Face folder.
REAL_MODELS = {"smollm2": SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"}
CACHE = PROJECT_ROOT / ".cache"
STRATEGIES = (
    "defaults",
    "original",
    "adapter-off",
    "precomputed-cold",
    "precomputed-warm",
    "prefix-sharing-cold",
    "prefix-sharing-warm",
    "ipex-llm",
    "trl-peft",
    "trl-precompute",
)
#: The models on the benchmark's command line: the real chat model first (the default), then the random ones.
DEFAULT_MODEL = "smollm2"
RESULT_KEYS = ("strategy", "pairs_per_s", "tokens_per_s", "peak_memory_mib", "first_loss", "last_loss", "mfu")

#: Qwen2 at the size of Qwen2.5-0.5B (its published config.json), and a tiny one with the same vocabulary.
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2-0.5b": {
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
    },
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "max_position_embeddings": 4096,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
    },
}

logger = logging.getLogger("dpo_step")


def model_folder(model: str) -> Path:
    """The folder of ``--model``: a real model converted once from ``../shared``'s GGUF, a random model built once,
    or the folder given; exits naming the missing shared asset."""
    if model in REAL_MODELS:
        from dpo_xpu.models.gguf import gguf_to_folder

        if not REAL_MODELS[model].is_file():
            sys.exit(f"missing shared asset {REAL_MODELS[model]}: set DPO_XPU_SHARED to the folder holding ../shared")
        return Path(gguf_to_folder(REAL_MODELS[model], cache_dir=CACHE / "benchmark-models"))
    return Path(model) if model not in MODEL_CONFIGS else build_random_model(model)


def build_random_model(name: str, cache_dir: Path = CACHE / "benchmark-models", seed: int = 0) -> Path:
    """Build (once) and return the folder of a randomly initialised Qwen2 model saved in bf16.

    Args:
        name: a key of :data:`MODEL_CONFIGS`.
        cache_dir: parent folder (git-ignored ``.cache/`` by default).
        seed: ``torch.manual_seed`` before initialisation, so every machine builds the same weights.

    Returns:
        ``<cache_dir>/<name>-random-seed<seed>``, holding ``config.json`` and ``model.safetensors``.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = cache_dir / f"{name}-random-seed{seed}"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    config = Qwen2Config(
        **MODEL_CONFIGS[name], bos_token_id=151643, eos_token_id=151645, pad_token_id=151643, dtype="bfloat16"
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    del model
    return folder


def fix_malloc_mmap_threshold(threshold: int = 1 << 20) -> bool:
    """Make glibc return freed blocks of ``threshold`` bytes or more to the OS at once (``mallopt``).

    By default glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
    freed tensors stay resident in the heap: the process's RSS then shows the allocator's high-water mark, not
    the memory the step needs (on the quick run, about 350 MiB more for ``adapter-off``). Fixing the
    threshold (the same as ``MALLOC_MMAP_THRESHOLD_``) costs page faults on fresh tensors, the same for every
    strategy. Returns ``False`` where glibc is absent.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, threshold)) and bool(libc.mallopt(-1, threshold))  # M_MMAP/TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def _trim_memory() -> None:
    from dpo_xpu.train.host_memory import release_freed_memory

    gc.collect()
    release_freed_memory()


class RssSampler:
    """A thread recording the process's highest resident set size (MiB) since the last :meth:`reset`, and the
    highest memory in use by glibc's allocator (``allocated_peak_mib``: its heap chunks and mmapped blocks in use,
    without the freed memory it keeps; the CPU's counterpart of ``torch.cuda.max_memory_allocated``, ``None``
    without glibc)."""

    def __init__(self, interval_s: float = 0.01) -> None:
        import psutil

        from dpo_xpu.train.host_memory import allocated_mib

        self.allocated_mib = allocated_mib  # glibc's in-use MiB now, or None without glibc
        self._process = psutil.Process()
        self.interval_s = interval_s
        self.peak_mib = 0.0
        self.allocated_peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def current_mib(self) -> float:
        return self._process.memory_info().rss / 2**20

    def reset(self) -> None:
        self.peak_mib = self.current_mib()
        self.allocated_peak_mib = self.allocated_mib()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, self.current_mib())
            allocated = self.allocated_mib()
            if allocated is not None:
                self.allocated_peak_mib = max(self.allocated_peak_mib or 0.0, allocated)
            time.sleep(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Settings:
    model: str
    model_path: str
    device: str
    steps: int
    batch: int
    max_length: int
    max_prompt_length: int
    gradient_checkpointing: bool
    bf16: bool
    learning_rate: float
    rows: int
    fit_rows: bool = True
    trl_cpu_repack: bool = False
    longest_rows: bool = False


def _recipe(
    settings: Settings, reference: str | None, backend: str, output_dir: Path, prefix_sharing: bool | None = False
) -> Any:
    """The recipe of one strategy; ``None`` for ``reference`` or ``prefix_sharing`` keeps dpo_xpu's default."""
    from dpo_xpu.recipes import make_recipe

    chosen = {"reference": reference, "prefix_sharing": prefix_sharing}
    return make_recipe(
        {
            **{key: value for key, value in chosen.items() if value is not None},
            "model_name_or_path": settings.model_path,
            "dataset_name_or_path": str(ORCA_ROWS),
            "output_dir": str(output_dir),
            "backend": backend,
            "device": settings.device,
            "quantization": "nf4",
            "limit": None if settings.fit_rows or settings.longest_rows else settings.rows,
            "drop_long_rows": settings.fit_rows,
            "max_steps": settings.steps,
            "per_device_train_batch_size": settings.batch,
            "gradient_accumulation_steps": 1,
            "max_length": settings.max_length,
            "max_prompt_length": settings.max_prompt_length,
            "gradient_checkpointing": settings.gradient_checkpointing,
            "bf16": settings.bf16,
            "learning_rate": settings.learning_rate,
            "warmup_steps": 0,
            "lr_scheduler_type": "constant",
            "logging_steps": 1,
            "save_steps": 100000,
        }
    )


def run_strategy(strategy: str, settings: Settings, tokenizer: Any, work: Path, sampler: RssSampler) -> dict:
    """Load, train ``settings.steps`` steps and measure one strategy; returns one result row."""
    import torch

    from dpo_xpu.distributed import main_process_first, world_size
    from dpo_xpu.pipeline import load_run_data, load_run_models, make_dpo_trainer
    from dpo_xpu.train.reference_cache import attach_precomputed_reference
    from dpo_xpu.train.trl_internals import SCORING_METHODS

    defaults = strategy == "defaults"
    prefix_sharing = strategy.startswith("prefix-sharing")
    precomputed = strategy.startswith("precomputed") or prefix_sharing
    # The precomputed runs build an adapter-off trainer (no per-step reference) and attach the cache
    # themselves, so the precompute is inside the timed part and uses this benchmark's cache folder.
    reference = {"original": "separate", "ipex-llm": "separate", "defaults": None}.get(strategy, "adapter-off")
    backend = "ipex-llm" if strategy == "ipex-llm" else "native"
    recipe = _recipe(settings, reference, backend, work / "runs" / strategy, None if defaults else prefix_sharing)
    shutil.rmtree(recipe.output_dir, ignore_errors=True)
    ref_cache = work / "reference-logps"
    if defaults:  # the default recipe caches where dpo-xpu train does, unless DPO_XPU_CACHE_DIR says otherwise
        ref_cache = work / "reference-logps-defaults"
        os.environ["DPO_XPU_CACHE_DIR"] = str(ref_cache)
    if strategy.endswith("-cold") or defaults:
        shutil.rmtree(ref_cache, ignore_errors=True)
    train_dataset, _ = load_run_data(recipe, tokenizer)
    if settings.fit_rows or settings.longest_rows:  # fit: the first rows that fit whole (drop_long_rows)
        if len(train_dataset) < settings.rows:
            raise SystemExit(
                f"only {len(train_dataset)} rows fit in max_length={settings.max_length} tokens, {settings.rows} "
                "needed: raise --max-length, lower --steps or --batch, or pass --rows first"
            )
        keep = longest_rows(train_dataset, tokenizer, settings) if settings.longest_rows else range(settings.rows)
        train_dataset = train_dataset.select(keep)
    device = settings.device.split(":")[0]
    on_gpu = device in ("cuda", "xpu")

    _trim_memory()
    baseline = sampler.current_mib()
    allocated_baseline = sampler.allocated_mib()
    if on_gpu:
        getattr(torch, device).reset_peak_memory_stats()
    sampler.reset()
    start = time.perf_counter()  # from model loading to the end of training, as a user waits for it
    # (peak so far, resident now) after each phase, MiB; for "train", the training phase's own peak
    phases: dict[str, tuple[float, float]] = {}
    torch.manual_seed(recipe.seed)
    peer = strategy.startswith("trl-")
    if peer:
        from dpo_xpu.data.truncation import truncate_prompts

        pairs_dataset = truncate_prompts(train_dataset, tokenizer, recipe.max_prompt_length)
        # TRL precomputes in here
        trainer = build_trl_peer(strategy, recipe, pairs_dataset, tokenizer, settings.trl_cpu_repack)
        policy = reference_model = None
    else:
        policy, reference_model = load_run_models(recipe)
        phases["loading"] = (sampler.peak_mib - baseline, sampler.current_mib() - baseline)
        # the defaults' precompute (reference: auto) runs in here, as in `dpo-xpu train`
        trainer = make_dpo_trainer(recipe, policy, reference_model, tokenizer, train_dataset, live_plot=False)
    # `original` and TRL's peers compute as TRL does: on the CPU it scores every position in the LM head; dpo_xpu's
    # trainers score only the answer tokens there (as TRL itself does on XPU and CUDA), switched on for their own
    # passes by make_dpo_trainer: `original` drops that switch.
    if strategy == "original":
        for name in SCORING_METHODS:
            vars(trainer).pop(name, None)
    step_ends = StepTimer()
    trainer.add_callback(step_ends)
    del policy, reference_model
    # several processes: rank 0 computes (cold) and the others read its cache file
    info = (
        main_process_first(attach_precomputed_reference, trainer, recipe, cache_dir=ref_cache) if precomputed else None
    )
    phases["setup"] = (sampler.peak_mib - baseline, sampler.current_mib() - baseline)
    if defaults:
        info = getattr(trainer, "reference_cache_info", None)
        prefix_sharing = bool(getattr(trainer, "prefix_sharing", False))
        precomputed = info is not None
    # dpo_xpu's trainers reset the allocator's peak at each logged step (perf/peak_memory_mib): keep the setup's
    setup_peak = getattr(torch, device).max_memory_allocated() / 2**20 if on_gpu else None
    setup_rss_peak = sampler.peak_mib
    sampler.reset()  # the training phase's own resident peak (what the memory planner estimates)
    trainer.train()
    synchronize(settings.device)
    elapsed = time.perf_counter() - start
    phases["train"] = (sampler.peak_mib - baseline, sampler.current_mib() - baseline)
    peak_rss = max(setup_rss_peak, sampler.peak_mib) - baseline
    peak_allocated = (
        sampler.allocated_peak_mib - allocated_baseline
        if sampler.allocated_peak_mib is not None and allocated_baseline is not None
        else None
    )
    logs = [row for row in trainer.state.log_history if "loss" in row]
    peak_device = None
    if on_gpu:  # the setup's peak, each logged step's (perf/peak_memory_mib), the rest since the last log
        windows = [row["perf/peak_memory_mib"] for row in logs if "perf/peak_memory_mib" in row]
        peak_device = max(setup_peak, getattr(torch, device).max_memory_allocated() / 2**20, *windows)
    pairs = settings.steps * settings.batch * world_size()  # per-device batch on each of the processes
    tokens = int(logs[-1].get("num_tokens", 0)) if logs else 0
    if not tokens:  # TRL 0.11 logs no token count: every row is trained once (rows = steps x batch)
        tokens = trl011_tokens(trainer.train_dataset)
    config = trainer.model.get_base_model().config if hasattr(trainer.model, "get_base_model") else None
    config = config or trainer.model.config
    mean_seq = tokens / (2 * pairs) if pairs else 0.0
    # prefix sharing runs the prompt once per pair: count the tokens it ran (the same ratio in precompute and steps)
    shared = getattr(trainer, "prefix_sharing_tokens", None) if prefix_sharing else None
    ratio = shared["packed"] / shared["sequence"] if shared and shared["sequence"] else 1.0
    flops = model_flops(config, tokens * ratio, mean_seq)
    if strategy in ("original", "adapter-off", "ipex-llm", "trl-peft", "trl-precompute") or (
        precomputed and info is not None and not info.hit
    ):
        flops += model_flops(config, tokens * ratio, mean_seq, forward_only=True)
    row = {
        "strategy": strategy,
        "pairs_per_s": pairs / elapsed,
        "tokens_per_s": tokens / elapsed,
        "peak_memory_mib": peak_device if on_gpu else peak_rss,
        "first_loss": float(logs[0]["loss"]) if logs else None,
        "last_loss": float(logs[-1]["loss"]) if logs else None,
        "mfu": None,
        "seconds": elapsed,
        "steps": settings.steps,
        "pairs": pairs,
        "tokens": tokens,
        "model_flops": flops,
        "peak_rss_mib": peak_rss,
        "peak_allocated_mib": peak_device if on_gpu else peak_allocated,
        "baseline_rss_mib": baseline,
        "losses": [float(r["loss"]) for r in logs],
        "reference_cache_hit": None if info is None else info.hit,
        "precompute_seconds": None if info is None else info.seconds,
        "prefix_token_ratio": ratio,
        "answer_share": answer_share(trainer.train_dataset, settings.max_length),
        # prefix sharing runs a pair as one packed sequence: the planner's share of the two-sequence positions
        "position_share": position_share(trainer.train_dataset, settings.max_length) if prefix_sharing else 1.0,
        "prefix_sharing": prefix_sharing,
        "step_seconds": step_ends.seconds(),
        "sequence_tokens": sequence_tokens(train_dataset, tokenizer, settings),
        "pid": os.getpid(),
        "trl_cpu_repack": settings.trl_cpu_repack if peer else None,
        "phase_peaks_mib": {name: peak for name, (peak, _) in phases.items()},
        "phase_resident_mib": {name: now for name, (_, now) in phases.items()},
    }
    del trainer
    _trim_memory()
    for kind in ("cuda", "xpu"):
        if on_gpu and kind == device:
            getattr(torch, kind).empty_cache()
    return row


class StepTimer:
    """A ``TrainerCallback`` (duck-typed: transformers calls each hook it finds) noting when training began and when
    each optimizer step ended, for the wall seconds of each step (:meth:`seconds`): the first includes warm-up."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("on_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        self.times = [time.perf_counter()]

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter())

    def seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


def sequence_tokens(dataset: Any, tokenizer: Any, settings: Settings) -> list[int]:
    """Each pair's longer sequence in tokens, prompt + the longer answer, cut as TRL cuts them (the prompt to its last
    ``max_prompt_length`` tokens, then the answer to ``max_length``): the length its batch is padded to at least."""
    from dpo_xpu.data.lengths import token_lengths
    from dpo_xpu.data.truncation import kept_answer_length

    lengths = token_lengths(dataset, tokenizer)
    kept = []
    for p, c, r in zip(lengths["prompt"], lengths["chosen"], lengths["rejected"], strict=True):
        p = min(p, settings.max_prompt_length)
        kept.append(p + kept_answer_length(p, max(c, r), settings.max_length))
    return kept


def longest_rows(dataset: Any, tokenizer: Any, settings: Settings) -> list[int]:
    """The indices, in file order, of the ``settings.rows`` pairs with the longest sequences as trained
    (:func:`sequence_tokens`; ``--rows longest``): the pairs longer than ``max_length`` first, cut to it, so that
    each batch reaches ``max_length`` where enough pairs are that long, then the longest of the others."""
    lengths = sequence_tokens(dataset, tokenizer, settings)
    return sorted(sorted(range(len(lengths)), key=lambda i: -lengths[i])[: settings.rows])


def build_trl_peer(
    strategy: str, recipe: Any, train_dataset: Any, tokenizer: Any, keep_cpu_repack: bool = False
) -> Any:
    """A TRL ``DPOTrainer`` built as a user of TRL, transformers and PEFT would build it for ``recipe`` (no dpo_xpu
    code): the NF4 base from ``BitsAndBytesConfig``, ``prepare_model_for_kbit_training``, a ``LoraConfig`` handed
    to the trainer, and ``precompute_ref_log_probs=True`` for ``trl-precompute``.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks each NF4 layer for a bf16 inference kernel at its first
    eval-mode, no-grad call (TRL's precompute is one) and keeps it packed: the training steps after it then run that
    kernel, which has no backward (bitsandbytes warns "an autograd kernel was not registered ... silently incorrect
    behavior"): no gradient flows through the NF4 layers, and a layer with a bias (Qwen2's q/k/v) fails outright.
    So, unless ``keep_cpu_repack`` (``--trl-cpu-repack``: TRL as it runs by default, to see that), the peers turn
    the repack off with :func:`dpo_xpu.models.backends.native.disable_cpu_nf4_repack` (bitsandbytes' public
    ``Linear4bit.support_avx512bf16_for_cpu``), the call the troubleshooting page gives users who load NF4 models
    themselves: TRL's best configuration that trains correctly."""
    import torch
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    dtype = torch.bfloat16 if recipe.bf16 else torch.float32
    device = recipe.device
    model = AutoModelForCausalLM.from_pretrained(
        recipe.model_name_or_path,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        ),
        dtype=dtype,
        device_map={"": device},
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.gradient_checkpointing)
    if not keep_cpu_repack:
        from dpo_xpu.models.backends.native import disable_cpu_nf4_repack

        disable_cpu_nf4_repack(model)
    peft_config = LoraConfig(
        r=recipe.lora_r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=recipe.lora_target_modules,
        task_type="CAUSAL_LM",
    )
    args = DPOConfig(
        output_dir=recipe.output_dir,
        beta=recipe.beta,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler_type,
        warmup_steps=recipe.warmup_steps,
        max_steps=recipe.max_steps,
        per_device_train_batch_size=recipe.per_device_train_batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        max_length=recipe.max_length,
        gradient_checkpointing=recipe.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=recipe.bf16,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=recipe.seed,
        use_cpu=device == "cpu",
        precompute_ref_log_probs=strategy == "trl-precompute",
    )
    torch.manual_seed(recipe.seed)
    return DPOTrainer(
        model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer, peft_config=peft_config
    )


def _ipex_llm_available() -> tuple[bool, str]:
    try:
        import ipex_llm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not this environment"
        return False, f"import ipex_llm failed ({type(exc).__name__}: {exc})"
    return True, ""


def _unavailable(strategy: str) -> str | None:
    """Why ``strategy`` cannot run in this environment, or ``None`` when it can."""
    if strategy == "ipex-llm":
        ok, why = _ipex_llm_available()
        return None if ok else why
    from dpo_xpu.train.trl_config import trl_generation

    if importlib.util.find_spec("bitsandbytes") is None or trl_generation() != "1.x":
        return "needs the native stack (bitsandbytes >= 0.48 NF4, TRL 1.x: the environment .venv); this one lacks it"
    if strategy.startswith(("precomputed", "prefix-sharing")):
        import trl

        from dpo_xpu.train.trl_config import trl_generation

        if trl_generation() != "1.x":
            return f"needs TRL >= 1.0 (dpo_xpu's reference cache and prefix sharing); found TRL {trl.__version__}"
    return None


def _versions() -> dict[str, str]:
    """The installed versions of the libraries a run's numbers depend on (absent ones left out)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "dpo-xpu"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def _commit() -> str | None:
    """The project's git commit, ``+dirty`` when the tree has changes; ``None`` outside a git checkout."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _cpu_model() -> str | None:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``None``."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def machine_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": _cpu_model() or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "torch": torch.__version__,
        "versions": _versions(),
        "commit": _commit(),
    }
    kind = device.split(":")[0]
    if kind in ("cuda", "xpu") and getattr(torch, kind).is_available():
        info["device_name"] = getattr(torch, kind).get_device_name()
    try:
        import psutil

        info["memory_mib"] = psutil.virtual_memory().total / 2**20
    except ImportError:
        pass
    return info


def trl011_tokens(dataset: Any) -> int:
    """Non-padding tokens of both sequences of every row, from TRL 0.11's tokenized columns (0 without them)."""
    columns = ("chosen_input_ids", "rejected_input_ids")
    if not set(columns) <= set(dataset.column_names):
        return 0
    return sum(len(ids) for column in columns for ids in dataset[column])


def pair_lengths(dataset: Any, max_length: int) -> list[tuple[int, int, int]] | None:
    """Each pair's ``(prompt, chosen, rejected)`` token counts, answers cut as TRL's collator cuts them
    (``keep_start`` at ``max_length``); ``None`` for columns other than TRL 1.x's tokenized ones (``prompt_ids``,
    ``chosen_ids``, ``rejected_ids``)."""
    from dpo_xpu.data.truncation import kept_answer_length

    if not {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
        return None
    return [
        (len(p), kept_answer_length(len(p), len(c), max_length), kept_answer_length(len(p), len(r), max_length))
        for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
    ]


def answer_share(dataset: Any, max_length: int) -> float | None:
    """The largest share of a pair's ``2 * max_length`` positions that are answer tokens (scored by the LM head):
    the largest pair bounds the scored tile of a batch. ``None`` for TRL 0.11's columns (it has no answer-only
    scoring)."""
    lengths = pair_lengths(dataset, max_length)
    if lengths is None:
        return None
    return max(((c + r) / (2 * max_length) for _, c, r in lengths), default=1.0) or 1.0


def position_share(dataset: Any, max_length: int) -> float:
    """The largest share of a pair's ``2 * max_length`` two-sequence positions that prefix sharing runs: its prompt
    once and both answers (``prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected``); 1.0 for columns other than
    TRL 1.x's."""
    lengths = pair_lengths(dataset, max_length)
    if lengths is None:
        return 1.0
    return min(1.0, max(((p + 1 + c + r) / (2 * max_length) for p, c, r in lengths), default=1.0))


def plan_rows(settings: Any, config: Any, rows: list[dict]) -> list[dict[str, Any]]:
    """Put the planner's ``planner_mib`` and ``planner_error`` on measured result rows (skipped ones left out),
    from the shares they recorded: the largest ``answer_share`` of them, each row's own ``position_share``; returns
    the estimates (:func:`estimate_rows`)."""
    ran = [r for r in rows if not r.get("skipped") and not r.get("error")]
    share = max((r["answer_share"] for r in ran if r.get("answer_share")), default=1.0)
    positions = {r["strategy"]: r.get("position_share") or 1.0 for r in ran}
    estimates = estimate_rows(settings, config, [r["strategy"] for r in ran], share, positions)
    add_planner_error(ran, estimates)
    return estimates


#: The planner's configuration of each strategy: (reference, LM head scores every position on the CPU, TRL's
#: chunked log-probs rather than the full logits). TRL's CPU path, which ``original`` and the peers keep, scores
#: every position; TRL 1.x (dpo_xpu and the peers alike: ``DPOTrainer`` adds its fused LM head) computes chunked
#: log-probs, TRL 0.11 (ipex-llm) the full logits tensor.
PLANNER_CONFIG = {
    "defaults": ("precomputed", False, True),
    "original": ("separate", True, True),
    "adapter-off": ("adapter-off", False, True),
    "precomputed-cold": ("precomputed", False, True),
    "precomputed-warm": ("precomputed", False, True),
    "prefix-sharing-cold": ("precomputed", False, True),
    "prefix-sharing-warm": ("precomputed", False, True),
    "ipex-llm": ("separate", True, False),
    "trl-peft": ("adapter-off", True, True),
    "trl-precompute": ("precomputed", True, True),
}


def estimate_rows(
    settings: Settings,
    config: Any,
    strategies: list[str],
    scored: float = 1.0,
    positions: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """The memory planner's estimate for each strategy's settings (``dpo_xpu.train.memory.estimate_memory``,
    configured by :data:`PLANNER_CONFIG`).

    ``scored`` is the answer tokens' share of the positions (:func:`answer_share`): the LM head's share for
    dpo_xpu's strategies, and for every strategy on a GPU (TRL scores answer tokens only there). ``positions``: each
    strategy's share of the two-sequence positions its layers run (:func:`position_share`; default 1.0).
    """
    from dpo_xpu.train.memory import estimate_memory
    from dpo_xpu.train.trl_internals import LOGPROB_TILE

    on_cpu = settings.device.startswith("cpu")
    rows = []
    for strategy in strategies:
        reference, every_position, chunked = PLANNER_CONFIG[strategy]
        est = estimate_memory(
            config,
            quantization="nf4",
            reference=reference,
            batch=settings.batch,
            max_length=settings.max_length,
            gradient_checkpointing=settings.gradient_checkpointing,
            compute_dtype="bfloat16" if settings.bf16 else "float32",
            device=settings.device.split(":")[0],
            scored_fraction=1.0 if every_position and on_cpu else scored,
            chunked_logits=chunked,
            vocab_chunk=LOGPROB_TILE[1] if every_position else None,  # TRL's own tiles, or dpo_xpu's on the CPU
            position_fraction=(positions or {}).get(strategy, 1.0),
        )
        rows.append({"strategy": strategy, **est.to_dict()})
    return rows


def add_planner_error(results: list[dict], estimates: list[dict]) -> None:
    """Put the planner's ``planner_mib`` and ``planner_error`` (estimate / measured peak - 1) on each measured row."""
    by_name = {e["strategy"]: e for e in estimates}
    for row in results:
        estimate = by_name.get(row["strategy"])
        if estimate is None or row.get("skipped") or not row.get("peak_memory_mib"):
            continue
        row["planner_mib"] = estimate["total_mib"]
        row["planner_error"] = estimate["total_mib"] / planned_peak(row) - 1


def planned_peak(row: dict) -> float:
    """The measured peak the planner estimates: on the CPU the training phase's own resident peak (model loading,
    which can peak higher, is not a training step), on a GPU the run's allocator peak."""
    train = (row.get("phase_peaks_mib") or {}).get("train")
    return train if train and row.get("peak_rss_mib") == row["peak_memory_mib"] else row["peak_memory_mib"]


def write_results(
    path: Path,
    machine: dict,
    gflops: float,
    results: list[dict],
    extra: dict | None = None,
    ceiling_gflops: float | None = None,
) -> dict:
    """Write the benchmark JSON and return it.

    Schema: ``{"machine": {...}, "matmul_bf16_gflops": float, "mfu_ceiling_gflops": float, "results":
    [{"strategy", "pairs_per_s", "tokens_per_s", "peak_memory_mib", "first_loss", "last_loss", "mfu", ...}, ...],
    ...extra}``; ``mfu`` is filled here from each row's ``model_flops`` and ``seconds`` against
    ``ceiling_gflops`` (the matmul ceiling of the run's compute dtype; default ``gflops``, the bf16 one).
    """
    ceiling = ceiling_gflops or gflops
    for row in results:
        if row.get("model_flops") is not None and row.get("seconds"):
            row["mfu"] = row["model_flops"] / row["seconds"] / (ceiling * 1e9)
        missing = [k for k in RESULT_KEYS if k not in row]
        if missing:
            raise ValueError(f"result row {row.get('strategy')!r} lacks {missing}")
    payload = {"machine": machine, "matmul_bf16_gflops": gflops, "mfu_ceiling_gflops": ceiling}
    payload.update(results=results, **(extra or {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return payload


def format_table(payload: dict) -> str:
    """The results as a fixed-width text table, with ratios to ``original`` (or, without it, ``trl-precompute``)."""
    rows = payload["results"]
    base = next((r for name in ("original", "trl-precompute") for r in rows if r["strategy"] == name), None)
    base = base if base is not None and base.get("pairs_per_s") else None
    head = (
        f"{'strategy':<20}{'pairs/s':>9}{'tokens/s':>10}{'peak MiB':>10}{'first loss':>12}{'last loss':>11}"
        f"{'MFU':>8}{'x speed':>9}{'x mem':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"{r['strategy']:<20}skipped: {r['skipped']}")
            continue
        speed = r["pairs_per_s"] / base["pairs_per_s"] if base else float("nan")
        mem = r["peak_memory_mib"] / base["peak_memory_mib"] if base and base["peak_memory_mib"] else float("nan")
        lines.append(
            f"{r['strategy']:<20}{r['pairs_per_s']:>9.4f}{r['tokens_per_s']:>10.1f}{r['peak_memory_mib']:>10.0f}"
            f"{r['first_loss']:>12.6f}{r['last_loss']:>11.6f}{100 * (r['mfu'] or 0):>7.2f}%{speed:>9.2f}{mem:>7.2f}"
        )
    peer = next((r for r in rows if r["strategy"] == "trl-precompute" and r.get("pairs_per_s")), None)
    exact = next((r for r in rows if r["strategy"] == "trl-peft" and r.get("losses")), None)
    for r in rows:  # TRL's fastest option is the bar dpo_xpu's strategies are held to; trl-peft's losses the truth
        if r.get("skipped") or r["strategy"].startswith("trl-") or not r.get("pairs_per_s"):
            continue
        parts = []
        if peer is not None:
            parts.append(
                f"against trl-precompute: {r['pairs_per_s'] / peer['pairs_per_s']:.2f}x pairs/s, "
                f"{r['peak_memory_mib'] / peer['peak_memory_mib']:.2f}x peak memory"
            )
        if exact is not None and len(exact["losses"]) == len(r["losses"]):
            gap = max(abs(a - b) for a, b in zip(r["losses"], exact["losses"], strict=True))
            parts.append(f"losses within {gap:.1e} of trl-peft's")
        if parts:
            lines.append(f"{r['strategy']:<20}{'; '.join(parts)}")
    for r in rows:
        if r.get("rounds_pairs_per_s") and len(r["rounds_pairs_per_s"]) > 1:
            speeds = ", ".join(f"{v:.4f}" for v in r["rounds_pairs_per_s"])
            lines.append(f"{r['strategy']:<20}rounds: {speeds} pairs/s (fastest / slowest {r['rounds_spread']:.2f})")
    for r in rows:
        if r.get("scaling_efficiency") is not None:
            lines.append(
                f"{r['strategy']:<20}{r['nproc']} processes: {r['nproc_pairs_per_s']:.4f} pairs/s, scaling efficiency "
                f"{r['scaling_efficiency']:.2f}, peak {r['nproc_peak_memory_mib']:.0f} MiB per process"
            )
    if base is not None:
        lines.append(f"x speed, x mem: against {base['strategy']}")
    ceiling = payload.get("mfu_ceiling_gflops", payload["matmul_bf16_gflops"])
    lines.append(
        f"MFU against the matmul ceiling of the compute dtype: {ceiling:.1f} GFLOP/s on {payload['machine']['device']} "
        f"(bf16 {payload['matmul_bf16_gflops']:.1f} GFLOP/s)"
    )
    for r in rows:
        if r.get("planner_mib") is not None:
            allocated = r.get("peak_allocated_mib")
            lines.append(
                f"{r['strategy']:<20}planner {r['planner_mib']:.0f} MiB against {planned_peak(r):.0f} MiB "
                f"measured in training ({100 * r['planner_error']:+.0f}%)"
                + (
                    f"; allocator's peak in use {allocated:.0f} MiB"
                    if allocated and allocated != r["peak_memory_mib"]
                    else ""
                )
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="smollm2 (default: the real SmolLM2-135M-Instruct), qwen2-0.5b (random weights), tiny, or a model folder",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), xpu, cuda (optionally :N)")
    parser.add_argument("--quick", action="store_true", help="3 steps, batch 1, max_length 256, one round")
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per strategy (default 6 on a CPU, 20 on a GPU; quick 3)"
    )
    parser.add_argument("--batch", type=int, default=None, help="pairs per step (default 2; quick 1)")
    parser.add_argument(
        "--max-length", type=int, default=None, help="tokens per sequence (default 320 on a CPU, 1024 on a GPU)"
    )
    parser.add_argument("--max-prompt-length", type=int, default=None, help="default max_length x 2 // 3")
    parser.add_argument(
        "--rows",
        choices=("fit", "first", "longest"),
        default="fit",
        help="fit (default): the first rows that fit whole in max_length; first: the first rows, truncated; "
        "longest: the longest rows, cut to max_length (sequences that reach it)",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds, fastest reported (default 3; quick 1)"
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the strategies one after the other in this process, once (what each round's process does)",
    )
    parser.add_argument("--matmul-gflops", default=None, help=argparse.SUPPRESS)  # bf16,fp32: measured by the parent
    parser.add_argument("--no-gradient-checkpointing", action="store_true", help="default: checkpointing on")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto", help="auto: on for GPUs only")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated subset")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument(
        "--keep-malloc", action="store_true", help="CPU: keep glibc's dynamic mmap threshold (RSS = heap high-water)"
    )
    parser.add_argument(
        "--trl-cpu-repack",
        action="store_true",
        help="keep bitsandbytes' AVX512-BF16 repack in TRL's peers, as TRL runs by default (CPU: its training after "
        "the precompute then gets no gradient through the NF4 layers; see build_trl_peer)",
    )
    parser.add_argument("--work-dir", type=Path, default=CACHE / "benchmark-work", help="run folders and cache")
    parser.add_argument(
        "--nproc", type=int, default=1, help="also run each strategy on N data-parallel processes (torchrun)"
    )
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc must be at least 1, found {args.nproc}")
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be at least 1, found {args.rounds}")
    return args


def _forwarded(argv: list[str], drop: tuple[str, ...]) -> list[str]:
    """``argv`` without the options named in ``drop`` (and their values)."""
    forwarded, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in drop:
            skip = "=" not in arg and name not in ("--in-process", "--quick")
            continue
        forwarded.append(arg)
    return forwarded


def run_rounds(argv: list[str], strategies: list[str], rounds: int, work: Path, gflops: tuple[float, float]) -> dict:
    """Run each strategy in its own process (this script, ``--in-process``), ``rounds`` interleaved rounds, and
    return the payload of the fastest round of each: every row gains ``round`` (which one), ``rounds_pairs_per_s``
    (all of them, in order) and ``rounds_spread`` (fastest / slowest).

    Raises:
        RuntimeError: a process failed (its output's tail is in the message).
    """
    import subprocess

    base = _forwarded(argv, ("--nproc", "--out", "--strategies", "--rounds", "--in-process", "--matmul-gflops"))
    runs: dict[str, list[dict]] = {name: [] for name in strategies}
    payload: dict[str, Any] = {}
    for k in range(1, rounds + 1):
        for name in strategies:
            out = work / "rounds" / f"round{k}-{name}.json"
            out.unlink(missing_ok=True)
            command = [sys.executable, str(Path(__file__).resolve()), *base, "--in-process", "--strategies", name]
            command += ["--out", str(out), "--matmul-gflops", f"{gflops[0]},{gflops[1]}"]
            logger.info("round %d/%d: %s ...", k, rounds, name)
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0 or not out.is_file():
                raise RuntimeError(f"{name} (round {k}) failed (exit {result.returncode}): {result.stderr[-3000:]}")
            payload = json.loads(out.read_text())
            row = payload["results"][0]
            row["round"] = k
            runs[name].append(row)
            if not row.get("skipped"):
                logger.info("round %d/%d: %s: %.4f pairs/s", k, rounds, name, row["pairs_per_s"])
    results = []
    for name in strategies:
        rows = runs[name]
        if rows[0].get("skipped"):
            results.append(rows[0])
            continue
        speeds = [r["pairs_per_s"] for r in rows]
        best = max(rows, key=lambda r: r["pairs_per_s"])
        results.append({**best, "rounds_pairs_per_s": speeds, "rounds_spread": max(speeds) / min(speeds)})
    payload["results"] = results
    payload["rounds"] = rounds
    return payload


def run_nproc(argv: list[str], nproc: int, strategies: list[str], work: Path) -> dict[str, dict[str, Any]]:
    """Run the benchmark under ``torchrun --standalone --nproc_per_node nproc`` (this script, the same arguments,
    ``strategies`` only) and return rank 0's rows by strategy.

    Raises:
        RuntimeError: the processes failed (their output is in the message's tail).
    """
    import subprocess

    out = work / f"nproc{nproc}.json"
    out.unlink(missing_ok=True)
    # this run's arguments minus --nproc, --out, --strategies, --work-dir and --rounds, each process in itself
    forwarded = [*_forwarded(argv, ("--nproc", "--out", "--strategies", "--work-dir", "--rounds", "--in-process"))]
    forwarded.append("--in-process")
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)),
        str(Path(__file__).resolve()),
        *forwarded,
        *("--strategies", ",".join(strategies), "--out", str(out), "--work-dir", str(work / f"nproc{nproc}")),
    ]
    logger.info("%d processes: %s", nproc, " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{nproc} processes failed (exit {result.returncode}): {result.stderr[-3000:]}")
    return {row["strategy"]: row for row in json.loads(out.read_text())["results"]}


def add_scaling(results: list[dict], nproc_rows: dict[str, dict[str, Any]], nproc: int) -> None:
    """Put ``nproc``, ``nproc_pairs_per_s``, ``nproc_peak_memory_mib`` (per process) and ``scaling_efficiency``
    (``nproc_pairs_per_s / (nproc x pairs_per_s)``) on each row that ran both ways."""
    for row in results:
        other = nproc_rows.get(row["strategy"])
        if row.get("skipped") or other is None or other.get("skipped") or not row.get("pairs_per_s"):
            continue
        row.update(
            nproc=nproc,
            nproc_pairs_per_s=other["pairs_per_s"],
            nproc_peak_memory_mib=other["peak_memory_mib"],
            nproc_losses=other["losses"],
            scaling_efficiency=other["pairs_per_s"] / (nproc * row["pairs_per_s"]),
        )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "datasets", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch
    from transformers import AutoConfig

    from dpo_xpu.models.loading import load_tokenizer

    for path in (ORCA_ROWS, QWEN2_TOKENIZER):
        if not path.exists():
            sys.exit(f"missing shared asset {path}: set DPO_XPU_SHARED to the folder holding ../shared")
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        sys.exit(f"unknown strategies {unknown}: choose from {', '.join(STRATEGIES)}")
    from dpo_xpu.device import select_device
    from dpo_xpu.distributed import init_distributed, is_main_process, world_size

    init_distributed(select_device(args.device))  # under torchrun (--nproc): each rank on its own device
    on_gpu = args.device.split(":")[0] in ("cuda", "xpu")
    steps = args.steps or (3 if args.quick else 20 if on_gpu else 6)
    batch = args.batch or (1 if args.quick else 2)
    max_length = args.max_length or (256 if args.quick else 1024 if on_gpu else 320)
    rounds = args.rounds or (1 if args.quick else 3)
    torch.set_num_threads(os.cpu_count() or 1)
    fixed_malloc = not on_gpu and not args.keep_malloc and fix_malloc_mmap_threshold()
    model_path = model_folder(args.model)
    settings = Settings(
        model=args.model,
        model_path=str(model_path),
        device=args.device,
        steps=steps,
        batch=batch,
        max_length=max_length,
        max_prompt_length=args.max_prompt_length or max(1, max_length * 2 // 3),
        gradient_checkpointing=not args.no_gradient_checkpointing,
        bf16=on_gpu if args.bf16 == "auto" else args.bf16 == "on",
        learning_rate=5e-5,
        rows=steps * batch * world_size(),
        fit_rows=args.rows == "fit",
        longest_rows=args.rows == "longest",
        trl_cpu_repack=args.trl_cpu_repack,
    )
    logger.info("settings: %s", settings)
    out = args.out or PROJECT_ROOT / "benchmarks" / "results" / (
        f"dpo_step-{args.device.split(':')[0]}{'-quick' if args.quick else ''}.json"
    )
    if args.matmul_gflops:
        gflops, gflops_fp32 = (float(v) for v in args.matmul_gflops.split(","))
    else:
        size = 512 if args.model == "tiny" else 2048  # the tiny run checks the script, not the machine
        gflops = matmul_gflops(args.device, "bfloat16", n=size)
        gflops_fp32 = matmul_gflops(args.device, "float32", n=size)
        logger.info("matmul ceiling: bf16 %.1f GFLOP/s, float32 %.1f GFLOP/s", gflops, gflops_fp32)
    if not args.in_process:  # each strategy in its own process, interleaved rounds
        payload = run_rounds(argv, strategies, rounds, args.work_dir, (gflops, gflops_fp32))
        results = payload["results"]
    else:
        # the random Qwen2-architecture models use the real Qwen2 tokenizer; a real model or folder brings its own
        tokenizer = load_tokenizer(QWEN2_TOKENIZER if args.model in MODEL_CONFIGS else model_path)
        sampler = RssSampler()
        results = []
        for strategy in strategies:
            why = _unavailable(strategy)
            if why is not None:
                logger.info("%s skipped: %s", strategy, why)
                results.append({**dict.fromkeys(RESULT_KEYS), "strategy": strategy, "skipped": why})
                continue
            logger.info("strategy %s ...", strategy)
            row = run_strategy(strategy, settings, tokenizer, args.work_dir, sampler)
            logger.info("strategy %s: %s", strategy, {k: row[k] for k in RESULT_KEYS})
            results.append(row)
        sampler.stop()
    if not is_main_process():
        return {}
    if args.nproc > 1:
        ran = [r["strategy"] for r in results if not r.get("skipped")]
        add_scaling(results, run_nproc(argv, args.nproc, ran, args.work_dir), args.nproc)
    config = AutoConfig.from_pretrained(model_path)
    estimates = plan_rows(settings, config, results)
    payload = write_results(
        out,
        machine_info(args.device),
        gflops,
        results,
        ceiling_gflops=gflops if settings.bf16 else gflops_fp32,
        extra={
            "matmul_fp32_gflops": gflops_fp32,
            "malloc_mmap_threshold_fixed": fixed_malloc,
            "settings": asdict(settings),
            "processes": world_size(),
            "rounds": 1 if args.in_process else rounds,
            "one_process_per_strategy": not args.in_process,
            "memory_estimates": estimates,
        },
    )
    print(format_table(payload))
    print(f"written: {out}")
    return payload


if __name__ == "__main__":
    main()
