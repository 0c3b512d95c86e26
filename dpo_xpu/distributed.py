"""More than one device: data-parallel DPO (DDP) under ``torchrun`` or ``accelerate launch``.

Each rank trains on its own device and holds one full NF4 copy of the base; the Trainer's DDP averages the LoRA
gradients, so one step sees ``per_device_train_batch_size x processes x gradient_accumulation_steps`` pairs. The
process group and the collectives are accelerate's (``PartialState``, ``gather_object``). What dpo_xpu adds:

- the rank's device (:func:`device_for_rank`);
- rank 0 alone decides and writes the run folder (:func:`on_rank_zero`), and its result, or its error with the same
  one-line message, reaches every rank; a check that fails on one rank alone (:func:`on_every_rank`: a node without
  the model) stops every rank too: accelerate's ``main_process_first`` / ``on_main_process`` leave the other ranks
  waiting at a barrier when one raises, hence our own;
- the ``precomputed`` reference is computed once per node, by its first process into the node's own cache folder,
  then read from it by the node's other processes (:func:`main_process_first`): nodes need not share a file system;
- SIGINT / SIGTERM stop every rank after the same step (:func:`agree_on_signal`);
- FSDP and DeepSpeed ZeRO are refused (:func:`check_engine`): sharding packed NF4 weights corrupts some (bitsandbytes
  issue #1945).

Ranks are read from the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), which answers before the process
group exists (``PartialState()`` would create it). With one process every function does nothing, or runs its argument.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from dpo_xpu.errors import DeviceNotAvailableError, DpoXpuError, RecipeError

if TYPE_CHECKING:
    import torch

    from dpo_xpu.recipes import Recipe

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The bitsandbytes issue that rules out sharding NF4 weights (FSDP2 corrupts about 0.1% of packed NF4 weights).
BNB_FSDP_ISSUE = "https://github.com/bitsandbytes-foundation/bitsandbytes/issues/1945"
#: Attribute set on an exception that every rank raises with the same message (the CLI prints it on rank 0 only).
ALL_RANKS_ATTR = "dpo_xpu_all_ranks"


class RankFailed(RuntimeError):
    """Raised on the other ranks when one failed with an error that is no :class:`~dpo_xpu.errors.DpoXpuError`."""


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def world_size() -> int:
    """The number of processes of this run (``WORLD_SIZE``, set by ``torchrun`` / ``accelerate launch``); 1 alone."""
    return max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    """This process's global rank (``RANK``), 0 in a single process."""
    return _env_int("RANK", 0)


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK``): the index of its device; 0 in a single process."""
    return _env_int("LOCAL_RANK", 0)


def is_distributed() -> bool:
    """Whether this process is one of several (``WORLD_SIZE`` > 1)."""
    return world_size() > 1


def is_main_process() -> bool:
    """Whether this process writes the run folder: rank 0, or the only process."""
    return rank() == 0


def is_local_main_process() -> bool:
    """Whether this process is its node's first (``LOCAL_RANK`` 0): it fills the node's caches."""
    return local_rank() == 0


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
    if local_rank() >= count:
        raise DeviceNotAvailableError(
            f"process LOCAL_RANK={local_rank()} has no {kind} device: PyTorch sees {count} on this node. Start at "
            f"most {count} processes per node (torchrun --nproc_per_node {count})"
        )
    return f"{kind}:{local_rank()}"


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


def _is_set(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def check_engine(recipe: Recipe) -> None:
    """Refuse FSDP and DeepSpeed ZeRO, asked for by an ``accelerate launch`` config (``ACCELERATE_USE_FSDP`` /
    ``ACCELERATE_USE_DEEPSPEED``) or the recipe's ``fsdp`` / ``fsdp_config`` / ``deepspeed`` options.

    Raises:
        RecipeError: either asked for; with ``quantization: nf4`` the message names bitsandbytes issue #1945.
    """
    options = recipe.trl_options or {}
    engines = []
    if _is_set("ACCELERATE_USE_FSDP") or options.get("fsdp") or options.get("fsdp_config"):
        engines.append("FSDP")
    if _is_set("ACCELERATE_USE_DEEPSPEED") or options.get("deepspeed"):
        engines.append("DeepSpeed")
    if not engines:
        return
    which = " and ".join(engines)
    if recipe.quantization == "nf4":
        raise RecipeError(
            f"{which} with quantization: nf4 is refused: sharding bitsandbytes' packed NF4 weights corrupts some of "
            f"them (bitsandbytes issue #1945, {BNB_FSDP_ISSUE}). Use data parallelism instead: torchrun or "
            "accelerate launch with a multi-device DDP config (recipes/accelerate/, docs/multi-device.md)"
        )
    raise RecipeError(
        f"{which} is not offered by dpo_xpu (not tested here, also with quantization: {recipe.quantization}): use "
        "data parallelism (DDP) with torchrun or accelerate launch (recipes/accelerate/, docs/multi-device.md)"
    )


def ddp_config_kwargs(config_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``{"ddp_find_unused_parameters": False}`` for a multi-process run whose ``config_kwargs`` do not set it (every
    LoRA parameter gets a gradient at each step, so DDP need not search the graph); ``{}`` otherwise."""
    if not is_distributed() or "ddp_find_unused_parameters" in config_kwargs:
        return {}
    return {"ddp_find_unused_parameters": False}


