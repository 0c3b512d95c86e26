"""The memory planner: component arithmetic, strategy ordering, the fit verdict, and parameter counts."""

from __future__ import annotations

import pytest
from conftest import STORIES260K, require_stories260k
from helpers import QWEN05

from dpo_xpu.recipes import make_recipe
from dpo_xpu.train.memory import (
    GPU_RUNTIME_MIB,
    MIB,
    NF4_BYTES_PER_PARAM,
    estimate_memory,
    matmul_parameters,
    recipe_fits,
)
from dpo_xpu.train.trl_internals import CPU_LOGPROB_CHUNK, LOGPROB_TILE


def test_matmul_parameters_match_a_real_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    small = {**QWEN05, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4}
    small["vocab_size"] = 1000
    model = Qwen2ForCausalLM(Qwen2Config(**small))
    linear = sum(m.weight.numel() for n, m in model.named_modules() if n.endswith("_proj"))
    assert matmul_parameters(small) == linear + 1000 * 64  # + the tied output head


def test_qwen_05b_weights_and_strategies():
    one = estimate_memory(QWEN05, "nf4", "adapter-off", batch=1, max_length=320, device="cpu")
    two = estimate_memory(QWEN05, "nf4", "separate", batch=1, max_length=320, device="cpu")
    pre = estimate_memory(QWEN05, "nf4", "precomputed", batch=1, max_length=320, device="cpu")
    linear = matmul_parameters(QWEN05) - 151936 * 896
    assert linear == pytest.approx(358e6, rel=0.01)  # Qwen2.5-0.5B: 494M parameters, 136M of them embeddings
    expected = (linear * NF4_BYTES_PER_PARAM + (151936 * 896 + 49 * 896) * 4) / MIB
    assert one.components_mib["weights"] == pytest.approx(expected)
    assert two.components_mib["weights"] == pytest.approx(2 * expected)
    assert two.total_mib > one.total_mib >= pre.total_mib
    assert pre.full_logits_mib < one.full_logits_mib  # no reference logits at all
    # full float32 logits of policy + reference outgrow the chunked tiles on a 150k vocabulary, even on the CPU where
    # TRL's torch fallback keeps eight tiles alive; by far on a GPU batch
    assert one.full_logits_mib > 2.5 * one.components_mib["logits"]
    gpu = estimate_memory(QWEN05, batch=4, max_length=1024)
    assert gpu.full_logits_mib > 10 * gpu.components_mib["logits"]
    assert set(one.to_dict()["components_mib"]) == {
        "weights",
        "lora_and_optimizer",
        "activations",
        "logits",
        "transients",
        "runtime",
    }


def test_checkpointing_and_length_scale_activations():
    on = estimate_memory(QWEN05, batch=2, max_length=1024, gradient_checkpointing=True)
    off = estimate_memory(QWEN05, batch=2, max_length=1024, gradient_checkpointing=False)
    assert off.components_mib["activations"] > 5 * on.components_mib["activations"]
    longer = estimate_memory(QWEN05, batch=2, max_length=2048, gradient_checkpointing=False)
    assert longer.components_mib["activations"] == pytest.approx(2 * off.components_mib["activations"])


def test_prefix_sharing_positions_scale_the_layers_terms_only():
    """position_fraction (prefix sharing's packed rows) scales what grows with the positions the layers run, not the
    weights, the adapters or the LM head's tile (scored_fraction's)."""
    for checkpointing in (True, False):
        two = estimate_memory(QWEN05, batch=2, max_length=512, gradient_checkpointing=checkpointing, device="cpu")
        one = estimate_memory(
            QWEN05, batch=2, max_length=512, gradient_checkpointing=checkpointing, device="cpu", position_fraction=0.5
        )
        for name in ("activations", "transients"):
            assert one.components_mib[name] < two.components_mib[name]
        assert one.components_mib["activations"] == pytest.approx(two.components_mib["activations"] / 2)
        for name in ("weights", "lora_and_optimizer", "logits", "runtime"):
            assert one.components_mib[name] == two.components_mib[name]
        assert one.total_mib < two.total_mib


