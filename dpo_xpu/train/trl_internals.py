"""Every reach of dpo_xpu into the private parts of TRL, accelerate and transformers, gathered in one place.

dpo_xpu keeps TRL's loop, losses and metrics, and changes a few things no public option reaches. Each of those
touches a name that a TRL release may rename without notice; they all go through this module, and
:func:`missing_internals` (run by the test suite and by :func:`dpo_xpu.pipeline.make_dpo_trainer`) names each one the
installed TRL lacks, with its version, so a TRL upgrade fails at once with one line instead of deep in a step.

What is reached, and why (TRL 1.x unless said otherwise):

- ``DPOTrainer._compute_loss(model, inputs, return_outputs)``: overridden by
  :class:`~dpo_xpu.train.trainer.DpoXpuTrainer` to add dpo_xpu's own losses, prefix sharing and a CPU reference;
- ``DPOTrainer.precompute_ref_logps`` (attribute): TRL reads the reference log-probs from the batch when it is
  true; the trainer sets it for the length of one loss call, and the precomputed reference for the whole run;
- ``DPOTrainer._metrics[mode]``: the per-micro-batch lists TRL logs; dpo_xpu's own losses replace ``rewards/*``;
- ``DPOTrainer._precompute_ref_logps(dataset, name, batch_size)``: routed through dpo_xpu's on-disk cache
  (:mod:`dpo_xpu.train.reference_cache`), so that ``evaluate(new_dataset)`` uses the cache too;
- ``trl.trainer.utils._use_triton(device)``: TRL's switch that scores only answer tokens; opened for the CPU
  (:func:`score_answer_tokens_only_on_cpu`);
- ``trl.trainer.utils.use_adapter`` and ``selective_log_softmax``: TRL's helpers (public module, undocumented);
- accelerate's ``model._is_accelerate_prepared``: marks a reference kept on the CPU so ``prepare`` leaves it there;
- transformers' ``Trainer._load_from_checkpoint(resume_from_checkpoint, model)``: wrapped on ``--resume`` under
  several processes, to cast the reloaded LoRA weights back before DDP builds its buckets;
- TRL 0.11 (the ipex-llm backend): ``DPOTrainer.get_batch_loss_metrics(model, batch, train_eval)``.
"""

from __future__ import annotations

import contextlib
import inspect
import types
from collections.abc import Callable, Iterator
from typing import Any

#: TRL 1.x ``DPOTrainer`` methods dpo_xpu overrides or calls, with the parameters it passes.
TRAINER_METHODS_1X = {
    "_compute_loss": ("model", "inputs", "return_outputs"),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "_precompute_ref_logps": ("dataset", "name"),
    "compute_ref_log_probs": ("model", "inputs"),
}
TRAINER_METHODS_011 = {"get_batch_loss_metrics": ("model", "batch", "train_eval")}
#: Names read in ``trl.trainer.utils`` (TRL 1.x).
TRL_UTILS_1X = ("_use_triton", "use_adapter", "selective_log_softmax")
#: Attributes TRL 1.x's ``DPOTrainer.__init__`` sets that dpo_xpu reads or writes (checked on a built trainer).
TRAINER_ATTRIBUTES_1X = ("_metrics", "precompute_ref_logps")


def trl_generation() -> str:
    """``"1.x"`` for TRL >= 0.12's API (``processing_class=``, no ``max_prompt_length``), else ``"0.11"``: the one
    place that reads the installed TRL's generation."""
    import trl
    from packaging.version import Version

    return "1.x" if Version(trl.__version__) >= Version("0.12") else "0.11"


def missing_internals(trainer: Any | None = None) -> list[str]:
    """The private names dpo_xpu relies on that the installed TRL lacks (empty when all are there).

    Args:
        trainer: a built ``DPOTrainer``; when given, its attributes (:data:`TRAINER_ATTRIBUTES_1X`) are checked too.

    Returns:
        One line per missing name, each naming the installed TRL version, e.g. ``"trl 1.17.0: DPOTrainer has no
        method _compute_loss (dpo_xpu overrides it)"``.
    """
    import trl
    from trl import DPOTrainer

    where = f"trl {trl.__version__}"
    problems = []
    methods = TRAINER_METHODS_1X if trl_generation() == "1.x" else TRAINER_METHODS_011
    for name, params in methods.items():
        method = getattr(DPOTrainer, name, None)
        if method is None:
            problems.append(f"{where}: DPOTrainer has no method {name} (dpo_xpu overrides or calls it)")
            continue
        found = list(inspect.signature(method).parameters)
        absent = [p for p in params if p not in found]
        if absent:
            problems.append(f"{where}: DPOTrainer.{name} lacks the parameter(s) {', '.join(absent)}")
    if trl_generation() == "1.x":
        import trl.trainer.utils as trl_utils

        problems += [f"{where}: trl.trainer.utils has no {n}" for n in TRL_UTILS_1X if not hasattr(trl_utils, n)]
        if trainer is not None:
            problems += [
                f"{where}: a built DPOTrainer has no attribute {n}"
                for n in TRAINER_ATTRIBUTES_1X
                if not hasattr(trainer, n)
            ]
    return problems


def require_internals(trainer: Any | None = None) -> None:
    """Raise when :func:`missing_internals` finds anything.

    Raises:
        RuntimeError: one line per missing name and the fix (the TRL range dpo_xpu is tested with).
    """
    problems = missing_internals(trainer)
    if problems:
        raise RuntimeError(
            "dpo_xpu does not support the installed TRL: "
            + "; ".join(problems)
            + ". Fix: install the TRL release dpo_xpu is tested with (environment.yml: trl 1.16 for the native "
            "backend; environment-ipex-llm.yml: trl 0.11.4), or upgrade dpo_xpu"
        )


