"""Preference losses on hand-computed numbers; gradients push the right way; masked tokens never count."""

from __future__ import annotations

import math

import pytest
import torch

from agentrl.algos import (
    dpo_loss,
    kto_loss,
    kto_reference_point,
    orpo_loss,
    sequence_logprobs,
    simpo_loss,
)
from agentrl.data.batch import collate
from agentrl.data.trajectory import LedgerBuilder
from agentrl.types import StopReason

INF, NAN = float("inf"), float("nan")
# L = -log sigmoid(1) = log(1 + e^-1); -log sigmoid(-1) = log(1 + e) = 1 + L
L = math.log1p(math.exp(-1.0))  # 0.31326168751822286


def t(x: object, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def leaves(*values: float) -> list[torch.Tensor]:
    return [t([v]).requires_grad_(True) for v in values]


# ---------------------------------------------------------------------------------------------- sequence logprobs
def test_sequence_logprobs_sum_and_mean_over_policy_tokens_only() -> None:
    logprobs = t([[-1.0, -2.0, -3.0, -4.0], [-0.5, -INF, -1.5, NAN], [NAN, -INF, 7.0, 0.0]])
    mask = t([[0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]], torch.int64)
    # row 0: -2 - 3 = -5 over 2 tokens;  row 1: -0.5 - 1.5 = -2 over 2;  row 2: no policy tokens -> 0
    torch.testing.assert_close(sequence_logprobs(logprobs, mask), t([-5.0, -2.0, 0.0]))
    torch.testing.assert_close(sequence_logprobs(logprobs, mask, average=True), t([-2.5, -1.0, 0.0]))
    # any nonzero mask value counts once, it is not a weight
    torch.testing.assert_close(sequence_logprobs(logprobs, mask * 3, average=True), t([-2.5, -1.0, 0.0]))
    with pytest.raises(ValueError, match="one shape"):
        sequence_logprobs(logprobs, mask[:, :3])
    with pytest.raises(ValueError, match="2-D"):
        sequence_logprobs(logprobs[0], mask[0])


def test_sequence_logprobs_per_segment_of_packed_and_prompt_shared_rows() -> None:
    # row 0: a shared prompt (-2), then segments 0 and 2; row 1: segment 1, then padding (-1)
    logprobs = t([[-9.0, -1.0, -2.0, -4.0, -8.0], [-0.5, -1.5, -3.0, NAN, -INF]])
    mask = t([[1, 0, 1, 1, 1], [0, 1, 1, 0, 1]], torch.int64)
    segments = t([[-2, 0, 0, 2, 2], [1, 1, 1, -1, -1]], torch.int64)
    # segment 0: -2; segment 1: -1.5 - 3 = -4.5; segment 2: -4 - 8 = -12; segment 3: none -> 0
    sums = sequence_logprobs(logprobs, mask, segment_ids_B_T=segments, num_sequences=4)
    torch.testing.assert_close(sums, t([-2.0, -4.5, -12.0, 0.0]))
    means = sequence_logprobs(logprobs, mask, average=True, segment_ids_B_T=segments)
    torch.testing.assert_close(means, t([-2.0, -2.25, -6.0]))
    with pytest.raises(ValueError, match="segment_ids_B_T"):
        sequence_logprobs(logprobs, mask, segment_ids_B_T=segments[:, :4])


def test_masked_inf_and_nan_change_neither_loss_nor_gradient() -> None:
    mask = t([[0, 1, 1, 0, 1], [0, 1, 0, 0, 1]], torch.int64)
    clean = t([[-0.2, -1.0, -0.5, -0.3, -0.7], [-0.1, -2.0, -0.4, -0.9, -1.1]])
    dirty = torch.where(mask != 0, clean, t([[-INF, 0, 0, NAN, 0], [NAN, 0, -INF, -INF, 0]]))

    def run(logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logprobs = logprobs.clone().requires_grad_(True)
        logps = sequence_logprobs(logprobs, mask)  # row 0 chosen, row 1 rejected
        loss = dpo_loss(logps[:1], logps[1:], t([-2.0]), t([-3.0]), beta=0.5).loss_B.sum()
        (grad,) = torch.autograd.grad(loss, logprobs)
        return loss.detach(), grad

    loss_clean, grad_clean = run(clean)
    loss_dirty, grad_dirty = run(dirty)
    # h = (-2.2 - -3.1) - (-2 - -3) = -0.1;  loss = log(1 + exp(0.05))
    assert loss_clean.item() == pytest.approx(math.log1p(math.exp(0.05)))
    assert loss_dirty.item() == loss_clean.item()
    assert torch.equal(grad_dirty, grad_clean)
    assert bool(torch.isfinite(grad_dirty).all())
    assert grad_dirty[mask == 0].abs().sum().item() == 0.0


def _multi_turn_mask() -> torch.Tensor:
    builder = LedgerBuilder([5, 6, 7])  # prompt
    builder.add_sampled([10, 11], [-0.1, -0.2])  # assistant turn 1: a tool call
    builder.add_observation([1, 2, 3])  # template glue + tool result + generation prompt
    builder.add_sampled([12], [-0.3])  # assistant turn 2: the answer
    builder.add_observation([4])  # end-of-turn glue
    return collate([builder.finish(StopReason.TERMINATED)]).to_torch().loss_mask_B_T


def test_multi_turn_tool_tokens_do_not_count() -> None:
    mask = _multi_turn_mask()
    assert mask.tolist() == [[0, 0, 0, 1, 1, 0, 0, 0, 1, 0]]
    # the same policy tokens; the tool result scored very differently (or not at all) in the two inputs
    a = t([[0.0, -1.0, -2.0, -0.1, -0.2, -0.5, -0.6, -0.7, -0.3, -0.4]])
    b = t([[NAN, -9.0, -INF, -0.1, -0.2, -30.0, -INF, NAN, -0.3, 5.0]])
    assert sequence_logprobs(a, mask).item() == pytest.approx(-0.6)
    assert torch.equal(sequence_logprobs(a, mask), sequence_logprobs(b, mask))
    assert torch.equal(sequence_logprobs(a, mask, average=True), sequence_logprobs(b, mask, average=True))
    assert sequence_logprobs(a, mask, average=True).item() == pytest.approx(-0.2)


# ---------------------------------------------------------------------------------------------- DPO
# pair 0: h = (pi_c - pi_r) - (ref_c - ref_r) = (-1 + 3) - 0 = 2 (the policy prefers the chosen more than ref)
# pair 1: h = (-3 + 1) - 0 = -2
PI_C, PI_R, REF_C, REF_R = t([-1.0, -3.0]), t([-3.0, -1.0]), t([-2.0, -2.0]), t([-2.0, -2.0])


def test_dpo_sigmoid_cdpo_robust_by_hand() -> None:
    out = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.5)
    # beta h = +1, -1:  -log sigmoid(1) = L,  -log sigmoid(-1) = 1 + L
    torch.testing.assert_close(out.loss_B, t([L, 1.0 + L]))
    torch.testing.assert_close(out.chosen_rewards_B, t([0.5, -0.5]))  # beta (pi_c - ref_c)
    torch.testing.assert_close(out.rejected_rewards_B, t([-0.5, 0.5]))
    torch.testing.assert_close(out.margins_B, t([1.0, -1.0]))
    assert out.accuracy.item() == 0.5
    cdpo = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.5, label_smoothing=0.1)
    # 0.9 L + 0.1 (1 + L) = L + 0.1;   0.9 (1 + L) + 0.1 L = L + 0.9
    torch.testing.assert_close(cdpo.loss_B, t([L + 0.1, L + 0.9]))
    robust = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.5, label_smoothing=0.1, kind="robust")
    # (0.9 L - 0.1 (1 + L)) / 0.8 = L - 0.125;   (0.9 (1 + L) - 0.1 L) / 0.8 = L + 1.125
    torch.testing.assert_close(robust.loss_B, t([L - 0.125, L + 1.125]))
    plain = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.5, kind="robust")
    torch.testing.assert_close(plain.loss_B, out.loss_B)


