"""The step-0 check: before the first update the policy equals the reference, so DPO's rewards are 0.

At the first optimizer step no update has been applied yet: the policy is the reference (LoRA's ``B`` matrices start
at zero; a ``separate`` reference is the same base; a starting adapter is copied as the reference). Every implicit
reward ``beta * (log pi(y|x) - log pi_ref(y|x))`` (Rafailov et al. 2023, eq. 5) is then 0, and the loss is its
value at a zero margin: ``-log sigmoid(0) = ln 2`` for sigmoid DPO (eq. 7), conservative DPO and ``dpo_norm``,
``1`` for ``hinge``, ``(1 / (2 beta))^2`` for ``ipo`` (Azar et al. 2023, eq. 17). When the logged values differ by
more than float noise, the reference is not computing what the policy computes (it was loaded in another dtype, on
another device, or with another kernel), and every reward of the run is biased by that gap. The check says so
once, plainly: in the log, in the first row of ``metrics.jsonl`` (``step0/logratio_gap``, ``step0/warning``) and in
notebook 3. (A ``precomputed`` reference is checked before the first step instead:
:func:`dpo_xpu.train.reference_cache.cached_logps_gap`.) No library checks this (TRL logs the numbers, never what
they should be at step 0), hence this small module.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

#: Largest step-0 gap taken as float noise, in nats of log-ratio (and in loss units for the loss).
STEP0_TOLERANCE = 1e-3
GAP_KEY = "step0/logratio_gap"
WARNING_KEY = "step0/warning"


def expected_step0_loss(loss_type: str, beta: float, nll_loss_coef: float = 0.0) -> float | None:
    """The loss at a zero margin for ``loss_type``, or ``None`` where it depends on the data.

    ``sigmoid`` and ``dpo_norm`` (with or without label smoothing): ``ln 2``; ``hinge``: ``1``; ``ipo``:
    ``(1 / (2 beta))^2``. An NLL term (``nll_loss_coef`` > 0) adds the data's NLL, so then ``None``.
    """
    if nll_loss_coef > 0:
        return None
    if loss_type in ("sigmoid", "dpo_norm"):
        return math.log(2)
    if loss_type == "hinge":
        return 1.0
    if loss_type == "ipo":
        return (1 / (2 * beta)) ** 2
    return None


def _strip_peft(name: str) -> str:
    """A PEFT policy's parameter name as the plain model names it."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def dtype_mismatches(policy: Any, reference: Any) -> list[str]:
    """Floating-point parameters that the policy and a separate reference hold in different dtypes.

    Returns:
        One ``"name: policy float32, reference bfloat16"`` line per differing parameter (LoRA matrices and
        quantized storage excluded), in model order.
    """
    ref = {name: p.dtype for name, p in reference.named_parameters() if p.dtype.is_floating_point}
    lines = []
    for name, param in policy.named_parameters():
        if "lora_" in name or not param.dtype.is_floating_point:
            continue
        plain = _strip_peft(name)
        if plain in ref and ref[plain] != param.dtype:
            policy_dtype, ref_dtype = str(param.dtype).removeprefix("torch."), str(ref[plain]).removeprefix("torch.")
            lines.append(f"{plain}: policy {policy_dtype}, reference {ref_dtype}")
    return lines


