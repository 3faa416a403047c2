"""The Env contract: sync-only and async-only envs work both ways; spaces; close; wrappers."""

from __future__ import annotations

import asyncio
import threading

import pytest

from agentrl import ChatSpace, Env, ResetResult, StepResult, TextSpace, Wrapper
from agentrl.testing import EchoEnv, GuessEnv


def test_sync_only_env_runs_through_async_twins():
    env = EchoEnv(rounds=2)

    async def play():
        obs, info = await env.areset(seed=3)
        first = await env.astep("wrong")
        return obs, info, first

    obs, info, first = asyncio.run(play())
    sync_obs, _ = env.reset(seed=3)
    assert obs == sync_obs
    assert info == {"tools": []}
    assert isinstance(first, StepResult) and first.reward == 0.0 and not first.terminated
    env.close()


def test_async_only_env_runs_through_sync_methods_even_inside_a_running_loop():
    env = GuessEnv(high=10)
    obs, info = env.reset(seed=1)
    assert [m["role"] for m in obs] == ["system", "user"]
    assert info["tools"][0]["function"]["name"] == "guess"

    async def inside_loop():  # sync calls from async code must not deadlock or fail
        return env.step('<tool_call>\n{"name": "guess", "arguments": {"number": 5}}\n</tool_call>')

    result = asyncio.run(inside_loop())
    assert result.observation[0]["role"] == "tool"
    assert result.observation[0]["content"] in {"higher", "lower", "correct"}
    env.close()
    env.close()


def test_async_env_finds_the_number_by_bisection_and_rewards_the_outcome():
    env = GuessEnv(high=100, max_turns=8)
    env.reset(seed=7)
    low, high, rewards = 1, 100, []
    for _ in range(8):
        mid = (low + high) // 2
        r = env.step(f'<tool_call>\n{{"name": "guess", "arguments": {{"number": {mid}}}}}\n</tool_call>')
        rewards.append(r.reward)
        answer = r.observation[0]["content"]
        if answer == "correct":
            break
        low, high = (mid + 1, high) if answer == "higher" else (low, mid - 1)
    assert r.terminated and not r.truncated
    assert r.info["reward_components"] == {"solved": 1.0, "format": 0.0}
    assert rewards[:-1] == [0.0] * (len(rewards) - 1)
    env.close()


def test_bad_tool_calls_become_observations_and_cost_the_format_reward():
    env = GuessEnv(high=10, max_turns=3)
    env.reset(seed=0)
    result = env.step('<tool_call>\n{"name": "guess", "arguments": {"number": "five"}}\n</tool_call>')
    assert result.observation[0]["role"] == "tool"
    assert "number" in result.observation[0]["content"]
    assert result.reward == pytest.approx(-0.1)
    result = env.step("<tool_call>\n{\"name\": ")
    assert result.observation and result.reward == pytest.approx(-0.1)
    result = env.step("I give up")
    assert result.truncated and not result.terminated  # the env's own turn limit
    env.close()


def test_an_env_implementing_neither_pair_says_so():
    class Empty(Env):
        pass

    with pytest.raises(NotImplementedError, match="step"):
        Empty().step("x")


def test_async_env_keeps_one_loop_across_calls():
    loops = []

    class LoopBound(Env):
        async def areset(self, *, seed=None, options=None):
            await super().areset(seed=seed)
            loops.append(asyncio.get_running_loop())
            return ResetResult([{"role": "user", "content": "hi"}], {"tools": []})

        async def astep(self, action):
            loops.append(asyncio.get_running_loop())
            return StepResult([], 0.0, True, False, {"reward_components": {}})

    env = LoopBound()
    env.reset(seed=0)
    env.step("x")
    assert loops[0] is loops[1]
    env.close()
    assert not any(t.name == "agentrl-env-loop" and t.is_alive() for t in threading.enumerate()), [(t.name, t.ident) for t in threading.enumerate()]


def test_spaces_contain_what_envs_return_and_reject_the_rest():
    text, chat = TextSpace(max_length=5), ChatSpace()
    assert text.contains("héllo") and not text.contains("toolong") and not text.contains(3)
    assert chat.contains([{"role": "tool", "content": "x"}]) and chat.contains([])
    assert not chat.contains([{"role": "robot", "content": "x"}])
    assert not chat.contains([{"role": "user", "content": None}])
    chat.seed(0)
    assert chat.contains(chat.sample())
    text.seed(0)
    sample = text.sample()
    assert isinstance(sample, str) and text.contains(sample)


def test_wrapper_forwards_async_twins():
    class Shout(Wrapper):
        async def astep(self, action):
            return await self.env.astep(action.lower())

    env = Shout(EchoEnv(rounds=1))
    obs, _ = asyncio.run(env.areset(seed=0))
    word = obs[-1]["content"].removeprefix("Say: ")
    result = asyncio.run(env.astep(word.upper()))
    assert result.reward == 1.0 and result.terminated
    asyncio.run(env.aclose())


def test_an_async_env_dropped_without_close_stops_its_loop_thread():
    import gc

    env = GuessEnv()
    env.reset(seed=0)
    thread = env._bridge.thread
    del env
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()
