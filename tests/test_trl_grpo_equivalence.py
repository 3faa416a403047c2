"""The GRPO policy loss against TRL 1.16's ``GRPOTrainer``: same loss and same parameter gradients.

TRL's side is the real trainer: a ``GRPOTrainer`` built on CPU around the tiny model, whose
``compute_loss`` runs on a hand-made batch (left-padded prompts, right-padded completions of different
lengths, one advantage per sequence, old logprobs perturbed so that both clip bounds bite, reference
logprobs for the KL term). Our side is the path the learners train with: each row becomes the ledger a
rollout records (the unpadded prompt, then the completion with loss mask 1), :func:`collate` lays the
ledgers out as a :class:`Batch`, :func:`policy_logprobs` gives the ledger-aligned logprobs (position ``t``
holds the logprob of token ``t``), and :func:`policy_loss` reduces them with the aggregation that matches
each TRL ``loss_type``:

- ``grpo``: each sequence's token mean, then the mean over sequences (``seq-mean-token-mean``);
- ``dr_grpo``: the token sum over ``B * max_completion_length``, the config value, not the batch width
  (``seq-mean-token-sum-norm`` with ``norm=max_completion_length``);
- ``dapo``: the token sum over ``num_items_in_batch``, the loss-token count of the generation batch
  (``token-mean``; with one micro-batch per generation batch that count is the mask's sum).

Settings TRL applies inside its loss that we apply explicitly: its log-probabilities are taken from
logits divided by ``temperature`` (so are ours: :func:`policy_logprobs`' ``temperature``); ``epsilon`` /
``epsilon_high`` are our ``eps_low`` / ``eps_high``. Two conventions differ, each pinned by a test below:
TRL's default ``use_bias_correction_kl=True`` multiplies the KL term by the (differentiable) ratio
``pi / pi_old``, which :func:`policy_loss` does not; and ``grpo`` counts a completion with no loss
tokens in its mean over sequences, where ``seq-mean-token-mean`` leaves it out.

Everything is float32: TRL's fused LM head accumulates in float32 whatever the model's dtype, so float64
would not tighten its side. The observed differences are ~1e-7; the bound is 1e-5.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from agentrl.algos.losses import aggregate, kl_estimate, policy_loss, ppo_clip_loss
from agentrl.data.batch import Batch, collate
from agentrl.data.trajectory import Trajectory, TurnSpan
from agentrl.learners.logprobs import policy_logprobs
from agentrl.models.loading import load_model, load_tokenizer

ATOL = 1e-5
TEMPERATURE = 0.7
MAX_COMPLETION_LENGTH = 16  # > the batch's completion width (7), so dr_grpo's divisor is visibly the config's
EPS_LOW = 0.2
PROMPT_LENGTHS = (3, 5, 4, 2)  # left-padded to 5, as TRL pads prompts
COMPLETION_LENGTHS = (6, 2, 7, 4)  # right-padded to 7
ADVANTAGES_B = (1.3, -0.8, 0.5, -1.1)
PAD_ID = 0
AGGREGATION = {"grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm", "dapo": "token-mean"}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def _batch(model: Any, completion_lengths: tuple[int, ...] = COMPLETION_LENGTHS) -> dict[str, torch.Tensor]:
    """TRL's ``inputs`` for ``compute_loss``, with old and reference logprobs made from the model's own.

    ``old`` = current + N(0, 0.35) noise, so ratios leave [0.8, 1.28] on both sides and clipping matters;
    ``ref`` = current + independent noise, so the k3 KL is well away from 0.
    """
    gen = torch.Generator().manual_seed(1234)
    width_p, width_c = max(PROMPT_LENGTHS), max(COMPLETION_LENGTHS)
    prompt_ids = torch.full((len(PROMPT_LENGTHS), width_p), PAD_ID)
    prompt_mask = torch.zeros_like(prompt_ids)
    completion_ids = torch.full((len(PROMPT_LENGTHS), width_c), PAD_ID)
    completion_mask = torch.zeros_like(completion_ids)
    for b, (n_p, n_c) in enumerate(zip(PROMPT_LENGTHS, completion_lengths, strict=True)):
        prompt_ids[b, width_p - n_p :] = torch.randint(9, 1024, (n_p,), generator=gen)
        prompt_mask[b, width_p - n_p :] = 1
        completion_ids[b, :n_c] = torch.randint(9, 1024, (n_c,), generator=gen)
        completion_mask[b, :n_c] = 1
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
    }
    with torch.no_grad():
        batch = _ledger_batch(inputs)
        logprobs_B_T, _ = policy_logprobs(model, batch, TEMPERATURE)
    current = torch.zeros(completion_ids.shape)
    current[completion_mask != 0] = logprobs_B_T[batch.loss_mask_B_T != 0]
    return {
        **inputs,
        "advantages": torch.tensor(ADVANTAGES_B),
        "old_per_token_logps": current + 0.35 * torch.randn(current.shape, generator=gen),
        "ref_per_token_logps": current + 0.5 * torch.randn(current.shape, generator=gen),
        "num_items_in_batch": completion_mask.sum(),
    }


def _ledger_batch(inputs: dict[str, torch.Tensor]) -> Batch:
    """TRL's rows as the ledgers a rollout records (prompt without its left padding, then the completion,
    mask 1 on it), collated one per row as the learners collate them."""
    ledgers = []
    for prompt, prompt_mask, completion, completion_mask in zip(
        inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], inputs["completion_mask"], strict=True
    ):
        ids = [*prompt[prompt_mask != 0].tolist(), *completion[completion_mask != 0].tolist()]
        n_p, n = int(prompt_mask.sum()), len(ids)
        turns = (TurnSpan(n_p, n),) if n > n_p else ()
        ledgers.append(Trajectory(ids, [0.0] * n, [0] * n_p + [1] * (n - n_p), turns))
    return collate(ledgers, pad_id=PAD_ID).to_torch()


def _on_ledger(batch: Batch, inputs: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """A per-completion-token tensor of TRL's layout placed on the ledger rows (0 elsewhere)."""
    out = torch.zeros(batch.shape)
    out[batch.loss_mask_B_T != 0] = inputs[key][inputs["completion_mask"] != 0]
    return out