def test_dpo_ipo_and_hinge_by_hand() -> None:
    # IPO: (h - 1 / (2 beta))^2 with beta = 0.5: (2 - 1)^2, (-2 - 1)^2;  beta = 0.25: (2 - 2)^2, (-2 - 2)^2
    torch.testing.assert_close(dpo_loss(PI_C, PI_R, REF_C, REF_R, 0.5, kind="ipo").loss_B, t([1.0, 9.0]))
    torch.testing.assert_close(dpo_loss(PI_C, PI_R, REF_C, REF_R, 0.25, kind="ipo").loss_B, t([0.0, 16.0]))
    # hinge: relu(1 - beta h): beta = 0.25: relu(0.5), relu(1.5)
    torch.testing.assert_close(dpo_loss(PI_C, PI_R, REF_C, REF_R, 0.25, kind="hinge").loss_B, t([0.5, 1.5]))


def test_dpo_gradients_raise_chosen_lower_rejected_and_skip_the_reference() -> None:
    pc, pr, rc, rr = leaves(-1.0, -3.0, -2.0, -2.0)  # h = 2
    dpo_loss(pc, pr, rc, rr, beta=0.5).loss_B.sum().backward()
    # dL/dpi_c = -beta sigmoid(-beta h) = -0.5 sigmoid(-1)
    assert pc.grad is not None and pr.grad is not None
    assert pc.grad.item() == pytest.approx(-0.5 * sigmoid(-1.0))
    assert pr.grad.item() == pytest.approx(0.5 * sigmoid(-1.0))
    assert rc.grad is None and rr.grad is None
    # IPO regularises: past its target margin 1 / (2 beta) it pulls h back, below it pushes h up
    for beta, expected in ((0.5, 2.0 * (2.0 - 1.0)), (0.1, 2.0 * (2.0 - 5.0))):
        pc, pr, rc, rr = leaves(-1.0, -3.0, -2.0, -2.0)
        dpo_loss(pc, pr, rc, rr, beta, kind="ipo").loss_B.sum().backward()
        assert pc.grad is not None and pc.grad.item() == pytest.approx(expected)


