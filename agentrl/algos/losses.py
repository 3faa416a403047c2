"""Policy-gradient losses and their parts: PPO clipping, value loss, KL estimators and controller, entropy,
loss aggregation, truncated importance sampling and the SFT negative log-likelihood.

Per-token functions return ``(B, T)`` tensors; :func:`aggregate` is the one place a per-token loss is
reduced to a scalar, and it ignores masked positions entirely (their values, even ``inf`` or ``nan``, change
neither the loss nor any gradient). The functions that exponentiate a log-ratio also take ``mask_B_T``: a
masked position then uses a log-ratio of 0, so a ``-inf`` logprob on an env token (one top-k filtered out)
cannot reach the backward pass as ``0 * inf = nan``. Logprobs are aligned with the ledger: the logprob at
position ``t`` is that of ``token_ids[t]`` (see :func:`agentrl.learners.logprobs.policy_logprobs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

__all__ = [
    "AGGREGATIONS",
    "AdaptiveKLController",
    "Aggregation",
    "PolicyLoss",
    "aggregate",
    "entropy_from_logits",
    "kl_estimate",
    "kl_penalized_rewards",
    "policy_loss",
    "ppo_clip_loss",
    "sft_nll_loss",
    "truncated_is_weights",
    "value_loss",
]

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AGGREGATIONS: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def ppo_clip_loss(
    logprobs_B_T: torch.Tensor,
    old_logprobs_B_T: torch.Tensor,
    advantages_B_T: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    mask_B_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token, with clip-higher and optional dual clip.

    ``ratio = exp(logprobs - old_logprobs)``; ``loss = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)``.
    With ``dual_clip = c`` (> 1), a negative-advantage token's loss is also capped at ``-c * A``, so a huge
    ratio on a bad token cannot dominate (Ye et al., 2020).

    Args:
        logprobs_B_T: the current policy's logprobs (with grad).
        old_logprobs_B_T: the logprobs the advantages were computed under (no grad needed).
        advantages_B_T: per-token advantages (broadcast a ``(B, 1)`` sequence advantage if you have one).
        eps_low, eps_high: the clip range below and above 1; ``eps_high=None`` means ``eps_low`` (DAPO's
            clip-higher raises only ``eps_high``).
        dual_clip: the dual-clip constant ``c``, or None.
        mask_B_T: policy tokens; elsewhere the ratio is taken as 1 (see the module docstring).

    Returns:
        ``(loss_B_T, clipped_B_T)``: the per-token loss, and 1.0 where the clipped branch was taken
        (a clip fraction once aggregated with the mask).

    Raises:
        ValueError: a negative eps, or ``dual_clip <= 1``.
    """
    import torch

    eps_high = eps_low if eps_high is None else eps_high
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"clip ranges must be >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (it caps the loss at -c * A), got {dual_clip}")
    ratio = torch.exp(_log_ratio(logprobs_B_T, old_logprobs_B_T.detach(), mask_B_T))
    unclipped = -advantages_B_T * ratio
    clipped = -advantages_B_T * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    if dual_clip is not None:
        capped = torch.minimum(loss, -dual_clip * advantages_B_T)
        dual = (advantages_B_T < 0) & (capped < loss)
        loss = torch.where(advantages_B_T < 0, capped, loss)
        was_clipped = was_clipped | dual
    return loss, was_clipped.to(loss.dtype)


def _log_ratio(a_B_T: torch.Tensor, b_B_T: torch.Tensor, mask_B_T: torch.Tensor | None) -> torch.Tensor:
    """``a - b``, and 0 where ``mask_B_T`` is 0 (a where(), so no gradient reaches those positions)."""
    import torch

    diff = a_B_T - b_B_T
    return diff if mask_B_T is None else torch.where(mask_B_T != 0, diff, torch.zeros_like(diff))