def _trainer(tmp_path, tokenizer, loss_type: str, beta: float, eps_high: float | None, **config: Any):
    """A real ``GRPOTrainer`` on a freshly loaded tiny model, with the loss's settings; returns both.

    The model is put in train mode and ``current_gradient_accumulation_steps`` set to 1, as ``Trainer``'s
    loop does for a step of one micro-batch; TRL then divides by nothing beyond the loss's own normalizer.
    """
    model = load_model("tiny", dtype=torch.float32)
    args = GRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        per_device_train_batch_size=len(PROMPT_LENGTHS), num_generations=len(PROMPT_LENGTHS),
        max_completion_length=MAX_COMPLETION_LENGTH, temperature=TEMPERATURE, loss_type=loss_type,
        beta=beta, epsilon=EPS_LOW, epsilon_high=eps_high, **config,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **_: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["p"] * len(PROMPT_LENGTHS)}),
        processing_class=tokenizer,
    )
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer, model


def _trl_loss(trainer: Any, model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    return loss.detach(), _grads(model)


def _grads(model: Any) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _ours(model: Any, inputs: dict[str, torch.Tensor], loss_type: str, beta: float, eps_high: float | None):
    model.zero_grad(set_to_none=True)
    batch = _ledger_batch(inputs)
    logprobs_B_T, _ = policy_logprobs(model, batch, TEMPERATURE)
    out = policy_loss(
        logprobs_B_T,
        _on_ledger(batch, inputs, "old_per_token_logps"),
        inputs["advantages"][:, None].expand_as(logprobs_B_T),
        batch.loss_mask_B_T,
        eps_low=EPS_LOW,
        eps_high=eps_high,
        ref_logprobs_B_T=_on_ledger(batch, inputs, "ref_per_token_logps") if beta else None,
        beta=beta,
        aggregation=AGGREGATION[loss_type],
        norm=MAX_COMPLETION_LENGTH if loss_type == "dr_grpo" else None,
    )
    out.loss.backward()
    return out, _grads(model)


def _max_grad_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize(
    ("beta", "eps_high"),
    [(0.0, None), (0.2, 0.28)],
    ids=["no-kl-symmetric-clip", "k3-kl-clip-higher"],
)
def test_loss_and_gradients_match_trl(tmp_path, tokenizer, loss_type, beta, eps_high) -> None:
    # use_bias_correction_kl=False: TRL's plain k3 term, the one policy_loss adds (see the test below).
    trainer, model = _trainer(tmp_path, tokenizer, loss_type, beta, eps_high, use_bias_correction_kl=False)
    inputs = _batch(model)
    trl_loss, trl_grads = _trl_loss(trainer, model, inputs)
    ours, our_grads = _ours(model, inputs, loss_type, beta, eps_high)

    assert abs(ours.loss.item() - trl_loss.item()) < ATOL
    assert _max_grad_diff(our_grads, trl_grads) < ATOL
    # The comparison is not vacuous: clipping took effect on some tokens but not all, at both bounds (TRL's
    # own clip metrics agree with ours), the gradients are far above the tolerance, and with beta > 0 the KL
    # term is sizeable.
    assert 0.05 < ours.clip_fraction.item() < 0.95
    assert max(g.abs().max().item() for g in our_grads.values()) > 1e3 * ATOL
    metrics = trainer._metrics["train"]
    assert metrics["clip_ratio/low_mean"][-1] > 0 and metrics["clip_ratio/high_mean"][-1] > 0
    assert metrics["clip_ratio/region_mean"][-1] == pytest.approx(ours.clip_fraction.item(), abs=1e-6)
    if beta:
        assert ours.kl.item() > 0.02
        assert metrics["kl"][-1] == pytest.approx(ours.kl.item(), abs=1e-6)


def test_trl_default_bias_corrected_kl_weights_k3_by_the_ratio(tmp_path, tokenizer) -> None:
    """TRL's default ``use_bias_correction_kl=True`` computes ``beta * (pi / pi_old) * k3`` per token, the
    ratio carrying gradient; :func:`policy_loss` adds ``beta * k3``. Our parts reproduce TRL's term, and the
    two conventions differ by far more than the tolerance on this off-policy batch."""
    beta, eps_high = 0.2, 0.28
    trainer, model = _trainer(tmp_path, tokenizer, "dapo", beta, eps_high)
    assert trainer.args.use_bias_correction_kl
    inputs = _batch(model)
    trl_loss, trl_grads = _trl_loss(trainer, model, inputs)

    model.zero_grad(set_to_none=True)
    batch = _ledger_batch(inputs)
    logprobs_B_T, _ = policy_logprobs(model, batch, TEMPERATURE)
    mask_B_T = batch.loss_mask_B_T
    old_B_T = _on_ledger(batch, inputs, "old_per_token_logps")
    pg_B_T, _ = ppo_clip_loss(
        logprobs_B_T, old_B_T, inputs["advantages"][:, None], EPS_LOW, eps_high, mask_B_T=mask_B_T
    )
    kl_B_T = kl_estimate(logprobs_B_T, _on_ledger(batch, inputs, "ref_per_token_logps"), "k3", mask_B_T=mask_B_T)
    ratio_B_T = torch.exp(torch.where(mask_B_T != 0, logprobs_B_T - old_B_T, 0.0))
    weighted = aggregate(pg_B_T + beta * ratio_B_T * kl_B_T, mask_B_T, "token-mean")
    weighted.backward()
    assert abs(weighted.item() - trl_loss.item()) < ATOL
    assert _max_grad_diff(_grads(model), trl_grads) < ATOL

    plain, plain_grads = _ours(model, inputs, "dapo", beta, eps_high)
    assert abs(plain.loss.item() - trl_loss.item()) > 10 * ATOL
    assert _max_grad_diff(plain_grads, trl_grads) > 100 * ATOL


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_completion_without_loss_tokens(tmp_path, tokenizer, loss_type) -> None:
    """A completion whose mask is all 0 (as TRL's ``mask_truncated_completions`` makes a truncated one).

    ``dr_grpo`` and ``dapo`` agree with ours exactly (it adds 0 to a sum over B rows or over tokens). TRL's
    ``grpo`` still counts the row in its mean over the B sequences, ``seq-mean-token-mean`` leaves it out:
    TRL's loss and gradients are ours times (non-empty rows / B).
    """
    trainer, model = _trainer(tmp_path, tokenizer, loss_type, 0.0, 0.28)
    lengths = (6, 0, 7, 4)
    inputs = _batch(model, completion_lengths=lengths)
    trl_loss, trl_grads = _trl_loss(trainer, model, inputs)
    ours, our_grads = _ours(model, inputs, loss_type, 0.0, 0.28)

    scale = sum(n > 0 for n in lengths) / len(lengths) if loss_type == "grpo" else 1.0
    assert abs(scale * ours.loss.item() - trl_loss.item()) < ATOL
    assert _max_grad_diff({k: scale * g for k, g in our_grads.items()}, trl_grads) < ATOL
    if loss_type == "grpo":
        assert abs(ours.loss.item() - trl_loss.item()) > 1e-3
