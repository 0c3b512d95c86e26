"""More than one device: data-parallel DPO (DDP) under ``torchrun`` or ``accelerate launch``.

Each rank trains on its own device with a full NF4 copy of the base; DDP averages the LoRA gradients, so one step
sees ``per_device_train_batch_size x processes x gradient_accumulation_steps`` pairs. The process group and the
collectives are accelerate's (``PartialState``, ``gather_object``); dpo_xpu adds:

- the rank's device (:func:`device_for_rank`);
- :func:`on_rank_zero` (rank 0 alone writes the run folder), :func:`on_every_rank` (a check that may fail on one node:
  the model missing there) and :func:`main_process_first` (the ``precomputed`` reference, computed once per node into
  the node's own cache: nodes need not share a file system). A result or an error reaches every rank, the error as
  the same one line; accelerate's ``main_process_first`` / ``on_main_process`` (so ``TrainingArguments``' too) leave
  the other ranks waiting at a barrier when one raises, hence our own;
- SIGINT / SIGTERM stop every rank after the same step (:func:`agree_on_signal`);
- FSDP and DeepSpeed ZeRO are refused (:func:`check_engine`): sharding packed NF4 weights corrupts some (bitsandbytes
  issue #1945).

Ranks are read from ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``, which answer before the process group exists
(``PartialState()`` would create it). Alone, every function does nothing or runs its argument.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from dpo_xpu.errors import DeviceNotAvailableError, DpoXpuError, RecipeError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

#: The bitsandbytes issue that rules out sharding NF4 weights (FSDP2 corrupts about 0.1% of packed NF4 weights).
BNB_FSDP_ISSUE = "https://github.com/bitsandbytes-foundation/bitsandbytes/issues/1945"
#: Attribute set on an exception that every rank raises with the same message (the CLI prints it on rank 0 only).
ALL_RANKS_ATTR = "dpo_xpu_all_ranks"


class RankFailed(RuntimeError):
    """Raised on the other ranks when one failed with an error that is no :class:`~dpo_xpu.errors.DpoXpuError`."""


def _env_int(name: str) -> int:
    try:
        return int(os.environ.get(name, 0))
    except ValueError:
        return 0


def world_size() -> int:
    """The number of processes of this run (``WORLD_SIZE``, set by ``torchrun`` / ``accelerate launch``); 1 alone."""
    return max(1, _env_int("WORLD_SIZE"))


def rank() -> int:
    """This process's global rank (``RANK``), 0 in a single process."""
    return _env_int("RANK")


def is_distributed() -> bool:
    """Whether this process is one of several (``WORLD_SIZE`` > 1)."""
    return world_size() > 1


def is_main_process() -> bool:
    """Whether this process writes the run folder: rank 0, or the only process."""
    return rank() == 0


def device_for_rank(kind: str, index: str | int | None, count: int) -> str:
    """The device this process trains on: ``kind`` (``"cpu"``, ``"xpu"``, ``"cuda"``) with the recipe's ``index``
    alone; under several processes ``kind:LOCAL_RANK`` (the CPU stays ``"cpu"``). ``count``: ``kind`` devices seen.

    Raises:
        DeviceNotAvailableError: under several processes, the recipe names one device index (every process would
            share it), or this node has fewer ``kind`` devices than processes.
    """
    if kind == "cpu":
        return "cpu"
    if not is_distributed():
        return kind if index is None else f"{kind}:{index}"
    if index is not None:
        raise DeviceNotAvailableError(
            f"device: '{kind}:{index}' names one device, but {world_size()} processes were started: use "
            f"device: {kind} (or auto), and each process takes {kind}:LOCAL_RANK"
        )
    local = _env_int("LOCAL_RANK")
    if local >= count:
        raise DeviceNotAvailableError(
            f"process LOCAL_RANK={local} has no {kind} device: PyTorch sees {count} on this node. Start at "
            f"most {count} processes per node (torchrun --nproc_per_node {count})"
        )
    return f"{kind}:{local}"


