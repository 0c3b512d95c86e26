"""Where a run's reference log-probs come from, decided once per recipe and TRL generation.

DPO's loss compares the policy's log-probs of each answer with a frozen reference's (Rafailov et al. 2023, eq. 7).
A recipe's ``reference`` (``auto``, ``adapter-off``, ``separate``, ``precomputed``), ``reference_free``,
``loss_type: simpo`` and ``reference_device`` together say how: :func:`reference_plan` turns them into one
:class:`ReferencePlan` that the TRL mapping, the model loading and the trainer factory all read, instead of each
deciding again.

``reference: auto`` (the default) picks the fastest exact strategy that the rest of the recipe allows, and says why
(:func:`resolve_reference`): ``precomputed`` (one reference forward per row, sorted by length, batched and cached
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


def is_reference_free(recipe: Recipe) -> bool:
    """Every reference log-prob is 0: ``reference_free``, or ``loss_type: simpo`` (SimPO, Meng et al. 2024)."""
    return recipe.reference_free or recipe.loss_type == "simpo"


def trained_pairs(recipe: Recipe, rows: int, world_size: int = 1) -> float:
    """Preference pairs a run trains on: ``max_steps`` x the global batch (per-device batch x gradient
    accumulation x ``world_size``), or ``num_train_epochs`` x ``rows`` when ``max_steps`` is ``-1``."""
    if recipe.max_steps > 0:
        return recipe.max_steps * recipe.per_device_train_batch_size * recipe.gradient_accumulation_steps * world_size
    return recipe.num_train_epochs * rows


def resolve_reference(recipe: Recipe, generation: str, rows: int | None = None, world_size: int = 1) -> tuple[str, str]:
    """The strategy ``reference: auto`` stands for, and why; an explicit ``reference`` is returned as it is.

    Args:
        recipe: the run's recipe.
        generation: ``"0.11"`` or ``"1.x"`` (:func:`dpo_xpu.train.trl_internals.trl_generation`).
        rows: training rows, once the data is loaded; ``None`` before (then a run is taken to cover its rows).
        world_size: data-parallel processes (the global batch is this times the per-device batch).

    Returns:
        ``(strategy, why)``: ``adapter-off``, ``separate`` or ``precomputed``, and one line for the log.
    """
    if recipe.reference != "auto":
        return recipe.reference, f"reference: {recipe.reference} (set in the recipe)"
    if is_reference_free(recipe):
        return "adapter-off", "reference: auto -> adapter-off (a reference-free loss computes no reference)"
    if recipe.reference_device == "cpu":
        return "separate", "reference: auto -> separate (reference_device: cpu moves a separate model)"
    if recipe.adapter_name_or_path:
        return "adapter-off", "reference: auto -> adapter-off (the starting adapter's frozen copy is the reference)"
    if generation != "1.x" or recipe.backend == "ipex-llm":
        return "adapter-off", "reference: auto -> adapter-off (the ipex-llm backend runs Intel's example as it is)"
    pairs = trained_pairs(recipe, rows, world_size) if rows else None
    if pairs is not None and pairs < rows:
        return "adapter-off", (
            f"reference: auto -> adapter-off (the run trains on {pairs:g} pairs of {rows} rows: precomputing every "
            "row would cost more than the reference forwards of its steps)"
        )
    return "precomputed", "reference: auto -> precomputed (each row's reference computed once, then cached on disk)"


def reference_plan(recipe: Recipe, generation: str, rows: int | None = None, world_size: int = 1) -> ReferencePlan:
    """The :class:`ReferencePlan` of a recipe on a TRL generation (``"0.11"`` or ``"1.x"``); ``rows`` and
    ``world_size`` as for :func:`resolve_reference`."""
    strategy, why = resolve_reference(recipe, generation, rows, world_size)
    precomputed_by = None
    if strategy == "precomputed":
        precomputed_by = "dpo_xpu" if generation == "1.x" else "trl"
    return ReferencePlan(
        strategy=strategy,
        separate_model=strategy == "separate",
        precomputed_by=precomputed_by,
        reference_free=is_reference_free(recipe),
        device="cpu" if recipe.reference_device == "cpu" else None,
        generation=generation,
        why=why,
    )
