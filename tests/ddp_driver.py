"""Test-only entry point for one rank of a multi-process ``dpo-xpu train`` (started by ``torchrun`` in
tests/test_distributed.py); not a test module itself.

    torchrun --standalone --nproc_per_node 2 tests/ddp_driver.py OUT_DIR train --recipe R ...

It runs ``dpo_xpu.cli.main`` on the arguments after ``OUT_DIR`` and writes ``OUT_DIR/rank<R>.json`` with:

- ``lora_sha256``: a digest of this rank's trainable LoRA weights after training (equal on every rank under DDP);
- ``writes``: every file this process opened for writing or created, renamed or removed through Python
  (``sys.addaudithook``: builtins.open, os.open, os.mkdir, os.rename/replace, os.remove, shutil.rmtree).
  torch.save and safetensors write from C++ / Rust and are not seen: the test also checks the folder's files;
- ``exit_code``.

With ``DDP_TEST_SIGNAL_STEP=N`` and ``DDP_TEST_SIGNAL_RANK=R``, rank R sends itself SIGTERM at the end of step N.
With ``DDP_TEST_NO_BARRIER=1`` a rank leaves without waiting for the others (a rank failing alone: they wait elsewhere).

``OUT_DIR probe CACHE_DIR FAILING_RANK`` trains nothing: :func:`dpo_xpu.distributed.main_process_first` fills
``CACHE_DIR/cache.txt`` (each rank appends ``computed R`` or ``read R``, in order), then
:func:`dpo_xpu.distributed.on_every_rank` fails on ``FAILING_RANK`` alone; ``OUT_DIR/rank<R>.json`` holds the error
each rank raised.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

WRITE_EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree", "shutil.move"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _record(writes: list[str]) -> Any:
    def hook(event: str, args: tuple) -> None:
        path = None
        if event == "open":
            target, mode, flags = (list(args) + [None, None, None])[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & WRITE_FLAGS
            )
            if writing and isinstance(target, (str, bytes, os.PathLike)):
                path = target
        elif event in WRITE_EVENTS and args:
            path = args[0]
        if path is not None:
            path = os.fsdecode(path) if not isinstance(path, str) else path
            if not path.startswith(("/dev/", "/proc/")):
                writes.append(f"{event} {os.path.abspath(path)}")

    return hook


def probe(out: Path, cache: Path, failing_rank: int) -> int:
    import torch

    from dpo_xpu import distributed
    from dpo_xpu.errors import RecipeError

    rank = distributed.rank()
    distributed.init_distributed(torch.device("cpu"))

    def fill() -> None:
        cache.mkdir(parents=True, exist_ok=True)
        done = (cache / "cache.txt").exists()
        with (cache / "cache.txt").open("a") as handle:
            handle.write(f"{'read' if done else 'computed'} {rank}\n")

    def check() -> None:
        if rank == failing_rank:
            raise RecipeError("no model here")

    distributed.main_process_first(fill)
    report: dict[str, Any] = {"rank": rank, "error": None}
    try:
        distributed.on_every_rank(check)
    except RecipeError as exc:
        report.update(error=str(exc), all_ranks=distributed.raised_by_all_ranks(exc))
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    distributed.barrier()
    torch.distributed.destroy_process_group()  # no rank leaves while another still talks to it
    return 0


def main() -> int:
    out = Path(sys.argv[1])
    if sys.argv[2] == "probe":
        return probe(out, Path(sys.argv[3]), int(sys.argv[4]))
    argv = sys.argv[2:]
    rank = int(os.environ.get("RANK", "0"))
    writes: list[str] = []
    sys.addaudithook(_record(writes))

    from transformers import TrainerCallback

    import dpo_xpu.pipeline as training
    from dpo_xpu import cli

    digest: dict[str, str | None] = {"lora_sha256": None}
    original = training.run_training

    class SignalAtStep(TrainerCallback):
        def __init__(self, step: int) -> None:
            self.step = step

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == self.step:
                os.kill(os.getpid(), signal.SIGTERM)

    def run_training(recipe: Any, *args: Any, **kwargs: Any) -> Any:
        step = int(os.environ.get("DDP_TEST_SIGNAL_STEP", "0"))
        if step and int(os.environ.get("DDP_TEST_SIGNAL_RANK", "0")) == rank:
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), SignalAtStep(step)]
        result = original(recipe, *args, **kwargs)
        if result.trainer is not None:
            h = hashlib.sha256()
            for name, param in sorted(result.trainer.model.named_parameters()):
                if param.requires_grad:
                    h.update(name.encode())
                    h.update(param.detach().float().cpu().numpy().tobytes())
            digest["lora_sha256"] = h.hexdigest()
        return result

    training.run_training = run_training
    code = 1
    try:
        code = cli.main(argv)
    finally:
        report = {"rank": rank, "exit_code": code, "writes": writes, **digest}
        (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
        # torchrun stops the other ranks once one exits with an error: leave only when every report is written
        from dpo_xpu.distributed import barrier

        try:
            if not os.environ.get("DDP_TEST_NO_BARRIER"):
                barrier()
        except Exception:  # noqa: BLE001 - the group is gone: nothing to wait for
            pass
    return code


if __name__ == "__main__":
    sys.exit(main())
