"""Online / iterative DPO: it learns from its own samples, the reference is what the config says, a scorer
replaces the env's ranking, multi-turn episodes with tool answers train, resume is exact."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from agentrl.data.buffer import TrajectoryGroup, with_final_reward
from agentrl.data.trajectory import Trajectory, TurnSpan
from agentrl.errors import ConfigError
from agentrl.learners.online_dpo import OnlineDPOConfig, mine_round, train_online_dpo
from agentrl.models.loading import load_model

FAST = {"env": "toy-digits-v0", "prompts_per_step": 8, "group_size": 4, "max_new_tokens": 8, "lr": 1e-2}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_online_dpo_raises_the_env_reward_of_the_tiny_model():
    result = train_online_dpo(OnlineDPOConfig(**FAST, max_steps=20, seed=0))
    scores = [log.update["score"] for log in result.history]
    assert scores[0] < 0.05
    assert max(scores[-3:]) > 0.8, scores
    assert all(log.update["pairs"] <= 8 and log.update["updates"] == (log.update["pairs"] > 0)
               for log in result.history)  # fmt: skip


def test_iterative_dpo_anchors_each_round_to_the_policy_it_starts_from():
    # One update per round, measured before it: the policy is the reference, so every margin is 0 and the
    # loss is exactly log 2. With the initial model as reference, later rounds move away from it.
    iterative = train_online_dpo(OnlineDPOConfig(**FAST, max_steps=4, reference="previous"))
    losses = [log.update["loss"] for log in iterative.history if log.update["pairs"]]
    assert losses and all(loss == pytest.approx(math.log(2), abs=1e-6) for loss in losses)
    online = train_online_dpo(OnlineDPOConfig(**FAST, max_steps=4, reference="initial"))
    assert online.history[0].update["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert any(abs(log.update["loss"] - math.log(2)) > 1e-3 for log in online.history[1:] if log.update["pairs"])


def _trajectory(ids: list[int], reward: float) -> Trajectory:
    return Trajectory(ids, [0.0] * len(ids), [0, 0, *[1] * (len(ids) - 2)], [TurnSpan(2, len(ids), reward)])


def test_a_scorer_ranks_the_samples_instead_of_the_env_reward():
    group = TrajectoryGroup("t", (_trajectory([1, 2, 5, 6], 1.0), _trajectory([1, 2, 7, 8], 0.0),
                                  _trajectory([1, 2, 9, 9], 0.5)))  # fmt: skip
    (by_env,), _ = mine_round([group], None, 0.0)
    assert by_env.chosen.token_ids[2] == 5 and by_env.rejected.token_ids[2] == 7
    (by_scorer,), scores = mine_round([group], lambda g: [0.0, 2.0, 1.0], 0.0)
    assert by_scorer.chosen.token_ids[2] == 7 and by_scorer.rejected.token_ids[2] == 5
    assert scores == [0.0, 2.0, 1.0]
    assert mine_round([group], lambda g: [1.0, 1.0, 1.0], 0.0)[0] == []  # all agree: no pair
    with pytest.raises(ConfigError, match="2 scores for a group of 3"):
        mine_round([group], lambda g: [1.0, 2.0], 0.0)


def test_rescore_changes_what_is_mined_and_the_monitor_sees_every_round():
    # The same hooks as GRPO and PPO (the shell's): a rescore that pays every sample the same leaves no pair
    # to mine, where the env's own rewards give pairs; the monitor's metrics land in each round's log.
    plain = train_online_dpo(OnlineDPOConfig(**FAST, max_steps=2, seed=0))
    assert sum(log.update["pairs"] for log in plain.history) > 0
    seen: list[tuple[int, bool]] = []

    def flat(groups: Sequence[TrajectoryGroup]) -> list[TrajectoryGroup]:
        def paid(t: Trajectory) -> Trajectory:
            unpaid = dataclasses.replace(t, turns=tuple(TurnSpan(u.start, u.end, 0.0) for u in t.turns))
            return with_final_reward(unpaid, "flat", 5.0)

        return [TrajectoryGroup(g.group_id, tuple(map(paid, g))) for g in groups]

    async def monitor(log: Any, model: Any, tokenizer: Any) -> dict[str, float]:
        seen.append((log.step, isinstance(model, torch.nn.Module) and tokenizer is not None))
        return {"gold": float(log.step)}

    result = train_online_dpo(OnlineDPOConfig(**FAST, max_steps=2, seed=0), rescore=flat, monitor=monitor)
    assert [log.update["pairs"] for log in result.history] == [0, 0]
    assert all(log.reward_mean == pytest.approx(5.0) for log in result.history)
    assert seen == [(1, True), (2, True)]
    assert [log.monitors for log in result.history] == [{"gold": 1.0}, {"gold": 2.0}]


def _even_ids(group: TrajectoryGroup) -> list[float]:
    return [float(sum(i % 2 == 0 for i, m in zip(t.token_ids, t.loss_mask, strict=True) if m)) for t in group]


def test_a_scorer_drives_training_end_to_end():
    # A scorer the env knows nothing of (how many sampled token ids are even) decides what is learned.
    seen: list[int] = []

    def even_ids(group: TrajectoryGroup) -> list[float]:
        seen.append(len(group))
        return _even_ids(group)

    result = train_online_dpo(OnlineDPOConfig(**FAST, max_steps=12, seed=1), scorer=even_ids)
    assert seen == [4] * 8 * 12
    evens = [log.update["score"] for log in result.history]
    assert evens[0] < 4.5 and min(evens[-3:]) > 5.5, evens  # of 8 sampled tokens


def test_multi_turn_episodes_with_env_turns_inside_the_completion_train():
    groups: list[TrajectoryGroup] = []

    def scorer(group: TrajectoryGroup) -> list[float]:
        groups.append(group)
        return _even_ids(group)

    config = OnlineDPOConfig(env="toy-echo-v0", prompts_per_step=4, group_size=4, max_new_tokens=6, max_steps=2,
                             lr=1e-3)  # fmt: skip
    result = train_online_dpo(config, scorer=scorer)
    assert sum(log.update["pairs"] for log in result.history) > 0
    assert all(math.isfinite(log.update["loss"]) for log in result.history if log.update["pairs"])
    pair = mine_round(groups[-1:], _even_ids, 0.0)[0][0]
    assert len(pair.chosen.turns) > 1
    mask = pair.completion_mask("chosen")
    first, last = mask.index(1), len(mask) - mask[::-1].index(1)
    assert 0 in mask[first:last]  # the user's turns sit inside the completion, outside every sum


def test_resume_continues_exactly_where_the_run_stopped(tmp_path):
    straight = train_online_dpo(OnlineDPOConfig(**FAST, max_steps=3, output_dir=tmp_path / "a", save_every=1))
    resumed = train_online_dpo(OnlineDPOConfig(**FAST, max_steps=3, output_dir=tmp_path / "b",
                                               resume_from=tmp_path / "a" / "step-000002"))  # fmt: skip
    assert [log.step for log in resumed.history] == [3]
    assert resumed.history[0].update["score"] == straight.history[2].update["score"]
    a = straight.model.state_dict()
    assert all(torch.equal(v, a[k]) for k, v in resumed.model.state_dict().items())
    reloaded = load_model(tmp_path / "b" / "step-000003")
    assert all(torch.equal(v, a[k]) for k, v in reloaded.state_dict().items())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({}, r"OnlineDPOConfig.env: got .*Field required"),
        ({"env": "x", "loss": "ppo"}, r"OnlineDPOConfig.loss: got 'ppo'"),
        ({"env": "x", "reference": "last"}, r"OnlineDPOConfig.reference: got 'last'"),
        ({"env": "x", "loss": "kto", "label_smoothing": 0.1}, r"label_smoothing applies to loss in"),
    ],
)
def test_bad_settings_fail_before_any_work_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        OnlineDPOConfig(**overrides)
