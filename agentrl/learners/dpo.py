"""Offline preference learning: DPO (with its robust, IPO and hinge variants), KTO, ORPO and SimPO.

Each conversation becomes the token ledger a rollout would have recorded (see
:func:`agentrl.models.chat.demonstration_ledger`), with the loss mask cut down to the completion: only the
tokens the policy sampled after the shared prompt count. Tool results, user turns and template glue inside
a multi-turn completion are mask 0, so they enter neither a sequence logprob nor a gradient. The losses are
the pure functions of :mod:`agentrl.algos.preference`; this module only feeds them.

One step: take ``batch_size`` examples in the seeded order of :func:`optim.iterate_batches`, compute the
policy's per-token logprobs, sum (or average) them over the completion, read the reference's sums (computed
once before training by default), and take an AdamW step on the loss's batch mean. A pair's chosen and
rejected rows share their prompt, so the decoder computes it once for both (:func:`_sequence_logps`).

Usage::

    from agentrl.learners.dpo import DPOConfig, read_preference_jsonl, train_dpo

    data = read_preference_jsonl("prefs.jsonl")  # or buffer.preference_pairs()
    result = train_dpo(DPOConfig(loss="dpo", max_steps=200, output_dir="runs/dpo"), data)
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from pydantic import Field, model_validator

from agentrl import algos
from agentrl.data.batch import collate_shared
from agentrl.data.buffer import PreferencePair
from agentrl.data.trajectory import Trajectory
from agentrl.errors import ConfigError
from agentrl.learners import checkpoints, logprobs, optim, policy_model
from agentrl.learners.config import TrainConfig
from agentrl.learners.preference_data import (
    Example,
    LabelledConversation,
    PreferenceConversation,
    read_preference_jsonl,
)
from agentrl.learners.result import TrainResult
from agentrl.learners.sft import ledger_from_mask
from agentrl.models.chat import ChatRenderer, demonstration_ledger
from agentrl.types import Message

__all__ = [
    "DPOConfig",
    "DPOStepLog",
    "LabelledConversation",
    "PreferenceConversation",
    "PreferenceEval",
    "SequenceLogps",
    "evaluate_preferences",
    "pair_loss",
    "read_preference_jsonl",
    "train_dpo",
]

PreferenceLossName = Literal["dpo", "ipo", "robust", "hinge", "kto", "orpo", "simpo"]
_REFERENCE_FREE = ("orpo", "simpo")
_SMOOTHED = ("dpo", "robust", "simpo")


# ---- configuration --------------------------------------------------------------------------------
class DPOConfig(TrainConfig):
    """Everything a preference run reads (the shared fields are documented on :class:`TrainConfig`).
    Invalid values raise :class:`~agentrl.errors.ConfigError`."""

    loss: PreferenceLossName = Field(
        "dpo",
        description="'dpo' (sigmoid), 'ipo', 'robust', 'hinge', 'kto' (unpaired), or the reference-free "
        "'orpo' and 'simpo'",
    )
    beta: float | None = Field(
        None,
        gt=0,
        description="KL strength (SimPO: reward scale); None means 0.1, or 2.0 for simpo (the paper's)",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="assumed label-noise rate in [0, 0.5), for dpo, robust and simpo"
    )
    simpo_gamma: float = Field(1.0, description="SimPO's target reward margin, e.g. 1.0 (= beta / 2)")
    orpo_lambda: float = Field(0.1, ge=0, description="ORPO's odds-ratio weight next to the NLL, e.g. 0.1")
    kto_desirable_weight: float = Field(1.0, gt=0, description="KTO's loss weight on desirable examples")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="KTO's loss weight on undesirable examples")
    batch_size: int = Field(8, ge=1, description="pairs (KTO: examples) per optimizer step, e.g. 8")
    max_seq_len: int = Field(
        2048, ge=2, description="tokens per conversation; longer ones are cut, e.g. 2048"
    )
    precompute_reference: bool = Field(
        True,
        description="score the whole dataset under the reference once before training and keep the sums "
        "in memory (False: load the reference beside the policy and score each batch)",
    )

    @model_validator(mode="after")
    def _loss_settings(self) -> DPOConfig:
        if self.label_smoothing and self.loss not in _SMOOTHED:
            raise ValueError(
                f"label_smoothing applies to loss in {_SMOOTHED}, not {self.loss!r}; set it to 0.0"
            )
        return self

    @property
    def loss_beta(self) -> float:
        """``beta``, or the loss's default when it is None."""
        if self.beta is not None:
            return self.beta
        return 2.0 if self.loss == "simpo" else 0.1


