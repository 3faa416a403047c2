"""The preference losses against TRL 1.16.0's own code on identical single-turn batches, within 1e-5.

TRL keeps these losses inside trainer methods. Real trainers need datasets, tokenizers and accelerate, so each
method is called unbound on a stand-in object that carries just the attributes that method reads (listed at
each stand-in). Everything else is real: a tiny Qwen2 policy and reference, TRL's fused LM head for DPO and KTO,
TRL's own logprob, padding and NLL code for ORPO and CPO/SimPO. Our side is the path the learners train with:
each (prompt, completion) becomes a ledger (mask 1 on the completion), :func:`collate` (or, for pairs that share
their prompt, :func:`collate_shared`, as DPO lays them out) makes the :class:`Batch`, :func:`policy_logprobs`
gives per-token logprobs, ``-inf`` is written outside the loss mask (it must not count) and
:func:`sequence_logprobs` reduces them per sequence.

Conventions found in TRL 1.16.0, and how these tests line up with them:

- DPO ``"sigmoid"`` has no label smoothing; conservative DPO (cDPO) survives as CPO's ``"sigmoid"`` loss, so
  our smoothed sigmoid is checked against ``CPOTrainer.cpo_loss`` fed the log-ratios ``pi - ref``.
- DPO ``"ipo"`` divides each sequence log-ratio by its completion length: we pass averaged logprobs.
- KTO's reference point is ``mean(pi - ref)`` over prompt ``i`` + completion ``i - 1``, clamped at 0.
- ORPO's NLL covers the prompt and the response; CPO's covers the response only. ``orpo_loss`` takes its NLL
  as an argument, so the test passes the NLL TRL computes the way TRL computes it.
- SimPO's ``gamma`` is TRL's ``simpo_gamma`` (the margin itself); CPO adds ``cpo_alpha * NLL`` on top.
"""

from __future__ import annotations

import collections
import copy
import types

import pytest
import torch
from transformers import Qwen2ForCausalLM

from agentrl.algos import (
    dpo_loss,
    kto_loss,
    kto_reference_point,
    orpo_loss,
    sequence_logprobs,
    sft_nll_loss,
    simpo_loss,
)
from agentrl.data.batch import SHARED_SEGMENT, collate, collate_shared
from agentrl.data.trajectory import Trajectory, TurnSpan
from agentrl.learners.logprobs import policy_logprobs
from agentrl.models.tiny import tiny_config

trl = pytest.importorskip("trl")
if trl.__version__ != "1.16.0":
    pytest.skip(
        f"the stand-ins follow TRL 1.16.0's trainer internals; found {trl.__version__}",
        allow_module_level=True,
    )
DPOTrainer = trl.DPOTrainer
KTOTrainer = trl.KTOTrainer
CPOTrainer = pytest.importorskip("trl.experimental.cpo").CPOTrainer
ORPOTrainer = pytest.importorskip("trl.experimental.orpo").ORPOTrainer
add_fused_lm_head = pytest.importorskip("trl.trainer.utils").add_fused_lm_head

ATOL = 1e-5
VOCAB = 64
Model = torch.nn.Module
Rows = list[tuple[list[int], list[int]]]  # (prompt ids, completion ids) per sequence


@pytest.fixture(scope="module")
def models() -> tuple[Model, Model]:
    """A tiny Qwen2 policy and its reference, a copy with perturbed weights, both with TRL's fused LM head.

    A reference near the policy is the realistic case, and it keeps the log-ratios small, so
    float32 rounding stays far below the tolerance even in IPO's squared loss.
    """
    config = tiny_config(vocab_size=VOCAB)
    config.initializer_range = 0.2  # peaked enough that the losses sit well away from their value at 0
    with torch.random.fork_rng():
        torch.manual_seed(0)
        policy = Qwen2ForCausalLM(config)
        ref = copy.deepcopy(policy)
        with torch.no_grad():
            for param in ref.parameters():
                param.add_(0.005 * torch.randn_like(param))
    for model in (policy, ref):  # the outputs DPO and KTO ask for; either model may play the policy
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return policy, ref


def _random_rows(lengths: list[tuple[int, int]], seed: int) -> Rows:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(3, VOCAB, (p,), generator=g).tolist(),
            torch.randint(3, VOCAB, (c,), generator=g).tolist(),
        )
        for p, c in lengths
    ]


def _greedy(model: Model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt) :].tolist()