def test_scoring_answer_tokens_only_shrinks_the_logit_tile():
    trl_tiles = {"device": "cpu", "vocab_chunk": LOGPROB_TILE[1]}  # TRL's own trainer on the CPU
    every = estimate_memory(QWEN05, batch=1, max_length=256, **trl_tiles)
    answers = estimate_memory(QWEN05, batch=1, max_length=256, scored_fraction=0.5, **trl_tiles)
    assert answers.components_mib["logits"] == pytest.approx(every.components_mib["logits"] / 2)
    assert every.total_mib - answers.total_mib == pytest.approx(every.components_mib["logits"] / 2)
    # a batch beyond the tile's 4,096 tokens: the tile, not the batch, bounds the term
    big = estimate_memory(QWEN05, batch=16, max_length=1024, scored_fraction=0.5)
    assert big.components_mib["logits"] == estimate_memory(QWEN05, batch=16, max_length=1024).components_mib["logits"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"quantization": "int8"},
        {"reference": "other"},
        {"compute_dtype": "int4"},
        {"batch": 0},
        {"scored_fraction": 0.0},
        {"scored_fraction": 1.5},
        {"position_fraction": 0.0},
        {"position_fraction": 1.01},
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        estimate_memory(QWEN05, **kwargs)


def test_recipe_fits_verdicts():
    recipe = make_recipe(
        {
            "model_name_or_path": "x",
            "reference": "separate",
            "max_length": 1024,
            "per_device_train_batch_size": 2,
            "max_prompt_length": 512,
        }
    )
    big = recipe_fits(recipe, 64 * 1024, config=QWEN05)
    assert big.fits and big.headroom_mib > 0 and big.message.startswith("fits")
    small = recipe_fits(recipe, 1024, config=QWEN05)
    assert not small.fits and small.headroom_mib < 0
    assert "adapter-off or precomputed" in small.message and "max_length" in small.message


def test_largest_allocation_is_the_biggest_single_tensor():
    tiled = estimate_memory(QWEN05, batch=4, max_length=1024)
    assert tiled.largest_allocation == "embedding / output head"  # 151,936 x 896 float32 beats a 4096 x 32768 tile
    assert tiled.largest_allocation_mib == pytest.approx(151936 * 896 * 4 / MIB)
    full = estimate_memory(QWEN05, batch=4, max_length=1024, chunked_logits=False)
    assert full.largest_allocation == "full logits"
    assert full.largest_allocation_mib == pytest.approx(2 * 4 * 1024 * 151936 * 4 / MIB)  # 4,748 MiB
    assert full.components_mib["logits"] == pytest.approx(3 * full.largest_allocation_mib)
    assert full.to_dict()["largest_allocation"] == "full logits"


def test_dpo_xpu_s_narrow_cpu_tiles_shrink_the_logit_term():
    """On the CPU dpo_xpu's trainers tile the vocabulary CPU_LOGPROB_CHUNK wide (trl_internals.cpu_lm_head), not
    TRL's 32,768: the logits term shrinks by that ratio, and the head's backward is no longer the step's peak."""
    ours = estimate_memory(QWEN05, batch=2, max_length=512, device="cpu")
    trl = estimate_memory(QWEN05, batch=2, max_length=512, device="cpu", vocab_chunk=LOGPROB_TILE[1])
    ratio = trl.components_mib["logits"] / ours.components_mib["logits"]
    assert ratio == pytest.approx(LOGPROB_TILE[1] / CPU_LOGPROB_CHUNK)
    assert ours.total_mib < trl.total_mib
    assert ours.components_mib["logits"] < ours.components_mib["transients"] < trl.components_mib["logits"]
    gpu = estimate_memory(QWEN05, batch=2, max_length=512, device="cuda")  # TRL's Triton tiles on a GPU
    assert gpu.settings["vocab_chunk"] is None and gpu.components_mib["logits"] > ours.components_mib["logits"]


def test_head_and_layer_backward_do_not_overlap():
    """The LM head's tiles and a layer's backward temporaries are alive one after the other, never together."""
    trl_tiles = {"device": "cpu", "vocab_chunk": LOGPROB_TILE[1]}
    head_bound = estimate_memory(QWEN05, batch=2, max_length=512, **trl_tiles)
    layer_bound = estimate_memory(QWEN05, batch=2, max_length=512, gradient_checkpointing=False, **trl_tiles)
    for est in (head_bound, layer_bound):
        c = est.components_mib
        assert est.total_mib == pytest.approx(sum(c.values()) - min(c["logits"], c["transients"]))
        assert f"max(logits {c['logits']:,.0f}, transients {c['transients']:,.0f})" in est.parts()
    assert head_bound.components_mib["logits"] > head_bound.components_mib["transients"]


