"""Advantage estimators on hand-computed numbers, on real ledgers, and against an exact policy gradient."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from agentrl.algos.advantages import (
    batch_normalize,
    discounted_returns,
    gae,
    group_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    sequence_to_tokens,
    turn_advantages,
    turn_index_from_mask,
    turn_returns,
    turn_rewards_from_trajectories,
    turn_values_to_tokens,
)
from agentrl.data.batch import collate
from agentrl.data.trajectory import LedgerBuilder, Trajectory
from agentrl.types import StopReason


def t(x: object, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype)


# ---------------------------------------------------------------------------------------------- GAE
# prompt | turn 0 (2 tokens, reward 0.5) | env token | turn 1 (1 token, reward 1.0) | trailing glue
MASK = t([[0, 1, 1, 0, 1, 0]], torch.int64)
REWARDS = t([[0.0, 0.0, 0.5, 0.0, 1.0, 0.0]])
VALUES = t([[9.0, 0.1, 0.2, 9.0, 0.4, 9.0]])  # 9.0 on mask-0 tokens: must be ignored


def test_gae_skips_env_tokens_and_bootstraps_across_them() -> None:
    adv, ret = gae(REWARDS, VALUES, MASK, gamma=0.9, lam=0.8)
    # t=4: 1.0 - 0.4 = 0.6
    # t=2: 0.5 + 0.9*0.4 - 0.2 = 0.66; + 0.72*0.6 = 1.092   (bootstraps from t=4 across the env token)
    # t=1: 0.9*0.2 - 0.1 = 0.08; + 0.72*1.092 = 0.86624
    torch.testing.assert_close(adv, t([[0, 0.86624, 1.092, 0, 0.6, 0]]))
    torch.testing.assert_close(ret, t([[0, 0.96624, 1.292, 0, 1.0, 0]]))


def test_gae_turn_level_discounts_only_between_turns() -> None:
    adv, _ = gae(REWARDS, VALUES, MASK, gamma=0.9, lam=0.8, turn_level=True)
    # t=2 -> t=4 crosses the env token (discount 0.9, lambda 0.8): as above, 1.092.
    # t=1 -> t=2 is inside turn 0 (no discount): 0.2 - 0.1 = 0.1; + 0.8*1.092 = 0.9736
    torch.testing.assert_close(adv, t([[0, 0.9736, 1.092, 0, 0.6, 0]]))


def test_gae_ignores_values_on_env_tokens() -> None:
    other = VALUES.clone()
    other[MASK == 0] = -123.0
    torch.testing.assert_close(
        gae(REWARDS, other, MASK, 0.9, 0.8)[0], gae(REWARDS, VALUES, MASK, 0.9, 0.8)[0]
    )


def test_discounted_returns_are_gae_with_zero_critic() -> None:
    # t=4: 1.0; t=2: 0.5 + 0.9*1.0 = 1.4; t=1: 0.9*1.4 = 1.26
    torch.testing.assert_close(discounted_returns(REWARDS, MASK, 0.9), t([[0, 1.26, 1.4, 0, 1.0, 0]]))


def test_gae_does_not_bootstrap_across_packed_episodes() -> None:
    mask = t([[0, 1, 0, 1]], torch.int64)
    rewards = t([[0.0, 1.0, 0.0, 2.0]])
    values = t([[0.5, 0.5, 0.5, 0.5]])
    segments = t([[0, 0, 1, 1]], torch.int64)
    adv, _ = gae(rewards, values, mask, 0.9, 0.8, segment_ids_B_T=segments)
    torch.testing.assert_close(adv, t([[0, 0.5, 0, 1.5]]))
    joined, _ = gae(rewards, values, mask, 0.9, 0.8)  # one episode: t=1 bootstraps from t=3
    assert joined[0, 1].item() == pytest.approx(1.0 + 0.9 * 0.5 - 0.5 + 0.72 * 1.5)


def test_gae_rejects_rewards_on_env_tokens_and_bad_params() -> None:
    with pytest.raises(ValueError, match="mask 0"):
        gae(t([[1.0, 0.0]]), t([[0.0, 0.0]]), t([[0, 1]]))
    with pytest.raises(ValueError, match="gamma"):
        gae(REWARDS, VALUES, MASK, gamma=1.5)
    with pytest.raises(ValueError, match="shapes differ"):
        gae(REWARDS, VALUES[:, :3], MASK)


def test_gae_on_a_collated_ledger() -> None:
    builder = LedgerBuilder([5, 6, 7])
    builder.add_sampled([10, 11], [-0.1, -0.2])
    builder.set_reward(0.25)
    builder.add_observation([1, 2])
    builder.add_sampled([12], [-0.3])
    builder.set_reward(1.0)
    builder.add_observation([3])
    trajectory = builder.finish(StopReason.TERMINATED)
    batch = collate([trajectory]).to_torch()
    mask = batch.loss_mask_B_T
    turn = turn_index_from_mask(mask)
    assert turn.tolist() == [[-1, -1, -1, 0, 0, -1, -1, 1, -1]]
    returns = discounted_returns(batch.turn_rewards_B_T.double(), mask)
    assert returns[0, 3].item() == pytest.approx(1.25)  # the first turn sees both rewards
    assert returns[0, 7].item() == pytest.approx(1.0)
    assert returns[mask == 0].abs().sum().item() == 0.0


# ---------------------------------------------------------------------------------------------- groups
def test_group_advantages_grpo_and_dr_grpo() -> None:
    rewards = t([1.0, 2.0, 3.0, 6.0])  # mean 3, sample std sqrt(14/3) = 2.1602469
    torch.testing.assert_close(
        group_advantages(rewards, eps=0.0), t([-0.9258201, -0.4629100, 0.0, 1.3887301]), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(group_advantages(rewards, scale=False), t([-2.0, -1.0, 0.0, 3.0]))
    two_groups = group_advantages(t([[1.0, 1.0, 1.0], [0.0, 1.0, 2.0]]))  # eps 1e-4 keeps 0/0 away
    torch.testing.assert_close(two_groups, t([[0.0, 0.0, 0.0], [-1.0, 0.0, 1.0]]) / (1 + 1e-4))
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(t([1.0]))


def test_rloo_advantages_use_the_others_mean() -> None:
    # others' means: 11/3, 10/3, 9/3, 6/3
    torch.testing.assert_close(rloo_advantages(t([1.0, 2.0, 3.0, 6.0])), t([-8 / 3, -4 / 3, 0.0, 4.0]))
    with pytest.raises(ValueError):
        rloo_advantages(t([1.0]))


def test_batch_normalize_and_reinforce_pp() -> None:
    x = t([[1.0, 2.0, 50.0], [3.0, -7.0, 8.0]])
    mask = t([[1, 1, 0], [1, 0, 0]], torch.int64)
    s = math.sqrt(1.5)  # (values 1, 2, 3: mean 2, population std sqrt(2/3))
    torch.testing.assert_close(batch_normalize(x, mask, eps=0.0), t([[-s, 0.0, 0.0], [s, 0.0, 0.0]]))
    rewards = t([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
    mask = t([[1, 1, 1], [1, 1, 0]], torch.int64)
    # returns-to-go: [1, 1, 1], [-1, -1]; mean 0.2, std sqrt(0.96)
    hi, lo = 0.8 / math.sqrt(0.96), -1.2 / math.sqrt(0.96)
    torch.testing.assert_close(
        reinforce_pp_advantages(rewards, mask, eps=0.0), t([[hi, hi, hi], [lo, lo, 0.0]])
    )


# ---------------------------------------------------------------------------------------------- turns
def test_turn_level_gae_agrees_with_turn_returns() -> None:
    episodes = [_episode([0.5, -1.0, 2.0]), _episode([1.0, 3.0])]
    batch = collate(episodes).to_torch()
    mask, rewards = batch.loss_mask_B_T, batch.turn_rewards_B_T.double()
    per_token = discounted_returns(rewards, mask, 0.7, turn_level=True)
    rewards_B_K, mask_B_K = turn_rewards_from_trajectories(episodes)
    expected = turn_values_to_tokens(turn_returns(rewards_B_K, mask_B_K, 0.7), turn_index_from_mask(mask))
    torch.testing.assert_close(per_token, expected)


def test_turn_returns_discount_per_turn() -> None:
    rewards = t([[1.0, 2.0, 3.0], [1.0, 2.0, 99.0]])
    mask = t([[1, 1, 1], [1, 1, 0]], torch.int64)
    # row 0: R2 = 3, R1 = 2 + 0.5*3 = 3.5, R0 = 1 + 0.5*3.5 = 2.75; row 1 ignores the padded 99
    torch.testing.assert_close(turn_returns(rewards, mask, 0.5), t([[2.75, 3.5, 3.0], [2.0, 2.0, 0.0]]))


GROUP_REWARDS = t([[1.0, 2.0], [0.0, 0.0], [1.0, 4.0]])  # returns-to-go: [3, 2], [0, -], [5, 4]
GROUP_MASK = t([[1, 1], [1, 0], [1, 1]], torch.int64)


def test_turn_advantages_leave_one_out() -> None:
    adv = turn_advantages(GROUP_REWARDS, GROUP_MASK, baseline="leave_one_out")
    # turn 0: 3 - (0+5)/2, 0 - (3+5)/2, 5 - (3+0)/2; turn 1 (two samples): 2 - 4, 4 - 2
    torch.testing.assert_close(adv, t([[0.5, -2.0], [-4.0, 0.0], [3.5, 2.0]]))


def test_turn_advantages_mean_and_normalized() -> None:
    adv = turn_advantages(GROUP_REWARDS, GROUP_MASK, baseline="mean")
    torch.testing.assert_close(adv, t([[1 / 3, -1.0], [-8 / 3, 0.0], [7 / 3, 1.0]]))
    adv = turn_advantages(GROUP_REWARDS, GROUP_MASK, baseline="normalized", eps=0.0)
    s0, s1 = math.sqrt(114 / 9 / 2), math.sqrt(2.0)
    torch.testing.assert_close(adv, t([[1 / 3 / s0, -1 / s1], [-8 / 3 / s0, 0.0], [7 / 3 / s0, 1 / s1]]))
    with pytest.raises(ValueError, match="baseline"):
        turn_advantages(GROUP_REWARDS, GROUP_MASK, baseline="median")


def test_turn_advantages_lone_sample_gets_its_return() -> None:
    adv = turn_advantages(t([[1.0, 2.0], [5.0, 0.0]]), t([[1, 1], [1, 0]], torch.int64))
    assert adv[0, 1].item() == 2.0  # nobody else reached turn 1: baseline 0


def test_turn_index_and_broadcast() -> None:
    mask = t([[0, 1, 1, 0, 0, 1, 0, 1]], torch.int64)
    turn = turn_index_from_mask(mask)
    assert turn.tolist() == [[-1, 0, 0, -1, -1, 1, -1, 2]]
    tokens = turn_values_to_tokens(t([[10.0, 20.0, 30.0]]), turn)
    assert tokens.tolist() == [[0.0, 10.0, 10.0, 0.0, 0.0, 20.0, 0.0, 30.0]]
    packed = t([[0, 1, 0, 1, 0, 1, 1, 0, 1]], torch.int64)
    segments = t([[0, 0, 0, 0, 1, 1, 1, 1, 1]], torch.int64)
    assert turn_index_from_mask(packed, segments).tolist() == [[-1, 0, -1, 1, -1, 0, 0, -1, 1]]
    # an episode that starts with a policy token right after the previous one's last policy token
    back_to_back = t([[1, 1, 0, 1]], torch.int64)
    assert turn_index_from_mask(back_to_back, t([[0, 1, 1, 1]], torch.int64)).tolist() == [[0, 0, -1, 1]]


def _episode(turn_rewards: list[float], prompt: int = 2) -> Trajectory:
    builder = LedgerBuilder(list(range(prompt)))
    for k, reward in enumerate(turn_rewards):
        builder.add_sampled([10 + k] * (k + 1), [-0.5] * (k + 1))
        builder.set_reward(reward)
        builder.add_observation([1])
    return builder.finish(StopReason.TERMINATED)


def test_turn_advantages_from_ledgers_reach_each_turns_tokens() -> None:
    group = [_episode([1.0, 2.0]), _episode([0.0]), _episode([1.0, 4.0])]  # GROUP_REWARDS below
    rewards, mask = turn_rewards_from_trajectories(group)
    assert rewards.tolist() == [[1.0, 2.0], [0.0, 0.0], [1.0, 4.0]] and mask.tolist() == [
        [1, 1],
        [1, 0],
        [1, 1],
    ]
    adv_G_K = turn_advantages(rewards, mask)
    batch = collate(group).to_torch()
    tokens = turn_values_to_tokens(adv_G_K, turn_index_from_mask(batch.loss_mask_B_T))
    # episode 0: prompt(2) | turn 0 (1 token) | obs | turn 1 (2 tokens) | obs
    assert tokens[0].tolist() == [0.0, 0.0, 0.5, 0.0, -2.0, -2.0, 0.0]
    assert tokens[1].tolist() == [0.0, 0.0, -4.0, 0.0, 0.0, 0.0, 0.0]
    assert bool((tokens[batch.loss_mask_B_T == 0] == 0).all())


def test_sequence_to_tokens() -> None:
    out = sequence_to_tokens(t([2.0, -1.0]), t([[0, 1, 1], [1, 0, 0]], torch.int64))
    assert out.tolist() == [[0.0, 2.0, 2.0], [-1.0, 0.0, 0.0]]


# ---------------------------------------------------------------------------------------------- exact gradient
# A K-turn episode: at turn k the policy continues (reward CONTINUE[k]) with probability sigmoid(theta[k]) or
# stops (reward STOP[k]); continuing past the last turn ends the episode. The policy decides when to stop, so
# how many samples of a group reach turn k depends on theta. Four possible trajectories: stop at 0, 1, 2, or
# never; small enough to enumerate, including every group of G of them.
THETA = t([0.3, -0.4, 0.8])
CONTINUE = [0.2, -0.5, 1.5]
STOP = [0.0, 1.0, 0.3]
K, G = 3, 4
KINDS = list(range(K + 1))  # kind k < K: continue k times then stop at turn k; kind K: continue every turn


def _kind_tables(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per kind: probability, per-turn rewards (K,), turn mask (K,), and score d log p / d theta (K,)."""
    p = torch.sigmoid(theta)
    probs, rewards, masks, scores = [], [], [], []
    for kind in KINDS:
        taken = min(kind + 1, K)
        prob, r, m, s = torch.ones((), dtype=theta.dtype), [0.0] * K, [0] * K, [0.0] * K
        for k in range(taken):
            cont = k < kind
            prob = prob * (p[k] if cont else 1 - p[k])
            r[k] = CONTINUE[k] if cont else STOP[k]
            m[k] = 1
            s[k] = float(1 - p[k].detach()) if cont else float(-p[k].detach())
        probs.append(prob)
        rewards.append(r)
        masks.append(m)
        scores.append(s)
    return torch.stack(probs), t(rewards), t(masks, torch.int64), t(scores)


