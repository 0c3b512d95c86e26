"""Throughput of a run: model FLOPs, the device's matmul ceiling, and the ``perf/*`` values of each logged step.

Each training step's row of ``metrics.jsonl`` says how fast the run trains (``perf/pairs_per_s``,
``perf/tokens_per_s``), its peak memory (:func:`peak_memory_mib`) and its model FLOPs utilisation (``perf/mfu``: the
step's model FLOPs, Kaplan et al. 2020 and PaLM, Chowdhery et al. 2022, app. B, per second, over the device's matmul
ceiling in the compute dtype, measured once per process by :func:`matmul_gflops`: published peaks differ by SKU,
clock and power limit, and a CPU has none that bf16 emulation honours). open-instruct logs the same
(``perf/mfu_step``); transformers and TRL log neither, hence this module.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def model_flops(config: Any, tokens: float, mean_seq_len: float, forward_only: bool = False) -> float:
    """Model FLOPs of a pass over ``tokens`` tokens (Kaplan et al. 2020, sec. 2.1; PaLM, Chowdhery et al. 2022, app. B).

    ``6 N + 12 L H Q S`` per token for forward and backward, ``2 N + 4 L H Q S`` for a forward only, where ``N``
    counts the parameters of the matrix multiplies (:func:`dpo_xpu.train.memory.matmul_parameters`), ``L`` layers,
    ``H`` heads, ``Q`` head dimension, ``S`` = ``mean_seq_len``. Returns FLOPs.
    """
    from dpo_xpu.train.memory import matmul_parameters

    n = matmul_parameters(config)
    head_dim = config.hidden_size // config.num_attention_heads
    attention = config.num_hidden_layers * config.num_attention_heads * head_dim * mean_seq_len
    per_token = 2 * n + 4 * attention if forward_only else 6 * n + 12 * attention
    return per_token * tokens


def synchronize(device: str) -> None:
    """Wait for the accelerator's queued work (``xpu`` and ``cuda``; nothing to wait for on a CPU)."""
    import torch

    kind = str(device).split(":")[0]
    if kind in ("cuda", "xpu"):
        getattr(torch, kind).synchronize()


@functools.lru_cache(maxsize=8)
def matmul_gflops(device: str, dtype_name: str = "bfloat16", n: int | None = None, repeats: int = 3) -> float:
    """The device's matmul ceiling in GFLOP/s: the fastest of ``repeats`` timed ``n x n @ n x n`` matmuls (``2 n^3``
    FLOPs each; ``n`` 1024 on a CPU, 8192 on a GPU) after a warm-up, measured once per process and arguments."""
    import torch

    kind = str(device).split(":")[0]
    n = n or (1024 if kind == "cpu" else 8192)
    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for i in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        (a @ b).sum().item()
        synchronize(device)
        if i:
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def peak_memory_mib(device: str) -> float | None:
    """The peak memory since the last call (MiB), reset for the next one (process-wide): on XPU and CUDA the
    allocator's (``max_memory_allocated``, tensors only); on a Linux CPU the process's peak resident memory (``VmHWM``
    in ``/proc/self/status``, reset through ``/proc/self/clear_refs``, Linux >= 4.0); ``None`` elsewhere (other OSes'
    ``ru_maxrss`` cannot be reset)."""
    import torch

    kind = str(device).split(":")[0]
    if kind in ("cuda", "xpu"):
        backend = getattr(torch, kind)
        peak = backend.max_memory_allocated() / 2**20
        backend.reset_peak_memory_stats()
        return peak
    try:
        status = Path("/proc/self/status").read_text()
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    line = next((line for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return int(line.split()[1]) / 1024 if line else None  # kB


@dataclass
class ThroughputMeter:
    """The ``perf/*`` values of each logged training step, from the step's wall time and TRL's token count.

    Between two logged steps: ``perf/pairs_per_s`` (steps x ``pairs_per_step``, the global batch),
    ``perf/tokens_per_s`` (TRL's ``num_tokens``: both sequences, before prefix sharing), ``perf/step_s``, with
    ``device`` ``perf/peak_memory_mib`` (:func:`peak_memory_mib`, where the device reports it) and, with
    ``peak_gflops`` (per process, :func:`matmul_gflops`), ``perf/mfu``: the model FLOPs of the tokens really run
    (``token_ratio()`` of TRL's count with prefix sharing; plus a reference forward with ``reference_forward``) per
    second, per process (``processes``), over the peak.
    """

    config: Any
    pairs_per_step: int
    peak_gflops: float | None = None
    processes: int = 1
    reference_forward: bool = False
    token_ratio: Callable[[], float] = lambda: 1.0
    device: str | None = None
    _last: tuple[float, int, float] | None = field(default=None, init=False)  # (time, step, tokens) when last logged

    def start(self, step: int = 0, tokens: float = 0.0) -> None:
        """Start timing, and the peak memory's window, at ``step`` (training's begin, or a resumed checkpoint's)."""
        if self.device is not None:
            peak_memory_mib(self.device)
        self._last = (time.perf_counter(), step, tokens)

    def values(self, step: int, tokens: float | None) -> dict[str, float]:
        """The ``perf/*`` values since the last call (or :meth:`start`), for a log at ``step`` whose cumulative
        token count is ``tokens`` (TRL's ``num_tokens``; ``None`` where the TRL logs none: no tokens/s, no MFU)."""
        now = time.perf_counter()
        if self._last is None:
            self._last = (now, 0, 0.0)
        then, last_step, last_tokens = self._last
        self._last = (now, step, tokens if tokens is not None else last_tokens)
        seconds, steps = now - then, step - last_step
        if seconds <= 0 or steps <= 0:
            return {}
        out = {
            "perf/step_s": round(seconds / steps, 4),
            "perf/pairs_per_s": round(steps * self.pairs_per_step / seconds, 4),
        }
        peak = peak_memory_mib(self.device) if self.device is not None else None
        if peak is not None:
            out["perf/peak_memory_mib"] = round(peak, 1)
        if tokens is None or tokens <= last_tokens:
            return out
        counted = tokens - last_tokens
        out["perf/tokens_per_s"] = round(counted / seconds, 1)
        if self.peak_gflops:
            ran = counted * float(self.token_ratio())
            mean_seq = counted / (2 * steps * self.pairs_per_step)  # two sequences a pair
            flops = model_flops(self.config, ran, mean_seq)
            if self.reference_forward:
                flops += model_flops(self.config, ran, mean_seq, forward_only=True)
            out["perf/mfu"] = round(flops / seconds / max(1, self.processes) / (self.peak_gflops * 1e9), 5)
        return out


def trainer_meter(trainer: Any, reference_forward: bool) -> ThroughputMeter:
    """The :class:`ThroughputMeter` of a built trainer (its policy's config, global batch, device, compute dtype and
    prefix sharing's token count); ``reference_forward``: a reference forward runs at each step."""
    model = trainer.model
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    args = trainer.args
    processes = max(1, getattr(args, "world_size", 1))
    pairs = args.per_device_train_batch_size * args.gradient_accumulation_steps * processes
    device = str(next(model.parameters()).device)
    peak = matmul_gflops(device, "bfloat16" if getattr(args, "bf16", False) else "float32")

    def token_ratio() -> float:
        counts = getattr(trainer, "prefix_sharing_tokens", None)
        return counts["packed"] / counts["sequence"] if counts and counts.get("sequence") else 1.0

    return ThroughputMeter(config, pairs, peak, processes, reference_forward, token_ratio, device)
