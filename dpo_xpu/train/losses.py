"""Preference losses that the installed TRL does not compute, as pure functions of per-sequence log-probs.

TRL computes most losses itself (see :data:`dpo_xpu.train.trl_config.TRL_LOSS_TYPES`); dpo_xpu adds the ones TRL lacks:

* conservative DPO (``sigmoid`` with ``label_smoothing`` > 0): TRL >= 0.29 dropped label smoothing from ``sigmoid``;
* length-normalised DPO (``dpo_norm``) with label smoothing (without it, TRL 1.x's ``sigmoid_norm`` is the same loss);
* SimPO (``simpo``), which TRL's ``DPOTrainer`` does not offer.

Every function takes tensors of shape ``[B]`` (one value per preference pair): summed log-probabilities of the
answer tokens under the policy (``policy_*``) and the reference (``ref_*``, zeros for a reference-free loss), in
nats, and answer lengths in tokens. Each returns ``(losses, chosen_rewards, rejected_rewards)``, all ``[B]``: the
per-pair loss (average it for the batch loss) and the implicit rewards the loss compares, detached.

    >>> losses, chosen, rejected = sigmoid_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Loss types computed here; ``sigmoid`` only when it needs label smoothing.
OWN_LOSSES = ("sigmoid", "dpo_norm", "simpo")


def sigmoid_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7), conservative when smoothed.

    With ``h = beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))]``::

        loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)

    ``eps = 0`` is eq. 7; ``eps > 0`` is conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences
    & relationship to IPO", the cDPO loss): each label is taken as flipped with probability ``eps``.

    Args:
        policy_chosen_logps, policy_rejected_logps (`torch.Tensor` `[B]`): summed answer log-probs, policy (nats).
        ref_chosen_logps, ref_rejected_logps (`torch.Tensor` `[B]`): the same under the reference (zeros:
            reference-free).
        beta (`float`): the KL strength.
        label_smoothing (`float`, defaults to 0): ``eps``, in [0, 0.5).

    Returns:
        `(losses, chosen_rewards, rejected_rewards)`, each `[B]`; rewards are ``beta * (log pi - log pi_ref)``.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = beta * (chosen_logratios - rejected_logratios)
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def dpo_norm_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Length-normalised DPO: :func:`sigmoid_loss` on per-token average log-probs.

    As open-instruct's ``dpo_norm`` (``concatenated_forward(average_log_prob=True)``, then ``dpo_loss``): every
    log-prob is divided by its answer's length ``|y|`` before eq. 7 of Rafailov et al. 2023 (a summed log-prob favours
    short answers: Meng et al. 2024, section 2.2). TRL 1.x's ``sigmoid_norm`` when ``label_smoothing`` is 0.

    Args:
        chosen_lengths, rejected_lengths (`torch.Tensor` `[B]`): answer lengths in tokens (>= 1).
        The others as :func:`sigmoid_loss`.

    Returns:
        `(losses, chosen_rewards, rejected_rewards)`, each `[B]`; rewards are ``beta * (log pi - log pi_ref) / |y|``.
    """
    return sigmoid_loss(
        policy_chosen_logps / chosen_lengths,
        policy_rejected_logps / rejected_lengths,
        ref_chosen_logps / chosen_lengths,
        ref_rejected_logps / rejected_lengths,
        beta=beta,
        label_smoothing=label_smoothing,
    )


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", eq. 6).

    ::

        h = beta / |y_w| * log pi(y_w|x) - beta / |y_l| * log pi(y_l|x) - gamma
        loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)

    No reference model; ``gamma`` is the target reward margin. ``eps`` (label smoothing, 0 in the paper) follows
    TRL's ``CPOTrainer`` SimPO.

    Args:
        policy_chosen_logps, policy_rejected_logps (`torch.Tensor` `[B]`): summed answer log-probs (nats).
        chosen_lengths, rejected_lengths (`torch.Tensor` `[B]`): answer lengths in tokens (>= 1).
        beta (`float`): the reward scale (the paper uses 2 to 10).
        gamma (`float`, defaults to 0.5): the target margin, in reward units (the paper's gamma, not gamma / beta).
        label_smoothing (`float`, defaults to 0): ``eps``, in [0, 0.5).

    Returns:
        `(losses, chosen_rewards, rejected_rewards)`, each `[B]`; rewards are ``beta * log pi(y|x) / |y|``.
    """
    chosen_rewards = beta * policy_chosen_logps / chosen_lengths
    rejected_rewards = beta * policy_rejected_logps / rejected_lengths
    h = chosen_rewards - rejected_rewards - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def own_loss(
    loss_type: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dispatch to :func:`sigmoid_loss`, :func:`dpo_norm_loss` or :func:`simpo_loss` by ``loss_type``.

    Raises:
        ValueError: ``loss_type`` is not one of :data:`OWN_LOSSES`.
    """
    policy = (policy_chosen_logps, policy_rejected_logps)
    ref = (ref_chosen_logps, ref_rejected_logps)
    lengths = (chosen_lengths, rejected_lengths)
    if loss_type == "sigmoid":
        return sigmoid_loss(*policy, *ref, beta, label_smoothing)
    if loss_type == "dpo_norm":
        return dpo_norm_loss(*policy, *ref, *lengths, beta, label_smoothing)
    if loss_type == "simpo":
        return simpo_loss(*policy, *lengths, beta, simpo_gamma, label_smoothing)
    raise ValueError(f"no own loss {loss_type!r}: dpo_xpu computes {', '.join(OWN_LOSSES)}")
