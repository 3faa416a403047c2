"""Advantage estimators: GAE over policy tokens, group baselines (GRPO, Dr. GRPO, RLOO), REINFORCE++ and
turn-aware advantages for multi-turn episodes.

Every function is pure and takes tensors named by dimension: ``B`` rows, ``T`` tokens, ``G`` samples of one
task (a group; leading dimensions are independent groups), ``K`` assistant turns. Token-level inputs follow the
ledger (:class:`agentrl.data.trajectory.Trajectory`): ``mask_B_T`` is 1 on policy-sampled tokens only, and
per-turn rewards sit on each turn's last sampled token (``Batch.turn_rewards_B_T``), so the last turn's reward
(which carries the outcome reward) sits on the final sampled token.

Environment and tool tokens (mask 0) are not actions: the recursions skip them, so the value of the last
token of a turn bootstraps from the value of the first token of the next turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from agentrl.data.trajectory import Trajectory

__all__ = [
    "batch_normalize",
    "discounted_returns",
    "gae",
    "group_advantages",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "sequence_to_tokens",
    "turn_advantages",
    "turn_index_from_mask",
    "turn_returns",
    "turn_rewards_from_trajectories",
    "turn_values_to_tokens",
]


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shapes differ: {shapes}")


def gae(
    rewards_B_T: torch.Tensor,
    values_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    *,
    turn_level: bool = False,
    segment_ids_B_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the policy tokens of each row.

    For consecutive policy tokens ``t < t'`` (any mask-0 tokens between them are skipped):
    ``delta_t = r_t + g * V_t' - V_t`` and ``A_t = delta_t + g * lam * A_t'``, with ``V`` and ``A`` past the
    last policy token of an episode taken as 0 (the episode is over). ``g = gamma`` per step, or with
    ``turn_level=True`` only where a turn ends (mask-0 tokens lie between ``t`` and ``t'``), so ``gamma`` and
    ``lam`` discount per turn and tokens within a turn are undiscounted.

    Args:
        rewards_B_T: reward per token, nonzero only on policy tokens (per-turn rewards on each turn's last token).
        values_B_T: the critic's value per token (ignored where ``mask_B_T`` is 0).
        mask_B_T: 1 on policy-sampled tokens.
        gamma, lam: discount and GAE lambda, in [0, 1].
        turn_level: discount per turn instead of per token.
        segment_ids_B_T: for packed rows, which episode each token belongs to; no bootstrapping across a change.

    Returns:
        ``(advantages_B_T, returns_B_T)``, both 0 where ``mask_B_T`` is 0; ``returns = advantages + values``
        (the critic's regression target).

    Raises:
        ValueError: shapes differ, gamma/lam outside [0, 1], or a reward on a token that is not an action.
    """
    import torch

    _check_same_shape(rewards_B_T=rewards_B_T, values_B_T=values_B_T, mask_B_T=mask_B_T)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    policy_B_T = mask_B_T != 0
    if bool((rewards_B_T[~policy_B_T] != 0).any()):
        raise ValueError(
            "a nonzero reward sits on a token with mask 0; place rewards on a turn's last sampled token"
        )
    rewards = rewards_B_T.detach().double()
    values = torch.where(policy_B_T, values_B_T.detach().double(), 0.0)
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    gap = torch.zeros(B, dtype=torch.bool, device=rewards.device)  # mask-0 tokens lie before the next action
    for t in range(T - 1, -1, -1):
        if segment_ids_B_T is not None and t + 1 < T:
            new_episode = segment_ids_B_T[:, t] != segment_ids_B_T[:, t + 1]
            next_value = torch.where(new_episode, 0.0, next_value)
            next_adv = torch.where(new_episode, 0.0, next_adv)
        on = policy_B_T[:, t]
        g = torch.full_like(next_value, gamma) if not turn_level else torch.where(gap, gamma, 1.0)
        delta = rewards[:, t] + g * next_value - values[:, t]
        adv = delta + g * lam * next_adv
        advantages[:, t] = torch.where(on, adv, 0.0)
        next_value = torch.where(on, values[:, t], next_value)
        next_adv = torch.where(on, adv, next_adv)
        gap = ~on
    returns = torch.where(policy_B_T, advantages + values, 0.0)
    return advantages.to(rewards_B_T.dtype), returns.to(rewards_B_T.dtype)


