"""``DpoXpuTrainer``: TRL 1.x's ``DPOTrainer`` with dpo_xpu's own losses, a reference-free mode, a CPU reference and
prefix sharing; :func:`~dpo_xpu.train.factory.build_trainer` picks it only when a recipe needs one of these.

It changes one method, ``_compute_loss``, and keeps TRL's forward passes, loss loop and metrics:

1. the reference log-probs are handed to TRL as if precomputed: zeros for a reference-free loss, or TRL's own
   ``compute_ref_log_probs`` on the reference's device (a ``separate`` reference kept on the CPU);
2. for an own loss (:mod:`dpo_xpu.train.losses`), TRL's loss list holds a zero-weighted ``sigmoid`` placeholder; the
   policy's per-token log-probs are read from TRL's forward pass (a forward hook), the own loss is added to TRL's,
   and TRL's ``rewards/*`` are replaced by the own loss's rewards; every other metric is TRL's;
3. with ``prefix_sharing``, every model call TRL makes runs packed, each pair's prompt once, and with
   ``packing_row_tokens`` several pairs per row, padding-free (:mod:`dpo_xpu.train.prefix_sharing`);
4. for ``ipo`` (whose loss acts on length-averaged log-ratios) the logged ``rewards/*`` are ``beta`` times those
   averages, as TRL 0.11 logs them, instead of TRL 1.x's sums.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from trl import DPOTrainer

from dpo_xpu.train.losses import own_loss
from dpo_xpu.train.prefix_sharing import PrefixSharing
from dpo_xpu.train.trl_internals import (
    answer_mask,
    chosen_rejected,
    fused_head_log_probs,
    mark_prepared,
    reference_logps_from_batch,
    step_metrics,
)

logger = logging.getLogger(__name__)


class DpoXpuTrainer(DPOTrainer):
    """TRL 1.x ``DPOTrainer`` plus dpo_xpu's losses, reference-free training and a reference on another device.

    Args:
        own_loss_type: ``"sigmoid"`` (conservative DPO), ``"dpo_norm"`` or ``"simpo"`` (:mod:`dpo_xpu.train.losses`);
            ``None`` keeps TRL's loss. ``label_smoothing`` and ``simpo_gamma`` are its parameters.
        reference_free: take every reference log-prob as 0 (no reference forward).
        reference_device: keep ``ref_model`` on this device (``"cpu"``): accelerate does not place it; its inputs go
            there.
        prefix_sharing: run each pair packed, its prompt once; ``prefix_sharing_tokens`` counts the real tokens in
            TRL's layout (``"sequence"``) and in the packed one (``"packed"``).
        packing_row_tokens: with ``prefix_sharing``, the padding-free rows' budget in tokens (several pairs per
            row); ``None``: one row per pair, padded to the longest.
        length_normalised_rewards: log ``rewards/*`` as ``beta`` times the length-averaged log-ratio (``ipo``).
        *args, **kwargs: as ``trl.DPOTrainer``.
    """

    def __init__(
        self,
        *args: Any,
        own_loss_type: str | None = None,
        reference_free: bool = False,
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        reference_device: str | None = None,
        prefix_sharing: bool = False,
        packing_row_tokens: int | None = None,
        length_normalised_rewards: bool = False,
        **kwargs: Any,
    ) -> None:
        ref_model = kwargs.get("ref_model")
        if reference_device is not None and ref_model is not None:
            # accelerate's prepare_model returns a model marked as prepared unchanged: no move to the accelerator
            # (and no refusal of a 4-bit model that lives on another device).
            mark_prepared(ref_model)
        super().__init__(*args, **kwargs)
        self.own_loss_type = own_loss_type
        self.reference_free = reference_free
        self.own_label_smoothing = label_smoothing
        self.simpo_gamma = simpo_gamma
        self.reference_device = torch.device(reference_device) if reference_device is not None else None
        self.prefix_sharing = prefix_sharing
        self.packing_row_tokens = packing_row_tokens
        self.length_normalised_rewards = length_normalised_rewards
        self.prefix_sharing_tokens = {"sequence": 0, "packed": 0}
        if self.reference_device is not None and self.ref_model is not None:
            logger.info("reference model kept on %s", next(self.ref_model.parameters()).device)

    def _reference_logps(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs ``(chosen [B], rejected [B])`` for a padded batch (chosen rows, then rejected)."""
        input_ids = inputs["input_ids"]
        if self.reference_free:
            zeros = torch.zeros(input_ids.size(0) // 2, device=input_ids.device, dtype=torch.float32)
            return zeros, zeros.clone()
        model = self.ref_model if self.ref_model is not None else self.model
        if self.reference_device is None or self.ref_model is None:
            return self.compute_ref_log_probs(model, inputs)
        moved = {k: v.to(self.reference_device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        chosen, rejected = self.compute_ref_log_probs(model, moved)
        return chosen.to(input_ids.device), rejected.to(input_ids.device)

    def _shared_prefix(self, model: Any) -> Any:
        """A :class:`PrefixSharing` context on ``model`` counting into ``prefix_sharing_tokens``, else a no-op."""
        if not self.prefix_sharing:
            return contextlib.nullcontext()
        return PrefixSharing(model, tokens=self.prefix_sharing_tokens, row_tokens=self.packing_row_tokens)

    def compute_ref_log_probs(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """TRL's reference log-probs ``(chosen [B], rejected [B])``, packed per pair with ``prefix_sharing``."""
        with self._shared_prefix(model):
            return super().compute_ref_log_probs(model, inputs)

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        # entered before the own loss's recorder hook, so that the recorder sees the unpacked outputs
        with self._shared_prefix(model):
            return self._compute_loss_inner(model, inputs, return_outputs)

    def _compute_loss_inner(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        inputs = dict(inputs)
        if "ref_chosen_logps" not in inputs or self.reference_free:
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = self._reference_logps(inputs)
        recorded: list[Any] = []
        handle = None
        if self.own_loss_type is not None or self.length_normalised_rewards:
            handle = model.register_forward_hook(lambda module, args, output: recorded.append(output))
        try:
            with reference_logps_from_batch(self):
                result = super()._compute_loss(model, inputs, return_outputs)
        finally:
            if handle is not None:
                handle.remove()
        if self.own_loss_type is None:
            if self.length_normalised_rewards:
                chosen_logps, rejected_logps, chosen_lengths, rejected_lengths = self._answer_logps(
                    fused_head_log_probs(recorded[0]), inputs
                )
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
                self._replace_rewards(
                    self.beta * (chosen_logps - ref_chosen.to(chosen_logps.dtype)).detach() / chosen_lengths,
                    self.beta * (rejected_logps - ref_rejected.to(rejected_logps.dtype)).detach() / rejected_lengths,
                )
            return result
        loss, outputs = result if return_outputs else (result, None)
        loss = loss + self._own_loss(fused_head_log_probs(recorded[0]), inputs)
        return (loss, outputs) if return_outputs else loss

    @staticmethod
    def _answer_logps(
        per_token_logps: torch.Tensor, inputs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summed answer log-probs ``(chosen [B], rejected [B])`` from the per-token ones ``[2B, T-1]``, and the
        answer lengths ``(chosen [B], rejected [B])`` in tokens, counted as TRL's ``sigmoid_norm`` and ``ipo`` count
        them (the completion mask, at least 1)."""
        mask = answer_mask(inputs)
        shift_mask = mask[..., 1:]
        logps = (per_token_logps[:, -shift_mask.size(1) :] * shift_mask).sum(dim=1)
        return (*chosen_rejected(logps), *chosen_rejected(mask.sum(dim=1).clamp(min=1).to(logps.dtype)))

    def _replace_rewards(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> None:
        """Put these rewards ``[B]`` in place of the ``rewards/*`` TRL just logged for this micro-batch."""
        metrics = step_metrics(self)
        gather = self.accelerator.gather
        metrics["rewards/chosen"][-1] = gather(chosen_rewards).mean().item()
        metrics["rewards/rejected"][-1] = gather(rejected_rewards).mean().item()
        metrics["rewards/accuracies"][-1] = gather((chosen_rewards > rejected_rewards).float()).mean().item()
        metrics["rewards/margins"][-1] = gather(chosen_rewards - rejected_rewards).mean().item()

    def _own_loss(self, per_token_logps: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """The own loss (batch mean) from the policy's per-token log-probs ``[2B, T-1]``; replaces ``rewards/*``."""
        chosen_logps, rejected_logps, chosen_lengths, rejected_lengths = self._answer_logps(per_token_logps, inputs)
        losses, chosen_rewards, rejected_rewards = own_loss(
            self.own_loss_type,
            chosen_logps,
            rejected_logps,
            inputs["ref_chosen_logps"].to(chosen_logps.dtype),
            inputs["ref_rejected_logps"].to(chosen_logps.dtype),
            chosen_lengths,
            rejected_lengths,
            beta=self.beta,
            label_smoothing=self.own_label_smoothing,
            simpo_gamma=self.simpo_gamma,
        )
        self._replace_rewards(chosen_rewards, rejected_rewards)
        return losses.mean()


def match_reference_adapter_dtype(model: torch.nn.Module) -> int:
    """Give TRL's frozen "ref" adapter the dtype of the trained "default" adapter it was copied from.

    TRL 1.x copies a starting adapter as a frozen "ref" adapter, then casts the trainable one of a quantized model to
    bf16 (QLoRA), but not the copy; PEFT runs an adapter in its weights' dtype, so policy and reference would differ
    at step 0 (stories260K: 9.6 nats on one answer, a first loss of 0.51 instead of ln 2).

    Returns:
        The number of "ref" parameters cast (0 when the model has no "ref" adapter or the dtypes already match).
    """
    params = dict(model.named_parameters())
    changed = 0
    for name, param in params.items():
        if ".ref." not in name:
            continue
        default = params.get(name.replace(".ref.", ".default."))
        if default is not None and param.dtype != default.dtype:
            param.data = param.data.to(default.dtype)
            changed += 1
    if changed:
        logger.info("cast %d parameters of the reference adapter to the trained adapter's dtype", changed)
    return changed