# ---- data ---------------------------------------------------------------------------------------
def _completion_ledger(
    renderer: ChatRenderer, prompt: Sequence[Message], completion: Sequence[Message]
) -> Trajectory:
    """The ledger of ``prompt + completion`` with mask 1 on the completion's assistant tokens only."""
    trajectory = demonstration_ledger(renderer, [*prompt, *completion])
    k = sum(m.get("role") == "assistant" for m in prompt)
    if k >= len(trajectory.turns):
        raise ConfigError("a chosen, rejected or completion list needs an assistant message to learn from")
    return _cut_before(trajectory, trajectory.turns[k].start)


def _cut_before(trajectory: Trajectory, start: int) -> Trajectory:
    return ledger_from_mask(trajectory.token_ids, [0] * start + list(trajectory.loss_mask[start:]))


def _ledgers(tokenizer: Any, template: str | None, example: Example) -> tuple[Trajectory, ...]:
    """``(chosen, rejected)`` for a pair, ``(completion,)`` for a labelled conversation."""
    if isinstance(example, PreferencePair):
        return (_cut_before(example.chosen, example.prefix_length),
                _cut_before(example.rejected, example.prefix_length))  # fmt: skip
    renderer = ChatRenderer(tokenizer, example.tools, template)
    if isinstance(example, LabelledConversation):
        return (_completion_ledger(renderer, example.prompt, example.completion),)
    return (_completion_ledger(renderer, example.prompt, example.chosen),
            _completion_ledger(renderer, example.prompt, example.rejected))  # fmt: skip


def _truncate(ledger: Trajectory, max_len: int) -> Trajectory | None:
    """The first ``max_len`` tokens, or None when no completion token is left (position 0 never counts)."""
    mask = (0, *ledger.loss_mask[1:max_len])
    return ledger_from_mask(ledger.token_ids[:max_len], mask) if any(mask) else None


@dataclass(frozen=True)
class _Dataset:
    """Examples as rows: pairs (``chosen[i]`` vs ``rejected[i]``), or KTO examples with their labels and the
    mismatched rows (prompt ``i`` with completion ``i - 1``) behind KTO's reference point."""

    kto: bool
    chosen: list[Trajectory]
    rejected: list[Trajectory]
    desirable: list[bool]
    mismatched: list[Trajectory]
    num_cut: int

    def __len__(self) -> int:
        return len(self.chosen)

    def second(self, i: int) -> Trajectory:
        """What example ``i`` is scored against: its rejected row, KTO: its mismatched row."""
        return self.mismatched[i] if self.kto else self.rejected[i]


def _dataset(config: DPOConfig, tokenizer: Any, examples: Sequence[Example]) -> _Dataset:
    """Tokenize, cut to ``max_seq_len`` and lay out ``examples`` for ``config.loss``.

    Raises:
        ConfigError: labelled conversations for a pairwise loss, or nothing left to train on.
    """
    kto = config.loss == "kto"
    built = [_ledgers(tokenizer, config.template, e) for e in examples]
    if not kto and any(len(b) == 1 for b in built):
        raise ConfigError(
            f"loss={config.loss!r} needs chosen/rejected pairs, but labelled conversations were given; "
            "use loss='kto' for unpaired data"
        )
    labels = [e.desirable if isinstance(e, LabelledConversation) else None for e in examples]
    num_cut = sum(len(x.token_ids) > config.max_seq_len for b in built for x in b)
    chosen: list[Trajectory] = []
    rejected: list[Trajectory] = []
    desirable: list[bool] = []
    for rows, label in zip(built, labels, strict=True):
        cut = [_truncate(x, config.max_seq_len) for x in rows]
        if kto:  # a pair gives a desirable and an undesirable example
            for x, good in zip(cut, [label] if label is not None else [True, False], strict=True):
                if x is not None:
                    chosen.append(x)
                    desirable.append(good)
        elif cut[0] is not None and cut[1] is not None:
            chosen.append(cut[0])
            rejected.append(cut[1])
    if not chosen:
        raise ConfigError(
            f"none of the {len(examples)} examples has a completion token within max_seq_len="
            f"{config.max_seq_len}; raise max_seq_len"
        )
    mismatched = (
        [_mismatch(chosen[i], chosen[i - 1], config.max_seq_len) for i in range(len(chosen))] if kto else []
    )
    return _Dataset(kto, chosen, rejected, desirable, mismatched, num_cut)


