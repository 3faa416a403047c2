"""Rejection-sampling SFT: which episodes are kept, training on their recorded ledgers, the reward going up."""

from __future__ import annotations

import numpy as np
import pytest

from agentrl.data.buffer import TrajectoryBuffer, TrajectoryGroup
from agentrl.data.trajectory import Trajectory, TurnSpan
from agentrl.errors import ConfigError
from agentrl.learners.rejection import sample_groups, select_best, train_rejection_sft
from agentrl.learners.rl import RolloutConfig
from agentrl.learners.sft import SFTConfig
from agentrl.types import StopReason

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _t(ids: list[int], reward: float, error: str | None = None) -> Trajectory:
    return Trajectory(ids, [0.0] * len(ids), [0, 0, *[1] * (len(ids) - 2)], [TurnSpan(2, len(ids), reward)],
                      stop_reason=StopReason.ERROR if error else StopReason.TERMINATED, error=error)  # fmt: skip


def test_select_best_keeps_the_top_distinct_episodes_of_each_task_above_the_bar():
    a = TrajectoryGroup("a", (_t([1, 2, 3], 0.5), _t([1, 2, 4], 1.0), _t([1, 2, 4], 1.0), _t([1, 2, 5], 1.0),
                              _t([1, 2, 6], 9.0, error="RuntimeError: boom")))  # fmt: skip
    b = TrajectoryGroup("b", (_t([1, 7, 8], 0.2), _t([1, 7, 9], 0.1)))
    best = select_best([a, b])
    assert [t.token_ids[2] for t in best] == [4, 8]  # failed episodes never count, ties keep sample order
    assert [t.token_ids[2] for t in select_best([a, b], per_task=2)] == [4, 5, 8, 9]  # duplicates kept once
    assert [t.token_ids[2] for t in select_best([a, b], per_task=3, min_reward=0.5)] == [4, 5, 3]
    with pytest.raises(ConfigError, match="per_task must be >= 1"):
        select_best([a], per_task=0)


def test_the_ledgers_are_trained_as_recorded():
    # Hand-made ledgers without messages: nothing to re-tokenize, so only the recorded tokens can be used.
    group = TrajectoryGroup("a", (_t([1, 2, 3, 4], 1.0), _t([1, 2, 5], 0.5)))
    result = train_rejection_sft(SFTConfig(max_steps=1, warmup_steps=0, batch_size=2), [group], per_task=2)
    assert result.extras["num_rows"] == 2 and result.history[0].tokens == 2 + 1


def test_nothing_above_the_bar_is_a_clear_error():
    group = TrajectoryGroup("a", (_t([1, 2, 3], 0.5),))
    with pytest.raises(ConfigError, match=r"min_reward=1.0 \(best seen: 0.5\); lower min_reward"):
        train_rejection_sft(SFTConfig(max_steps=1, warmup_steps=0), [group], min_reward=1.0)


def test_rejection_sft_trains_on_the_recorded_ledgers_and_raises_the_reward(tmp_path):
    config = RolloutConfig(env="toy-digits-v0", group_size=8, max_new_tokens=8, seed=0)
    groups = sample_groups(config, 32)
    before = np.mean([t.total_reward for g in groups for t in g])
    buffer = TrajectoryBuffer(groups)
    best = select_best(buffer.groups, per_task=2)
    assert np.mean([t.total_reward for t in best]) > 2 * before

    sft = SFTConfig(max_steps=30, batch_size=16, lr=5e-3, warmup_steps=0, output_dir=tmp_path)
    result = train_rejection_sft(sft, buffer, per_task=2)
    assert result.extras["num_rows"] == len(best)
    assert result.history[-1].loss < result.history[0].loss - 0.5
    after = sample_groups(config.model_copy(update={"model": str(result.checkpoint), "seed": 1}), 32)
    assert np.mean([t.total_reward for g in after for t in g]) > 2 * before
