"""Memory planner: the expected peak memory of a DPO training step, by component, before loading anything.

From the model config (a Llama / Mistral / Qwen2-style decoder) and the recipe:

- ``weights``: NF4 linear layers at 4 bits plus a float32 absmax per 64-value block (Dettmers et al. 2023, "QLoRA",
  sec. 3), other parameters in float32 (PEFT's ``prepare_model_for_kbit_training``); twice for ``separate``;
- ``lora_and_optimizer``: LoRA matrices (Hu et al. 2021), their gradients and AdamW's two moments: 4 bytes each, or
  2 for QLoRA on TRL 1.x, which casts the adapters to bf16 (QLoRA sec. 3; the moments follow the parameter's dtype);
- ``activations``: what autograd keeps for the backward (:data:`ACT_PER_TOKEN_LAYER`), or one hidden state per
  layer with gradient checkpointing (Chen et al. 2016);
- ``logits``: TRL 1.x's tiled log-probs (:data:`LOGPROB_TILE`, :data:`CPU_TILE_COPIES`, :data:`GPU_TILE_COPIES`;
  answer tokens only where TRL scores only those: ``scored_fraction``; on the CPU dpo_xpu's narrower tiles,
  ``vocab_chunk``); on TRL 0.11 the full float32 logits;
- ``transients``: one layer's backward (recomputed activations, temporaries, on CPU a dequantised NF4 weight);
- ``runtime``: :data:`CPU_RUNTIME_MIB`, :data:`GPU_RUNTIME_MIB` (measured).

The LM head's backward runs before any layer's: the total is ``weights + lora_and_optimizer + runtime + activations
+ max(logits, transients)``. The estimate names its largest single allocation (Intel Arc A-series cards allocate at
most 4 GiB in one piece, intel/intel-extension-for-pytorch #325). Sequences count as padded to ``max_length``, or
as the share of those positions prefix sharing's packed rows run (``position_fraction``). Within 15% of the training
peaks ``benchmarks/dpo_step.py`` (CPU float32, SmolLM2-135M-Instruct: -2% to -0%) and ``benchmarks/scaling.py``
measure (CUDA bf16; CPU float32 at ``max_length`` 256-1024, batch 1-4: 25 of 27 peaks, the misses dpo_xpu's
defaults at batch 4 x 1024, +37%, and batch 1 x 256, -34%, glibc's freed heap; docs/performance.md). On the CPU
an NF4 model's activations count as float32 in bf16 too (bitsandbytes returns its input's dtype): CPU bf16 in
``docs/performance.md``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dpo_xpu.train.trl_internals import CPU_LOGPROB_CHUNK, LOGPROB_TILE

if TYPE_CHECKING:
    from dpo_xpu.recipes import Recipe
    from dpo_xpu.train.reference import ReferencePlan

logger = logging.getLogger(__name__)

MIB = 2**20
#: bitsandbytes' default NF4 block size: one float32 absmax per this many weights.
NF4_BLOCKSIZE = 64
#: Bytes per NF4 weight: 4 bits plus the block's float32 absmax.
NF4_BYTES_PER_PARAM = 0.5 + 4 / NF4_BLOCKSIZE
#: Values autograd keeps per token and layer without checkpointing, as ``a * hidden + b * intermediate``.
ACT_PER_TOKEN_LAYER = (16, 5)
#: Float32 tiles alive at once in the backward of TRL's torch fallback (CPU; ``tests/test_memory.py`` checks it): the
#: buffer, ``y``, ``z``, ``log_p``, ``p``, ``grad``, ``is_target.float() - p``, its product with the incoming
#: gradient, and the boolean ``is_target`` (a quarter).
CPU_TILE_COPIES = 8.25
#: Float32 tiles alive at once in TRL's in-place Triton kernels: one on CUDA (0.8 to 1.3 measured on an H200); on XPU
#: one plus its float32 upcast in the bf16 backward, with a margin (4) until measured; ``"gpu"`` (unknown) as XPU.
GPU_TILE_COPIES = {"cuda": 1, "xpu": 4, "gpu": 4}
#: The allocator's tensors the terms leave out (kernel workspaces, bitsandbytes' buffers, the LM head's input
#: gradient): 97 to 137 MiB measured on CUDA at every shape of ``benchmarks/scaling.py`` (60 to 100 while the LoRA
#: term counted QLoRA's bf16 adapters at float32's 16 bytes: the same fit, 37 MiB moved); within XPU's tile margin.
GPU_RUNTIME_MIB = {"cuda": 109, "xpu": 0, "gpu": 0}
#: Resident memory beyond the tensors on CPU (library state, oneDNN caches, glibc's free lists), measured as resident
#: memory minus glibc's peak in use: 57 MiB for dpo_xpu's defaults and for TRL's peer alike (benchmarks/dpo_step.py).
CPU_RUNTIME_MIB = 60
#: Share of the device's memory a recipe may plan to use (the rest: allocator fragmentation, runtime).
FIT_FRACTION = 0.9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: The largest single allocation an Intel Arc A-series GPU allows (intel/intel-extension-for-pytorch #325).
ARC_A_SERIES_MAX_ALLOCATION_MIB = 4096


def _dims(config: Any) -> tuple[int, int, int, int, int, int, bool]:
    """``(hidden, intermediate, layers, kv width, q width, vocabulary, tied)`` of a (text) config or its dict."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def get(name: str) -> Any:
        return text.get(name) if isinstance(text, dict) else getattr(text, name, None)

    hidden, heads, vocab = get("hidden_size"), get("num_attention_heads"), get("vocab_size")
    head_dim = get("head_dim") or hidden // heads
    kv_dim, tied = (get("num_key_value_heads") or heads) * head_dim, bool(get("tie_word_embeddings"))
    return hidden, get("intermediate_size"), get("num_hidden_layers"), kv_dim, heads * head_dim, vocab, tied


