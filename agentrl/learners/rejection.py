"""Rejection-sampling SFT (RFT, RAFT, the "expert iteration" step of R1-style recipes): sample G episodes per
task, keep the best of each task, fine-tune on them with the SFT learner.

The kept episodes are trained as the sampler recorded them: their token ledgers, with the loss on the
sampled tokens only (tool results and env turns stay masked), not a re-tokenization of their text.

Usage::

    from agentrl.learners.rejection import sample_groups, select_best, train_rejection_sft
    from agentrl.learners.rl import RolloutConfig

    groups = sample_groups(RolloutConfig(env="math-v0", model="runs/rl/step-000100", group_size=8), 64)
    result = train_rejection_sft(SFTConfig(model="runs/rl/step-000100", max_steps=50), groups, min_reward=1.0)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence

from agentrl.data.buffer import TrajectoryBuffer, TrajectoryGroup
from agentrl.data.trajectory import Trajectory
from agentrl.errors import ConfigError
from agentrl.learners import policy_model, rl
from agentrl.learners.result import TrainResult
from agentrl.learners.sft import SFTConfig, SFTStepLog, train_sft

__all__ = ["sample_groups", "select_best", "train_rejection_sft"]


def select_best(
    groups: Iterable[TrajectoryGroup], per_task: int = 1, min_reward: float | None = None
) -> list[Trajectory]:
    """The ``per_task`` highest-reward distinct episodes of each group.

    Args:
        groups: trajectory groups, one per task (a buffer's ``groups``, or the runner's output).
        per_task: the most episodes kept per task; ties keep the earlier sample.
        min_reward: keep only episodes whose total reward is at least this (e.g. 1.0 for "solved"); None
            keeps the best whatever it scored.

    Only trainable episodes with at least one turn that ended without an error count; of episodes with
    identical tokens only the first is kept.

    Raises:
        ConfigError: ``per_task`` < 1.
    """
    if per_task < 1:
        raise ConfigError(f"per_task must be >= 1, got {per_task}")
    kept: list[Trajectory] = []
    for group in groups:
        candidates = [t for t in group if t.trainable and t.turns and t.error is None]
        candidates.sort(key=lambda t: -t.total_reward)  # stable: ties keep sample order
        seen: set[tuple[int, ...]] = set()
        for trajectory in candidates:
            if len(seen) == per_task or (min_reward is not None and trajectory.total_reward < min_reward):
                break
            ids = tuple(trajectory.token_ids)
            if ids not in seen:
                seen.add(ids)
                kept.append(trajectory)
    return kept


def sample_groups(config: rl.RolloutConfig, num_tasks: int) -> list[TrajectoryGroup]:
    """Play ``num_tasks`` tasks of ``config.env`` ``config.group_size`` times each with ``config.model``.

    Raises:
        ConfigError: a setting the model, env or backend cannot honour.
    """
    model, tokenizer = policy_model.load_trainable(config)
    model.eval()

    async def play() -> list[TrajectoryGroup]:
        runner = rl.make_runner(config, model, tokenizer)
        try:
            return await runner.run(num_tasks, config.group_size)
        finally:
            await runner.aclose()
            await runner.policy.aclose()

    return asyncio.run(play())


def train_rejection_sft(
    config: SFTConfig,
    groups: Iterable[TrajectoryGroup] | TrajectoryBuffer,
    per_task: int = 1,
    min_reward: float | None = None,
    on_step: Callable[[SFTStepLog], None] | None = None,
) -> TrainResult:
    """Fine-tune ``config.model`` on the best episodes of each group (see :func:`select_best`).

    Raises:
        ConfigError: no episode passes the filter (the message gives the best reward seen).
    """
    group_list: Sequence[TrajectoryGroup] = list(
        groups.groups if isinstance(groups, TrajectoryBuffer) else groups
    )
    best = select_best(group_list, per_task, min_reward)
    if not best:
        rewards = [t.total_reward for g in group_list for t in g if t.trainable and t.turns]
        raise ConfigError(
            f"no episode of {len(group_list)} groups reached min_reward={min_reward} (best seen: "
            f"{max(rewards) if rewards else 'none'}); lower min_reward or sample more per task"
        )
    return train_sft(config, best, on_step=on_step)
