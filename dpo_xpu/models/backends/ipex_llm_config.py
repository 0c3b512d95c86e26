"""The ipex-llm backend's TRL: a recipe's TRL 0.11 ``DPOConfig`` parts (Intel's example pins trl < 0.12), kept here
so that neither TRL generation's names leak into the other's (:mod:`dpo_xpu.train.trl_config` holds TRL 1.x's)."""

from __future__ import annotations

from typing import Any

#: Loss types TRL 0.11 computes (``DPOConfig.loss_type``).
LOSS_TYPES = tuple(
    "sigmoid hinge ipo exo_pair nca_pair robust bco_pair sppo_hard aot apo_zero apo_down aot_pair".split()
)
#: TRL 0.11's loss types that use ``label_smoothing``.
LABEL_SMOOTHING_LOSSES = ("sigmoid", "robust", "exo_pair", "aot", "aot_pair")
#: The example's optimizer, transformers' own AdamW, and no ``gradient_checkpointing_kwargs``: transformers 4.45's
#: reentrant default (whose first forwards run ipex-llm's inference kernels, the reference's).
OPTIMIZER_KWARGS: dict[str, Any] = {"optim": "adamw_hf"}


def loss_kwargs(loss_type: str, label_smoothing: float, reference_free: bool, nll_loss_coef: float) -> dict[str, Any]:
    """TRL 0.11's loss keywords for a recipe's values, ``rpo_alpha`` being the NLL term ``nll_loss_coef`` (``None``
    when 0)."""
    return {
        "loss_type": loss_type,
        "label_smoothing": label_smoothing,
        "reference_free": reference_free,
        "rpo_alpha": nll_loss_coef or None,
    }


def config_kwargs(max_prompt_length: int | None) -> dict[str, Any]:
    """The rest: ``max_prompt_length`` (TRL 0.11 cuts prompts itself) and :data:`OPTIMIZER_KWARGS`."""
    return {"max_prompt_length": max_prompt_length, **OPTIMIZER_KWARGS}