def linear_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """``{name: (in_features, out_features)}`` of one Llama-style decoder layer's projections."""
    hidden, inter, _, kv_dim, q_dim, _, _ = _dims(config)
    return {
        "q_proj": (hidden, q_dim),
        "k_proj": (hidden, kv_dim),
        "v_proj": (hidden, kv_dim),
        "o_proj": (q_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def matmul_parameters(config: Any) -> int:
    """Parameters in matrix multiplies per token (layers' projections and the output head): the ``N`` of the
    ``6 N T`` training-FLOPs rule (Kaplan et al. 2020, sec. 2.1); a tied embedding counts once, as the head."""
    hidden, _, layers, _, _, vocab, _ = _dims(config)
    per_layer = sum(i * o for i, o in linear_shapes(config).values())
    return layers * per_layer + vocab * hidden


@dataclass
class MemoryEstimate:
    """The expected peak memory of one training step (MiB = 2**20 bytes): ``components_mib`` (see the module),
    ``total_mib`` (their sum less the smaller of ``logits`` and ``transients``), ``full_logits_mib`` (the full
    float32 logits without TRL's chunking, not in the total), the ``settings`` it was made for, and the largest single
    tensor (``largest_allocation_mib``, and what it is in ``largest_allocation``)."""

    components_mib: dict[str, float]
    total_mib: float
    full_logits_mib: float
    settings: dict[str, Any] = field(default_factory=dict)
    largest_allocation_mib: float = 0.0
    largest_allocation: str = ""

    def parts(self) -> str:
        """The components in one line, MiB: ``"weights 165, ..., max(logits 912, transients 127)"``."""
        shown = {k: v for k, v in self.components_mib.items() if k not in ("logits", "transients")}
        head, layer = self.components_mib.get("logits", 0.0), self.components_mib.get("transients", 0.0)
        return (
            ", ".join(f"{k} {v:,.0f}" for k, v in shown.items()) + f", max(logits {head:,.0f}, transients {layer:,.0f})"
        )

    def to_dict(self) -> dict[str, Any]:
        """The estimate as a JSON-serialisable dict (MiB rounded to 0.1)."""
        out = {k: round(v, 1) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}
        return {**out, "components_mib": {k: round(v, 1) for k, v in self.components_mib.items()}}


def estimate_memory(
    config: Any,
    quantization: str = "nf4",
    reference: str = "adapter-off",
    batch: int = 1,
    max_length: int = 1024,
    gradient_checkpointing: bool = True,
    compute_dtype: str = "bfloat16",
    lora_r: int = 16,
    lora_targets: tuple[str, ...] | list[str] | None = None,
    device: str = "gpu",
    scored_fraction: float = 1.0,
    chunked_logits: bool = True,
    vocab_chunk: int | None = None,
    position_fraction: float = 1.0,
) -> MemoryEstimate:
    """The peak memory of a DPO training step (policy + reference), by component, as a :class:`MemoryEstimate`.

    Args:
        config: the model's ``PretrainedConfig`` (or a dict of its fields).
        quantization: ``"nf4"`` or ``"none"`` (weights in ``compute_dtype``: ``"bfloat16"``, ``"float16"`` or
            ``"float32"``, also the activations' dtype).
        reference: ``"adapter-off"``, ``"separate"`` (a second copy of the weights) or ``"precomputed"``.
        batch: pairs per step (two sequences each). max_length: tokens per sequence, padded to it.
        lora_targets: projection names with adapters; default all seven of :func:`linear_shapes`.
        device: ``"cuda"``, ``"xpu"`` or ``"gpu"`` (XPU's figures): the allocator's peak; ``"cpu"``: resident memory.
        scored_fraction: the share of positions the LM head scores, in (0, 1]: 1.0, or the answer tokens' share
            where only those are scored (about 0.5 on orca pairs at 256 tokens).
        chunked_logits: TRL 1.x's tiled log-probs; ``False`` for TRL 0.11's full float32 logits.
        vocab_chunk: vocabulary entries per log-prob tile; default dpo_xpu's trainers' (on the CPU
            :data:`~dpo_xpu.train.trl_internals.CPU_LOGPROB_CHUNK`, elsewhere TRL's ``LOGPROB_TILE[1]``); TRL's own
            trainer on the CPU: ``LOGPROB_TILE[1]``.
        position_fraction: the share of the ``2 * batch * max_length`` positions a micro-batch runs through the
            layers, in (0, 1]: 1.0 (two sequences per pair, padded: TRL's layout, and the bound a fit check uses),
            or less where prefix sharing runs each prompt once in packed rows without padding (dpo_xpu's default
            on the CPU; the largest pair's ``(prompt + chosen + rejected) / (2 * max_length)`` bounds it).

    Raises:
        ValueError: an unknown ``quantization``, ``reference``, ``compute_dtype`` or ``device``, a non-positive
            size, or a ``scored_fraction`` or ``position_fraction`` outside (0, 1].
    """
    settings = {k: v for k, v in locals().items() if k not in ("config", "lora_targets")}  # the arguments
    choices = {
        "quantization": (quantization, ("nf4", "none")),
        "reference": (reference, ("adapter-off", "separate", "precomputed")),
        "compute_dtype": (compute_dtype, tuple(DTYPE_BYTES)),
        "device": (device, ("cpu", *GPU_TILE_COPIES)),
    }
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, found {value!r}")
    if batch <= 0 or max_length <= 0 or lora_r <= 0:
        raise ValueError(f"batch, max_length and lora_r must be > 0, found {batch}, {max_length}, {lora_r}")
    for name, share in (("scored_fraction", scored_fraction), ("position_fraction", position_fraction)):
        if not 0.0 < share <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], found {share}")
    hidden, inter, layers, _, _, vocab, tied = _dims(config)
    # bitsandbytes' Linear4bit returns its input's dtype, and a k-bit-prepared model's embeddings and norms are
    # float32, so under bf16 autocast an NF4 model's activations between the matrix multiplies stay float32 (probed on
    # the CPU, where dpo_xpu's bf16 peaks equal its float32 ones); the GPU's terms stay as fitted on the H200
    act_bytes = 4 if quantization == "nf4" and device == "cpu" else DTYPE_BYTES[compute_dtype]
    shapes = linear_shapes(config)
    linear_params = layers * sum(i * o for i, o in shapes.values())
    other_params = vocab * hidden * (1 if tied else 2) + layers * 2 * hidden + hidden
    if quantization == "nf4":
        one_copy = linear_params * NF4_BYTES_PER_PARAM + other_params * 4
    else:
        one_copy = (linear_params + other_params) * act_bytes
    weights = one_copy * (2 if reference == "separate" else 1)

    targets = lora_targets or list(shapes)
    bf16_adapters = quantization == "nf4" and chunked_logits  # TRL 1.x (chunked log-probs) casts QLoRA's to bf16
    lora = (
        layers
        * lora_r
        * sum(i + o for name, (i, o) in shapes.items() if name in targets)
        * (8 if bf16_adapters else 16)
    )

    tokens = 2 * batch * max_length
    run = tokens * position_fraction  # the positions the layers run
    per_layer_full = (ACT_PER_TOKEN_LAYER[0] * hidden + ACT_PER_TOKEN_LAYER[1] * inter) * act_bytes
    activations = run * layers * (hidden * act_bytes if gradient_checkpointing else per_layer_full)
    chunk = vocab_chunk or (CPU_LOGPROB_CHUNK if device == "cpu" else LOGPROB_TILE[1])
    tile = min(tokens * scored_fraction, LOGPROB_TILE[0]) * min(vocab, chunk) * 4
    logits = tile * (CPU_TILE_COPIES if device == "cpu" else GPU_TILE_COPIES[device])
    if not chunked_logits:
        logits = tokens * vocab * 4 * 3  # TRL 0.11: logits, log-softmax and its gradient, whole
    dequantised = max(i * o for i, o in shapes.values()) * 4 if device == "cpu" and quantization == "nf4" else 0
    # one layer's backward: its recomputed activations (checkpointing), their gradients' temporaries, and on CPU
    # one dequantised weight
    transients = run * per_layer_full * (1.5 if gradient_checkpointing else 0.5) + dequantised
    # policy: logits, log-softmax, gradient (3 copies); reference: logits and log-softmax (2 copies)
    full_logits = tokens * vocab * 4 * (3 + (0 if reference == "precomputed" else 2))
    components = {
        "weights": weights / MIB,
        "lora_and_optimizer": lora / MIB,
        "activations": activations / MIB,
        "logits": logits / MIB,
        "transients": transients / MIB,
        "runtime": CPU_RUNTIME_MIB if device == "cpu" else GPU_RUNTIME_MIB[device],
    }
    # one tensor each: a tile of TRL's chunked log-probs, the gate/up output of one layer for the whole batch, the
    # embedding (and untied head) upcast to float32, a dequantised NF4 weight (CPU kernels)
    single = {
        ("logits tile" if chunked_logits else "full logits"): tile if chunked_logits else tokens * vocab * 4,
        "MLP activation": run * inter * act_bytes,
        "embedding / output head": vocab * hidden * (4 if quantization == "nf4" else act_bytes),
        "dequantised weight": dequantised,
    }
    name = max(single, key=single.get)
    # the LM head's backward and a layer's backward run one after the other: the larger of the two counts
    total = sum(components.values()) - min(components["logits"], components["transients"])
    return MemoryEstimate(components, total, full_logits / MIB, settings, single[name] / MIB, name)


@dataclass
class FitVerdict:
    """Whether a recipe's step is expected to fit: ``fits`` when ``estimate.total_mib <= FIT_FRACTION *
    device_memory_mib``; ``headroom_mib`` the difference (negative: short by that much); ``message`` one line, with
    what to change when it does not fit."""

    fits: bool
    estimate: MemoryEstimate
    device_memory_mib: float
    headroom_mib: float
    message: str


def recipe_fits(
    recipe: Recipe, device_memory_mib: float, config: Any = None, plan: ReferencePlan | None = None
) -> FitVerdict:
    """Whether ``recipe`` is expected to fit in ``device_memory_mib`` (MiB; the host's memory for a CPU run), leaving
    ``1 - FIT_FRACTION`` of it to the runtime, as a :class:`FitVerdict`. ``config``: the model's (default: loaded
    from ``recipe.model_name_or_path``, :class:`ModelLoadError` when it cannot be); ``plan``: the run's reference plan
    (default: the plan of the TRL generation the recipe's backend runs, native 1.x, ipex-llm 0.11)."""
    from dpo_xpu.models.base import from_pretrained, resolve_model_path
    from dpo_xpu.train.reference import reference_plan

    if config is None:
        from transformers import AutoConfig

        config = from_pretrained(AutoConfig, resolve_model_path(recipe.model_name_or_path))
    plan = plan or reference_plan(recipe, "1.x" if recipe.backend == "native" else "0.11")
    bf16 = recipe.bf16  # bool once a run settled it; an unsettled auto: bf16 on a GPU (planned, maybe absent here)
    if not isinstance(bf16, bool):
        from dpo_xpu.device import select_device, use_bf16

        where = recipe.device if recipe.device != "auto" else select_device("auto").type
        bf16 = not where.startswith("cpu") or use_bf16(bf16, "cpu")[0]
    estimate = estimate_memory(
        config,
        quantization=recipe.quantization,
        reference=plan.strategy,
        batch=recipe.per_device_train_batch_size,
        max_length=recipe.max_length,
        gradient_checkpointing=recipe.gradient_checkpointing,
        compute_dtype="bfloat16" if bf16 else "float32",
        lora_r=recipe.lora_r,
        lora_targets=recipe.lora_target_modules,
        device=kind if (kind := recipe.device.split(":")[0]) in ("cpu", "cuda", "xpu") else "gpu",
        chunked_logits=plan.generation == "1.x",  # TRL 0.11 (the ipex-llm backend) builds the full logits
    )
    headroom = FIT_FRACTION * device_memory_mib - estimate.total_mib
    parts = estimate.parts()
    if headroom >= 0:
        message = (
            f"fits: about {estimate.total_mib:,.0f} MiB expected ({parts}) of {device_memory_mib:,.0f} MiB "
            f"({headroom:,.0f} MiB to spare)"
        )
    else:
        hints = []
        if plan.strategy == "separate":
            hints.append("reference: adapter-off or precomputed (one copy of the weights)")
        if not recipe.gradient_checkpointing:
            hints.append("gradient_checkpointing: true")
        if recipe.per_device_train_batch_size > 1:
            hints.append("a smaller per_device_train_batch_size with more gradient_accumulation_steps")
        hints.append("a smaller max_length")
        message = (
            f"does not fit: about {estimate.total_mib:,.0f} MiB expected ({parts}), "
            f"{-headroom:,.0f} MiB more than {FIT_FRACTION:.0%} of {device_memory_mib:,.0f} MiB. Try "
            + "; ".join(hints)
        )
    return FitVerdict(headroom >= 0, estimate, device_memory_mib, headroom, message)
