"""Losses on hand-computed numbers; masked positions change neither a loss nor a gradient (autograd)."""

from __future__ import annotations

import math

import pytest
import torch

from agentrl.algos.losses import (
    AGGREGATIONS,
    AdaptiveKLController,
    aggregate,
    entropy_from_logits,
    kl_estimate,
    kl_penalized_rewards,
    policy_loss,
    ppo_clip_loss,
    sft_nll_loss,
    truncated_is_weights,
    value_loss,
)


def t(x: object, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype)


# ---------------------------------------------------------------------------------------------- PPO
RATIOS = t([[1.5, 0.5, 1.1, 0.7, 5.0]])
ADVANTAGES = t([[1.0, 1.0, -1.0, -1.0, -1.0]])


def _ppo(**kwargs: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logprobs = RATIOS.log().requires_grad_(True)
    loss, clipped = ppo_clip_loss(logprobs, torch.zeros_like(logprobs), ADVANTAGES, **kwargs)  # type: ignore[arg-type]
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    return loss.detach(), clipped, grad


def test_ppo_clip_higher() -> None:
    loss, clipped, grad = _ppo(eps_low=0.2, eps_high=0.28)
    # r=1.5,A=+1: max(-1.5, -1.28) = -1.28 (clipped above at 1.28, not 1.2)
    # r=0.5,A=+1: max(-0.5, -0.8) = -0.5;  r=1.1,A=-1: 1.1;  r=0.7,A=-1: max(0.7, 0.8) = 0.8 (clipped below)
    torch.testing.assert_close(loss, t([[-1.28, -0.5, 1.1, 0.8, 5.0]]))
    assert clipped.tolist() == [[1.0, 0.0, 0.0, 1.0, 0.0]]
    # d/d logprob of -A * r is -A * r where unclipped, 0 where clipped
    torch.testing.assert_close(grad, t([[0.0, -0.5, 1.1, 0.0, 5.0]]))
    symmetric, _, _ = _ppo(eps_low=0.2)
    assert symmetric[0, 0].item() == pytest.approx(-1.2)


def test_ppo_dual_clip_caps_negative_advantage_loss() -> None:
    loss, clipped, grad = _ppo(eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    # r=5, A=-1: min(max(5, 1.28), 3 * 1) = 3, and no gradient through the cap
    torch.testing.assert_close(loss, t([[-1.28, -0.5, 1.1, 0.8, 3.0]]))
    assert clipped.tolist() == [[1.0, 0.0, 0.0, 1.0, 1.0]]
    assert grad[0, 4].item() == 0.0
    with pytest.raises(ValueError, match="dual_clip"):
        _ppo(dual_clip=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        _ppo(eps_low=-0.1)


def test_value_loss_clipping() -> None:
    values, old, returns = t([1.0, 2.0]), t([0.5, 2.0]), t([2.0, 1.0])
    # token 0: max((1-2)^2, (0.7-2)^2) / 2 = 0.845;  token 1: the clipped value equals V: 0.5
    torch.testing.assert_close(value_loss(values, old, returns, 0.2), t([0.845, 0.5]))
    torch.testing.assert_close(value_loss(values, old, returns, None), t([0.5, 0.5]))


# ---------------------------------------------------------------------------------------------- KL
def test_kl_estimators_by_hand() -> None:
    logprobs, ref = t([-1.0, -2.0]), t([-1.5, -1.0])  # log(ref/pi) = -0.5, 1.0
    torch.testing.assert_close(kl_estimate(logprobs, ref, "k1"), t([0.5, -1.0]))
    torch.testing.assert_close(kl_estimate(logprobs, ref, "k2"), t([0.125, 0.5]))
    torch.testing.assert_close(kl_estimate(logprobs, ref, "k3"), t([math.exp(-0.5) - 0.5, math.e - 2.0]))
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(logprobs, ref, "k4")  # type: ignore[arg-type]


def test_k1_and_k3_are_unbiased_for_the_true_kl() -> None:
    p, q = t([0.5, 0.3, 0.2]), t([0.2, 0.3, 0.5])
    true_kl = float((p * (p / q).log()).sum())
    n = 200_000
    tokens = torch.multinomial(p, n, replacement=True, generator=torch.Generator().manual_seed(0))
    for kind in ("k1", "k3"):
        samples = kl_estimate(p.log()[tokens], q.log()[tokens], kind)  # type: ignore[arg-type]
        stderr = float(samples.std()) / math.sqrt(n)
        assert abs(float(samples.mean()) - true_kl) < 4 * stderr, kind
    assert bool((kl_estimate(p.log()[tokens], q.log()[tokens], "k3") >= 0).all())


def test_kl_as_reward_penalty() -> None:
    shaped = kl_penalized_rewards(t([[0.0, 0.0, 1.0]]), t([[0.1, 0.2, 0.3]]), t([[0, 1, 1]]), beta=0.5)
    torch.testing.assert_close(shaped, t([[0.0, -0.1, 0.85]]))


def test_adaptive_kl_controller_moves_beta_toward_the_target() -> None:
    ctl = AdaptiveKLController(beta=0.1, target=6.0, horizon=10_000)
    # kl/target - 1 = +1 and -0.5: both capped at 0.2 in size
    assert ctl.update(12.0, n_steps=256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    high = ctl.beta
    assert ctl.update(3.0, n_steps=256) == pytest.approx(high * (1 - 0.2 * 256 / 10_000))
    low = ctl.beta
    assert ctl.update(6.6, n_steps=100) == pytest.approx(low * (1 + 0.1 * 100 / 10_000))
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(beta=0.1, target=0.0)
    with pytest.raises(ValueError, match="finite"):
        ctl.update(float("nan"))


# ---------------------------------------------------------------------------------------------- entropy, logprobs
LN3 = math.log(3.0)


def test_entropy_from_logits() -> None:
    logits = t([[[0.0, 0.0], [0.0, LN3]]])  # p = (1/2, 1/2) and (1/4, 3/4)
    expected = [math.log(2.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]
    torch.testing.assert_close(entropy_from_logits(logits), t([expected], torch.float32))


# ---------------------------------------------------------------------------------------------- aggregation
LOSS = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
LOSS_MASK = t([[1, 1, 0], [1, 0, 0]], torch.int64)


def test_aggregation_modes_by_hand() -> None:
    assert aggregate(LOSS, LOSS_MASK, "token-mean").item() == pytest.approx(7 / 3)
    assert aggregate(LOSS, LOSS_MASK, "seq-mean-token-mean").item() == pytest.approx((1.5 + 4.0) / 2)
    assert aggregate(LOSS, LOSS_MASK, "seq-mean-token-sum-norm", norm=4).item() == pytest.approx(7 / 8)
    with pytest.raises(ValueError, match="norm"):
        aggregate(LOSS, LOSS_MASK, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="mode"):
        aggregate(LOSS, LOSS_MASK, "sum")  # type: ignore[arg-type]


def test_aggregation_of_packed_rows_uses_segments() -> None:
    loss, mask, segments = t([[1.0, 2.0, 3.0, 4.0]]), t([[1, 1, 1, 1]]), t([[0, 0, 1, 1]], torch.int64)
    assert aggregate(loss, mask, "seq-mean-token-mean", segment_ids_B_T=segments).item() == pytest.approx(2.5)
    value = aggregate(loss, mask, "seq-mean-token-sum-norm", norm=2, segment_ids_B_T=segments).item()
    assert value == pytest.approx((3 + 7) / (2 * 2))


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_masked_positions_change_neither_loss_nor_gradient(mode: str) -> None:
    def run(garbage: float) -> tuple[torch.Tensor, torch.Tensor]:
        logprobs = t([[-0.5, -1.0, garbage], [-2.0, garbage, garbage]]).requires_grad_(True)
        old = t([[-0.6, -0.9, garbage], [-1.5, 3.0, garbage]])
        ref = t([[-0.7, -1.2, -0.1], [-1.0, garbage, -9.0]])
        adv = t([[1.0, 1.0, 1.0], [-1.0, 5.0, -1.0]])
        pg, _ = ppo_clip_loss(logprobs, old, adv, 0.2, 0.28, dual_clip=3.0, mask_B_T=LOSS_MASK)
        kl = kl_estimate(logprobs, ref, "k3", mask_B_T=LOSS_MASK)
        weights = truncated_is_weights(logprobs, old, 2.0, mask_B_T=LOSS_MASK)
        loss = aggregate(weights * pg + 0.1 * kl, LOSS_MASK, mode, norm=3)  # type: ignore[arg-type]
        (grad,) = torch.autograd.grad(loss, logprobs)
        return loss.detach(), grad

    reference_loss, reference_grad = run(-0.3)
    for garbage in (-50.0, 40.0, float("-inf")):
        loss, grad = run(garbage)
        torch.testing.assert_close(loss, reference_loss)
        torch.testing.assert_close(grad, reference_grad)
    assert bool((reference_grad[LOSS_MASK == 0] == 0).all())
    assert bool((reference_grad[LOSS_MASK == 1] != 0).all())


def test_aggregate_ignores_nan_at_masked_positions() -> None:
    loss = t([[1.0, float("nan")]]).requires_grad_(True)
    value = aggregate(loss, t([[1, 0]]), "token-mean")
    (grad,) = torch.autograd.grad(value, loss)
    assert value.item() == 1.0 and grad.tolist() == [[1.0, 0.0]]


def test_token_mean_with_a_global_token_count() -> None:
    # micro-batch of a larger batch with 10 policy tokens in all: (1 + 2 + 4) / 10
    assert aggregate(LOSS, LOSS_MASK, "token-mean", norm=10).item() == pytest.approx(0.7)


# ---------------------------------------------------------------------------------------------- policy loss
def _trl_style_loss(
    logprobs: torch.Tensor,
    old: torch.Tensor,
    ref: torch.Tensor,
    adv_B: torch.Tensor,
    mask: torch.Tensor,
    is_ratio: torch.Tensor,
    beta: float,
    loss_type: str,
    max_len: int,
) -> torch.Tensor:
    """GRPO's per-token loss and reductions written out independently, in the form TRL's trainer uses."""
    coef_1 = torch.exp(logprobs - old)
    coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.28)
    per_token = -torch.min(coef_1 * adv_B.unsqueeze(1), coef_2 * adv_B.unsqueeze(1)) * is_ratio
    per_token = per_token + beta * (torch.exp(ref - logprobs) - (ref - logprobs) - 1)
    m = mask.to(per_token.dtype)
    if loss_type == "grpo":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dr_grpo":
        return (per_token * m).sum() / (per_token.size(0) * max_len)
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


@pytest.mark.parametrize(
    ("loss_type", "mode"),
    [("grpo", "seq-mean-token-mean"), ("dr_grpo", "seq-mean-token-sum-norm"), ("dapo", "token-mean")],
)
def test_policy_loss_matches_the_grpo_formulas(loss_type: str, mode: str) -> None:
    gen = torch.Generator().manual_seed(1)
    B, T = 4, 6
    base = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 2
    old = base + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    ref = base + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    sampler = old + 0.2 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=gen) < 0.7).long()
    mask[:, 0] = 1
    adv_B = torch.randn(B, generator=gen, dtype=torch.float64)
    is_w = truncated_is_weights(old, sampler, cap=2.0)
    ours_lp = base.clone().requires_grad_(True)
    theirs_lp = base.clone().requires_grad_(True)
    out = policy_loss(
        ours_lp, old, adv_B.unsqueeze(1).expand(B, T), mask, eps_low=0.2, eps_high=0.28,
        ref_logprobs_B_T=ref, beta=0.04, is_weights_B_T=is_w, aggregation=mode,
        norm=T if loss_type == "dr_grpo" else None,  # type: ignore[arg-type]
    )  # fmt: skip
    theirs = _trl_style_loss(theirs_lp, old, ref, adv_B, mask, is_w, 0.04, loss_type, T)
    (g_ours,) = torch.autograd.grad(out.loss, ours_lp)
    (g_theirs,) = torch.autograd.grad(theirs, theirs_lp)
    torch.testing.assert_close(out.loss, theirs, atol=1e-12, rtol=0)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-12, rtol=0)
    assert 0.0 <= out.clip_fraction.item() <= 1.0 and out.kl.item() > 0
    assert not out.pg_loss.requires_grad


def test_policy_loss_needs_a_reference_for_kl() -> None:
    x = t([[-1.0]])
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(x, x, x, t([[1]]), beta=0.1)
    assert policy_loss(x, x, t([[2.0]]), t([[1]])).loss.item() == pytest.approx(-2.0)


# ---------------------------------------------------------------------------------------------- IS, SFT
def test_truncated_is_weights() -> None:
    learner, sampler = t([[-1.0, -1.0, -1.0]]), t([[-1.0, -1.0 - math.log(1.5), -1.0 - math.log(4.0)]])
    torch.testing.assert_close(truncated_is_weights(learner, sampler, cap=2.0), t([[1.0, 1.5, 2.0]]))
    learner.requires_grad_(True)
    assert not truncated_is_weights(learner, sampler).requires_grad
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(learner, sampler, cap=0.0)


def test_sft_nll_by_hand_and_masked_targets_get_no_gradient() -> None:
    logprobs = t([[0.0, math.log(0.75), math.log(0.5), -2.0]], torch.float32).requires_grad_(True)
    mask = t([[0, 1, 0, 1]], torch.int64)  # tokens 1 and 3 are assistant tokens: -(log 3/4 - 2) / 2
    loss = sft_nll_loss(logprobs, mask)
    assert loss.item() == pytest.approx(-(math.log(0.75) - 2.0) / 2, rel=1e-6)
    (grad,) = torch.autograd.grad(loss, logprobs)
    torch.testing.assert_close(grad, t([[0.0, -0.5, 0.0, -0.5]], torch.float32))
    summed = sft_nll_loss(logprobs, mask, "seq-mean-token-sum-norm", norm=4.0)
    assert summed.item() == pytest.approx(-(math.log(0.75) - 2.0) / 4, rel=1e-6)
    with pytest.raises(ValueError, match="position 0"):
        sft_nll_loss(logprobs, t([[1, 1, 0, 0]], torch.int64))


def test_weighted_sft_nll_is_the_weighted_mean_of_the_targets() -> None:
    logprobs = t([[0.0, math.log(0.75), -float("inf"), -2.0]], torch.float32).requires_grad_(True)
    mask = t([[0, 1, 0, 1]], torch.int64)  # a masked-out -inf stays out
    weights = t([[7.0, 1.0, 9.0, 3.0]], torch.float32)  # only the targets' weights count: (1, 3)
    loss = sft_nll_loss(logprobs, mask, weights_B_T=weights)
    assert loss.item() == pytest.approx(-(math.log(0.75) + 3 * -2.0) / 4, rel=1e-6)
    (grad,) = torch.autograd.grad(loss, logprobs)
    torch.testing.assert_close(grad, t([[0.0, -0.25, 0.0, -0.75]], torch.float32))
    ones = sft_nll_loss(logprobs, mask, weights_B_T=torch.ones(1, 4))
    assert ones.item() == pytest.approx(sft_nll_loss(logprobs, mask).item(), rel=1e-6)
    with pytest.raises(ValueError, match="token-mean"):
        sft_nll_loss(logprobs, mask, "seq-mean-token-mean", weights_B_T=weights)
    with pytest.raises(ValueError, match="no norm"):
        sft_nll_loss(logprobs, mask, norm=4.0, weights_B_T=weights)
