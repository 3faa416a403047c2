"""Reward-hacking monitors against hand-computed numbers."""

from __future__ import annotations

import math

import pytest

from agentrl.data.trajectory import LedgerBuilder
from agentrl.rewards.monitors import (
    component_means,
    pearson,
    repeated_ngram_rate,
    stop_reason_shares,
    trajectory_monitors,
)
from agentrl.types import StopReason


def test_pearson_matches_a_hand_computed_value():
    # x = 1,2,3,4; y = 2,4,5,9: dx = -1.5,-.5,.5,1.5; dy = -3,-1,0,4; sxy = 4.5+.5+0+6 = 11;
    # sxx = 5; syy = 9+1+0+16 = 26; r = 11 / sqrt(130)
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0  # undefined: constant x
    assert pearson([5], [1]) == 0.0
    with pytest.raises(ValueError, match="2 x values but 3 y values"):
        pearson([1, 2], [1, 2, 3])


def test_repeated_ngram_rate_counts_repeats_of_earlier_ngrams():
    # 1 2 1 2 1 2: bigrams 12 21 12 21 12 -> 3 of 5 repeat; 3 4 5 -> 0 of 2
    assert repeated_ngram_rate([[1, 2, 1, 2, 1, 2], [3, 4, 5]], n=2) == pytest.approx(3 / 7)
    assert repeated_ngram_rate([[7, 7, 7, 7]], n=1) == pytest.approx(3 / 4)
    assert repeated_ngram_rate([[1, 2]], n=4) == 0.0  # too short to hold a 4-gram
    with pytest.raises(ValueError, match="at least 1"):
        repeated_ngram_rate([[1]], n=0)


def test_component_means_sum_turns_and_average_over_every_episode():
    episodes = [
        [{"format": 0.1}, {"format": 0.1, "correct": 1.0}],
        [{"format": -0.1}],
    ]
    means = component_means(episodes)
    assert means == pytest.approx({"format": 0.05, "correct": 0.5})
    assert component_means([]) == {}


def test_stop_reason_shares():
    shares = stop_reason_shares(["terminated", StopReason.ERROR, "max_turns", "truncated"])
    assert shares["error"] == 0.25 and shares["truncated"] == 0.5
    assert shares["stop/terminated"] == 0.25 and shares["stop/deadline"] == 0.0
    with pytest.raises(ValueError):
        stop_reason_shares(["exploded"])


def _trajectory(turns, stop=StopReason.TERMINATED):
    builder = LedgerBuilder([100, 101])
    for ids, reward, components in turns:
        builder.add_sampled(ids, [-0.5] * len(ids))
        builder.set_reward(reward, components)
        builder.add_observation([102])
    return builder.finish(stop, error="ToolError: boom" if stop is StopReason.ERROR else None)


def test_trajectory_monitors_over_a_batch():
    batch = [
        _trajectory([([1, 2, 1, 2], 0.1, {"format": 0.1}), ([5, 6], 1.0, {"correct": 1.0})]),
        _trajectory([([9], 0.0, {"format": 0.0})], StopReason.MAX_TURNS),
        _trajectory([([3, 3, 3], -0.1, {"format": -0.1})], StopReason.ERROR),
    ]
    metrics = trajectory_monitors(batch, n=2)
    # returns 1.1, 0, -0.1 against lengths 6, 1, 3
    assert metrics["reward_length_corr"] == pytest.approx(pearson([1.1, 0.0, -0.1], [6, 1, 3]))
    # bigrams: turn [1,2,1,2] -> 1 of 3 repeat; [5,6] -> 0 of 1; [9] -> none; [3,3,3] -> 1 of 2
    assert metrics["repeated_ngram_rate"] == pytest.approx(2 / 6)
    assert metrics["reward/format"] == pytest.approx(0.0)
    assert metrics["reward/correct"] == pytest.approx(1 / 3)
    assert metrics["error"] == pytest.approx(1 / 3) and metrics["truncated"] == pytest.approx(1 / 3)
    assert trajectory_monitors([]) == {}