def init_distributed(device: torch.device) -> None:
    """Join accelerate's process group (xccl on XPU, nccl on CUDA, gloo on CPU), which sets this rank's current
    device, before anything is loaded or written; no-op alone.

    Raises:
        DeviceNotAvailableError: the process group came up with another number of processes than ``WORLD_SIZE``.
    """
    if not is_distributed():
        return
    from accelerate import PartialState

    state = PartialState(cpu=device.type == "cpu")
    if state.num_processes != world_size():
        raise DeviceNotAvailableError(
            f"{world_size()} processes were started but accelerate set up {state.num_processes} "
            f"({state.distributed_type}): for {device.type}, start the processes with torchrun or accelerate launch"
        )


def check_engine(quantization: str, trl_options: dict[str, Any]) -> None:
    """Refuse FSDP and DeepSpeed ZeRO, asked for by an ``accelerate launch`` config (``ACCELERATE_USE_FSDP`` /
    ``ACCELERATE_USE_DEEPSPEED``) or the recipe's TRL options ``fsdp`` / ``fsdp_config`` / ``deepspeed``.

    Raises:
        RecipeError: either asked for; with ``quantization: nf4`` the message names bitsandbytes issue #1945.
    """
    options = trl_options or {}
    env = {
        name: os.environ.get(f"ACCELERATE_USE_{name}", "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("FSDP", "DEEPSPEED")
    }
    asked = {
        "FSDP": env["FSDP"] or options.get("fsdp") or options.get("fsdp_config"),
        "DeepSpeed": env["DEEPSPEED"] or options.get("deepspeed"),
    }
    which = " and ".join(engine for engine, wanted in asked.items() if wanted)
    if not which:
        return
    if quantization == "nf4":
        raise RecipeError(
            f"{which} with quantization: nf4 is refused: sharding bitsandbytes' packed NF4 weights corrupts some of "
            f"them (bitsandbytes issue #1945, {BNB_FSDP_ISSUE}). Use data parallelism instead: torchrun or "
            "accelerate launch with a multi-device DDP config (recipes/accelerate/, docs/multi-device.md)"
        )
    raise RecipeError(
        f"{which} is not offered by dpo_xpu (not tested here, also with quantization: {quantization}): use "
        "data parallelism (DDP) with torchrun or accelerate launch (recipes/accelerate/, docs/multi-device.md)"
    )


def ddp_config_kwargs(config_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``{"ddp_find_unused_parameters": False}`` for a multi-process run whose ``config_kwargs`` do not set it (every
    LoRA parameter gets a gradient at each step, so DDP need not search the graph); ``{}`` otherwise."""
    if not is_distributed() or "ddp_find_unused_parameters" in config_kwargs:
        return {}
    return {"ddp_find_unused_parameters": False}


def global_batch_line(per_device_train_batch_size: int, gradient_accumulation_steps: int) -> str:
    """The start line that says how many pairs one optimizer step sees, e.g.
    ``"data parallel: 2 processes (gloo); global batch 4 = 1 per device x 2 processes x 2 accumulation steps"``."""
    n = world_size()
    backend = "one process"
    if n > 1:
        import torch.distributed as dist

        backend = f"{n} processes ({dist.get_backend() if dist.is_initialized() else 'no process group'})"
    batch, steps = per_device_train_batch_size, gradient_accumulation_steps
    return (
        f"data parallel: {backend}; global batch {batch * n * steps} = {batch} per device x "
        f"{n} process{'es' if n > 1 else ''} x {steps} accumulation step{'s' if steps != 1 else ''}"
    )


def _rebuild(info: dict[str, Any], where: int) -> BaseException:
    """Rank ``where``'s error as this rank raises it: the same :mod:`dpo_xpu.errors` class and message (prefixed
    ``on rank N:`` when N is not 0), marked as raised by every rank."""
    from dpo_xpu import errors

    cls = getattr(errors, info["name"], None) if info["module"] == errors.__name__ else None
    message = info["message"] if where == 0 else f"on rank {where}: {info['message']}"
    exc: BaseException
    if isinstance(cls, type) and issubclass(cls, DpoXpuError):
        exc = cls(message)
        if info["exit_code"] is not None:
            exc.exit_code = info["exit_code"]  # type: ignore[attr-defined]
    elif info["name"] == "KeyboardInterrupt":
        exc = KeyboardInterrupt()
    else:
        first = (info["message"].splitlines() or [""])[0][:300]
        exc = RankFailed(f"rank {where} failed with {info['name']}: {first}")
    setattr(exc, ALL_RANKS_ATTR, True)
    return exc


def _run_where(runs_here: bool, fn: Callable[[], Any], share: bool = False) -> Any:
    """Run ``fn`` on the ranks where ``runs_here``, then gather every rank's outcome (a collective: every rank calls
    it). Returns rank 0's value with ``share`` (it must pickle), else this rank's own (``None`` where ``fn`` did not
    run); any rank's error is raised on every rank (this rank's own, else the lowest failing rank's, see
    :func:`_rebuild`). Alone: ``fn()`` where ``runs_here``."""
    if not is_distributed():
        return fn() if runs_here else None
    from accelerate.utils import gather_object

    value = own = None
    outcome: tuple[str, Any] = ("skipped", None)
    if runs_here:
        try:
            value = fn()
            outcome = ("ok", value if share else None)
        except BaseException as exc:
            own = exc
            info = {"module": type(exc).__module__, "name": type(exc).__name__, "message": str(exc)}
            outcome = ("error", {**info, "exit_code": getattr(exc, "exit_code", None)})
    outcomes = gather_object([outcome])
    if own is not None:
        setattr(own, ALL_RANKS_ATTR, True)
        raise own
    for where, (status, info) in enumerate(outcomes):
        if status == "error":
            raise _rebuild(info, where)
    return outcomes[0][1] if share else value


def on_rank_zero(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` on rank 0 alone and return its (picklable) result on every rank; alone, just call it.

    Raises:
        BaseException: what ``fn`` raised on rank 0, on every rank: a :class:`~dpo_xpu.errors.DpoXpuError` as the
            same class and message, anything else as :class:`RankFailed`.
    """
    return _run_where(rank() == 0, lambda: fn(*args, **kwargs), share=True)