@dataclass
class Step0Check:
    """What the first logged step must show, and the likely causes to name when it does not.

    Args:
        beta: the run's ``beta`` (rewards are ``beta`` times a log-ratio).
        expected_loss: the loss at a zero margin (:func:`expected_step0_loss`); ``None``: only the rewards are checked.
        causes: likely causes, most likely first, quoted when the check fails.
        tolerance: the largest gap taken as float noise (default :data:`STEP0_TOLERANCE`).
    """

    beta: float
    expected_loss: float | None
    causes: list[str] = field(default_factory=list)
    tolerance: float = STEP0_TOLERANCE

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        """Check the first training row (logged at step 1); return the keys to add to it.

        Returns:
            ``{GAP_KEY: gap}`` (the larger mean |log-ratio| of chosen and rejected, nats), plus ``{WARNING_KEY:
            message}`` when the gap or the loss's distance from :attr:`expected_loss` passes :attr:`tolerance`;
            ``{}`` when the row has no rewards.
        """
        chosen, rejected = row.get("rewards/chosen"), row.get("rewards/rejected")
        if not isinstance(chosen, (int, float)) or not isinstance(rejected, (int, float)):
            return {}
        gap = max(abs(chosen), abs(rejected)) / self.beta
        out: dict[str, Any] = {GAP_KEY: gap}
        loss = row.get("loss")
        loss_off = (
            isinstance(loss, (int, float))
            and self.expected_loss is not None
            and abs(loss - self.expected_loss) > self.tolerance
        )
        if gap <= self.tolerance and not loss_off:
            return out
        loss_text = (
            f"; loss {loss:.4f} instead of {self.expected_loss:.4f}"
            if isinstance(loss, (int, float)) and self.expected_loss is not None
            else ""
        )
        cause = self.causes[0] if self.causes else "the reference computes differently from the policy"
        out[WARNING_KEY] = (
            f"step-0 check: before any update the policy and the reference differ by {gap:.4g} nats of log-ratio "
            f"(rewards/chosen {chosen:.4g}, rewards/rejected {rejected:.4g}, both should be 0{loss_text}); every "
            f"reward of this run is biased by that gap. Likely cause: {cause}"
        )
        logger.warning(out[WARNING_KEY])
        return out


def step0_causes(
    policy: Any,
    reference: Any,
    device_type: str,
    *,
    backend: str = "native",
    reference_device: str = "same",
    gradient_checkpointing: bool = True,
    bf16: bool = False,
) -> list[str]:
    """The likely causes of a step-0 gap for a run, most likely first (``reference``: a ``separate`` one or ``None``;
    ``device_type``: the policy's; the keywords: the recipe's values, ``bf16`` settled)."""
    causes = []
    if reference is not None:
        mismatches = dtype_mismatches(policy, reference)
        if mismatches:
            more = f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
            causes.append(
                f"the separate reference was loaded in another dtype than the policy: {mismatches[0]}{more}"
                + (
                    ". The ipex-llm example loads its policy with the checkpoint's dtype and float32 norms, its "
                    "reference in bfloat16"
                    if backend == "ipex-llm"
                    else ""
                )
            )
    if reference_device != "same":
        causes.append(f"the reference runs on {reference_device}, the policy on {device_type}: other kernels")
    if backend == "ipex-llm" and device_type == "cpu" and not gradient_checkpointing:
        causes.append(
            "ipex-llm's CPU low-bit layers run a training kernel for the policy and an inference kernel for the "
            "reference, which round differently on some CPUs; gradient_checkpointing: true (reentrant, as the "
            "example's README runs it) makes the policy's first forward take the inference kernel too"
        )
    if bf16 is True:
        causes.append(
            "bf16 rounding: a reference computed in other batch shapes (other padding, a precomputed reference's "
            "length-sorted batches) rounds differently in bf16; a run with bf16: false shows whether the gap is that"
        )
    causes.append(
        "the reference is not loaded as the policy is (other weights, dtype or quantization), or a kernel rounds "
        "differently in training and in inference"
    )
    return causes


def describe_step0(metrics: list[dict[str, Any]]) -> str:
    """One line on the step-0 check of a run's ``metrics.jsonl`` rows, for notebooks and the CLI."""
    first = next((row for row in metrics if "loss" in row), None)
    if first is None or GAP_KEY not in first:
        return "step-0 check: not made (the first logged step is not step 1, or the loss logs no rewards)"
    if WARNING_KEY in first:
        return str(first[WARNING_KEY])
    return (
        f"step-0 check: ok, the policy equals the reference before the first update (log-ratio gap "
        f"{first[GAP_KEY]:.2g} nats)"
    )