def test_cpu_tile_copies_match_trls_torch_fallback():
    """CPU_TILE_COPIES against TRL's own chunked log-prob function on the CPU: the backward's peak of live memory,
    sampled from glibc while it runs, is that many float32 tiles (within 15%)."""
    import threading
    import time

    import torch

    from dpo_xpu.train.host_memory import allocated_mib
    from dpo_xpu.train.memory import CPU_TILE_COPIES, LOGPROB_TILE

    chunked = pytest.importorskip("trl.kernels.chunked_logprob")
    if allocated_mib() is None:
        pytest.skip("glibc's mallinfo2 is not available to measure live memory")
    hidden, vocab, tokens = 64, LOGPROB_TILE[1], 1024  # one full-width tile of 1,024 tokens: 128 MiB
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, hidden, generator=generator) * 0.02
    states = torch.randn(tokens, hidden, generator=generator, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    outputs = ("entropy", "mean_logits", "is_top1")  # what TRL's DPOTrainer asks for
    log_probs = chunked.ChunkedLogProbFunction.apply(states, weight, None, targets, 1.0, vocab, None, 1.0, outputs)[0]
    loss = log_probs.sum()
    base = allocated_mib()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], allocated_mib())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        loss.backward()
    finally:
        done.set()
        sampler.join()
    tile_mib = tokens * vocab * 4 / MIB
    copies = (peak[0] - base) / tile_mib  # 8.8 measured on the CI machine: 8.25 tiles and library scratch
    assert copies == pytest.approx(CPU_TILE_COPIES, rel=0.15), f"TRL's CPU backward held {copies:.2f} tiles"


def test_gpu_logits_are_tiles_in_place_with_the_allocators_own_tensors_beside():
    """On CUDA TRL's Triton kernels hold one float32 log-prob tile, and the allocator holds GPU_RUNTIME_MIB more
    (both measured by ``benchmarks/scaling.py`` on an H200); XPU (and ``gpu``, which one not known) keep a margin of
    four tiles until measured."""
    cuda, xpu, gpu = (estimate_memory(QWEN05, batch=2, max_length=1024, device=d) for d in ("cuda", "xpu", "gpu"))
    tile = 4096 * 32768 * 4 / MIB  # TRL's log-prob tile: 2 x 2 x 1024 positions fill it
    assert cuda.components_mib["logits"] == pytest.approx(tile)
    assert xpu.components_mib["logits"] == pytest.approx(4 * tile) == gpu.components_mib["logits"]
    assert cuda.components_mib["runtime"] == GPU_RUNTIME_MIB["cuda"] > 0
    assert cuda.total_mib < xpu.total_mib == gpu.total_mib
    with pytest.raises(ValueError, match="device must be"):
        estimate_memory(QWEN05, device="tpu")


@require_stories260k
def test_an_nf4_models_activations_stay_float32_under_bf16_autocast_on_the_cpu():
    """The fact the CPU's activation term rests on: a k-bit-prepared NF4 model (bf16 compute) passes float32 hidden
    states between its layers under bf16 autocast (bitsandbytes' Linear4bit returns its input's dtype), so the planner
    counts them at 4 bytes in bf16 too, and an NF4 bf16 estimate's activations equal float32's on the CPU."""
    import torch

    from dpo_xpu.models.backends.native import load_base

    model = load_base(str(STORIES260K), "nf4", torch.device("cpu"), torch.bfloat16, prepare=True)
    dtypes = []
    model.model.layers[0].register_forward_hook(lambda module, args, out: dtypes.append(out[0].dtype))
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.tensor([[1, 2, 3, 4]]))
    assert dtypes == [torch.float32, torch.float32]  # the projection's output, then the layer's
    kwargs = {"batch": 2, "max_length": 512, "device": "cpu"}
    bf16 = estimate_memory(QWEN05, compute_dtype="bfloat16", **kwargs)
    fp32 = estimate_memory(QWEN05, compute_dtype="float32", **kwargs)
    for name in ("activations", "transients"):
        assert bf16.components_mib[name] == fp32.components_mib[name]
    gpu = {**kwargs, "device": "cuda"}  # the GPU's terms stay as fitted (H200)
    assert estimate_memory(QWEN05, compute_dtype="bfloat16", **gpu).components_mib["activations"] == pytest.approx(
        estimate_memory(QWEN05, compute_dtype="float32", **gpu).components_mib["activations"] / 2
    )
