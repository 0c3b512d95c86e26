"""TRL 0.11's ``DPOTrainer`` (the ipex-llm backend) with a reference-free mode that runs no reference forward.

TRL 0.11's ``reference_free=True`` still runs the reference every step and logs rewards of a reference the loss
ignores; here its log-probs are precomputed zeros, so ``rewards/*`` are ``beta * log pi(y|x)``, as on the native
backend. TRL offers no switch for this, hence this subclass.
"""

from __future__ import annotations

from typing import Any

import torch
from trl import DPOTrainer


class ReferenceFreeDPOTrainer(DPOTrainer):
    """TRL 0.11 ``DPOTrainer`` whose reference log-probs are zeros (``DPOConfig(reference_free=True)``)."""

    def get_batch_loss_metrics(self, model: Any, batch: dict[str, Any], train_eval: str = "train") -> Any:
        """TRL's loss and metrics with ``reference_chosen_logps`` and ``reference_rejected_logps`` zeros ``[B]``."""
        pairs = len(batch["chosen_input_ids"])
        zeros = torch.zeros(pairs, dtype=torch.float32)
        batch = {**batch, "reference_chosen_logps": zeros, "reference_rejected_logps": zeros.clone()}
        precompute = self.precompute_ref_log_probs
        self.precompute_ref_log_probs = True  # TRL 0.11 reads the reference log-probs from the batch
        try:
            return super().get_batch_loss_metrics(model, batch, train_eval)
        finally:
            self.precompute_ref_log_probs = precompute
