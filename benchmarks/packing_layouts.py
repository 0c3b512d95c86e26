"""Prefix-sharing layouts side by side: TRL's two sequences per pair, prefix sharing one row per pair, padding-free
packing (several pairs per row) with sdpa over the whole row, and packing with attention pair by pair
(``packed-pairs``: :mod:`dpo_xpu.train.pair_attention`, the CPU's default), on one micro-batch's forward and backward.

A random-weight Llama of SmolLM2-135M's shape (or ``--tiny``) with LoRA r16 on every projection, random pairs of
uneven lengths (prompt 32-256 tokens, answers 8-160, cut to ``--max-length`` as TRL cuts them); each layout scores
the answer tokens with the full LM head and ``log_softmax`` and backpropagates their sum. Needs only torch,
transformers and PEFT (no TRL, no bitsandbytes), so it runs on a bare accelerator machine. Interleaved rounds (round
0 warms up; the layouts' order alternates), per-round speed ratios against two sequences, and the largest log-prob
difference of each layout from two sequences. Speed is measured here, never asserted in tests.

    python benchmarks/packing_layouts.py --device cpu --dtype float32 --batch 2 --max-length 320 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dpo_xpu.train.pair_attention import install_pair_attention
from dpo_xpu.train.prefix_sharing import pack_pairs


def _model(tiny: bool, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9)
    if tiny:
        dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = LlamaConfig(vocab_size=49152, num_key_value_heads=3 if not tiny else 2, tie_word_embeddings=True, **dims)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets))
    install_pair_attention(model)  # sdpa for every call without pair_spans: only packed-pairs runs pair by pair
    return model


def _batch(pairs: int, max_length: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """TRL's collator layout ``[2B, T]``: chosen rows then rejected rows, right-padded."""
    rows = []
    for _ in range(pairs):
        prompt = torch.randint(3, 49152, (int(torch.randint(32, 257, (1,), generator=gen)),), generator=gen)
        prompt = prompt[: max_length // 2]
        answers = [torch.randint(3, 49152, (int(torch.randint(8, 161, (1,), generator=gen)),), generator=gen)]
        answers.append(torch.randint(3, 49152, (int(torch.randint(8, 161, (1,), generator=gen)),), generator=gen))
        rows.append([(prompt, a[: max_length - prompt.numel()]) for a in answers])
    ordered = [r[0] for r in rows] + [r[1] for r in rows]
    width = max(p.numel() + a.numel() for p, a in ordered)
    ids = torch.zeros(len(ordered), width, dtype=torch.long)
    mask, answer = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, a) in enumerate(ordered):
        n = p.numel() + a.numel()
        ids[i, :n], mask[i, :n], answer[i, p.numel() : n] = torch.cat([p, a]), 1, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(answer == 0, -100)}


def _step(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], row_tokens: int | None, two: bool, pairs: bool = False
) -> torch.Tensor:
    """Forward + backward of one layout; the answer tokens' log-probs in TRL's layout ``[2B, T - 1]``."""
    backbone, head = model.base_model.model.model, model.base_model.model.lm_head
    if two:
        hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        hidden, labels = hidden[:, :-1], batch["labels"][:, 1:]
    else:
        packed = pack_pairs(batch["input_ids"], batch["attention_mask"], batch["labels"], row_tokens)
        spans = {"pair_spans": packed.spans} if pairs else {}
        out = backbone(
            input_ids=packed.input_ids, attention_mask=packed.attention_mask, position_ids=packed.position_ids, **spans
        )
        hidden, labels = out.last_hidden_state, packed.next_tokens
    scored = labels != -100
    logps = torch.log_softmax(head(hidden[scored]).float(), dim=-1).gather(-1, labels[scored][:, None])[:, 0]
    logps.sum().backward()
    per_token = torch.zeros(labels.shape, dtype=logps.dtype, device=logps.device).masked_scatter(scored, logps)
    return per_token.detach() if two else packed.unpack(per_token).detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=320)
    parser.add_argument("--batches", type=int, default=4, help="micro-batches per layout and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (a quick check of the script)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    model = _model(args.tiny, args.device, dtype)
    gen = torch.Generator().manual_seed(1)
    batches = [
        {k: v.to(args.device) for k, v in _batch(args.batch, args.max_length, gen).items()} for _ in range(args.batches)
    ]
    layouts = {
        "two-sequences": (None, True, False),
        "per-pair": (None, False, False),
        "packed": (2 * args.batch * args.max_length, False, False),
        "packed-pairs": (2 * args.batch * args.max_length, False, True),
    }
    times: dict[str, list[float]] = {name: [] for name in layouts}
    logps: dict[str, list[torch.Tensor]] = {}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for r in range(args.rounds + 1):
        for name in list(layouts) if r % 2 else list(reversed(layouts)):
            row_tokens, two, pairs = layouts[name]
            sync()
            start = time.perf_counter()
            logps[name] = [_step(model, b, row_tokens, two, pairs) for b in batches]
            sync()
            model.zero_grad(set_to_none=True)
            if r:
                times[name].append(time.perf_counter() - start)
    tokens = {name: 0 for name in layouts}
    for b in batches:
        tokens["two-sequences"] += b["input_ids"].numel()
        for name in ("per-pair", "packed", "packed-pairs"):
            tokens[name] += pack_pairs(
                b["input_ids"], b["attention_mask"], b["labels"], layouts[name][0]
            ).input_ids.numel()
    print(
        f"device={args.device} dtype={args.dtype} batch={args.batch} max_length={args.max_length} "
        f"batches={args.batches} rounds={args.rounds} tiny={args.tiny} torch={torch.__version__}"
    )
    for name in layouts:
        ratios = [a / b for a, b in zip(times["two-sequences"], times[name], strict=True)]
        gap = max(float((x - y).abs().max()) for x, y in zip(logps[name], logps["two-sequences"], strict=True))
        print(
            f"{name:14s} positions {tokens[name]:6d}  best {min(times[name]):.3f} s  speed vs two-sequences by "
            f"round {' '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f})  "
            f"largest log-prob gap {gap:.2e}"
        )


if __name__ == "__main__":
    main()
