"""Rollouts on a real local Ray instance (2 CPUs; every actor its own process): the synchronous cluster run plays
exactly what the single-process run plays, the asynchronous one learns as well and never trains a sample staler
than ``max_staleness`` (read from the ledgers' per-turn versions), and a killed env worker or engine loses no
episode and counts none twice."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pytest

from agentrl.data.buffer import TrajectoryGroup
from agentrl.data.trajectory import Trajectory
from agentrl.learners.grpo import GRPOConfig, train_grpo
from agentrl.types import StopReason

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread", "local_ray")]

DIGITS = {"env": "toy-digits-v0", "prompts_per_step": 4, "group_size": 8, "max_new_tokens": 16, "warmup_steps": 0,
          "lr": 2e-2, "seed": 0}  # fmt: skip
LATENCY = {"env": "bench-latency-v0", "env_kwargs": {"turns": 2, "p50_s": 0.15, "p99_s": 0.6}, "prompts_per_step": 4,
           "group_size": 4, "max_new_tokens": 8, "warmup_steps": 0, "lr": 1e-2, "seed": 0}  # fmt: skip
CLUSTER = {"env_workers": 2, "engines": 1, "setup": ["agentrl.bench.async_env"]}


class Played:
    """What each step handed the learner (the ``on_rollout`` hook) and its step logs."""

    def __init__(self) -> None:
        self.steps: dict[int, list[Trajectory]] = {}
        self.logs: list = []

    def on_rollout(self, step: int, groups: Sequence[TrajectoryGroup]) -> None:
        self.steps[step] = [t for g in groups for t in g]

    def on_step(self, log) -> None:
        self.logs.append(log)


def train(played: Played, **fields) -> list:
    return list(
        train_grpo(GRPOConfig(**fields), on_step=played.on_step, on_rollout=played.on_rollout).history
    )


def assert_within_staleness(played: Played, bound: int) -> Counter[int]:
    """Every trained sample's oldest turn is at most ``bound`` versions behind the weights that trained it
    (step ``s`` trains with version ``s - 1``: one weight sync per step, none before the first)."""
    seen: Counter[int] = Counter()
    for step, trajectories in played.steps.items():
        for t in trajectories:
            assert len(t.turn_versions) == len(t.turns) and min(t.turn_versions) == t.policy_version
            seen[step - 1 - t.policy_version] += 1
    assert max(seen) <= bound and min(seen) >= 0, seen
    return seen


def assert_each_episode_once(played: Played, steps: int, tasks: int, group: int) -> None:
    keys = [
        (t.meta["call"], t.meta["task_index"], t.meta["sample_index"])
        for ts in played.steps.values()
        for t in ts
    ]
    assert len(keys) == len(set(keys)) == steps * tasks * group
    assert all(t.stop_reason is not StopReason.ERROR for ts in played.steps.values() for t in ts)


def kill_later(name_part: str, delay_s: float) -> threading.Thread:
    """Kill (Ray may restart it) the first live actor whose name holds ``name_part``, ``delay_s`` from now."""

    def kill() -> None:
        time.sleep(delay_s)
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if name_part in a["name"]]
        ray.kill(ray.get_actor(names[0]), no_restart=False)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


# ---- synchronous: the same samples as one process -----------------------------------------------------------
def test_a_synchronous_cluster_run_plays_what_the_single_process_run_plays():
    single, cluster = Played(), Played()
    train(single, **DIGITS, max_steps=2)
    history = train(cluster, **DIGITS, max_steps=2, cluster=CLUSTER)
    for step in (1, 2):  # seeded per request: the same tokens, whichever engine and batch sampled them
        assert [t.token_ids for t in cluster.steps[step]] == [t.token_ids for t in single.steps[step]]
        for ours, theirs in zip(cluster.steps[step], single.steps[step], strict=True):
            np.testing.assert_allclose(ours.logprobs, theirs.logprobs, atol=1e-4)
    assert assert_within_staleness(cluster, 0) == Counter({0: 64})
    assert history[-1].cluster["settled"] == 64 and history[-1].cluster["staleness_max"] == 0


# ---- asynchronous: learns, and within the bound -------------------------------------------------------------
def test_asynchronous_training_with_staleness_1_reaches_the_synchronous_reward():
    sync, async_ = Played(), Played()
    steps = 10
    sync_history = train(sync, **DIGITS, max_steps=steps)
    async_history = train(async_, **DIGITS, max_steps=steps, cluster=CLUSTER, max_staleness=1)
    sync_last = np.mean([log.reward_mean for log in sync_history[-3:]])
    async_last = np.mean([log.reward_mean for log in async_history[-3:]])
    assert sync_last > 0.5, [round(log.reward_mean, 3) for log in sync_history]
    assert async_last > 0.5 and abs(async_last - sync_last) < 0.3, (sync_last, async_last)
    seen = assert_within_staleness(async_, 1)
    # It did overlap: after the first steps samples are one version old (on a loaded machine a few start late
    # enough to be fresh, so not every one of them).
    assert seen[1] >= (steps // 2) * 32, seen
    assert all(log.cluster["staleness_max"] <= 1 for log in async_history)
    assert all(log.update.get("ratio") is not None for log in async_history)  # the IS-corrected update ran


def test_the_dropping_mode_never_trains_past_the_bound_and_counts_what_it_dropped():
    played = Played()
    history = train(played, **LATENCY, max_steps=3, cluster={**CLUSTER, "admission": "drop"}, max_staleness=0)
    assert_within_staleness(played, 0)
    assert all(len(ts) == 16 for ts in played.steps.values())
    assert (
        history[-1].cluster["dropped_groups"] >= 1
    )  # bound 0: a group still playing when weights move is stale


# ---- faults ---------------------------------------------------------------------------------------------------
def test_a_killed_env_worker_loses_no_episode_and_counts_none_twice():
    played = Played()
    killer = None

    def on_rollout(step: int, groups: Sequence[TrajectoryGroup]) -> None:
        nonlocal killer
        played.on_rollout(step, groups)
        if step == 1:  # call 2 plays now (staleness 1): kill a worker in the middle of it
            killer = kill_later("env-worker-0", 0.2)

    config = GRPOConfig(**LATENCY, max_steps=3, cluster=CLUSTER, max_staleness=1)
    history = train_grpo(config, on_step=played.on_step, on_rollout=on_rollout).history
    assert killer is not None
    killer.join()
    last = history[-1].cluster
    assert last["worker_lost"] >= 1 and last["replayed"] >= 1 and last.get("lost", 0) == 0
    assert_each_episode_once(played, 3, 4, 4)
    assert last["settled"] >= 48 and last.get("duplicates", 0) == 0
    replayed = [t for ts in played.steps.values() for t in ts if t.meta.get("replays")]
    assert replayed  # the replays reached the learner, marked
    assert_within_staleness(played, 1)


def test_a_killed_engine_loses_no_episode_and_its_replacement_gets_the_weights():
    played = Played()
    killer = None

    def on_rollout(step: int, groups: Sequence[TrajectoryGroup]) -> None:
        nonlocal killer
        played.on_rollout(step, groups)
        if step == 1:
            killer = kill_later("engine-0", 0.1)

    config = GRPOConfig(**LATENCY, max_steps=3, cluster={**CLUSTER, "engines": 2}, max_staleness=1)
    history = train_grpo(config, on_step=played.on_step, on_rollout=on_rollout).history
    assert killer is not None
    killer.join()
    last = history[-1].cluster
    assert last["engine_lost"] >= 1 and last.get("lost", 0) == 0
    assert_each_episode_once(played, 3, 4, 4)
    assert_within_staleness(played, 1)  # a restarted engine never answered with old (or no) weights