def _mismatch(prompt_of: Trajectory, completion_of: Trajectory, max_len: int) -> Trajectory:
    """``prompt_of``'s prompt followed by ``completion_of``'s completion (from the first mask-1 token on)."""
    a, b = prompt_of.prompt_length, completion_of.prompt_length
    ids = (*prompt_of.token_ids[:a], *completion_of.token_ids[b:])
    mask = (*prompt_of.loss_mask[:a], *completion_of.loss_mask[b:])
    cut = _truncate(ledger_from_mask(ids, mask), max_len)  # no completion token left: the row scores 0
    return cut if cut is not None else ledger_from_mask(ids[:max_len], (0,) * min(len(ids), max_len))


# ---- sequence logprobs and the loss --------------------------------------------------------------
class SequenceLogps(NamedTuple):
    """Per-row log-likelihood of the completion tokens: the sum and the per-token mean."""

    sum_N: torch.Tensor
    mean_N: torch.Tensor

    def take(self, index: Sequence[int] | slice) -> SequenceLogps:
        index_t = index if isinstance(index, slice) else torch.as_tensor(index, dtype=torch.long)
        return SequenceLogps(self.sum_N[index_t], self.mean_N[index_t])


def _sequence_logps(model: Any, rows: Sequence[Trajectory], pad_id: int, config: DPOConfig) -> SequenceLogps:
    """The completion logprobs of ``rows`` under ``model``, in one batch: rows that share a prompt (a pair's
    chosen and rejected) compute it once (:func:`~agentrl.data.batch.collate_shared`), and only the positions
    that predict a completion token go through the softmax (:func:`~agentrl.learners.logprobs.policy_logprobs`)."""
    batch = collate_shared(rows, pad_id=pad_id).to_torch(torch.device(config.device))
    with optim.autocast(config.precision, config.device):
        logprobs_B_T, _ = logprobs.policy_logprobs(model, batch)
    per_segment = {"segment_ids_B_T": batch.segment_ids_B_T, "num_sequences": len(rows)}
    return SequenceLogps(algos.sequence_logprobs(logprobs_B_T.float(), batch.loss_mask_B_T, **per_segment),
                         algos.sequence_logprobs(logprobs_B_T.float(), batch.loss_mask_B_T, average=True,
                                                 **per_segment))  # fmt: skip


@torch.no_grad()
def _reference_logps(reference: Any, model: Any, rows: Sequence[Trajectory], pad_id: int, config: DPOConfig,
                     chunk: int | None = None) -> SequenceLogps:  # fmt: skip
    """:func:`_sequence_logps` under the reference (``reference`` when loaded, else ``model`` with adapters
    off), in chunks of ``chunk`` rows, without gradients."""
    chunk = chunk or len(rows)
    context = model.disable_adapter() if reference is None else contextlib.nullcontext()
    with context:
        scorer = reference if reference is not None else model
        parts = [_sequence_logps(scorer, rows[i : i + chunk], pad_id, config) for i in range(0, len(rows), chunk)]
    return SequenceLogps(torch.cat([p.sum_N for p in parts]), torch.cat([p.mean_N for p in parts]))


def pair_loss(config: DPOConfig, chosen: SequenceLogps, rejected: SequenceLogps,
              ref_chosen: SequenceLogps | None, ref_rejected: SequenceLogps | None) -> algos.PreferenceLoss:  # fmt: skip
    """``config.loss`` on a batch of pairs (KTO's rewards here are DPO's ``beta * (pi - ref)``, for evaluation).

    Sums for DPO, robust, hinge and KTO; per-token means for IPO, SimPO and ORPO (whose NLL term is each
    chosen completion's mean token NLL).
    """
    beta = config.loss_beta
    if config.loss == "simpo":
        return algos.simpo_loss(chosen.mean_N, rejected.mean_N, beta, config.simpo_gamma,
                                label_smoothing=config.label_smoothing)  # fmt: skip
    if config.loss == "orpo":
        return algos.orpo_loss(chosen.mean_N, rejected.mean_N, -chosen.mean_N, config.orpo_lambda)
    assert ref_chosen is not None and ref_rejected is not None
    kind = {"dpo": "sigmoid", "kto": "sigmoid"}.get(config.loss, config.loss)
    pick = (lambda s: s.mean_N) if config.loss == "ipo" else (lambda s: s.sum_N)
    smoothing = config.label_smoothing if config.loss != "kto" else 0.0
    return algos.dpo_loss(pick(chosen), pick(rejected), pick(ref_chosen), pick(ref_rejected), beta,
                          label_smoothing=smoothing, kind=kind)  # type: ignore[arg-type]  # fmt: skip