def _pad(rows: Rows, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, completion_mask)``."""
    width = width or max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention[i, : len(p) + len(c)] = 1
        completion[i, len(p) : len(p) + len(c)] = 1
    return ids, attention, completion


def _ledger(prompt: list[int], completion: list[int], *, with_prompt: bool = False) -> Trajectory:
    """The ledger of ``prompt + completion``: mask 1 on the completion (``with_prompt``: on every token but the
    first, as TRL's ORPO NLL counts them)."""
    ids = [*prompt, *completion]
    start = 1 if with_prompt else len(prompt)
    return Trajectory(ids, [0.0] * len(ids), [0] * start + [1] * (len(ids) - start), (TurnSpan(start, len(ids)),))


def _ours(model: Model, rows: Rows, *, average: bool = False, shared: bool = False) -> torch.Tensor:
    """Each row's completion logprob (sum or mean), one conversation per row or, with ``shared``, each distinct
    prompt computed once (:func:`collate_shared`)."""
    ledgers = [_ledger(p, c) for p, c in rows]
    batch = (collate_shared(ledgers) if shared else collate(ledgers)).to_torch()
    assert bool((batch.segment_ids_B_T == SHARED_SEGMENT).any()) == shared  # the layout the test means
    logprobs_B_T, _ = policy_logprobs(model, batch)
    mask_B_T = batch.loss_mask_B_T
    logprobs_B_T = torch.where(mask_B_T != 0, logprobs_B_T, float("-inf"))  # nothing outside may count
    return sequence_logprobs(logprobs_B_T, mask_B_T, average=average, segment_ids_B_T=batch.segment_ids_B_T,
                             num_sequences=len(rows))  # fmt: skip


def _nll(model: Model, rows: Rows, *, with_prompt: bool) -> torch.Tensor:
    """The token-mean NLL of the rows' completions (``with_prompt``: of every token but the first)."""
    batch = collate([_ledger(p, c, with_prompt=with_prompt) for p, c in rows]).to_torch()
    logprobs_B_T, _ = policy_logprobs(model, batch)
    return sft_nll_loss(logprobs_B_T, batch.loss_mask_B_T)


def _identity(x: object) -> object:
    return x


def _accelerator() -> types.SimpleNamespace:
    # one process: gathering across ranks is the identity
    return types.SimpleNamespace(device=torch.device("cpu"), gather=_identity, gather_for_metrics=_identity)


def _metrics() -> dict[str, collections.defaultdict[str, list[float]]]:
    return {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}


# ---------------------------------------------------------------------------------------------- DPO
DPO_PAIRS = 4
# (prompt, completion) lengths of the chosen rows, then the rejected completions' lengths
DPO_LENGTHS = [(2, 3), (4, 1), (3, 6), (5, 4)]
DPO_REJECTED = [5, 2, 1, 4]


def _dpo_rows(seed: int) -> Rows:
    """The chosen rows, then the rejected rows on the same prompts (as a learner's pairs come)."""
    chosen = _random_rows(DPO_LENGTHS, seed)
    rejected = [c for _, c in _random_rows([(1, n) for n in DPO_REJECTED], seed + 100)]
    return chosen + [(p, r) for (p, _), r in zip(chosen, rejected, strict=True)]


def _dpo_stand_in(
    policy: Model, ref: Model, loss_type: str, beta: float, smoothing: float
) -> types.SimpleNamespace:
    # What DPOTrainer._compute_loss reads (reference computed online, no LD-DPO, WPO, f-divergence or MoE aux loss)
    return types.SimpleNamespace(
        model=policy, ref_model=ref, accelerator=_accelerator(),
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None), beta=beta, label_smoothing=smoothing, loss_types=[loss_type], loss_weights=[1.0],
        precompute_ref_logps=False, ld_alpha=None, f_divergence_type="reverse_kl", use_weighting=False,
        aux_loss_enabled=False, _metrics=_metrics(), _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip


def _trl_dpo(
    policy: Model, ref: Model, rows: Rows, loss_type: str, beta: float, smoothing: float = 0.0
) -> tuple[torch.Tensor, types.SimpleNamespace]:
    ids, attention, completion = _pad(rows)
    stand_in = _dpo_stand_in(policy, ref, loss_type, beta, smoothing)
    batch = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}
    return DPOTrainer._compute_loss(stand_in, policy, batch, False), stand_in


