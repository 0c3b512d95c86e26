"""The ipex-llm backend's TRL: how a recipe maps onto TRL 0.11's ``DPOConfig`` (Intel's example pins trl < 0.12).

TRL 0.11 takes ``max_prompt_length``, ``label_smoothing``, ``reference_free`` and ``rpo_alpha`` (the NLL term)
itself, and the example trains with ``optim="adamw_hf"`` and transformers 4.45's default (reentrant) gradient
checkpointing. :mod:`dpo_xpu.train.trl_config` asks this module for the TRL 0.11 parts of a ``DPOConfig`` and keeps
TRL 1.x's (the native backend) to itself, so that neither generation's names leak into the other's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dpo_xpu.recipes import Recipe

#: Loss types TRL 0.11 computes (``DPOConfig.loss_type``).
LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "apo_zero",
    "apo_down",
    "aot_pair",
)
#: TRL 0.11's loss types that use ``label_smoothing``.
LABEL_SMOOTHING_LOSSES = ("sigmoid", "robust", "exo_pair", "aot", "aot_pair")
#: The example's optimizer: transformers' own AdamW (its notes: paged AdamW is not supported), and no
#: ``gradient_checkpointing_kwargs``: transformers 4.45's reentrant default. Under reentrant checkpointing the
#: policy's checkpointed layers run their first forward without a graph, which picks ipex-llm's inference kernels,
#: the reference's.
OPTIMIZER_KWARGS: dict[str, Any] = {"optim": "adamw_hf"}


def loss_kwargs(recipe: Recipe) -> dict[str, Any]:
    """TRL 0.11's loss keywords: the loss, conservative DPO's label smoothing, reference-free, and ``rpo_alpha``
    (the NLL term on the chosen answers, ``nll_loss_coef``; ``None`` when 0)."""
    return {
        "loss_type": recipe.loss_type,
        "label_smoothing": recipe.label_smoothing,
        "reference_free": recipe.reference_free,
        "rpo_alpha": recipe.nll_loss_coef or None,
    }


def config_kwargs(recipe: Recipe) -> dict[str, Any]:
    """The rest of TRL 0.11's ``DPOConfig``: ``max_prompt_length`` (TRL 0.11 cuts prompts itself, keeping their end),
    and :data:`OPTIMIZER_KWARGS`."""
    return {"max_prompt_length": recipe.max_prompt_length, **OPTIMIZER_KWARGS}