# ---- the loop -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DPOStepLog:
    """One optimizer step, measured on its batch before the update.

    ``chosen_reward`` / ``rejected_reward`` are the mean implicit rewards of the chosen and rejected
    completions (KTO: of the desirable and undesirable examples), ``margin`` their difference, and
    ``accuracy`` the fraction of pairs ranked right (KTO: of examples whose reward has their label's sign).
    """

    step: int
    loss: float
    accuracy: float
    margin: float
    chosen_reward: float
    rejected_reward: float
    lr: float
    grad_norm: float
    seconds: float


def train_dpo(
    config: DPOConfig,
    data: Iterable[Example],
    on_step: Callable[[DPOStepLog], None] | None = None,
) -> TrainResult:
    """Train ``config.model`` on preference data with ``config.loss``.

    Args:
        config: the run's settings.
        data: :class:`PreferenceConversation` s (e.g. from :func:`read_preference_jsonl`),
            :class:`~agentrl.data.buffer.PreferencePair` s mined from a buffer (their ledgers are used as
            they are), or for ``loss="kto"`` also :class:`LabelledConversation` s (each pair then gives a
            desirable and an undesirable example).
        on_step: called after every optimizer step with its :class:`DPOStepLog`.

    Returns:
        The trained model (in train mode), the tokenizer, the log, the final checkpoint's path (None
        without ``output_dir``) and ``extras``: ``num_examples`` (pairs; KTO: examples) and ``num_cut``
        (conversations cut to ``max_seq_len``).

    Raises:
        ConfigError: labelled conversations for a pairwise loss, or no example with a completion token
            within ``max_seq_len``.
        TemplateError: the chat template cannot reproduce the rollout's tokens.
    """
    optim.seed_everything(config.seed)
    optim.check_precision(config.precision, config.device)
    model, tokenizer = policy_model.load_trainable(config)
    dataset = _dataset(config, tokenizer, list(data))
    pad_id = policy_model.pad_id(tokenizer)

    # The reference's sums, for the whole dataset up front (default) or per batch from a loaded copy.
    reference, cached = None, None
    if config.loss not in _REFERENCE_FREE:
        reference = policy_model.load_reference(config, model)
        if config.precompute_reference:
            cached = _precompute_reference(config, reference, model, dataset, pad_id)
            reference = None

    optimizer = optim.make_optimizer(model, config.lr, config.weight_decay, config.betas)
    scheduler = optim.make_scheduler(optimizer, config.warmup_steps, config.max_steps, config.min_lr_ratio)
    step = 0
    if config.resume_from is not None:
        step = checkpoints.load_training_state(config.resume_from, optimizer, scheduler).step
    meta = {"config": config.model_dump(mode="json"), "learner": f"preference-{config.loss}"}

    history: list[DPOStepLog] = []
    checkpoint: Path | None = None
    batches = optim.iterate_batches(len(dataset), config.batch_size, config.seed, start_step=step)
    while step < config.max_steps:
        started = time.perf_counter()
        index = next(batches)
        loss, stats = _batch_loss(config, model, reference, dataset, index, cached, pad_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr = optimizer.param_groups[0]["lr"]
        grad_norm = optim.clip_and_step(model, optimizer, scheduler, config.grad_clip)
        step += 1

        log = DPOStepLog(step, loss.item(), **stats, lr=lr, grad_norm=float(grad_norm),
                      seconds=time.perf_counter() - started)  # fmt: skip
        history.append(log)
        if on_step is not None:
            on_step(log)
        at_save = config.save_every is not None and step % config.save_every == 0
        if config.output_dir is not None and (at_save or step == config.max_steps):
            checkpoint = checkpoints.save_step(config, model, tokenizer, optimizer, scheduler, step, meta)
    extras = {"num_examples": len(dataset), "num_cut": dataset.num_cut}
    return TrainResult(model, tokenizer, tuple(history), checkpoint, extras)


def _precompute_reference(config: DPOConfig, reference: Any, model: Any, dataset: _Dataset,
                          pad_id: int) -> SequenceLogps:  # fmt: skip
    """The reference's sequence logprobs of every row, in the order :func:`_cached_ref` reads them back:
    each example's row, then what it is scored against (so a pair's rows share their prompt's forward)."""
    rows = [row for i in range(len(dataset)) for row in (dataset.chosen[i], dataset.second(i))]
    return _reference_logps(reference, model, rows, pad_id, config, 2 * config.batch_size)


def _cached_ref(cached: SequenceLogps, index: Sequence[int]) -> tuple[SequenceLogps, SequenceLogps]:
    """The precomputed reference sums of the batch ``index``: (chosen, rejected), KTO: (examples, mismatched)."""
    return cached.take([2 * i for i in index]), cached.take([2 * i + 1 for i in index])


def _batch_loss(config: DPOConfig, model: Any, reference: Any, dataset: _Dataset, index: Sequence[int],
                cached: SequenceLogps | None, pad_id: int) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """The batch-mean loss of the examples ``index`` (with grad) and its :class:`DPOStepLog` statistics."""
    first = [dataset.chosen[i] for i in index]
    second = [dataset.second(i) for i in index]
    b = len(index)
    ref_first = ref_second = None
    if config.loss not in _REFERENCE_FREE:
        if cached is not None:
            ref_first, ref_second = _cached_ref(cached, index)
        else:
            ref = _reference_logps(reference, model, [*first, *second], pad_id, config)
            ref_first, ref_second = ref.take(slice(0, b)), ref.take(slice(b, None))
    if dataset.kto:
        assert ref_first is not None and ref_second is not None
        with torch.no_grad():
            mismatched = _sequence_logps(model, second, pad_id, config)
        kl_ref = algos.kto_reference_point(mismatched.sum_N, ref_second.sum_N)
        policy = _sequence_logps(model, first, pad_id, config)
        desirable_B = torch.tensor([dataset.desirable[i] for i in index], device=policy.sum_N.device)
        kto = algos.kto_loss(policy.sum_N, ref_first.sum_N, desirable_B, kl_ref, config.loss_beta,
                             config.kto_desirable_weight, config.kto_undesirable_weight)  # fmt: skip
        good, bad = kto.rewards_B[desirable_B], kto.rewards_B[~desirable_B]
        chosen_r = float(good.mean()) if len(good) else math.nan
        rejected_r = float(bad.mean()) if len(bad) else math.nan
        accuracy = float(((kto.rewards_B > 0) == desirable_B).float().mean())
        return kto.loss_B.mean(), {"accuracy": accuracy, "margin": chosen_r - rejected_r,
                                   "chosen_reward": chosen_r, "rejected_reward": rejected_r}  # fmt: skip
    both = _sequence_logps(model, [*first, *second], pad_id, config)
    out = pair_loss(config, both.take(slice(0, b)), both.take(slice(b, None)), ref_first, ref_second)
    return out.loss_B.mean(), {
        "accuracy": float(out.accuracy), "margin": float(out.margins_B.mean()),
        "chosen_reward": float(out.chosen_rewards_B.mean()),
        "rejected_reward": float(out.rejected_rewards_B.mean()),
    }  # fmt: skip


# ---- evaluation -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreferenceEval:
    """Held-out pairs under a loss's implicit reward: the fraction ranked right and the mean margin."""

    accuracy: float
    margin: float


@torch.no_grad()
def evaluate_preferences(
    config: DPOConfig,
    model: Any,
    tokenizer: Any,
    pairs: Sequence[PreferenceConversation | PreferencePair],
    reference: Any = None,
) -> PreferenceEval:
    """Score held-out ``pairs`` with ``config.loss``'s implicit rewards (KTO: ``beta * (pi - ref)``).

    ``reference`` is the frozen starting model; when None, ``config.model`` is loaded as the reference
    for the losses that have one.

    Raises:
        ConfigError: no pair has completion tokens within ``max_seq_len``.
    """
    pairwise = config.model_copy(update={"loss": "dpo" if config.loss == "kto" else config.loss})
    dataset = _dataset(pairwise, tokenizer, list(pairs))
    pad_id = policy_model.pad_id(tokenizer)
    rows = [*dataset.chosen, *dataset.rejected]
    was_training = model.training
    model.eval()
    try:
        policy = _sequence_logps(model, rows, pad_id, config)
        ref = None
        if config.loss not in _REFERENCE_FREE:
            reference = reference if reference is not None else policy_model.load_reference(config, model)
            ref = _reference_logps(reference, model, rows, pad_id, config)
    finally:
        model.train(was_training)
    n = len(dataset)
    out = pair_loss(
        pairwise, policy.take(slice(0, n)), policy.take(slice(n, None)),
        ref.take(slice(0, n)) if ref else None, ref.take(slice(n, None)) if ref else None,
    )  # fmt: skip
    return PreferenceEval(float(out.accuracy), float(out.margins_B.mean()))