@pytest.mark.parametrize(
    ("kind", "beta", "smoothing", "average"),
    [
        ("sigmoid", 0.5, 0.0, False),
        ("robust", 0.5, 0.2, False),
        ("hinge", 0.5, 0.0, False),
        ("ipo", 1.0, 0.0, True),
    ],
)
def test_dpo_loss_values_match_trl(
    models: tuple[Model, Model], kind: str, beta: float, smoothing: float, average: bool
) -> None:
    policy, ref = models
    rows = _dpo_rows(seed=0)
    with torch.no_grad():
        trl_loss, _ = _trl_dpo(policy, ref, rows, kind, beta, smoothing)
        pi, pi_ref = _ours(policy, rows, average=average, shared=True), _ours(ref, rows, average=average, shared=True)
    n = DPO_PAIRS
    ours = dpo_loss(pi[:n], pi[n:], pi_ref[:n], pi_ref[n:], beta, label_smoothing=smoothing, kind=kind)  # type: ignore[arg-type]
    assert abs(ours.loss_B.mean().item() - trl_loss.item()) < ATOL
    # not a degenerate batch: the policy already ranks some pairs right and some wrong
    assert 0 < ours.accuracy.item() < 1


def test_dpo_gradients_and_rewards_match_trl(models: tuple[Model, Model]) -> None:
    policy, ref = models
    rows = _dpo_rows(seed=1)
    policy.zero_grad()
    trl_loss, stand_in = _trl_dpo(policy, ref, rows, "sigmoid", beta=0.5)
    trl_loss.backward()
    trl_grads = [p.grad.clone() for p in policy.parameters() if p.grad is not None]
    policy.zero_grad()
    pi = _ours(policy, rows, shared=True)
    with torch.no_grad():
        pi_ref = _ours(ref, rows, shared=True)
    n = DPO_PAIRS
    ours = dpo_loss(pi[:n], pi[n:], pi_ref[:n], pi_ref[n:], beta=0.5)
    ours.loss_B.mean().backward()
    our_grads = [p.grad for p in policy.parameters() if p.grad is not None]
    policy.zero_grad()
    assert len(our_grads) == len(trl_grads) > 0
    for ours_g, trl_g in zip(our_grads, trl_grads, strict=True):
        torch.testing.assert_close(ours_g, trl_g, atol=ATOL, rtol=1e-4)
    logged = stand_in._metrics["train"]
    assert ours.chosen_rewards_B.mean().item() == pytest.approx(logged["rewards/chosen"][0], abs=ATOL)
    assert ours.rejected_rewards_B.mean().item() == pytest.approx(logged["rewards/rejected"][0], abs=ATOL)
    assert ours.margins_B.mean().item() == pytest.approx(logged["rewards/margins"][0], abs=ATOL)
    assert ours.accuracy.item() == logged["rewards/accuracies"][0]