def global_batch_line(recipe: Recipe) -> str:
    """The start line that says how many pairs one optimizer step sees, e.g.
    ``"data parallel: 2 processes (gloo); global batch 4 = 1 per device x 2 processes x 2 accumulation steps"``."""
    n = world_size()
    backend = "one process"
    if n > 1:
        import torch.distributed as dist

        backend = f"{n} processes ({dist.get_backend() if dist.is_initialized() else 'no process group'})"
    total = recipe.per_device_train_batch_size * n * recipe.gradient_accumulation_steps
    return (
        f"data parallel: {backend}; global batch {total} = {recipe.per_device_train_batch_size} per device x "
        f"{n} process{'es' if n > 1 else ''} x {recipe.gradient_accumulation_steps} accumulation step"
        f"{'s' if recipe.gradient_accumulation_steps != 1 else ''}"
    )


def _describe(exc: BaseException) -> dict[str, Any]:
    return {
        "module": type(exc).__module__,
        "name": type(exc).__name__,
        "message": str(exc),
        "exit_code": getattr(exc, "exit_code", None),
    }


def _rebuild(info: dict[str, Any], where: int) -> BaseException:
    """Rank ``where``'s error as this rank raises it: the same :mod:`dpo_xpu.errors` class and message (prefixed
    ``on rank N:`` when N is not 0), marked as raised by every rank."""
    from dpo_xpu import errors

    cls = getattr(errors, info["name"], None) if info["module"] == errors.__name__ else None
    message = info["message"] if where == 0 else f"on rank {where}: {info['message']}"
    exc: BaseException
    if isinstance(cls, type) and issubclass(cls, DpoXpuError):
        exc = cls(message)
        if info.get("exit_code") is not None:
            exc.exit_code = info["exit_code"]  # type: ignore[attr-defined]
    elif info["name"] == "KeyboardInterrupt":
        exc = KeyboardInterrupt()
    else:
        first = (info["message"].splitlines() or [""])[0][:300]
        exc = RankFailed(f"rank {where} failed with {info['name']}: {first}")
    setattr(exc, ALL_RANKS_ATTR, True)
    return exc


def _run_where(runs_here: bool, fn: Callable[..., T], args: Any, kwargs: Any, share: bool = False) -> list[Any]:
    """Run ``fn`` on the ranks where ``runs_here``, then gather every rank's outcome (a collective: every rank calls
    it). Returns each rank's ``fn`` value (shared ones, else this rank's only); any rank's error is raised on every
    rank (this rank's own, else the lowest failing rank's, see :func:`_rebuild`)."""
    from accelerate.utils import gather_object

    own: BaseException | None = None
    value: Any = None
    outcome: tuple[str, Any] = ("skipped", None)
    if runs_here:
        try:
            value = fn(*args, **kwargs)
            outcome = ("ok", value if share else None)
        except BaseException as exc:
            own, outcome = exc, ("error", _describe(exc))
    outcomes = gather_object([outcome])
    failed = [(r, info) for r, (status, info) in enumerate(outcomes) if status == "error"]
    if own is not None:
        setattr(own, ALL_RANKS_ATTR, True)
        raise own
    if failed:
        raise _rebuild(failed[0][1], failed[0][0])
    values = [payload for _, payload in outcomes]
    values[rank()] = value
    return values


def on_rank_zero(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` on rank 0 alone and return its (picklable) result on every rank; alone, just call it.

    Raises:
        BaseException: what ``fn`` raised on rank 0, on every rank: a :class:`~dpo_xpu.errors.DpoXpuError` as the
            same class and message, anything else as :class:`RankFailed`.
    """
    if not is_distributed():
        return fn(*args, **kwargs)
    return _run_where(rank() == 0, fn, args, kwargs, share=True)[0]


def on_every_rank(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` on every rank, each returning its own result; when it fails on any rank (a node without the model
    or the data), every rank raises that error (``on rank N: ...`` beside rank 0's own), so that no rank is left
    waiting for the failed one at its next collective. A collective: call it where every rank does (never inside
    :func:`on_rank_zero`'s ``fn``). Alone, just call it."""
    if not is_distributed():
        return fn(*args, **kwargs)
    return _run_where(True, fn, args, kwargs)[rank()]


def main_process_first(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` first on each node's first process (``LOCAL_RANK`` 0; the nodes at the same time), then on the
    node's other processes, each returning its own result: what ``fn`` caches on disk is computed once per node,
    into that node's own folder (nodes need not share a file system). An error on any rank is raised on every rank,
    as :func:`on_every_rank` does. Alone, just call it."""
    if not is_distributed():
        return fn(*args, **kwargs)
    first = is_local_main_process()
    firsts = _run_where(first, fn, args, kwargs)
    others = _run_where(not first, fn, args, kwargs)  # a collective: every rank calls it
    return (firsts if first else others)[rank()]


def barrier() -> None:
    """Wait until every rank gets here (no-op alone or before the process group exists)."""
    if not is_distributed():
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def agree_on_signal(signum: int | None) -> int | None:
    """The signal any rank received (the largest number when several), known to every rank; alone: ``signum``.
    Called at each step's end, so that a SIGTERM reaching the ranks at slightly different times stops all of them
    after the same step."""
    if not is_distributed():
        return signum
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    if not dist.is_initialized():
        return signum
    flag = torch.tensor([signum or 0], dtype=torch.int64, device=PartialState().device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    value = int(flag.item())
    return value or None


def raised_by_all_ranks(exc: BaseException) -> bool:
    """Whether every rank raises ``exc`` with the same message (the CLI then prints it on rank 0 only)."""
    return bool(getattr(exc, ALL_RANKS_ATTR, False))
