"""Training on several devices of this machine from a notebook or a script: :func:`launch_training` starts the
ranks with accelerate's ``notebook_launcher`` (``debug_launcher`` on the CPU), each running
:func:`dpo_xpu.pipeline.run_training`. ``notebook_launcher`` needs the training function in an importable module,
hence this one (the ranks themselves are :mod:`dpo_xpu.distributed`'s business).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_xpu.errors import RecipeError

if TYPE_CHECKING:
    from dpo_xpu.recipes import Recipe


def _train_worker(recipe: Recipe, overwrite: bool, resume: bool) -> None:
    """One rank's work under :func:`launch_training` (module level, so spawned processes can import it)."""
    import torch.distributed as dist

    from dpo_xpu.pipeline import run_training

    if dist.is_available() and dist.is_initialized():  # debug_launcher: a process group, but no RANK / LOCAL_RANK
        os.environ.setdefault("RANK", str(dist.get_rank()))
        os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))

    run_training(recipe, overwrite=overwrite, live_plot=False, resume=resume)


def launch_training(
    recipe: Recipe | str | Path | dict[str, Any],
    num_processes: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
) -> Path:
    """Train ``recipe`` (a Recipe, a YAML path or a dict of recipe keys) on several devices of this machine, each
    process running :func:`dpo_xpu.pipeline.run_training` (``overwrite``, ``resume`` as there); rank 0 writes the run
    folder. Call it before anything touches the device (bitsandbytes' import included): ``notebook_launcher``
    refuses to start once an accelerator was initialised in the kernel.

    Args:
        num_processes: default one per accelerator device (XPU, then CUDA); with 1, or one device, it says so and
            trains in this process.

    Returns:
        The run folder (``recipe.output_dir``).

    Raises:
        RecipeError: a bad recipe, ``num_processes`` < 1, or more processes than the recipe's devices.
        DpoXpuError: from training.
    """
    from accelerate import debug_launcher, notebook_launcher

    from dpo_xpu.device import device_count
    from dpo_xpu.recipes import Recipe, load_recipe, make_recipe

    if isinstance(recipe, dict):
        recipe = make_recipe(recipe)  # as a recipe file: TRL's options accepted, values converted and checked
    elif isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe)
    elif not isinstance(recipe, Recipe):
        raise RecipeError(
            f"launch_training: recipe must be a Recipe, a YAML path or a dict of recipe keys, found "
            f"{type(recipe).__name__}"
        )
    on_cpu = recipe.device.startswith("cpu")
    kind, count = next(((k, n) for k in ("xpu", "cuda") if (n := device_count(k)) > 0), ("cpu", 0))
    if num_processes is None:
        num_processes = 1 if on_cpu else max(1, count)
    if num_processes < 1:
        raise RecipeError(f"num_processes must be at least 1, found {num_processes}")
    if num_processes == 1:
        where = "the CPU" if on_cpu or count == 0 else f"one {kind} device"
        print(f"launch_training: one process on {where}: training in this process", flush=True)
        _train_worker(recipe, overwrite, resume)
        return Path(recipe.output_dir)
    if not on_cpu and num_processes > count:
        raise RecipeError(
            f"num_processes={num_processes} but this machine has {count} {kind} device(s): ask for at most {count}"
        )
    launcher = debug_launcher if on_cpu else notebook_launcher  # debug_launcher: gloo processes on the CPU
    launcher(_train_worker, args=(recipe, overwrite, resume), num_processes=num_processes)
    return Path(recipe.output_dir)