def test_conservative_dpo_matches_trl_cpo_sigmoid_on_log_ratios(models: tuple[Model, Model]) -> None:
    policy, ref = models
    rows = _dpo_rows(seed=2)
    with torch.no_grad():
        pi, pi_ref = _ours(policy, rows, shared=True), _ours(ref, rows, shared=True)
    n, beta, smoothing = DPO_PAIRS, 0.5, 0.2
    # What CPOTrainer.cpo_loss reads; with the log-ratios as its "logps" it is cDPO
    stand_in = types.SimpleNamespace(
        loss_type="sigmoid", beta=beta, label_smoothing=smoothing, alpha=0.0, accelerator=_accelerator()
    )
    trl_losses, trl_chosen_rewards, _ = CPOTrainer.cpo_loss(
        stand_in, pi[:n] - pi_ref[:n], pi[n:] - pi_ref[n:]
    )
    ours = dpo_loss(pi[:n], pi[n:], pi_ref[:n], pi_ref[n:], beta, label_smoothing=smoothing)
    torch.testing.assert_close(ours.loss_B, trl_losses, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.chosen_rewards_B, trl_chosen_rewards, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- KTO
KTO_LENGTHS = [(2, 3), (4, 1), (3, 6), (5, 4), (2, 2), (3, 5)]
KTO_LABELS = [True, False, True, True, False, False]


def _kto_batch(rows: Rows) -> tuple[dict[str, torch.Tensor], Rows]:
    # TRL's mismatched pairs: prompt i with completion i - 1 (cyclically)
    kl_rows = [(rows[i][0], rows[i - 1][1]) for i in range(len(rows))]
    ids, attention, completion = _pad(rows)
    kl_ids, kl_attention, kl_completion = _pad(kl_rows)
    batch = {
        "input_ids": ids, "attention_mask": attention, "completion_mask": completion,
        "KL_input_ids": kl_ids, "KL_attention_mask": kl_attention, "KL_completion_mask": kl_completion,
        "label": torch.tensor(KTO_LABELS),
    }  # fmt: skip
    return batch, kl_rows


@pytest.mark.parametrize("swap", [False, True], ids=["policy-vs-ref", "ref-vs-policy"])
def test_kto_loss_value_matches_trl(models: tuple[Model, Model], swap: bool) -> None:
    policy, ref = models[::-1] if swap else models
    rows = _random_rows(KTO_LENGTHS, seed=3)
    batch, kl_rows = _kto_batch(rows)
    beta, desirable_weight, undesirable_weight = 0.5, 1.0, 1.5
    # What KTOTrainer._compute_loss reads (loss "kto", reference computed online, KL term on, no MoE aux loss)
    stand_in = types.SimpleNamespace(
        model=policy, ref_model=ref, accelerator=_accelerator(),
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None), beta=beta, loss_type="kto",
        desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        calculate_KL=True, precompute_ref_logps=False, aux_loss_enabled=False,
        _metrics=_metrics(), _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    stand_in._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, stand_in)
    with torch.no_grad():
        trl_loss = KTOTrainer._compute_loss(stand_in, policy, batch, False)
        z = kto_reference_point(_ours(policy, kl_rows), _ours(ref, kl_rows))
        pi, pi_ref = _ours(policy, rows), _ours(ref, rows)
        ours = kto_loss(pi, pi_ref, torch.tensor(KTO_LABELS), z, beta, desirable_weight, undesirable_weight)
    assert abs(ours.loss_B.mean().item() - trl_loss.item()) < ATOL
    logged = stand_in._metrics["train"]
    assert z.item() == pytest.approx(logged["kl"][0], abs=ATOL)
    desirable = torch.tensor(KTO_LABELS)
    assert ours.rewards_B[desirable].mean().item() == pytest.approx(logged["rewards/chosen"][0], abs=ATOL)
    assert ours.rewards_B[~desirable].mean().item() == pytest.approx(logged["rewards/rejected"][0], abs=ATOL)


def test_kto_reference_point_is_clamped_in_exactly_one_role(models: tuple[Model, Model]) -> None:
    # mean(pi - ref) flips sign when the roles swap, so one direction is clamped to 0, the other is not
    rows = _random_rows(KTO_LENGTHS, seed=3)
    _, kl_rows = _kto_batch(rows)
    with torch.no_grad():
        a, b = _ours(models[0], kl_rows), _ours(models[1], kl_rows)
    points = sorted([kto_reference_point(a, b).item(), kto_reference_point(b, a).item()])
    assert points[0] == 0.0 and points[1] == pytest.approx((a - b).mean().abs().item())
    assert points[1] > 0.1


# ---------------------------------------------------------------------------------------------- ORPO, SimPO
@pytest.fixture(scope="module")
def pair_rows(models: tuple[Model, Model]) -> tuple[Rows, Rows]:
    """Pairs of the policy's greedy continuation (mean logprob near -1, where log(1 - p) matters) and random
    tokens, on one prompt; the greedy one is chosen in pairs 0 and 2, rejected in pairs 1 and 3."""
    lengths = [(2, 3), (4, 5), (3, 1), (5, 4)]
    prompts = [p for p, _ in _random_rows(lengths, seed=4)]
    greedy = [_greedy(models[0], p, c) for p, (_, c) in zip(prompts, lengths, strict=True)]
    random = [c for _, c in _random_rows([(1, 6), (1, 2), (1, 3), (1, 1)], seed=5)]
    pairs = [(g, r) if i % 2 == 0 else (r, g) for i, (g, r) in enumerate(zip(greedy, random, strict=True))]
    chosen = [(p, c) for p, (c, _) in zip(prompts, pairs, strict=True)]
    rejected = [(p, r) for p, (_, r) in zip(prompts, pairs, strict=True)]
    return chosen, rejected


def _pair_batch(chosen: Rows, rejected: Rows) -> dict[str, torch.Tensor]:
    """The tokenized-pair batch ORPO and CPO take; chosen and rejected padded to different widths."""
    batch = {}
    for name, rows in (("chosen", chosen), ("rejected", rejected)):
        ids, attention, completion = _pad(rows)
        batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"] = ids, attention
        batch[f"{name}_labels"] = ids.masked_fill(completion == 0, -100)
    return batch