def discounted_returns(
    rewards_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    gamma: float = 1.0,
    *,
    turn_level: bool = False,
    segment_ids_B_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Returns-to-go over policy tokens: :func:`gae` with a zero critic and ``lam = 1``. 0 where mask is 0."""
    import torch

    advantages, _ = gae(
        rewards_B_T,
        torch.zeros_like(rewards_B_T),
        mask_B_T,
        gamma,
        1.0,
        turn_level=turn_level,
        segment_ids_B_T=segment_ids_B_T,
    )
    return advantages


def group_advantages(rewards_G: torch.Tensor, *, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages over the last dimension: GRPO ``(r - mean) / (std + eps)``, Dr. GRPO ``r - mean``.

    ``std`` is the sample standard deviation and ``eps`` defaults to 1e-4, both as in TRL's GRPO, so a group
    whose rewards all agree gets advantages of 0.

    Args:
        rewards_G: each sample's reward; ``(..., G)`` for several groups at once.
        scale: divide by the group's std (GRPO) or not (Dr. GRPO).
        eps: added to the std.

    Raises:
        ValueError: ``scale`` with fewer than 2 samples per group (no std to divide by).
    """
    centred = rewards_G - rewards_G.mean(dim=-1, keepdim=True)
    if not scale:
        return centred
    if rewards_G.shape[-1] < 2:
        raise ValueError(
            "std-scaled group advantages need at least 2 samples per group; use scale=False or G >= 2"
        )
    return centred / (rewards_G.std(dim=-1, keepdim=True) + eps)


def rloo_advantages(rewards_G: torch.Tensor) -> torch.Tensor:
    """RLOO: each sample's reward minus the mean of the *other* samples of its group (last dimension).

    The baseline does not depend on the sample it is subtracted from, so the estimator stays unbiased.

    Raises:
        ValueError: fewer than 2 samples per group.
    """
    G = rewards_G.shape[-1]
    if G < 2:
        raise ValueError("RLOO needs at least 2 samples per group")
    others_mean = (rewards_G.sum(dim=-1, keepdim=True) - rewards_G) / (G - 1)
    return rewards_G - others_mean


def batch_normalize(x_B_T: torch.Tensor, mask_B_T: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Whiten ``x`` with the mean and (population) std of its masked entries; 0 where the mask is 0."""
    import torch

    keep = mask_B_T != 0
    values = x_B_T[keep]
    if values.numel() == 0:
        return torch.zeros_like(x_B_T)
    mean = values.mean()
    std = values.std(correction=0)
    return torch.where(keep, (x_B_T - mean) / (std + eps), 0.0)


def reinforce_pp_advantages(
    rewards_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    gamma: float = 1.0,
    *,
    eps: float = 1e-8,
    segment_ids_B_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """REINFORCE++: token returns-to-go (rewards may include a per-token KL penalty), normalised over the batch.

    The whole batch's policy tokens share one mean and std, instead of a per-group baseline.
    """
    returns = discounted_returns(rewards_B_T, mask_B_T, gamma, segment_ids_B_T=segment_ids_B_T)
    return batch_normalize(returns, mask_B_T, eps)


# ---------------------------------------------------------------------------------------------- turns
def sequence_to_tokens(advantages_B: torch.Tensor, mask_B_T: torch.Tensor) -> torch.Tensor:
    """Give every policy token of row ``b`` the advantage ``advantages_B[b]``; 0 on mask-0 tokens."""
    import torch

    return torch.where(
        mask_B_T != 0, advantages_B.unsqueeze(-1), torch.zeros_like(advantages_B).unsqueeze(-1)
    )


def turn_rewards_from_trajectories(trajectories: Sequence[Trajectory]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-turn rewards of each trajectory, padded to the most turns: ``(turn_rewards_B_K, turn_mask_B_K)``.

    The rows of a group, in order, are what :func:`turn_advantages` takes (``(G, K)``, or ``(N, G, K)`` after
    a reshape when the groups are the same size).
    """
    import torch

    K = max((len(t.turns) for t in trajectories), default=0)
    rewards = torch.zeros(len(trajectories), K, dtype=torch.float64)
    mask = torch.zeros(len(trajectories), K, dtype=torch.int64)
    for b, trajectory in enumerate(trajectories):
        n = len(trajectory.turns)
        rewards[b, :n] = torch.tensor([turn.reward for turn in trajectory.turns], dtype=torch.float64)
        mask[b, :n] = 1
    return rewards, mask


def turn_returns(
    turn_rewards_B_K: torch.Tensor, turn_mask_B_K: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """Per-turn returns-to-go with turn-level discounting: ``R_k = sum_{j >= k} gamma^(j - k) r_j``.

    Args:
        turn_rewards_B_K: each episode's per-turn rewards, padded to ``K`` turns.
        turn_mask_B_K: 1 on turns that happened (a prefix of each row).
        gamma: per-turn discount in [0, 1].

    Returns:
        ``returns_B_K``, 0 on padding.
    """
    import torch

    _check_same_shape(turn_rewards_B_K=turn_rewards_B_K, turn_mask_B_K=turn_mask_B_K)
    rewards = torch.where(turn_mask_B_K != 0, turn_rewards_B_K, 0.0)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for k in range(rewards.shape[-1] - 1, -1, -1):
        running = rewards[..., k] + gamma * running
        returns[..., k] = running
    return torch.where(turn_mask_B_K != 0, returns, 0.0)


def turn_advantages(
    turn_rewards_G_K: torch.Tensor,
    turn_mask_G_K: torch.Tensor,
    gamma: float = 1.0,
    *,
    baseline: str = "leave_one_out",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Turn-aware advantages: each turn's return-to-go minus a group baseline taken at the same turn position.

    ``baseline``:
        - ``"leave_one_out"`` (default): the mean return-to-go at turn ``k`` over the *other* samples of the
          group that reached turn ``k`` (0 when none did). It never depends on the sample's own actions, so
          the policy-gradient estimate stays unbiased even when the policy decides how many turns to take
          (``tests/test_algos_advantages.py`` checks this against an exact gradient).
        - ``"mean"``: the mean over every sample that reached turn ``k``, itself included. Biased: the own
          return shrinks the advantage by ``1 - 1/n_k``, and ``n_k`` (how many reached turn ``k``) depends on the
          policy.
        - ``"normalized"``: ``(R - mean_k) / (std_k + eps)``, GRPO's normalisation per turn position. Biased
          (the mean bias, and the std rescales turn positions by amounts that depend on the policy).

        Measured on the test's 3-turn stop/continue problem with G = 4 (exact expectation over all 256
        groups): ``leave_one_out`` matches the exact gradient to 1e-12; ``mean`` is off by 29.6% of the
        gradient's norm and ``normalized`` by 21.3%, its turn-2 component 63% too small. There, the
        outcome-level RLOO is unbiased too, with a slightly lower total variance (0.0398 vs 0.0413).

    Args:
        turn_rewards_G_K: per-turn rewards of ``G`` samples of one task, padded to ``K`` turns; ``(..., G, K)``
            for several groups at once.
        turn_mask_G_K: 1 on turns that happened.
        gamma: per-turn discount of the returns-to-go.
        baseline: one of the names above.
        eps: added to the std for ``"normalized"``.

    Returns:
        ``advantages_G_K``, 0 on padding.

    Raises:
        ValueError: an unknown ``baseline`` or mismatched shapes.
    """
    import torch

    if baseline not in ("leave_one_out", "mean", "normalized"):
        raise ValueError(f"baseline must be 'leave_one_out', 'mean' or 'normalized', got {baseline!r}")
    returns = turn_returns(turn_rewards_G_K, turn_mask_G_K, gamma)
    present = (turn_mask_G_K != 0).to(returns.dtype)
    n_K = present.sum(dim=-2, keepdim=True)
    total_K = (returns * present).sum(dim=-2, keepdim=True)
    if baseline == "leave_one_out":
        others = (n_K - present).clamp(min=1.0)
        base = (total_K - returns * present) / others
        return torch.where(present > 0, returns - base, 0.0)
    mean_K = total_K / n_K.clamp(min=1.0)
    centred = torch.where(present > 0, returns - mean_K, 0.0)
    if baseline == "mean":
        return centred
    # Bessel-corrected std per turn position over the samples present; a lone sample gets std 0.
    var_K = (centred**2).sum(dim=-2, keepdim=True) / (n_K - 1).clamp(min=1.0)
    return centred / (var_K.sqrt() + eps)


def turn_index_from_mask(mask_B_T: torch.Tensor, segment_ids_B_T: torch.Tensor | None = None) -> torch.Tensor:
    """Which turn each policy token belongs to: ``turn_B_T`` (0, 1, ... per episode), -1 on mask-0 tokens.

    A turn is a maximal run of policy tokens; in the ledger every turn is followed by template or env tokens,
    so runs and :class:`~agentrl.data.trajectory.TurnSpan` s agree. With ``segment_ids_B_T`` (packed rows)
    the count restarts for each episode.
    """
    import torch

    on = (mask_B_T != 0).long()
    previous = torch.nn.functional.pad(on, (1, 0))[:, :-1]
    starts = (on == 1) & (previous == 0)
    if segment_ids_B_T is not None:
        first_of_segment = torch.ones_like(starts)
        first_of_segment[:, 1:] = segment_ids_B_T[:, 1:] != segment_ids_B_T[:, :-1]
        starts = starts | ((on == 1) & first_of_segment)
        count = starts.long().cumsum(dim=1)
        # Subtract the count reached before each segment began, so every episode starts at turn 0.
        offset = torch.where(first_of_segment, count - starts.long(), 0)
        offset = torch.cummax(torch.where(first_of_segment, offset, -1), dim=1).values
        index = count - offset - 1
    else:
        index = starts.long().cumsum(dim=1) - 1
    return torch.where(on == 1, index, -1)


def turn_values_to_tokens(values_B_K: torch.Tensor, turn_B_T: torch.Tensor) -> torch.Tensor:
    """Broadcast one value per turn (e.g. turn advantages) to that turn's tokens; 0 where ``turn_B_T`` is -1.

    Rows of ``values_B_K`` and ``turn_B_T`` are the same episodes (unpacked rows).
    """
    import torch

    gathered = values_B_K.gather(1, turn_B_T.clamp(min=0))
    return torch.where(turn_B_T >= 0, gathered, 0.0)
