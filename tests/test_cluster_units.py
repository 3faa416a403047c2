"""The cluster's pieces that need no Ray: settings, staleness and distribution figures, fault typing, the
per-turn versions of a ledger, the runner's one-episode entry point, and a single-process run importing no Ray."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from agentrl.cluster import faults, metrics
from agentrl.cluster.engine import _Gate
from agentrl.data.trajectory import Trajectory, TurnSpan
from agentrl.errors import ConfigError
from agentrl.learners.grpo import GRPOConfig
from agentrl.learners.rl import ASYNC_TIS_CAP
from agentrl.types import StopReason


def ledger(versions: list[int], reward: float = 1.0, meta: dict | None = None, **fields) -> Trajectory:
    ids, mask, turns = [1, 2], [0, 0], []
    for _ in versions:
        turns.append(TurnSpan(len(ids), len(ids) + 2, reward / len(versions)))
        ids += [3, 4, 5]
        mask += [1, 1, 0]
    return Trajectory(ids, [0.0] * len(ids), mask, turns, policy_version=min(versions),
                      meta={"turn_versions": versions, **(meta or {})}, **fields)  # fmt: skip


# ---- settings -----------------------------------------------------------------------------------------------
def test_max_staleness_needs_a_cluster_and_turns_truncated_is_on():
    with pytest.raises(ConfigError, match="runs on a cluster"):
        GRPOConfig(env="toy-digits-v0", max_staleness=1)
    config = GRPOConfig(env="toy-digits-v0", max_staleness=1, cluster={"env_workers": 2})
    assert config.tis_cap == pytest.approx(ASYNC_TIS_CAP) and config.cluster is not None
    assert GRPOConfig(env="toy-digits-v0", max_staleness=1, cluster={}, tis_cap=1.5).tis_cap == pytest.approx(
        1.5
    )
    assert GRPOConfig(env="toy-digits-v0", cluster={}).tis_cap is None  # synchronous: on-policy


def test_cluster_settings_are_checked_with_the_field_named():
    with pytest.raises(ConfigError, match="env_workers"):
        GRPOConfig(env="toy-digits-v0", cluster={"env_workers": 0})
    with pytest.raises(ConfigError, match="admission"):
        GRPOConfig(env="toy-digits-v0", cluster={"admission": "fifo"})


def test_the_run_config_carries_the_cluster_section_to_the_learner(tmp_path):
    from agentrl.pipeline.config import build_run_config, resolve

    run = build_run_config("toy-digits-v0", overrides=["cluster.env_workers=3", "cluster.engines=1",
                                                        "learner.max_staleness=1"])  # fmt: skip
    learner = resolve(run, tmp_path).learner
    assert learner.cluster.env_workers == 3 and learner.max_staleness == 1 and learner.tis_cap is not None
    assert resolve(build_run_config("toy-digits-v0"), tmp_path).learner.cluster is None


# ---- figures ------------------------------------------------------------------------------------------------
def test_staleness_counts_from_the_oldest_turn():
    trajectories = [ledger([3, 4]), ledger([4, 4]), ledger([2])]
    assert [metrics.staleness(t, 4) for t in trajectories] == [1, 0, 2]
    histogram = metrics.staleness_histogram(trajectories, 4)
    assert histogram["staleness/0"] == 1 and histogram["staleness/1"] == 1 and histogram["staleness/2"] == 1
    assert histogram["staleness_max"] == 2 and histogram["staleness_mean"] == pytest.approx(1.0)


def test_trained_and_sampled_distributions():
    out = metrics.distribution("trained", [ledger([0], reward=1.0), ledger([0, 0, 0], reward=0.0)])
    assert out == pytest.approx({"trained/length": 4.0, "trained/turns": 2.0, "trained/reward": 0.5})
    assert metrics.distribution("sampled", []) == {}


def test_busy_share_is_the_busy_time_over_the_window():
    assert metrics.busy_share({0: 3.0, 1: 1.0}, {0: 1.0}, 4.0) == pytest.approx((0.5 + 0.25) / 2)
    assert metrics.busy_share({}, {}, 4.0) == 0.0
    clock = metrics.BusyClock()
    clock.start()
    clock.start()
    time.sleep(0.02)
    clock.stop()
    assert clock.active == 1 and clock.busy_s >= 0.02
    clock.stop()
    frozen = clock.busy_s
    time.sleep(0.01)
    assert clock.busy_s == pytest.approx(frozen)


# ---- faults and ledgers -------------------------------------------------------------------------------------
def test_only_the_infrastructure_failures_are_typed_as_such():
    def failed(error: str) -> Trajectory:
        return ledger([0], stop_reason=StopReason.ERROR, error=error)

    assert faults.classify(failed("SandboxError: the sandbox was lost twice")) is faults.Infra.SANDBOX_LOST
    assert faults.classify(failed("EngineUnavailable: no engine answered")) is faults.Infra.ENGINE_LOST
    assert faults.classify(failed("RayTaskError(EngineUnavailable): no engine")) is faults.Infra.ENGINE_LOST
    assert faults.classify(failed("RuntimeError: the reply mentions SandboxError")) is None
    assert faults.classify(failed("ValueError: the env returned a non-finite reward")) is None
    assert faults.classify(ledger([0])) is None


def test_turn_versions_fall_back_to_the_policy_version():
    assert ledger([2, 3]).turn_versions == (2, 3)
    plain = Trajectory((1, 2), (0.0, 0.0), (0, 1), (TurnSpan(1, 2),), policy_version=5)
    assert plain.turn_versions == (5,)
    assert Trajectory.from_json(ledger([1, 2]).to_json()).turn_versions == (1, 2)


def test_the_runner_plays_one_episode_as_its_run_would():
    from agentrl.models.loading import load_model, load_tokenizer
    from agentrl.rollout.hf import HFPolicy
    from agentrl.rollout.policy import SamplingParams
    from agentrl.rollout.runner import Runner, Task

    model, tokenizer = load_model("tiny"), load_tokenizer("tiny")

    async def main() -> tuple[list[Trajectory], Trajectory]:
        runner = Runner("toy-echo-v0", HFPolicy(model, tokenizer, seed=0), tokenizer,
                        sampling=SamplingParams(max_tokens=6), seed=3)  # fmt: skip
        groups = await runner.run(2, 2, call=4)
        one = await runner.play(Task(), call=4, task_index=1, sample_index=1)
        await runner.aclose()
        return list(groups[1]), one

    group, one = asyncio.run(main())
    assert one.token_ids == group[1].token_ids and one.meta["reset_seed"] == group[1].meta["reset_seed"]
    assert one.meta["turn_versions"] == [0] * len(one.turns)


def test_a_weight_switch_waits_for_the_requests_in_flight_and_holds_new_ones():
    async def main() -> list[str]:
        gate, events = _Gate(), []

        async def request(name: str, delay: float) -> None:
            async with gate.shared():
                events.append(f"{name}+")
                await asyncio.sleep(delay)
                events.append(f"{name}-")

        async def switch() -> None:
            await asyncio.sleep(0.01)
            async with gate.exclusive():
                events.append("switch")
                await asyncio.sleep(0.02)

        async def late() -> None:
            await asyncio.sleep(0.02)
            await request("late", 0.0)

        await asyncio.gather(request("a", 0.05), switch(), late())
        return events

    assert asyncio.run(main()) == ["a+", "a-", "switch", "late+", "late-"]


def test_a_single_process_run_imports_no_ray():
    code = ("import sys; from agentrl.learners.grpo import GRPOConfig, train_grpo; "
            "train_grpo(GRPOConfig(env='toy-digits-v0', prompts_per_step=1, group_size=2, max_new_tokens=4, "
            "max_steps=1, warmup_steps=0)); print('ray' in sys.modules)")  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_the_router_picks_the_least_loaded_engine_and_keeps_an_episode_on_it():
    from agentrl.cluster.engine import Router

    router = Router(["engine-0", "engine-1", "engine-2"])
    router.outstanding = [2, 0, 1]
    assert router._pick("a", []) == 1  # fewest outstanding
    router.outstanding = [0, 5, 0]
    assert router._pick("a", []) == 1  # pinned: its later turns stay where its prefix is cached
    assert router._pick("b", []) == 0
    assert router._pick("a", [1]) == 0 and router.pinned["a"] == 0  # its engine failed: re-pinned elsewhere
    router.release("a")
    assert "a" not in router.pinned


class _Method:
    """An actor method's ``.remote``: a coroutine answering ``fn`` (what awaiting a Ray ObjectRef gives)."""

    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        async def call():
            return self.fn(*args)

        return call()


class _Handle:
    """An engine handle for the router's logic: ``load`` and ``score``, or a dead actor's error."""

    def __init__(self, logprob: float, error: Exception | None = None):
        def answer(value):
            if error is not None:
                raise error
            return value

        self.load = _Method(lambda weights, version: answer(version))
        self.score = _Method(lambda rows: answer([[logprob] * (len(r) - 1) for r in rows]))


def test_the_identity_check_skips_a_dead_or_restarting_engine_instead_of_failing_the_run():
    """A killed engine is restarted and gets the latest weights before it serves; the check after a sync must
    not stop the run meanwhile (the next sync's check scores it). The real kill runs in test_cluster.py."""
    ray = pytest.importorskip("ray")
    from agentrl.cluster.engine import Router

    restarting = ray.exceptions.ActorUnavailableError("The actor is restarting", b"\0" * 16)
    router = Router([_Handle(-1.0), _Handle(-2.0, restarting), _Handle(-3.0, ray.exceptions.RayActorError())])

    async def check():
        await router.set_weights(["weights"], 1)
        return await router.score_engines([[5, 6, 7]])

    assert asyncio.run(check()) == [[[-1.0, -1.0]], None, None]
    assert router.versions == [1, -1, -1]  # the two get the weights again before they next serve
