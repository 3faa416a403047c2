"""The over-optimisation monitor: the divergence rule by hand, and real GRPO runs on the tiny model where a
training reward that works against the held-out gold score is flagged and one aligned with it is not."""

from __future__ import annotations

import pytest

from agentrl.data.trajectory import Trajectory
from agentrl.errors import ConfigError
from agentrl.learners.gold import GoldMonitor, gold_scorer
from agentrl.learners.grpo import GRPOConfig, train_grpo
from agentrl.models.tiny import tiny_model_path
from agentrl.rewards.monitors import overoptimisation
from agentrl.tracking import MetricRecord, flatten_metrics
from agentrl.train_report import charts_for

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ---- the rule ----------------------------------------------------------------------------------------------
def test_gold_falling_from_its_best_while_the_proxy_keeps_rising_is_flagged():
    proxy = [0.1, 0.2, 0.3, 0.4, 0.5]
    gold = [0.1, 0.3, 0.25, 0.2, 0.15]
    check = overoptimisation(proxy, gold, tolerance=0.05, patience=2)
    # Point 2 is 0.05 below the best (not more): not flagged; points 3 and 4 are.
    assert check.flags == (False, False, False, True, True)
    assert check.diverged_at == 3 and check.best == 1
    assert check.gold_drop == pytest.approx(0.15) and check.proxy_gain == pytest.approx(0.3)


def test_noise_collapse_and_progress_are_not_over_optimisation():
    # One dip: patience 2 waits for a second.
    assert not overoptimisation([0.1, 0.2, 0.3, 0.4], [0.1, 0.3, 0.1, 0.35]).diverged
    # Both falling: the policy got worse at everything, it is not exploiting its reward.
    assert not overoptimisation([0.5, 0.4, 0.3, 0.2], [0.5, 0.3, 0.2, 0.1]).diverged
    both = overoptimisation([0.1, 0.2, 0.3], [0.2, 0.3, 0.4])
    assert not any(both.flags) and both.correlation == pytest.approx(1.0)
    with pytest.raises(ValueError, match="equal"):
        overoptimisation([0.1], [])
    with pytest.raises(ConfigError, match="component"):
        gold_scorer("correct")


# ---- real runs -----------------------------------------------------------------------------------------
def letters(trajectories) -> float:
    """A gold score at odds with toy-digits' reward: the share of the replies' characters that are letters."""
    shares = []
    for t in trajectories:
        text = t.messages[-1]["content"].strip() if t.turns else ""
        shares.append(sum(c.isalpha() for c in text) / len(text) if text else 0.0)
    return sum(shares) / len(shares)


RUN = {"env": "toy-digits-v0", "model": str(tiny_model_path()), "prompts_per_step": 8, "group_size": 4,
       "max_new_tokens": 8, "lr": 1e-2, "warmup_steps": 0, "max_steps": 10, "seed": 0}  # fmt: skip


def test_a_reward_working_against_the_gold_score_is_flagged_in_a_real_run():
    lines: list[str] = []
    monitor = GoldMonitor("toy-digits-v0", gold=letters, every=1, tasks=16, max_new_tokens=8, temperature=1.0,
                          echo=lines.append)  # fmt: skip
    result = train_grpo(GRPOConfig(**RUN), monitor=monitor)
    measured = [log.monitors for log in result.history if log.monitors]
    assert [log.step for log in result.history if log.monitors] == list(range(1, 11))
    assert all(set(m) == {"gold", "gold_proxy", "gold_drop", "proxy_gain", "overoptimised"} for m in measured)
    proxies = [p.proxy for p in monitor.points]
    assert proxies[-1] > proxies[0] + 0.1, proxies  # the policy learned its training reward
    check = monitor.divergence()
    assert check is not None and check.diverged, monitor.points
    assert measured[-1]["overoptimised"] == 1.0 and len(lines) == 1 and "over-optimisation" in lines[0]
    # The report draws gold beside the training reward.
    records = [
        MetricRecord("rl", log.step, 0.0, 0.0, flatten_metrics(log.as_dict())) for log in result.history
    ]
    chart = next(c for c in charts_for(records) if c.name == "overoptimisation")
    assert {s.label for s in chart.series} == {"gold", "gold_proxy", "overoptimised"}
    assert next(s for s in chart.series if s.label == "gold").steps == list(range(1, 11))


def test_a_reward_aligned_with_the_gold_score_is_not_flagged():
    monitor = GoldMonitor("toy-digits-v0", gold="component:digits", every=2, tasks=16, max_new_tokens=8,
                          temperature=1.0)  # fmt: skip
    train_grpo(GRPOConfig(**RUN), monitor=monitor)
    assert [p.step for p in monitor.points] == [1, 2, 4, 6, 8, 10]  # a baseline at step 1, then every 2
    golds = [p.gold for p in monitor.points]
    assert golds[-1] > golds[0], golds
    check = monitor.divergence()
    assert check is not None and not check.diverged, monitor.points


def test_every_measurement_plays_the_same_held_out_tasks():
    seen: list[list[Trajectory]] = []

    def record(trajectories):
        seen.append(list(trajectories))
        return 0.0

    monitor = GoldMonitor("toy-guess-v0", gold=record, every=1, tasks=3, max_new_tokens=4)
    train_grpo(
        GRPOConfig(**{**RUN, "env": "toy-guess-v0", "max_steps": 2, "prompts_per_step": 2}), monitor=monitor
    )
    assert len(seen) == 2 and [len(s) for s in seen] == [3, 3]
    first, second = ([t.meta["reset_seed"] for t in s] for s in seen)
    assert first == second and len(set(first)) == 3  # the same three tasks each time


def test_ppo_takes_the_same_rescore_and_monitor_hooks():
    from agentrl.data.buffer import with_final_reward
    from agentrl.learners.ppo import PPOConfig, train_ppo

    def plus_one(groups):
        return [g.replace(with_final_reward(t, "bonus", 1.0) for t in g) for g in groups]

    monitor = GoldMonitor("toy-digits-v0", gold="component:digits", every=1, tasks=4, max_new_tokens=8)
    result = train_ppo(PPOConfig(**{**RUN, "max_steps": 2}), rescore=plus_one, monitor=monitor)
    assert [p.step for p in monitor.points] == [1, 2]
    assert all(log.reward_components["bonus"] == pytest.approx(1.0) and "gold" in log.monitors for log in result.history)
