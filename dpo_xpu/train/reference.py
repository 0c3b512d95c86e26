"""Where a run's reference log-probs come from, decided once per recipe and TRL generation.

DPO's loss compares the policy's log-probs of each answer with a frozen reference's (Rafailov et al. 2023, eq. 7).
A recipe's ``reference`` (``adapter-off``, ``separate``, ``precomputed``), ``reference_free``, ``loss_type: simpo``
and ``reference_device`` together say how: :func:`reference_plan` turns them into one :class:`ReferencePlan` that
the TRL mapping, the model loading and the trainer factory all read, instead of each deciding again.
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
        strategy: the recipe's ``reference``.
        separate_model: a second frozen copy of the base is loaded (``separate``).
        precomputed_by: ``None`` (computed at every step), ``"trl"`` (TRL 0.11's own precompute, the ipex-llm
            backend) or ``"dpo_xpu"`` (dpo_xpu's checked on-disk cache, :mod:`dpo_xpu.train.reference_cache`, TRL
            1.x: TRL's own cache is keyed by the data and the weights only, not by ``max_length`` or truncation,
            and has no corruption check).
        reference_free: every reference log-prob is 0 (``reference_free``, or ``loss_type: simpo``): no reference
            forward at all, and no step-0 check (the rewards are not 0 at step 0).
        device: ``"cpu"`` for a separate reference kept off the accelerator, else ``None`` (the policy's device).
    """

    strategy: str
    separate_model: bool
    precomputed_by: str | None
    reference_free: bool
    device: str | None

    @property
    def trl_precomputes(self) -> bool:
        """``DPOConfig.precompute_ref_log_probs``: TRL computes the log-probs before training itself."""
        return self.precomputed_by == "trl"


def reference_plan(recipe: Recipe, generation: str) -> ReferencePlan:
    """The :class:`ReferencePlan` of a recipe on a TRL generation (``"0.11"`` or ``"1.x"``)."""
    precomputed_by = None
    if recipe.reference == "precomputed":
        precomputed_by = "dpo_xpu" if generation == "1.x" else "trl"
    return ReferencePlan(
        strategy=recipe.reference,
        separate_model=recipe.reference == "separate",
        precomputed_by=precomputed_by,
        reference_free=recipe.reference_free or recipe.loss_type == "simpo",
        device="cpu" if recipe.reference_device == "cpu" else None,
    )
