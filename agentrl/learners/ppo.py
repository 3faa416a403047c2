"""PPO with a critic on multi-turn environments (InstructGPT-style): the reward is the env's per-turn reward
minus a per-token KL penalty to the reference, advantages come from GAE over the policy's own tokens (the
value bootstraps across tool results and user turns, which are not actions), and the actor and critic
take several epochs of minibatch steps on each rollout batch.

One step::

    rollout      G samples for each of ``prompts_per_step`` tasks
    filters      as GRPO's (failed episodes, overlong, optional dynamic sampling)
    score        old logprobs, reference logprobs (kl_coef > 0), critic values: one no-grad pass
    rewards      turn rewards at each turn's last token - kl_coef * k1 per policy token
    advantages   GAE(gamma, lam), per token or per turn (``turn_level``); whitened over the batch
    update       mu epochs x minibatches: clipped surrogate (actor), clipped value loss (critic)
    kl control   the adaptive controller moves kl_coef toward ``kl_target`` (when set)
    weight sync  to the rollout backend

Usage::

    from agentrl.learners.ppo import PPOConfig, train_ppo

    result = train_ppo(PPOConfig(env="math-v0", model="runs/sft/step-000200", max_steps=100))
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from agentrl import algos
from agentrl.data.batch import collate
from agentrl.data.buffer import TrajectoryGroup
from agentrl.data.trajectory import Trajectory
from agentrl.learners import batching, logprobs, loop, optim, policy_model, rl
from agentrl.learners.result import TrainResult
from agentrl.models.value_head import ValueModel

__all__ = ["CRITIC_DIR", "PPOConfig", "gae_advantages", "train_ppo"]

CRITIC_DIR = "critic"


class PPOConfig(rl.RLConfig):
    """A PPO run (shared fields: :class:`~agentrl.learners.rl.RLConfig` and ``TrainConfig``)."""

    mu: int = Field(2, ge=1, description="epochs over each rollout batch, e.g. 2")
    minibatches: int = Field(2, ge=1, description="optimizer steps per epoch, e.g. 2")
    gamma: float = Field(1.0, ge=0, le=1, description="discount (per token, or per turn with turn_level)")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda, e.g. 0.95")
    turn_level: bool = Field(False, description="discount per turn instead of per token")
    whiten_advantages: bool = Field(True, description="normalise advantages over the batch's policy tokens")
    critic_model: str | None = Field(
        None, description="the critic's starting weights; None: the policy's model"
    )
    critic_lr: float | None = Field(None, gt=0, le=1, description="critic learning rate; None: lr")
    value_clip: float | None = Field(
        0.2, gt=0, description="clip of the value update around the old value, or None"
    )
    kl_coef: float = Field(
        0.0, ge=0, description="per-token KL penalty in the reward (InstructGPT), e.g. 0.05"
    )
    kl_target: float | None = Field(
        None, gt=0, description="per-sequence KL the adaptive controller steers kl_coef to, or None (fixed)"
    )
    kl_horizon: int = Field(
        10_000, ge=1, description="samples over which a full 20% kl_coef correction is spread"
    )


# ---- advantages -----------------------------------------------------------------------------------
def gae_advantages(
    trajectories: Sequence[Trajectory],
    values: Sequence[np.ndarray],
    config: PPOConfig,
    logprobs: Sequence[np.ndarray] | None = None,
    ref_logprobs: Sequence[np.ndarray] | None = None,
    kl_coef: float = 0.0,
) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """Per-trajectory ``(advantages, returns)`` from GAE on KL-shaped rewards, and the mean per-sequence KL.

    Rewards: each turn's reward on its last sampled token, minus ``kl_coef * k1`` on every policy token
    when reference logprobs are given. Advantages are whitened over the batch when configured.
    """
    batch = collate(trajectories).to_torch()
    mask_B_T = batch.loss_mask_B_T
    rewards_B_T = batch.turn_rewards_B_T.double()
    kl_per_sequence = 0.0
    if ref_logprobs is not None and logprobs is not None:
        kl_B_T = algos.kl_estimate(batching.place(batch, logprobs, torch.float64),
                                   batching.place(batch, ref_logprobs, torch.float64), "k1", mask_B_T)  # fmt: skip
        kl_per_sequence = float((kl_B_T * mask_B_T).sum(dim=1).mean())
        rewards_B_T = algos.kl_penalized_rewards(rewards_B_T, kl_B_T, mask_B_T, kl_coef)
    advantages_B_T, returns_B_T = algos.gae(
        rewards_B_T, batching.place(batch, values, torch.float64), mask_B_T, config.gamma, config.lam,
        turn_level=config.turn_level,
    )  # fmt: skip
    if config.whiten_advantages:
        advantages_B_T = algos.batch_normalize(advantages_B_T, mask_B_T)
    lengths = [len(t.token_ids) for t in trajectories]
    return (
        [advantages_B_T[b, :n].numpy() for b, n in enumerate(lengths)],
        [returns_B_T[b, :n].numpy() for b, n in enumerate(lengths)],
        kl_per_sequence,
    )


# ---- the update -----------------------------------------------------------------------------------
def update_actor_critic(
    model: Any, critic: ValueModel, optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any],
    trajectories: Sequence[Trajectory], old: dict[str, list[np.ndarray]], config: PPOConfig, *, pad_id: int,
    seed: int,
) -> dict[str, float]:  # fmt: skip
    """``mu`` epochs of ``minibatches`` steps; each step updates the actor on the clipped surrogate and the
    critic on the clipped value loss. ``old`` holds per-trajectory ``logprobs``, ``values``,
    ``advantages`` and ``returns`` from before the update."""
    stats: defaultdict[str, float] = defaultdict(float)
    for epoch in range(config.mu):
        for mini in batching.microbatches(trajectories, config, seed=seed * 1009 + epoch):
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            n_tokens = sum(trajectories[i].num_sampled for micro in mini for i in micro)
            for micro in mini:
                weight, norm = batching.micro_scale(config, [trajectories[i] for i in micro],
                                                     sum(map(len, mini)), n_tokens)  # fmt: skip
                batch = batching.to_batch([trajectories[i] for i in micro], pad_id, config)
                mask_B_T = batch.loss_mask_B_T
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
                    values_B_T = critic(batch)
                assert entropy_B_T is not None

                def placed(key: str, batch: Any = batch, micro: list[int] = micro) -> torch.Tensor:
                    return batching.place(batch, [old[key][i] for i in micro])

                is_w_B_T = None
                if config.tis_cap is not None:
                    is_w_B_T = algos.truncated_is_weights(placed("logprobs"), batch.sampler_logprobs_B_T,
                                                          config.tis_cap, mask_B_T)  # fmt: skip
                pl = algos.policy_loss(
                    logprobs_B_T, placed("logprobs"), placed("advantages"), mask_B_T,
                    eps_low=config.eps_low, eps_high=config.eps_high, dual_clip=config.dual_clip,
                    is_weights_B_T=is_w_B_T, aggregation=config.aggregation, norm=norm,
                    segment_ids_B_T=batch.segment_ids_B_T,
                )  # fmt: skip
                vl_B_T = algos.value_loss(values_B_T, placed("values"), placed("returns"), config.value_clip)
                vl = algos.aggregate(vl_B_T, mask_B_T, config.aggregation, norm=norm,
                                     segment_ids_B_T=batch.segment_ids_B_T)  # fmt: skip
                entropy = algos.aggregate(entropy_B_T, mask_B_T, config.aggregation, norm=norm,
                                          segment_ids_B_T=batch.segment_ids_B_T)  # fmt: skip
                (weight * (pl.loss - config.entropy_coef * entropy + vl)).backward()
                part = len(micro) / len(trajectories) / config.mu
                for key, value in (("loss", pl.loss), ("value_loss", vl), ("clip_fraction", pl.clip_fraction),
                                   ("ratio", pl.ratio_mean), ("entropy", entropy)):  # fmt: skip
                    stats[key] += float(value.detach()) * part
            grad_norm = optim.clip_and_step(model, optimizers[0], schedulers[0], config.grad_clip)
            stats["grad_norm"] += grad_norm / config.updates_per_step
            stats["critic_grad_norm"] += optim.clip_and_step(
                critic, optimizers[1], schedulers[1], config.grad_clip
            ) / (config.updates_per_step)
    return dict(stats)


# ---- the learner ----------------------------------------------------------------------------------
def train_ppo(
    config: PPOConfig,
    on_step: loop.OnStep | None = None,
    on_rollout: loop.OnRollout | None = None,
    rescore: loop.Rescore | None = None,
    monitor: loop.Monitor | None = None,
) -> TrainResult:
    """Run ``config.max_steps`` PPO steps on ``config.env``; see the module docstring for one step.

    ``rescore`` and ``monitor`` work as in :func:`~agentrl.learners.grpo.train_grpo` (e.g. an LLM judge's
    score in the reward, the held-out gold score). The result's ``extras`` hold the ``critic`` and the final
    ``kl_coef``; checkpoints hold the critic under ``critic/``, both optimizers' states and ``kl_coef``.
    """
    hooks = loop.Hooks(on_step, on_rollout, rescore, monitor)
    return loop.run_online(config, "ppo", lambda: _learner(config), hooks)


def _learner(config: PPOConfig) -> loop.Online:
    model, tokenizer = policy_model.load_trainable(config)
    resumed = Path(config.resume_from) / CRITIC_DIR if config.resume_from is not None else None
    critic = ValueModel.from_pretrained(resumed or config.critic_model or config.model, config.device).train()
    if config.gradient_checkpointing:
        critic.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = policy_model.load_reference(config, model) if config.kl_coef > 0 else None
    pad_id = policy_model.pad_id(tokenizer)
    optimizers = [optim.make_optimizer(model, config.lr, config.weight_decay, config.betas),
                  optim.make_optimizer(critic, config.critic_lr or config.lr, config.weight_decay, config.betas)]  # fmt: skip
    total_updates = config.max_steps * config.updates_per_step
    schedulers = [
        optim.make_scheduler(o, config.warmup_steps, total_updates, config.min_lr_ratio) for o in optimizers
    ]
    kl_ctl = algos.AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon) if config.kl_target else None
    state = {"kl_coef": config.kl_coef}  # the shell restores it on resume

    def update(step: int, groups: Sequence[TrajectoryGroup]) -> loop.Update:
        kept, dropped = rl.filter_groups(groups, config)
        trajectories = [t for g in kept for t in g]
        if not trajectories:
            return loop.Update(trajectories, dropped, {})
        kl_coef = state["kl_coef"]
        old = {"logprobs": batching.logprob_arrays(model, trajectories, pad_id, config),
               "values": batching.per_trajectory(critic, trajectories, pad_id, config)}  # fmt: skip
        ref = batching.logprob_arrays(model, trajectories, pad_id, config, reference, True) if kl_coef > 0 else None
        old["advantages"], old["returns"], kl = gae_advantages(
            trajectories, old["values"], config, old["logprobs"], ref, kl_coef
        )
        model.train()
        stats = update_actor_critic(model, critic, optimizers, schedulers, trajectories, old, config,
                                    pad_id=pad_id, seed=config.seed + step)  # fmt: skip
        stats.update(kl=kl, kl_coef=kl_coef)
        if kl_ctl is not None:
            kl_ctl.beta = kl_coef
            state["kl_coef"] = kl_ctl.update(kl, n_steps=len(trajectories))
        return loop.Update(trajectories, dropped, stats)

    return loop.Online(model, tokenizer, optim.Joint(optimizers), optim.Joint(schedulers), update,
                       saved={CRITIC_DIR: critic}, state=state)  # fmt: skip
