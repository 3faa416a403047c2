"""Offline preference losses: DPO (with cDPO, robust and IPO variants), KTO, ORPO and SimPO.

Each loss works on one number per sequence, built by :func:`sequence_logprobs` from per-token logprobs and the
ledger's loss mask. Only policy-sampled tokens (mask 1) count: tool results, user turns and template glue
never enter a preference loss, whatever values sit at those positions, so multi-turn trajectories are
compared on what the policy chose and nothing else.

Sums or means: DPO and KTO take summed logprobs (the sequence's log-likelihood); SimPO and ORPO take
length-averaged ones (``average=True``); IPO takes averaged ones too, by the convention of TRL and the IPO
authors (a squared loss on sums grows with length). Reference logprobs are always treated as constants.

Every loss returns per-example values (``loss_B``), not a batch mean: take ``.mean()`` for the batch, or weight
the examples first. The implicit rewards it returns are detached, for logging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

__all__ = [
    "DPO_KINDS",
    "DPOKind",
    "KTOLoss",
    "ORPOLoss",
    "PreferenceLoss",
    "dpo_loss",
    "kto_loss",
    "kto_reference_point",
    "orpo_loss",
    "sequence_logprobs",
    "simpo_loss",
]

DPOKind = Literal["sigmoid", "robust", "ipo", "hinge"]
DPO_KINDS: tuple[str, ...] = ("sigmoid", "robust", "ipo", "hinge")


def sequence_logprobs(
    logprobs_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    *,
    average: bool = False,
    segment_ids_B_T: torch.Tensor | None = None,
    num_sequences: int | None = None,
) -> torch.Tensor:
    """Each sequence's log-likelihood over its policy tokens: the sum (or mean) of logprobs where the mask is
    nonzero. A sequence is a row, or with ``segment_ids_B_T`` a segment (packed and prompt-shared rows hold several).

    Masked positions are dropped with ``where``, not multiplied by 0, so a ``-inf`` or ``nan`` there (a tool
    token a top-k sampler never scored) changes neither the result nor any gradient. Nonzero mask values
    all count as 1.

    Args:
        logprobs_B_T: per-token logprobs aligned with the ledger (see :func:`agentrl.learners.logprobs.policy_logprobs`).
        mask_B_T: the loss mask; nonzero on policy-sampled tokens.
        average: divide by the number of policy tokens (SimPO, ORPO and IPO's length normalisation); a
            sequence without policy tokens gives 0 either way.
        segment_ids_B_T: which sequence (0 to ``num_sequences - 1``) each token belongs to, as in
            :class:`~agentrl.data.batch.Batch` (negative where no sequence's own: padding, a shared prompt).
        num_sequences: how many sequences ``segment_ids_B_T`` numbers; default its largest id + 1.

    Returns:
        ``logps_B`` (one per row), or ``logps_N`` (one per segment) with ``segment_ids_B_T``.

    Raises:
        ValueError: the shapes differ, or the tensors are not 2-D.
    """
    import torch

    if logprobs_B_T.shape != mask_B_T.shape or logprobs_B_T.dim() != 2:
        raise ValueError(
            f"logprobs_B_T and mask_B_T must be 2-D and of one shape, got {tuple(logprobs_B_T.shape)} "
            f"and {tuple(mask_B_T.shape)}"
        )
    keep = mask_B_T != 0
    zero = torch.zeros((), dtype=logprobs_B_T.dtype, device=logprobs_B_T.device)
    kept_B_T = torch.where(keep, logprobs_B_T, zero)
    if segment_ids_B_T is None:
        total, count = kept_B_T.sum(dim=-1), keep.sum(dim=-1)
    else:
        if segment_ids_B_T.shape != mask_B_T.shape:
            raise ValueError(f"segment_ids_B_T has shape {tuple(segment_ids_B_T.shape)}, not {tuple(mask_B_T.shape)}")
        n = num_sequences if num_sequences is not None else int(segment_ids_B_T.max()) + 1
        keep = keep & (segment_ids_B_T >= 0)
        index_K = segment_ids_B_T[keep]
        total = kept_B_T.new_zeros(n).index_add(0, index_K, kept_B_T[keep])
        count = torch.bincount(index_K, minlength=n)
    if not average:
        return total
    return total / count.clamp(min=1).to(total.dtype)


@dataclass(frozen=True)
class PreferenceLoss:
    """A pairwise loss per pair, with the implicit rewards behind it (detached).

    Attributes:
        loss_B: the loss of each pair (with grad); ``.mean()`` is the batch loss.
        chosen_rewards_B: the implicit reward of each chosen response (DPO: ``beta * (pi - ref)``; SimPO:
            ``beta * mean logprob``; ORPO: ``lam * mean logprob``).
        rejected_rewards_B: the same for each rejected response.
    """

    loss_B: torch.Tensor
    chosen_rewards_B: torch.Tensor
    rejected_rewards_B: torch.Tensor

    @property
    def margins_B(self) -> torch.Tensor:
        """Chosen minus rejected reward, per pair."""
        return self.chosen_rewards_B - self.rejected_rewards_B

    @property
    def accuracy(self) -> torch.Tensor:
        """The fraction of pairs whose chosen reward is strictly higher (a 0-dim tensor)."""
        return (self.chosen_rewards_B > self.rejected_rewards_B).to(self.chosen_rewards_B.dtype).mean()


@dataclass(frozen=True)
class ORPOLoss(PreferenceLoss):
    """:func:`orpo_loss`'s result: ``loss_B = nll + lam * odds_ratio_loss_B``.

    Attributes:
        odds_ratio_loss_B: ``-log sigmoid(log_odds_B)`` per pair (with grad), before the ``lam`` weight.
        log_odds_B: the log odds ratio of chosen over rejected (detached).
    """

    odds_ratio_loss_B: torch.Tensor
    log_odds_B: torch.Tensor


@dataclass(frozen=True)
class KTOLoss:
    """:func:`kto_loss`'s result, one entry per example (KTO needs no pairs).

    Attributes:
        loss_B: the weighted loss of each example (with grad); ``.mean()`` is TRL's batch loss.
        rewards_B: ``beta * (pi - ref)`` per example (detached).
        desirable_B: the labels the loss was computed with.
        kl_ref: the reference point ``z_ref`` that was used (0-dim, detached, >= 0).
    """

    loss_B: torch.Tensor
    rewards_B: torch.Tensor
    desirable_B: torch.Tensor
    kl_ref: torch.Tensor


def dpo_loss(
    policy_chosen_B: torch.Tensor,
    policy_rejected_B: torch.Tensor,
    ref_chosen_B: torch.Tensor,
    ref_rejected_B: torch.Tensor,
    beta: float = 0.1,
    *,
    label_smoothing: float = 0.0,
    kind: DPOKind = "sigmoid",
) -> PreferenceLoss:
    """DPO and its pairwise variants on sequence logprobs.

    With ``h = (pi_c - pi_r) - (ref_c - ref_r)`` and ``eps = label_smoothing``:

    - ``"sigmoid"``: ``-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)`` (Rafailov et al., 2023); with
      ``eps > 0`` this is conservative DPO (cDPO), which trusts each label with probability ``1 - eps``.
      TRL 1.16's ``"sigmoid"`` has no smoothing term; its cDPO form survives in the CPO trainer.
    - ``"robust"``: ``(-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)) / (1 - 2 eps)`` (Chowdhury et
      al., 2024), an unbiased loss under labels flipped with probability ``eps``.
    - ``"ipo"``: ``(h - 1 / (2 beta))^2`` (Azar et al., 2023; ``beta`` is the paper's tau). Pass
      length-averaged logprobs (``sequence_logprobs(..., average=True)``) for all four inputs to match TRL,
      which divides each log-ratio by the completion's token count; with sums the loss grows with length.
    - ``"hinge"``: ``relu(1 - beta h)`` (SLiC).

    Args:
        policy_chosen_B, policy_rejected_B: the policy's sequence logprobs (with grad).
        ref_chosen_B, ref_rejected_B: the reference model's (detached here).
        beta: the KL strength; larger keeps the policy closer to the reference.
        label_smoothing: ``eps`` in [0, 0.5), for ``"sigmoid"`` and ``"robust"`` only.
        kind: which loss.

    Returns:
        The per-pair loss, and rewards ``beta * (pi - ref)`` for chosen and rejected.

    Raises:
        ValueError: an unknown ``kind``, ``beta <= 0``, ``label_smoothing`` outside [0, 0.5) or given to a kind
            that has none, or inputs of different shapes.
    """
    import torch.nn.functional as F

    if kind not in DPO_KINDS:
        raise ValueError(f"kind must be one of {DPO_KINDS}, got {kind!r}")
    _check_beta(beta)
    _check_smoothing(label_smoothing)
    if label_smoothing and kind not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing applies to 'sigmoid' and 'robust' only; {kind!r} has none")
    _check_shapes(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B)
    chosen_ratio = policy_chosen_B - ref_chosen_B.detach()
    rejected_ratio = policy_rejected_B - ref_rejected_B.detach()
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if kind == "sigmoid":
        loss = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif kind == "robust":
        loss = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif kind == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        loss = F.relu(1 - beta * h)
    return PreferenceLoss(loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def kto_reference_point(kl_policy_logps_B: torch.Tensor, kl_ref_logps_B: torch.Tensor) -> torch.Tensor:
    """KTO's reference point ``z_ref``: a batch estimate of KL(pi || ref), detached and clamped at 0.

    The estimate is the mean of ``pi - ref`` over mismatched pairs: each prompt with a completion from another
    example (TRL pairs prompt ``i`` with completion ``i - 1``, cyclically), so the policy is scored on text
    it was not trained to prefer. Under data parallelism, average the estimate across ranks before
    :func:`kto_loss` (TRL gathers it).

    Args:
        kl_policy_logps_B: the policy's sequence logprobs of the mismatched pairs.
        kl_ref_logps_B: the reference model's, on the same pairs.

    Returns:
        A 0-dim tensor ``max(0, mean(pi - ref))``, without grad.

    Raises:
        ValueError: the shapes differ or are empty.
    """
    _check_shapes(kl_policy_logps_B, kl_ref_logps_B)
    if kl_policy_logps_B.numel() == 0:
        raise ValueError("the KL estimate needs at least one mismatched pair")
    return (kl_policy_logps_B.detach() - kl_ref_logps_B.detach()).mean().clamp(min=0)


def kto_loss(
    policy_logps_B: torch.Tensor,
    ref_logps_B: torch.Tensor,
    desirable_B: torch.Tensor,
    kl_ref: torch.Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLoss:
    """KTO (Ethayarajh et al., 2024; TRL's ``KTOTrainer``, loss ``"kto"``) on unpaired, labelled examples.

    With ``r = pi - ref`` and ``z = kl_ref``: a desirable example's loss is
    ``desirable_weight * (1 - sigma(beta (r - z)))``, an undesirable one's
    ``undesirable_weight * (1 - sigma(beta (z - r)))``. The weights balance unequal class counts (the paper
    keeps ``desirable_weight * n_desirable / (undesirable_weight * n_undesirable)`` in [1, 4/3]).

    Args:
        policy_logps_B: the policy's sequence logprobs (summed; with grad).
        ref_logps_B: the reference model's (detached here).
        desirable_B: bool labels, True for a desirable example.
        kl_ref: the reference point, from :func:`kto_reference_point`; detached and clamped at 0 here too.
        beta: the KL strength.
        desirable_weight, undesirable_weight: the per-class loss weights (> 0).

    Returns:
        Per-example losses in input order (their mean is TRL's loss), rewards ``beta * r`` and ``z``.

    Raises:
        ValueError: ``beta <= 0``, a weight <= 0, labels that are not bool, or inputs of different shapes.
    """
    import torch

    _check_beta(beta)
    if desirable_weight <= 0 or undesirable_weight <= 0:
        raise ValueError(
            f"class weights must be > 0, got desirable_weight={desirable_weight}, "
            f"undesirable_weight={undesirable_weight}"
        )
    if desirable_B.dtype != torch.bool:
        raise ValueError(f"desirable_B must be a bool tensor (True = desirable), got {desirable_B.dtype}")
    _check_shapes(policy_logps_B, ref_logps_B, desirable_B)
    z = torch.as_tensor(kl_ref, dtype=policy_logps_B.dtype, device=policy_logps_B.device)
    z = z.detach().clamp(min=0)
    ratio = policy_logps_B - ref_logps_B.detach()
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (ratio - z)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z - ratio)))
    loss = torch.where(desirable_B, desirable, undesirable)
    return KTOLoss(loss, beta * ratio.detach(), desirable_B, z)


def orpo_loss(
    chosen_avg_B: torch.Tensor,
    rejected_avg_B: torch.Tensor,
    chosen_nll: torch.Tensor,
    lam: float = 0.1,
) -> ORPOLoss:
    """ORPO (Hong et al., 2024): SFT on the chosen response plus an odds-ratio penalty; no reference model.

    With ``odds(y) = p / (1 - p)`` and ``log p`` the length-averaged logprob ``a``:
    ``log_odds = (a_c - a_r) - (log(1 - exp(a_c)) - log(1 - exp(a_r)))``, and
    ``loss_B = chosen_nll + lam * -log sigma(log_odds)``. ``log(1 - exp(a))`` is computed stably (``log1p(-exp(a))``
    below ``-ln 2``, ``log(-expm1(a))`` above), in at least float32, with ``a`` capped at ``-eps`` inside that
    term only: a response the model is sure of (``a`` rounding to 0) then gives a finite loss and gradient.

    TRL's ORPO trainer takes its NLL over the prompt and the response; pass whichever NLL you train on
    (in agentrl, :func:`agentrl.algos.sft_nll_loss` on the policy tokens). TRL calls ``lam`` ``beta``.

    Args:
        chosen_avg_B, rejected_avg_B: the policy's length-averaged sequence logprobs (< 0; with grad).
        chosen_nll: the SFT loss on the chosen responses: a 0-dim tensor, or one per pair.
        lam: the weight of the odds-ratio term.

    Returns:
        Per-pair losses (their mean is TRL's loss), rewards ``lam * a`` as TRL logs them, and the parts.

    Raises:
        ValueError: ``lam < 0``, or inputs of different shapes.
    """
    import torch
    import torch.nn.functional as F

    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    _check_shapes(chosen_avg_B, rejected_avg_B)
    dtype = torch.promote_types(chosen_avg_B.dtype, torch.float32)
    chosen, rejected = chosen_avg_B.to(dtype), rejected_avg_B.to(dtype)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    odds_ratio_loss = -F.logsigmoid(log_odds)
    return ORPOLoss(
        loss_B=chosen_nll + lam * odds_ratio_loss,
        chosen_rewards_B=lam * chosen.detach(),
        rejected_rewards_B=lam * rejected.detach(),
        odds_ratio_loss_B=odds_ratio_loss,
        log_odds_B=log_odds.detach(),
    )


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0`` without cancellation; ``x`` is capped at ``-eps`` first."""
    import torch

    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def simpo_loss(
    chosen_avg_B: torch.Tensor,
    rejected_avg_B: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 1.0,
    *,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """SimPO (Meng et al., 2024): a reference-free margin loss on length-averaged logprobs.

    With ``h = beta (a_c - a_r) - gamma``: ``-(1 - eps) log sigma(h) - eps log sigma(-h)``. ``gamma`` is the
    target reward margin itself (TRL's ``simpo_gamma``), not ``gamma / beta``; the defaults are the SimPO
    paper's ``beta = 2`` and ``gamma / beta = 0.5``. TRL's CPO trainer adds ``cpo_alpha * nll`` on top
    (default 1.0); pure SimPO is ``cpo_alpha = 0``.

    Args:
        chosen_avg_B, rejected_avg_B: the policy's length-averaged sequence logprobs (with grad).
        beta: the reward scale.
        gamma: the target margin.
        label_smoothing: ``eps`` in [0, 0.5).

    Returns:
        Per-pair losses and rewards ``beta * a``.

    Raises:
        ValueError: ``beta <= 0``, ``label_smoothing`` outside [0, 0.5), or inputs of different shapes.
    """
    import torch.nn.functional as F

    _check_beta(beta)
    _check_smoothing(label_smoothing)
    _check_shapes(chosen_avg_B, rejected_avg_B)
    h = beta * (chosen_avg_B - rejected_avg_B) - gamma
    eps = label_smoothing
    loss = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
    return PreferenceLoss(loss, beta * chosen_avg_B.detach(), beta * rejected_avg_B.detach())


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def _check_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")


def _check_shapes(*tensors: torch.Tensor) -> None:
    shapes = {tuple(x.shape) for x in tensors}
    if len(shapes) != 1:
        raise ValueError(f"per-sequence inputs must share one shape, got {sorted(shapes)}")
