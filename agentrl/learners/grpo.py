"""GRPO and its variants on multi-turn environments: play G samples per task, score them with the env,
turn the rewards into group-relative advantages, update the policy on its own sampled tokens only.

One step::

    rollout      G samples for each of ``prompts_per_step`` tasks (the runner, the rollout backend)
    filters      drop failed episodes; overlong filter or soft penalty; dynamic sampling (DAPO)
    advantages   grpo (r - mean) / std | dr_grpo r - mean | rloo | reinforce_pp | turn (per-turn returns,
                 leave-one-out baseline per turn position)
    update       mu passes x minibatches optimizer steps of the clipped surrogate (+ k1/k2/k3 KL to a
                 reference when beta > 0; + entropy bonus; truncated IS for sampler mismatch)
    weight sync  to the rollout backend (free for ``hf``: it samples with the learner's module)

The named recipes are settings of one loop (see :data:`PRESETS`): GRPO (std-scaled advantages, sequence
mean of token means), Dr. GRPO (no std, token sums over a constant), DAPO (token mean, clip-higher,
dynamic sampling, soft overlong penalty). No reference model is loaded when ``beta`` is 0.

Usage::

    from agentrl.learners.grpo import GRPOConfig, train_grpo

    result = train_grpo(GRPOConfig(env="math-v0", model="runs/sft/step-000200", max_steps=100))
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from agentrl import algos
from agentrl.data.batch import collate
from agentrl.data.buffer import TrajectoryGroup
from agentrl.data.trajectory import Trajectory
from agentrl.learners import batching, data_parallel, logprobs, loop, optim, policy_model, rl
from agentrl.learners.result import TrainResult

__all__ = ["PRESETS", "GRPOConfig", "sample_advantages", "train_grpo", "update_policy"]

PRESETS: dict[str, dict[str, Any]] = {
    "grpo": {"advantage": "grpo", "aggregation": "seq-mean-token-mean"},
    "dr_grpo": {"advantage": "dr_grpo", "aggregation": "seq-mean-token-sum-norm"},
    "dapo": {"advantage": "grpo", "aggregation": "token-mean", "eps_high": 0.28, "dynamic_sampling": True,
             "overlong": "soft"},
}  # fmt: skip
"""Field values of the named recipes: ``GRPOConfig(**PRESETS["dapo"], env=...)``."""


class GRPOConfig(rl.RLConfig):
    """A GRPO run (shared fields: :class:`~agentrl.learners.rl.RLConfig` and ``TrainConfig``)."""

    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "turn"] = Field(
        "grpo",
        description="estimator: 'grpo', 'dr_grpo', 'rloo', 'reinforce_pp' or 'turn' (per-turn rewards)",
    )
    gamma: float = Field(1.0, ge=0, le=1, description="discount for 'reinforce_pp' (per token) and 'turn'")
    beta: float = Field(0.0, ge=0, description="KL-to-reference weight in the loss; 0 loads no reference")
    kl_kind: Literal["k1", "k2", "k3"] = Field("k3", description="KL estimator for beta > 0, e.g. 'k3'")


# ---- advantages -----------------------------------------------------------------------------------
def sample_advantages(groups: Sequence[TrajectoryGroup], config: GRPOConfig) -> list[np.ndarray]:
    """One advantage array per trajectory (aligned with its ``token_ids``, 0 off the policy tokens), in
    group order. A group left with one sample (after filters) has no baseline: its advantages are 0."""
    if config.advantage == "reinforce_pp":
        trajectories = [t for g in groups for t in g]
        batch = collate(trajectories).to_torch()
        adv_B_T = algos.reinforce_pp_advantages(
            batch.turn_rewards_B_T.double(), batch.loss_mask_B_T, config.gamma
        )
        return [adv_B_T[b, : len(t.token_ids)].numpy() for b, t in enumerate(trajectories)]
    out: list[np.ndarray] = []
    for group in groups:
        if config.advantage == "turn":
            out += _turn_advantages(group.trajectories, config.gamma)
            continue
        rewards_G = torch.as_tensor(group.rewards_G)
        if len(group) < 2:
            adv_G = torch.zeros_like(rewards_G)
        elif config.advantage == "rloo":
            adv_G = algos.rloo_advantages(rewards_G)
        else:
            adv_G = algos.group_advantages(rewards_G, scale=config.advantage == "grpo")
        out += [
            float(a) * np.asarray(t.loss_mask, dtype=np.float64) for a, t in zip(adv_G, group, strict=True)
        ]
    return out


def _turn_advantages(trajectories: Sequence[Trajectory], gamma: float) -> list[np.ndarray]:
    rewards_G_K, mask_G_K = algos.turn_rewards_from_trajectories(trajectories)
    adv_G_K = algos.turn_advantages(rewards_G_K, mask_G_K, gamma)
    out = []
    for g, trajectory in enumerate(trajectories):
        values = np.zeros(len(trajectory.token_ids))
        for k, turn in enumerate(trajectory.turns):
            values[turn.start : turn.end] = float(adv_G_K[g, k])
        out.append(values * np.asarray(trajectory.loss_mask))
    return out


# ---- the update -----------------------------------------------------------------------------------
def update_policy(
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trajectories: Sequence[Trajectory],
    advantages: Sequence[np.ndarray],
    config: GRPOConfig,
    *,
    pad_id: int,
    seed: int,
    reference: Any = None,
) -> dict[str, float]:
    """``mu`` passes of ``minibatches`` optimizer steps on the clipped surrogate; returns mean statistics.

    Old logprobs are recomputed only when the policy moves between the first and a later minibatch
    (``mu * minibatches > 1``) or for the IS correction; otherwise they are the current ones, detached.

    Under torchrun each rank trains on its share of ``trajectories`` (:mod:`~agentrl.learners.data_parallel`);
    the minibatch totals that normalise the loss, and the statistics, are over all ranks.
    """
    trajectories, advantages = data_parallel.local_share(trajectories, advantages)
    (rows_total,) = data_parallel.all_sum([sum(not data_parallel.is_filler(t) for t in trajectories)])
    recompute_old = config.updates_per_step > 1 or config.tis_cap is not None
    old = batching.logprob_arrays(model, trajectories, pad_id, config) if recompute_old else None
    ref = (
        batching.logprob_arrays(model, trajectories, pad_id, config, reference, True)
        if config.beta > 0
        else None
    )
    stats: defaultdict[str, float] = defaultdict(float)
    for epoch in range(config.mu):
        for mini in batching.microbatches(trajectories, config, seed=seed * 1009 + epoch):
            optimizer.zero_grad(set_to_none=True)
            rows = [trajectories[i] for micro in mini for i in micro]
            n_rows, n_tokens = data_parallel.all_sum(
                [sum(not data_parallel.is_filler(t) for t in rows), sum(t.num_sampled for t in rows)]
            )
            for micro in mini:
                batch = batching.to_batch([trajectories[i] for i in micro], pad_id, config)
                with optim.autocast(config.precision, config.device):
                    logprobs_B_T, entropy_B_T = logprobs.policy_logprobs(
                        model,
                        batch,
                        config.temperature,
                        top_k=config.top_k,
                        top_p=config.top_p,
                        with_entropy=True,
                        entropy_grad=config.entropy_coef > 0,
                    )
                assert entropy_B_T is not None
                mask_B_T = batch.loss_mask_B_T
                old_B_T = batching.place(batch, [old[i] for i in micro]) if old else logprobs_B_T.detach()
                is_w_B_T = None
                if config.tis_cap is not None:
                    is_w_B_T = algos.truncated_is_weights(
                        old_B_T, batch.sampler_logprobs_B_T, config.tis_cap, mask_B_T
                    )
                weight, norm = batching.micro_scale(config, [trajectories[i] for i in micro], n_rows, n_tokens)
                out = algos.policy_loss(
                    logprobs_B_T, old_B_T, batching.place(batch, [advantages[i] for i in micro]), mask_B_T,
                    eps_low=config.eps_low, eps_high=config.eps_high, dual_clip=config.dual_clip,
                    ref_logprobs_B_T=batching.place(batch, [ref[i] for i in micro]) if ref else None,
                    beta=config.beta, kl_kind=config.kl_kind, is_weights_B_T=is_w_B_T,
                    aggregation=config.aggregation, norm=norm, segment_ids_B_T=batch.segment_ids_B_T,
                )  # fmt: skip
                entropy = algos.aggregate(entropy_B_T, mask_B_T, config.aggregation, norm=norm,
                                          segment_ids_B_T=batch.segment_ids_B_T)  # fmt: skip
                (weight * (out.loss - config.entropy_coef * entropy)).backward()
                # Each rank's statistics are its part of the whole: the loss terms as the optimizer sees them
                # (weighted), the token means by the micro-batch's share of the step's samples.
                share = sum(not data_parallel.is_filler(trajectories[i]) for i in micro) / rows_total / config.mu
                for key, value, part in (("loss", out.loss, weight / config.updates_per_step),
                                         ("entropy", entropy, weight / config.updates_per_step),
                                         ("kl", out.kl, share), ("clip_fraction", out.clip_fraction, share),
                                         ("ratio", out.ratio_mean, share)):  # fmt: skip
                    stats[key] += float(value.detach()) * part
            stats["grad_norm"] += (
                optim.clip_and_step(model, optimizer, scheduler, config.grad_clip) / config.updates_per_step
            )
    return dict(stats)


# ---- the learner ----------------------------------------------------------------------------------
def train_grpo(
    config: GRPOConfig,
    on_step: loop.OnStep | None = None,
    on_rollout: loop.OnRollout | None = None,
    rescore: loop.Rescore | None = None,
    monitor: loop.Monitor | None = None,
) -> TrainResult:
    """Run ``config.max_steps`` GRPO steps on ``config.env``; see the module docstring for one step.

    ``rescore(groups) -> groups`` changes the rollout's rewards before anything reads them, e.g. adds an
    LLM judge's or a reward model's score (:class:`agentrl.judge.JudgeGroupReward`). ``monitor`` is awaited
    after each step with ``(log, model, tokenizer)`` and its metrics become the log's ``monitors`` (e.g. the
    held-out gold score of :class:`agentrl.learners.gold.GoldMonitor`). The shell around the update is
    :func:`agentrl.learners.loop.run_online`.

    Raises:
        ConfigError: a setting the model, env or backend cannot honour (before any step runs).
    """
    hooks = loop.Hooks(on_step, on_rollout, rescore, monitor)
    return loop.run_online(config, "grpo", lambda: _learner(config), hooks)


def _learner(config: GRPOConfig) -> loop.Online:
    optim.check_precision(config.precision, config.device)
    model, tokenizer = policy_model.load_trainable(config)
    reference = policy_model.load_reference(config, model) if config.beta > 0 else None
    optimizer = optim.make_optimizer(model, config.lr, config.weight_decay, config.betas)
    total_updates = config.max_steps * config.updates_per_step
    scheduler = optim.make_scheduler(optimizer, config.warmup_steps, total_updates, config.min_lr_ratio)

    def update(step: int, groups: Sequence[TrajectoryGroup]) -> loop.Update:
        kept, dropped = rl.filter_groups(groups, config)
        trajectories = [t for g in kept for t in g]
        advantages = sample_advantages(kept, config)
        model.train()
        stats: dict[str, float] = {}
        if trajectories:
            stats = update_policy(model, optimizer, scheduler, trajectories, advantages, config,
                                  pad_id=policy_model.pad_id(tokenizer), seed=config.seed + step,
                                  reference=reference)  # fmt: skip
        return loop.Update(trajectories, dropped, stats)

    return loop.Online(model, tokenizer, optimizer, scheduler, update)