def step_metrics(trainer: Any) -> dict[str, list[float]]:
    """TRL's metric lists of the current mode (``train`` or ``eval``): one value appended per micro-batch."""
    return trainer._metrics["train" if trainer.model.training else "eval"]


@contextlib.contextmanager
def reference_logps_from_batch(trainer: Any) -> Iterator[None]:
    """Within the block, TRL reads ``ref_chosen_logps`` / ``ref_rejected_logps`` from the batch."""
    before = trainer.precompute_ref_logps
    trainer.precompute_ref_logps = True
    try:
        yield
    finally:
        trainer.precompute_ref_logps = before


def route_reference_precompute(trainer: Any, precompute: Callable[..., Any]) -> Callable[..., Any]:
    """Replace the trainer's ``_precompute_ref_logps`` by ``precompute(trainer, dataset, name, batch=None)`` for the
    rest of the run, read the log-probs from the datasets from now on, and return the bound method."""
    trainer._precompute_ref_logps = types.MethodType(precompute, trainer)
    trainer.precompute_ref_logps = True
    trainer.args.precompute_ref_log_probs = True
    return trainer._precompute_ref_logps


def mark_prepared(model: Any) -> None:
    """Make accelerate's ``prepare`` return ``model`` unchanged (not moved to the accelerator)."""
    model._is_accelerate_prepared = True


def score_answer_tokens_only_on_cpu(enabled: bool = True) -> bool:
    """Let TRL 1.x's fused LM head score only the answer tokens on the CPU, as it already does on XPU and CUDA.

    TRL computes per-token log-probs in vocabulary chunks without materialising the logits. On Triton devices
    (XPU, CUDA) it scores only the positions with a label (the answer tokens); elsewhere it scores every position,
    prompt and padding included, because on Neuron a changing number of positions would recompile the graph
    (``trl.trainer.utils``, the ``compact`` switch). The CPU compiles nothing, so there the extra positions are
    pure waste: the LM head (vocabulary x hidden) dominates a step's FLOPs and memory on 150k-token vocabularies.
    This opens the switch for the CPU only; the kernels stay TRL's, and each scored token's log-prob is
    computed exactly as before (its row of the chunked log-softmax does not depend on the other rows).
    No library offers this, hence these few lines of our own. :func:`~dpo_xpu.pipeline.make_dpo_trainer`
    calls it for CPU runs.

    Args:
        enabled: ``True`` opens the switch for the CPU; ``False`` restores TRL's own behaviour.

    Returns:
        ``True`` when TRL has the switch, ``False`` for a TRL without it (0.11 has no fused LM head).
    """
    try:
        import trl.trainer.utils as trl_utils
    except ImportError:  # pragma: no cover - TRL is a dependency
        return False
    current = getattr(trl_utils, "_use_triton", None)
    if current is None:
        return False
    trl_own = getattr(current, "trl_own", current)
    if not enabled:
        trl_utils._use_triton = trl_own
    elif current is trl_own:

        def compact_positions(device: Any) -> bool:
            return device.type == "cpu" or trl_own(device)

        compact_positions.trl_own = trl_own  # type: ignore[attr-defined]
        trl_utils._use_triton = compact_positions
    return True


def use_adapter(model: Any, adapter_name: str | None) -> Any:
    """TRL's context manager that runs a PEFT model with ``adapter_name`` active (``None``: adapters off)."""
    from trl.trainer.utils import use_adapter as trl_use_adapter

    return trl_use_adapter(model, adapter_name=adapter_name)


def selective_log_softmax() -> Callable[[Any, Any], Any] | None:
    """TRL's memory-saving ``log_softmax`` + ``gather`` (TRL >= 0.14), or ``None`` where it is absent."""
    try:
        from trl.trainer.utils import selective_log_softmax as trl_selective
    except ImportError:
        return None
    return trl_selective


def keep_dtypes_before_ddp(trainer: Any, keeper: Any) -> None:
    """On ``resume`` under several processes, cast the reloaded LoRA weights back to their dtypes before DDP
    wraps the model (the pipeline calls it only under several processes).

    ``Trainer`` reloads the checkpoint's adapter (PEFT upcasts it to float32) before ``accelerator.prepare``
    builds DDP's gradient buckets; :class:`dpo_xpu.callbacks.checkpoints.KeepTrainableDtypes` casts them back only at
    ``on_train_begin``, after DDP was built for float32 parameters, and DDP then no longer keeps the ranks' LoRA
    weights equal (measured: different digests on the two ranks after a resume). So the cast also runs right after
    the reload. A reach into transformers' private ``Trainer._load_from_checkpoint`` (transformers 5.x; TRL's
    ``DPOTrainer`` inherits it): when the name is gone this raises rather than silently training apart.

    Args:
        trainer: the run's trainer, before ``train(resume_from_checkpoint=...)``.
        keeper: its :class:`~dpo_xpu.callbacks.checkpoints.KeepTrainableDtypes` callback.

    Raises:
        AttributeError: the installed transformers has no ``Trainer._load_from_checkpoint``.
    """
    load = trainer._load_from_checkpoint

    def load_then_cast(resume_from_checkpoint: str, model: Any = None) -> None:
        load(resume_from_checkpoint, model)
        keeper.on_train_begin(trainer.args, trainer.state, trainer.control, model=trainer.model)

    trainer._load_from_checkpoint = load_then_cast
