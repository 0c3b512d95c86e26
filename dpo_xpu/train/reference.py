"""Where a run's reference log-probs come from, decided once per recipe and TRL generation.

DPO's loss compares the policy's log-probs of each answer with a frozen reference's (Rafailov et al. 2023, eq. 7).
A recipe's ``reference`` (``auto``, ``adapter-off``, ``separate``, ``precomputed``), ``reference_free``,
``loss_type: simpo`` and ``reference_device`` together say how: :func:`reference_plan` turns them into one
:class:`ReferencePlan` that the TRL mapping, the model loading and the trainer factory all read, instead of each
deciding again.

``reference: auto`` (the default) picks the fastest exact strategy that the rest of the recipe allows, and says why
(:func:`reference_plan`): ``precomputed`` (one reference forward per row, sorted by length, batched and cached
on disk, so a rerun on the same data computes nothing), unless the run trains on only part of its rows (then
precomputing every row costs more than the per-step reference forwards of ``adapter-off``), a reference-free loss
needs none, ``reference_device: cpu`` needs a ``separate`` model, a starting adapter is the reference
(``adapter-off`` keeps its frozen copy), or the backend is ipex-llm (Intel's example, reproduced as it is).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dpo_xpu.recipes import Recipe


@dataclass(frozen=True)
class ReferencePlan:
    """How the reference log-probs of a run are computed.

    Attributes:
        strategy: the recipe's ``reference``, with ``auto`` resolved (``adapter-off``, ``separate`` or
            ``precomputed``).
        separate_model: a second frozen copy of the base is loaded (``separate``).
        precomputed_by: ``None`` (computed at every step), ``"trl"`` (TRL 0.11's own precompute, the ipex-llm
            backend) or ``"dpo_xpu"`` (dpo_xpu's checked on-disk cache, :mod:`dpo_xpu.train.reference_cache`, TRL
            1.x: TRL's own cache is keyed by the data and the weights only, not by ``max_length`` or truncation,
            and has no corruption check).
        reference_free: every reference log-prob is 0 (``reference_free``, or ``loss_type: simpo``): no reference
            forward at all, and no step-0 check (the rewards are not 0 at step 0).
        device: ``"cpu"`` for a separate reference kept off the accelerator, else ``None`` (the policy's device).
        generation: the TRL generation it was made for, ``"0.11"`` or ``"1.x"``.
        why: one line saying how ``strategy`` was chosen (``auto``'s reason, or that the recipe set it).
    """

    strategy: str
    separate_model: bool
    precomputed_by: str | None
    reference_free: bool
    device: str | None
    generation: str
    why: str = ""

    @property
    def trl_precomputes(self) -> bool:
        """``DPOConfig.precompute_ref_log_probs``: TRL computes the log-probs before training itself."""
        return self.precomputed_by == "trl"


def reference_plan(recipe: Recipe, generation: str, rows: int | None = None, world_size: int = 1) -> ReferencePlan:
    """The :class:`ReferencePlan` of a recipe: an explicit ``reference`` as it is, or what ``reference: auto``
    stands for, and why.

    Args:
        recipe: the run's recipe.
        generation: ``"0.11"`` or ``"1.x"`` (:func:`dpo_xpu.train.trl_internals.trl_generation`).
        rows: training rows, once the data is loaded; ``None`` before (then a run is taken to cover its rows).
        world_size: data-parallel processes (the global batch is this times the per-device batch).
    """
    # every reference log-prob is 0: reference_free, or SimPO (Meng et al. 2024)
    free = recipe.reference_free or recipe.loss_type == "simpo"
    # pairs the run trains on: max_steps x the global batch, or epochs x rows when max_steps is -1
    global_batch = recipe.per_device_train_batch_size * recipe.gradient_accumulation_steps * world_size
    pairs = (
        (recipe.max_steps * global_batch if recipe.max_steps > 0 else recipe.num_train_epochs * rows) if rows else None
    )
    auto = (  # what reference: auto stands for: the first strategy whose condition holds, and why
        (free, "adapter-off", "a reference-free loss computes no reference"),
        (recipe.reference_device == "cpu", "separate", "reference_device: cpu moves a separate model"),
        (bool(recipe.adapter_name_or_path), "adapter-off", "the starting adapter's frozen copy is the reference"),
        (
            generation != "1.x" or recipe.backend == "ipex-llm",
            "adapter-off",
            "the ipex-llm backend runs Intel's example",
        ),
        (
            pairs is not None and pairs < rows,
            "adapter-off",
            f"the run trains on {pairs or 0:g} pairs of {rows} rows: precomputing every row would cost more than the "
            "reference forwards of its steps",
        ),
        (True, "precomputed", "each row's reference computed once, then cached on disk"),
    )
    if recipe.reference != "auto":
        strategy, why = recipe.reference, f"reference: {recipe.reference} (set in the recipe)"
    else:
        strategy, reason = next((strategy, reason) for holds, strategy, reason in auto if holds)
        why = f"reference: auto -> {strategy} ({reason})"
    precomputed_by = None
    if strategy == "precomputed":
        precomputed_by = "dpo_xpu" if generation == "1.x" else "trl"
    return ReferencePlan(
        strategy=strategy,
        separate_model=strategy == "separate",
        precomputed_by=precomputed_by,
        reference_free=free,
        device="cpu" if recipe.reference_device == "cpu" else None,
        generation=generation,
        why=why,
    )