def _exact_gradient() -> torch.Tensor:
    theta = THETA.clone().requires_grad_(True)
    probs, rewards, _, _ = _kind_tables(theta)
    (expected_return,) = torch.autograd.grad((probs * rewards.sum(dim=1)).sum(), theta)
    return expected_return


def _estimates(kinds_N_G: torch.Tensor, baseline: str) -> torch.Tensor:
    """The gradient estimate of each group: (1/G) sum_i sum_k A_ik * score_ik, shape (N, K)."""
    _, rewards_kind, mask_kind, score_kind = _kind_tables(THETA)
    if baseline.startswith("outcome_"):  # one advantage per episode from its total reward, on every turn
        totals_N_G = rewards_kind.sum(dim=1)[kinds_N_G]
        adv_N_G = rloo_advantages(totals_N_G) if baseline == "outcome_rloo" else group_advantages(totals_N_G)
        adv_N_G_K = adv_N_G.unsqueeze(-1) * mask_kind[kinds_N_G]
    else:
        adv_N_G_K = turn_advantages(rewards_kind[kinds_N_G], mask_kind[kinds_N_G], baseline=baseline)
    return (adv_N_G_K * score_kind[kinds_N_G]).sum(dim=1) / G


def _expected_estimate(baseline: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The estimator's exact mean and variance: every one of the (K+1)^G groups weighted by its probability."""
    probs, _, _, _ = _kind_tables(THETA)
    groups = t(list(itertools.product(KINDS, repeat=G)), torch.int64)  # (256, G)
    weights = probs[groups].prod(dim=1).unsqueeze(1)
    estimates = _estimates(groups, baseline)
    mean = (weights * estimates).sum(dim=0)
    return mean, (weights * (estimates - mean) ** 2).sum(dim=0)


def test_exact_gradient_matches_finite_differences() -> None:
    def expected_return(theta: torch.Tensor) -> float:
        probs, rewards, _, _ = _kind_tables(theta)
        return float((probs * rewards.sum(dim=1)).sum())

    exact = _exact_gradient()
    for k in range(K):
        step = torch.zeros(K, dtype=torch.float64)
        step[k] = 1e-6
        numeric = (expected_return(THETA + step) - expected_return(THETA - step)) / 2e-6
        assert exact[k].item() == pytest.approx(numeric, abs=1e-8)


def test_leave_one_out_turn_advantages_are_unbiased_and_naive_ones_are_not() -> None:
    """Exact expectations over all 256 groups, then a Monte Carlo check of the shipped estimator.

    Prints the measured bias (run with ``-s``): relative error ``|E[g] - grad| / |grad|`` per estimator.
    """
    exact = _exact_gradient()
    names = ("leave_one_out", "mean", "normalized", "outcome_rloo", "outcome_grpo")
    moments = {name: _expected_estimate(name) for name in names}
    expectation = {name: mean for name, (mean, _) in moments.items()}
    relative = {name: float((e - exact).norm() / exact.norm()) for name, e in expectation.items()}
    print(f"\nexact gradient {exact.tolist()}")
    for name, e in expectation.items():
        cosine = float(e @ exact / (e.norm() * exact.norm()))
        total_var = float(moments[name][1].sum())
        print(
            f"E[{name}] = {e.tolist()}  relative bias {relative[name]:.4f}  cosine {cosine:.4f}  var {total_var:.4f}"
        )
    torch.testing.assert_close(expectation["leave_one_out"], exact, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(expectation["outcome_rloo"], exact, atol=1e-12, rtol=1e-12)
    assert relative["mean"] > 0.05 and relative["normalized"] > 0.05 and relative["outcome_grpo"] > 0.05

    # Monte Carlo: the mean over N sampled groups lands within 4 standard errors of the exact gradient
    # (a chance failure has probability < 1e-4 per component for the unbiased estimator).
    probs, _, _, _ = _kind_tables(THETA)
    N = 40_000
    kinds = torch.multinomial(probs, N * G, replacement=True, generator=torch.Generator().manual_seed(0))
    estimates = _estimates(kinds.view(N, G), "leave_one_out")
    mean, stderr = estimates.mean(dim=0), estimates.std(dim=0) / math.sqrt(N)
    z = (mean - exact) / stderr
    print(f"Monte Carlo leave_one_out mean {mean.tolist()} stderr {stderr.tolist()} z {z.tolist()}")
    assert bool((z.abs() < 4).all()), z
    naive = _estimates(kinds.view(N, G), "normalized").mean(dim=0)
    z_naive = (naive - exact) / stderr
    print(f"Monte Carlo normalized mean {naive.tolist()} z against the exact gradient {z_naive.tolist()}")
    assert bool((z_naive.abs() > 4).any())