def on_every_rank(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` on every rank, each returning its own result; when it fails on any rank (a node without the model
    or the data), every rank raises that error (``on rank N: ...`` beside rank 0's own), so that no rank is left
    waiting for the failed one at its next collective. A collective: call it where every rank does (never inside
    :func:`on_rank_zero`'s ``fn``). Alone, just call it."""
    return _run_where(True, lambda: fn(*args, **kwargs))


def main_process_first(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` first on each node's first process (``LOCAL_RANK`` 0; the nodes at the same time), then on the
    node's other processes, each returning its own result: what ``fn`` caches on disk is computed once per node,
    into that node's own folder (nodes need not share a file system). An error on any rank is raised on every rank,
    as :func:`on_every_rank` does. Alone, just call it."""
    first = _env_int("LOCAL_RANK") == 0
    firsts = _run_where(first, lambda: fn(*args, **kwargs))
    others = _run_where(not first, lambda: fn(*args, **kwargs))  # a collective: every rank calls it
    return firsts if first else others


def barrier() -> None:
    """Wait until every rank gets here (no-op alone or before the process group exists)."""
    import torch.distributed as dist

    if is_distributed() and dist.is_initialized():
        dist.barrier()


def agree_on_signal(signum: int | None) -> int | None:
    """The signal any rank received (the largest number when several), known to every rank; alone: ``signum``.
    Called at each step's end, so that a SIGTERM reaching the ranks at slightly different times stops all of them
    after the same step."""
    import torch.distributed as dist

    if not (is_distributed() and dist.is_initialized()):
        return signum
    import torch
    from accelerate import PartialState

    flag = torch.tensor([signum or 0], dtype=torch.int64, device=PartialState().device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # a third of gather_object's time (2 gloo ranks: 1.0 vs 3.2 ms)
    return int(flag.item()) or None


def raised_by_all_ranks(exc: BaseException) -> bool:
    """Whether every rank raises ``exc`` with the same message (the CLI then prints it on rank 0 only)."""
    return bool(getattr(exc, ALL_RANKS_ATTR, False))
