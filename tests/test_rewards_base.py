"""Reward composition, named weighted components and the ORM/PRM protocols."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agentrl.errors import ConfigError
from agentrl.rewards import (
    OutcomeReward,
    ProcessReward,
    RewardResult,
    RewardSpec,
    WeightedReward,
    compose,
    parse_weights,
)


def test_compose_weights_each_component_and_sums_them_exactly():
    result = compose({"correct": 1.0, "format": 1.0, "length": -0.3}, {"format": 0.1, "length": 0.5})
    assert dict(result.components) == {"correct": 1.0, "format": 0.1, "length": -0.15}
    assert dict(result.raw) == {"correct": 1.0, "format": 1.0, "length": -0.3}
    assert result.score == sum(result.components.values())
    assert math.isclose(result.score, 0.95)


def test_compose_rejects_unknown_weight_names_and_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown components \['fromat'\].*\['correct', 'format'\]"):
        compose({"correct": 1.0, "format": 0.0}, {"fromat": 0.1})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1", None])
def test_compose_rejects_non_finite_values(bad):
    with pytest.raises(ConfigError, match="finite"):
        compose({"correct": bad}, {})


def test_result_is_frozen_and_its_mappings_are_read_only():
    result = compose({"a": 2.0}, {"a": 3.0}, {"answer": "6"})
    with pytest.raises(AttributeError):
        result.score = 0.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        result.components["a"] = 0.0  # type: ignore[index]
    assert result.score == 6.0 and result.info["answer"] == "6"
    assert RewardResult.single("correct", 1).components == {"correct": 1.0}


def test_weighted_reward_scores_a_list_of_named_functions():
    def judge(task, answer):  # a plugged-in scorer returning a full result: its info is kept
        return RewardResult.single("judge", 0.5, reason="half right")

    reward = WeightedReward([
        RewardSpec("correct", lambda task, answer: answer == task),
        RewardSpec("length", lambda task, answer: -len(answer) / 10, weight=0.2),
        RewardSpec("model", judge, weight=2.0),
    ])
    result = reward("42", "42")
    assert dict(result.components) == {"correct": 1.0, "length": pytest.approx(-0.04), "model": 1.0}
    assert result.score == sum(result.components.values())
    assert result.info["model"] == {"reason": "half right"}
    assert isinstance(reward, OutcomeReward) and isinstance(reward, ProcessReward)


def test_with_weights_overrides_from_config_and_rejects_unknown_names():
    reward = WeightedReward([RewardSpec("correct", lambda t, a: 1.0), RewardSpec("format", lambda t, a: 1.0, 0.1)])
    assert reward.with_weights({"format": 0.5})("t", "a").score == 1.5
    assert reward("t", "a").score == pytest.approx(1.1)  # the original is unchanged
    with pytest.raises(ConfigError, match=r"unknown reward component 'style'.*\['correct', 'format'\]"):
        reward.with_weights({"style": 1.0})
    with pytest.raises(ConfigError, match="finite number"):
        parse_weights({"format": "high"}, ["format"])


def test_reward_functions_returning_garbage_or_duplicates_are_config_errors():
    with pytest.raises(ConfigError, match="unique"):
        WeightedReward([RewardSpec("a", lambda t, a: 0.0), RewardSpec("a", lambda t, a: 1.0)])
    with pytest.raises(ConfigError, match="callable"):
        RewardSpec("a", "not a function")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="returned 'yes'"):
        WeightedReward([RewardSpec("a", lambda t, a: "yes")])("t", "a")
    assert WeightedReward([RewardSpec("a", lambda t, a: np.float32(0.5))])("t", "a").score == 0.5