def value_loss(
    values_B_T: torch.Tensor,
    old_values_B_T: torch.Tensor,
    returns_B_T: torch.Tensor,
    clip_eps: float | None = 0.2,
) -> torch.Tensor:
    """PPO's clipped value loss per token: ``0.5 * max((V - R)^2, (clip(V, V_old - e, V_old + e) - R)^2)``.

    ``clip_eps=None`` gives the plain ``0.5 * (V - R)^2``.
    """
    import torch

    unclipped = (values_B_T - returns_B_T) ** 2
    if clip_eps is None:
        return 0.5 * unclipped
    old = old_values_B_T.detach()
    clipped_values = old + torch.clamp(values_B_T - old, -clip_eps, clip_eps)
    return 0.5 * torch.maximum(unclipped, (clipped_values - returns_B_T) ** 2)


def kl_estimate(
    logprobs_B_T: torch.Tensor,
    ref_logprobs_B_T: torch.Tensor,
    kind: Literal["k1", "k2", "k3"] = "k3",
    mask_B_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled by pi (Schulman's k1, k2, k3).

    With ``log_r = ref_logprobs - logprobs``: ``k1 = -log_r`` (unbiased, can be negative), ``k2 = log_r^2 / 2``
    (biased, low variance), ``k3 = exp(log_r) - log_r - 1`` (unbiased, non-negative; GRPO's KL term).
    With ``mask_B_T``, masked positions get 0. Use the result as a loss term (``beta * aggregate(kl, mask)``)
    or as a reward penalty (:func:`kl_penalized_rewards`).

    Raises:
        ValueError: an unknown ``kind``.
    """
    import torch

    log_r = _log_ratio(ref_logprobs_B_T, logprobs_B_T, mask_B_T)
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"kind must be 'k1', 'k2' or 'k3', got {kind!r}")


def kl_penalized_rewards(
    rewards_B_T: torch.Tensor, kl_B_T: torch.Tensor, mask_B_T: torch.Tensor, beta: float
) -> torch.Tensor:
    """InstructGPT-style shaping: ``rewards - beta * kl`` on policy tokens (the KL enters as a reward, no grad)."""
    import torch

    return torch.where(mask_B_T != 0, rewards_B_T - beta * kl_B_T.detach(), rewards_B_T)


@dataclass
class AdaptiveKLController:
    """Adapts the KL coefficient toward a target KL (Ziegler et al., 2019).

    After each step, ``beta *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon``: beta rises while the
    measured KL exceeds the target and falls while it is below.

    Attributes:
        beta: the current coefficient.
        target: the KL per sequence (or token, as long as ``update`` gets the same unit) to aim for.
        horizon: how many steps a full 20% correction is spread over.
    """

    beta: float
    target: float
    horizon: int = 10_000

    def __post_init__(self) -> None:
        if self.beta < 0 or self.target <= 0 or self.horizon <= 0:
            raise ValueError(
                f"need beta >= 0, target > 0, horizon > 0; got beta={self.beta}, "
                f"target={self.target}, horizon={self.horizon}"
            )

    def update(self, kl: float, n_steps: int = 1) -> float:
        """Feed the KL measured over ``n_steps`` steps; returns the new beta."""
        if not math.isfinite(kl):
            raise ValueError(f"measured KL must be finite, got {kl}")
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta


def entropy_from_logits(logits_B_T_V: torch.Tensor) -> torch.Tensor:
    """The policy's entropy at each position, ``-sum_v p_v log p_v``, in nats: ``(B, T)``.

    As a bonus, subtract ``coef * aggregate(entropy, mask)`` from the loss.
    """
    import torch

    logp = torch.log_softmax(logits_B_T_V.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def aggregate(
    loss_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    mode: Aggregation = "token-mean",
    *,
    norm: float | None = None,
    segment_ids_B_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar over the masked tokens.

    Modes:
        - ``"token-mean"`` (DAPO): sum over all masked tokens / their count (or / ``norm`` when given: pass
          the token count of the whole batch when it is split into micro-batches); long sequences weigh more.
        - ``"seq-mean-token-mean"`` (original GRPO): each sequence's token mean, then the mean over sequences.
        - ``"seq-mean-token-sum-norm"`` (Dr. GRPO): each sequence's token sum divided by the constant ``norm``
          (e.g. the max completion length), then the mean over sequences; no length bias.

    A sequence is a row, or with ``segment_ids_B_T`` (packed rows) each id >= 0. Sequences without masked
    tokens count in the sequence mean as 0 for the sum mode and are skipped for the token-mean mode.

    Raises:
        ValueError: an unknown mode, or ``"seq-mean-token-sum-norm"`` without a positive ``norm``.
    """
    import torch

    if mode not in AGGREGATIONS:
        raise ValueError(f"mode must be one of {AGGREGATIONS}, got {mode!r}")
    keep = mask_B_T != 0
    # where(), not multiply: a masked inf/nan would otherwise turn 0 * inf into nan.
    masked = torch.where(keep, loss_B_T, torch.zeros((), dtype=loss_B_T.dtype, device=loss_B_T.device))
    weight = keep.to(masked.dtype)
    if mode == "token-mean":
        return masked.sum() / (weight.sum().clamp(min=1.0) if norm is None else norm)
    if segment_ids_B_T is None:
        sums, counts = masked.sum(dim=-1), weight.sum(dim=-1)
    else:
        ids = segment_ids_B_T.flatten()
        valid = ids >= 0
        n = int(ids[valid].max()) + 1 if bool(valid.any()) else 0
        sums = masked.new_zeros(n).index_add(0, ids[valid], masked.flatten()[valid])
        counts = weight.new_zeros(n).index_add(0, ids[valid], weight.flatten()[valid])
    if mode == "seq-mean-token-mean":
        has = counts > 0
        return (sums[has] / counts[has]).sum() / has.sum().clamp(min=1)
    if norm is None or norm <= 0:
        raise ValueError(
            "'seq-mean-token-sum-norm' needs norm > 0 (e.g. the max completion length in tokens)"
        )
    return sums.sum() / (sums.numel() * norm) if sums.numel() else sums.sum()


@dataclass(frozen=True)
class PolicyLoss:
    """What :func:`policy_loss` returns; every field but ``loss`` is detached, for logging.

    Attributes:
        loss: the scalar to backpropagate.
        pg_loss: the clipped-surrogate part, aggregated.
        kl: the mean per-token KL estimate over policy tokens (0 when no reference was given).
        clip_fraction: the fraction of policy tokens whose clipped branch was taken.
        ratio_mean: the mean of ``pi / pi_old`` over policy tokens.
    """

    loss: torch.Tensor
    pg_loss: torch.Tensor
    kl: torch.Tensor
    clip_fraction: torch.Tensor
    ratio_mean: torch.Tensor


def policy_loss(
    logprobs_B_T: torch.Tensor,
    old_logprobs_B_T: torch.Tensor,
    advantages_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    ref_logprobs_B_T: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_kind: Literal["k1", "k2", "k3"] = "k3",
    is_weights_B_T: torch.Tensor | None = None,
    aggregation: Aggregation = "token-mean",
    norm: float | None = None,
    segment_ids_B_T: torch.Tensor | None = None,
) -> PolicyLoss:
    """The GRPO/PPO policy loss: per token ``w * clipped_surrogate + beta * kl``, aggregated over the mask.

    The order is TRL's GRPO: importance weights (``w``, e.g. :func:`truncated_is_weights`) multiply the
    surrogate only; the KL term (a loss term here; for a KL reward penalty use :func:`kl_penalized_rewards`
    and leave ``beta`` at 0) is added after. No reference logprobs are needed when ``beta`` is 0.
    ``segment_ids_B_T`` marks the sequences of packed rows for the sequence-mean aggregations.

    Raises:
        ValueError: ``beta > 0`` without ``ref_logprobs_B_T``, or what the parts raise.
    """
    import torch

    if beta > 0 and ref_logprobs_B_T is None:
        raise ValueError("beta > 0 needs ref_logprobs_B_T (the reference model's logprobs); or set beta=0")
    pg, clipped = ppo_clip_loss(
        logprobs_B_T, old_logprobs_B_T, advantages_B_T, eps_low, eps_high, dual_clip, mask_B_T=mask_B_T
    )
    if is_weights_B_T is not None:
        pg = pg * is_weights_B_T.detach()
    per_token = pg
    kl = torch.zeros((), dtype=pg.dtype, device=pg.device)
    if ref_logprobs_B_T is not None:
        kl_B_T = kl_estimate(logprobs_B_T, ref_logprobs_B_T, kl_kind, mask_B_T=mask_B_T)
        if beta != 0:
            per_token = per_token + beta * kl_B_T
        kl = aggregate(kl_B_T.detach(), mask_B_T)
    loss = aggregate(per_token, mask_B_T, aggregation, norm=norm, segment_ids_B_T=segment_ids_B_T)
    with torch.no_grad():
        ratio = torch.exp(_log_ratio(logprobs_B_T, old_logprobs_B_T, mask_B_T))
        return PolicyLoss(
            loss=loss,
            pg_loss=aggregate(pg.detach(), mask_B_T, aggregation, norm=norm, segment_ids_B_T=segment_ids_B_T),
            kl=kl,
            clip_fraction=aggregate(clipped, mask_B_T),
            ratio_mean=aggregate(ratio, mask_B_T),
        )


def truncated_is_weights(
    learner_logprobs_B_T: torch.Tensor,
    sampler_logprobs_B_T: torch.Tensor,
    cap: float = 2.0,
    mask_B_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Truncated importance weights ``min(pi_learner / pi_sampler, cap)`` for the sampler/learner mismatch.

    The sampler (vLLM, a quantised or batched kernel) and the learner give the same tokens slightly
    different probabilities; multiplying the per-token policy loss by these weights corrects the gradient
    toward the learner's own distribution, and the cap bounds the variance. Pass the learner's logprobs
    under the weights that sampled (the PPO "old" logprobs). The weights carry no gradient; with
    ``mask_B_T`` they are 1 on masked positions.

    Raises:
        ValueError: ``cap`` is not positive.
    """
    import torch

    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    log_w = _log_ratio(learner_logprobs_B_T, sampler_logprobs_B_T, mask_B_T).detach()
    return torch.exp(log_w).clamp(max=cap)


def sft_nll_loss(
    logprobs_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    mode: Aggregation = "token-mean",
    *,
    norm: float | None = None,
    weights_B_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked negative log-likelihood: minus the ledger-aligned logprobs where ``mask`` is 1 (the assistant
    tokens), aggregated by :func:`aggregate`.

    Args:
        weights_B_T: per-token loss weights (``"token-mean"`` only): the weighted mean over the masked tokens,
            ``sum(w * nll) / sum(w)``; None weighs every token 1.

    Raises:
        ValueError: a masked-in token at position 0 (it has no context to be predicted from), or weights with
            a mode other than ``"token-mean"`` or with ``norm``.
    """
    if bool((mask_B_T[:, 0] != 0).any()):
        raise ValueError(
            "mask is 1 at position 0; the first token has no context, start the mask at 1 or later"
        )
    if weights_B_T is None:
        return aggregate(-logprobs_B_T, mask_B_T, mode, norm=norm)
    if mode != "token-mean" or norm is not None:
        raise ValueError(f"per-token weights need mode 'token-mean' and no norm, got {mode!r} and norm={norm}")
    weights = weights_B_T.to(logprobs_B_T.dtype) * (mask_B_T != 0)
    return aggregate(-logprobs_B_T * weights, mask_B_T, norm=max(float(weights.sum()), 1e-12))
