"""Online and iterative DPO: the policy samples its own preference data from an environment.

One round::

    rollout    G samples for each of ``prompts_per_step`` tasks with the current policy (the runner)
    score      the env's total reward of each sample, or ``scorer(group)`` (a reward model, a judge)
    mine       per group, best vs worst, split at the first assistant turn where they differ
               (:func:`~agentrl.data.buffer.mine_pair`); groups whose scores all agree give no pair
    reference  the starting model's sums (``reference="initial"``: online DPO), or the policy's own at the
               start of the round (``"previous"``: iterative DPO, each round anchored to the last)
    update     ``epochs`` passes of ``batch_size``-pair optimizer steps of ``loss`` over the round's pairs
    sync       the weights to the rollout backend (free for ``hf``)

The pairs are the ledgers the sampler recorded, so the completion mask is exactly the sampled tokens of
the divergent turns: tool results and env turns inside them count in neither sum. Any loss of
:class:`~agentrl.learners.dpo.DPOConfig` works (KTO takes each pair as one desirable and one undesirable
example).

Usage::

    from agentrl.learners.online_dpo import OnlineDPOConfig, train_online_dpo

    result = train_online_dpo(OnlineDPOConfig(env="toy-digits-v0", max_steps=20, group_size=4))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import Field

from agentrl.data.buffer import PreferencePair, TrajectoryGroup, mine_pair
from agentrl.learners import loop, optim, policy_model, rl
from agentrl.learners.dpo import (
    _REFERENCE_FREE,
    DPOConfig,
    SequenceLogps,
    _batch_loss,
    _dataset,
    _precompute_reference,
)
from agentrl.learners.result import TrainResult

__all__ = ["GroupScorer", "OnlineDPOConfig", "mine_round", "train_online_dpo"]

GroupScorer = Callable[[TrajectoryGroup], Sequence[float]]
"""Scores each trajectory of a group (higher is better), e.g. a trained reward model or an LLM judge."""


class OnlineDPOConfig(rl.RolloutConfig, DPOConfig):
    """An online / iterative preference run: the rollout fields of
    :class:`~agentrl.learners.rl.RolloutConfig` and the loss fields of
    :class:`~agentrl.learners.dpo.DPOConfig`; ``max_steps`` counts rounds (rollout + updates)."""

    lr: float = Field(1e-4, gt=0, le=1, description="peak AdamW learning rate, e.g. 1e-4 tiny, 5e-7 for 7B")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up optimizer steps (not rounds), e.g. 0")
    batch_size: int = Field(8, ge=1, description="pairs per optimizer step, e.g. 8")
    epochs: int = Field(1, ge=1, description="passes over each round's pairs, e.g. 1")
    min_margin: float = Field(0.0, ge=0, description="least score gap between chosen and rejected, e.g. 0.0")
    reference: Literal["initial", "previous"] = Field(
        "initial",
        description="'initial': the starting model anchors every round (online DPO); 'previous': the "
        "policy at the start of each round does (iterative DPO)",
    )

    @property
    def updates_per_round(self) -> int:
        """The most optimizer steps one round can take (every group giving a pair)."""
        return self.epochs * math.ceil(self.prompts_per_step / self.batch_size)


def mine_round(
    groups: Sequence[TrajectoryGroup], scorer: GroupScorer | None, min_margin: float
) -> tuple[list[PreferencePair], list[float]]:
    """Score each group (``scorer``, or the env's rewards) and mine its best-vs-worst pair.

    Returns:
        The pairs, and every trainable sample's score (for the log).
    """
    pairs: list[PreferencePair] = []
    scores_all: list[float] = []
    for group in groups:
        scores = list(scorer(group)) if scorer is not None else [t.total_reward for t in group]
        pair = mine_pair(group, min_margin, scores)  # raises on a wrong score count
        scores_all += [s for t, s in zip(group, scores, strict=True) if t.trainable and t.turns]
        if pair is not None:
            pairs.append(pair)
    return pairs, scores_all


def train_online_dpo(
    config: OnlineDPOConfig,
    scorer: GroupScorer | None = None,
    on_step: loop.OnStep | None = None,
    on_rollout: loop.OnRollout | None = None,
    rescore: loop.Rescore | None = None,
    monitor: loop.Monitor | None = None,
) -> TrainResult:
    """Run ``config.max_steps`` rounds; see the module docstring for one round.

    Args:
        config: the run's settings.
        scorer: ranks each group's samples instead of the env's total reward.
        on_step / on_rollout / rescore / monitor: the hooks of :func:`~agentrl.learners.loop.run_online`,
            as for GRPO (``rescore`` changes the rewards the pairs are mined by). Each round's log has the
            samples' mean ``score``, the ``pairs`` mined and the updates' mean statistics in ``update``
            (NaN when no pair was mined).

    Raises:
        ConfigError: a setting the model, env or backend cannot honour (before any round runs).
    """
    hooks = loop.Hooks(on_step, on_rollout, rescore, monitor)
    return loop.run_online(config, f"online-{config.loss}", lambda: _learner(config, scorer), hooks)


def _learner(config: OnlineDPOConfig, scorer: GroupScorer | None) -> loop.Online:
    model, tokenizer = policy_model.load_trainable(config)
    needs_reference = config.loss not in _REFERENCE_FREE
    initial = policy_model.load_reference(config, model) if needs_reference and config.reference == "initial" else None
    optimizer = optim.make_optimizer(model, config.lr, config.weight_decay, config.betas)
    total_updates = config.max_steps * config.updates_per_round
    scheduler = optim.make_scheduler(optimizer, config.warmup_steps, total_updates, config.min_lr_ratio)

    def update(step: int, groups: Sequence[TrajectoryGroup]) -> loop.Update:
        pairs, scores = mine_round(groups, scorer, config.min_margin)
        stats = _update(config, model, optimizer, scheduler, pairs, tokenizer, initial, policy_model.pad_id(tokenizer),
                        step)  # fmt: skip
        trained = [t for pair in pairs for t in (pair.chosen, pair.rejected)]
        stats = {"score": sum(scores) / len(scores) if scores else math.nan, "pairs": len(pairs), **stats}
        return loop.Update(trained, {"unpaired": sum(len(g) for g in groups) - len(trained)}, stats)

    return loop.Online(model, tokenizer, optimizer, scheduler, update)


def _update(config: OnlineDPOConfig, model: Any, optimizer: Any, scheduler: Any, pairs: Sequence[PreferencePair],
            tokenizer: Any, initial: Any, pad_id: int, step: int) -> dict[str, Any]:  # fmt: skip
    """``epochs`` passes of ``batch_size``-pair steps over one round's pairs; their mean statistics."""
    if not pairs:
        return {"updates": 0, "loss": math.nan, "accuracy": math.nan, "margin": math.nan}
    dataset = _dataset(config, tokenizer, pairs)
    cached: SequenceLogps | None = None
    if config.loss not in _REFERENCE_FREE:
        # "previous": the policy itself, before this round's updates; "initial" under LoRA: None (adapters off).
        reference = model if config.reference == "previous" else initial
        model.eval()
        cached = _precompute_reference(config, reference, model, dataset, pad_id)
    model.train()
    per_pass = math.ceil(len(dataset) / config.batch_size)
    batches = optim.iterate_batches(len(dataset), config.batch_size, config.seed + step)
    losses, accuracies, margins = [], [], []
    for _ in range(config.epochs * per_pass):
        loss, stats = _batch_loss(config, model, None, dataset, next(batches), cached, pad_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optim.clip_and_step(model, optimizer, scheduler, config.grad_clip)
        losses.append(loss.item())
        accuracies.append(stats["accuracy"])
        margins.append(stats["margin"])
    n = len(losses)
    return {
        "updates": n,
        "loss": sum(losses) / n,
        "accuracy": sum(accuracies) / n,
        "margin": sum(margins) / n,
    }