def _pair_forward(policy: Model, chosen: Rows, rejected: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Our side: mean completion logprobs of chosen and rejected, each pair's prompt computed once."""
    avg = _ours(policy, chosen + rejected, average=True, shared=True)
    return avg[: len(chosen)], avg[len(chosen) :]


def test_orpo_loss_value_matches_trl(models: tuple[Model, Model], pair_rows: tuple[Rows, Rows]) -> None:
    policy, (chosen, rejected) = models[0], pair_rows
    lam = 0.1
    # What ORPOTrainer.get_batch_loss_metrics and the methods it calls read (decoder-only, no MoE aux loss)
    stand_in = types.SimpleNamespace(
        beta=lam, is_encoder_decoder=False, padding_value=0, aux_loss_enabled=False, accelerator=_accelerator(),
        concatenated_inputs=ORPOTrainer.concatenated_inputs, get_batch_logps=ORPOTrainer.get_batch_logps,
    )  # fmt: skip
    stand_in.concatenated_forward = types.MethodType(ORPOTrainer.concatenated_forward, stand_in)
    stand_in.odds_ratio_loss = types.MethodType(ORPOTrainer.odds_ratio_loss, stand_in)
    with torch.no_grad():
        trl_loss, metrics = ORPOTrainer.get_batch_loss_metrics(
            stand_in, policy, _pair_batch(chosen, rejected)
        )
        avg_c, avg_r = _pair_forward(policy, chosen, rejected)
        # TRL's ORPO NLL: every token of the chosen rows but the first (prompt included)
        nll = _nll(policy, chosen, with_prompt=True)
        ours = orpo_loss(avg_c, avg_r, nll, lam=lam)
    # log(1 - p) is far from 0 on the greedy responses: the odds ratio is not the probability ratio
    assert (ours.log_odds_B - (avg_c - avg_r)).abs().max().item() > 0.1
    assert abs(ours.loss_B.mean().item() - trl_loss.item()) < ATOL
    assert ours.log_odds_B.mean().item() == pytest.approx(metrics["log_odds_chosen"], abs=ATOL)
    assert -ours.odds_ratio_loss_B.mean().item() == pytest.approx(metrics["log_odds_ratio"], abs=ATOL)
    assert nll.item() == pytest.approx(metrics["nll_loss"], abs=ATOL)


@pytest.mark.parametrize(("smoothing", "cpo_alpha"), [(0.0, 0.0), (0.1, 0.0), (0.0, 1.0)])
def test_simpo_loss_value_matches_trl_cpo(
    models: tuple[Model, Model], pair_rows: tuple[Rows, Rows], smoothing: float, cpo_alpha: float
) -> None:
    policy, (chosen, rejected) = models[0], pair_rows
    beta, gamma = 2.0, 1.0
    # What CPOTrainer.get_batch_loss_metrics and the methods it calls read (decoder-only, AlphaPO off, no aux loss)
    stand_in = types.SimpleNamespace(
        loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=smoothing, cpo_alpha=cpo_alpha, alpha=0.0,
        is_encoder_decoder=False, pad_token_id=0, aux_loss_enabled=False, accelerator=_accelerator(),
        concatenated_inputs=CPOTrainer.concatenated_inputs, get_batch_logps=CPOTrainer.get_batch_logps,
    )  # fmt: skip
    stand_in.concatenated_forward = types.MethodType(CPOTrainer.concatenated_forward, stand_in)
    stand_in.cpo_loss = types.MethodType(CPOTrainer.cpo_loss, stand_in)
    with torch.no_grad():
        trl_loss, metrics = CPOTrainer.get_batch_loss_metrics(stand_in, policy, _pair_batch(chosen, rejected))
        avg_c, avg_r = _pair_forward(policy, chosen, rejected)
        ours = simpo_loss(avg_c, avg_r, beta=beta, gamma=gamma, label_smoothing=smoothing)
        # CPO's NLL covers the response only
        total = ours.loss_B.mean() + cpo_alpha * _nll(policy, chosen, with_prompt=False)
    assert abs(total.item() - trl_loss.item()) < ATOL
    assert ours.chosen_rewards_B.mean().item() == pytest.approx(metrics["rewards/chosen"], abs=ATOL)
    assert ours.accuracy.item() == metrics["rewards/accuracies"] == 0.5