def test_dpo_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="kind"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, kind="kto")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.0)
    with pytest.raises(ValueError, match="has none"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, label_smoothing=0.1, kind="ipo")
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, label_smoothing=0.5, kind="robust")
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R[:1])


# ---------------------------------------------------------------------------------------------- KTO
def test_kto_by_hand() -> None:
    policy, ref = t([-1.0, -3.0, -2.0]), t([-2.0, -2.0, -2.0])  # r = pi - ref = 1, -1, 0
    desirable = torch.tensor([True, False, False])
    out = kto_loss(policy, ref, desirable, kl_ref=0.5, beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    # desirable, r = 1:    1 - sigmoid(0.5 (1 - 0.5))       = 1 - sigmoid(0.25)
    # undesirable, r = -1: 2 (1 - sigmoid(0.5 (0.5 + 1)))   = 2 (1 - sigmoid(0.75))
    # undesirable, r = 0:  2 (1 - sigmoid(0.5 (0.5 - 0)))   = 2 (1 - sigmoid(0.25))
    expected = [1 - sigmoid(0.25), 2 * (1 - sigmoid(0.75)), 2 * (1 - sigmoid(0.25))]
    torch.testing.assert_close(out.loss_B, t(expected))
    torch.testing.assert_close(out.rewards_B, t([0.5, -0.5, 0.0]))
    assert out.kl_ref.item() == 0.5
    # a negative reference point is clamped at 0: desirable r = 1 -> 1 - sigmoid(0.5)
    clamped = kto_loss(policy, ref, desirable, kl_ref=-0.3, beta=0.5)
    assert clamped.loss_B[0].item() == pytest.approx(1 - sigmoid(0.5))
    assert clamped.kl_ref.item() == 0.0


def test_kto_gradients_and_reference_point() -> None:
    policy = t([-1.0, -3.0]).requires_grad_(True)
    kl_policy = t([-1.0, -2.0]).requires_grad_(True)
    z = kto_reference_point(kl_policy, t([-1.5, -2.7]))  # mean(0.5, 0.7)
    assert z.item() == pytest.approx(0.6)
    assert not z.requires_grad
    assert kto_reference_point(t([-1.5, -2.7]), t([-1.0, -2.0])).item() == 0.0  # mean(-0.5, -0.7) -> 0
    kto_loss(policy, t([-2.0, -2.0]), torch.tensor([True, False]), z, beta=0.5).loss_B.sum().backward()
    assert policy.grad is not None
    # desirable: d/dpi (1 - sigmoid(beta (r - z))) = -beta s (1 - s) with s = sigmoid(0.5 (1 - 0.6))
    s = sigmoid(0.2)
    assert policy.grad[0].item() == pytest.approx(-0.5 * s * (1 - s))
    assert policy.grad[1].item() > 0  # undesirable: raising its likelihood raises the loss
    assert kl_policy.grad is None


def test_kto_rejects_bad_arguments() -> None:
    policy, ref = t([-1.0, -3.0]), t([-2.0, -2.0])
    with pytest.raises(ValueError, match="bool"):
        kto_loss(policy, ref, torch.tensor([1, 0]), 0.0)
    with pytest.raises(ValueError, match="weights"):
        kto_loss(policy, ref, torch.tensor([True, False]), 0.0, undesirable_weight=0.0)
    with pytest.raises(ValueError, match="one shape"):
        kto_loss(policy, ref, torch.tensor([True]), 0.0)
    with pytest.raises(ValueError, match="at least one"):
        kto_reference_point(t([]), t([]))


# ---------------------------------------------------------------------------------------------- ORPO
def test_orpo_by_hand() -> None:
    # p_c = 0.5: odds 1;  p_r = 0.2: odds 1/4;  log odds ratio = ln 4;  -log sigmoid(ln 4) = ln(1 + 1/4)
    chosen, rejected = t([math.log(0.5)]).requires_grad_(True), t([math.log(0.2)]).requires_grad_(True)
    nll = t(0.7).requires_grad_(True)
    out = orpo_loss(chosen, rejected, nll, lam=0.1)
    torch.testing.assert_close(out.log_odds_B, t([math.log(4.0)]))
    torch.testing.assert_close(out.odds_ratio_loss_B, t([math.log(1.25)]))
    torch.testing.assert_close(out.loss_B.detach(), t([0.7 + 0.1 * math.log(1.25)]))
    torch.testing.assert_close(out.chosen_rewards_B, t([0.1 * math.log(0.5)]))
    out.loss_B.sum().backward()
    assert nll.grad is not None and nll.grad.item() == 1.0
    # d log_odds / d a = 1 + e^a / (1 - e^a) = 1 / (1 - p);  dL/d log_odds = -sigmoid(-ln 4) = -1/5
    assert chosen.grad is not None and chosen.grad.item() == pytest.approx(0.1 * -0.2 / 0.5)
    assert rejected.grad is not None and rejected.grad.item() == pytest.approx(0.1 * 0.2 / 0.8)
    with pytest.raises(ValueError, match="lam"):
        orpo_loss(chosen, rejected, nll, lam=-1.0)


def test_orpo_is_stable_near_certainty() -> None:
    # a = -1e-6 in float32: log(1 - e^a) = log(-expm1(a)) ~ -13.8155; naive log(1 - exp(a)) rounds badly
    chosen = t([-1e-6, 0.0], torch.float32).requires_grad_(True)
    rejected = t([math.log(0.5)] * 2, torch.float32)
    out = orpo_loss(chosen, rejected, t(0.0, torch.float32))
    expected = -1e-6 - math.log(-math.expm1(-1e-6))  # the ln 0.5 terms cancel
    assert out.log_odds_B[0].item() == pytest.approx(expected, rel=1e-5)
    out.loss_B.sum().backward()  # a = 0 exactly: finite loss and gradient, not nan
    assert bool(torch.isfinite(out.loss_B).all()) and chosen.grad is not None
    assert bool(torch.isfinite(chosen.grad).all()) and bool((chosen.grad <= 0).all())


# ---------------------------------------------------------------------------------------------- SimPO
def test_simpo_by_hand() -> None:
    chosen, rejected = t([-1.0, -0.5]).requires_grad_(True), t([-1.5, -1.5])
    out = simpo_loss(chosen, rejected, beta=2.0, gamma=1.0)
    # h = 2 (a_c - a_r) - 1 = 0 and 1:  ln 2 and L
    torch.testing.assert_close(out.loss_B.detach(), t([math.log(2.0), L]))
    torch.testing.assert_close(out.chosen_rewards_B, t([-2.0, -1.0]))
    torch.testing.assert_close(out.rejected_rewards_B, t([-3.0, -3.0]))
    smoothed = simpo_loss(chosen, rejected, beta=2.0, gamma=1.0, label_smoothing=0.1)
    # h = 0 is symmetric: still ln 2;  h = 1: 0.9 L + 0.1 (1 + L) = L + 0.1
    torch.testing.assert_close(smoothed.loss_B.detach(), t([math.log(2.0), L + 0.1]))
    out.loss_B.sum().backward()
    # dL/da_c = -beta sigmoid(-h): -2 * 1/2 and -2 sigmoid(-1)
    assert chosen.grad is not None
    torch.testing.assert_close(chosen.grad, t([-1.0, -2.0 * sigmoid(-1.0)]))
    with pytest.raises(ValueError, match="beta"):
        simpo_loss(chosen, rejected, beta=-1.0)


def test_length_normalised_losses_ignore_repetition_where_summed_dpo_does_not() -> None:
    # doubling a response with the same per-token logprobs keeps its mean, doubles its sum
    short = t([[-0.5, -1.0, 0.0, 0.0]])
    long = t([[-0.5, -1.0, -0.5, -1.0]])
    short_mask, long_mask = t([[1, 1, 0, 0]]), t([[1, 1, 1, 1]])
    rejected = t([-2.0])
    a_short = sequence_logprobs(short, short_mask, average=True)
    a_long = sequence_logprobs(long, long_mask, average=True)
    torch.testing.assert_close(simpo_loss(a_short, rejected).loss_B, simpo_loss(a_long, rejected).loss_B)
    s_short, s_long = sequence_logprobs(short, short_mask), sequence_logprobs(long, long_mask)
    ref = t([0.0])
    assert not torch.equal(
        dpo_loss(s_short, rejected, ref, ref).loss_B, dpo_loss(s_long, rejected, ref, ref).loss_B
    )
