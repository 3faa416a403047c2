"""code-sandbox-v0 end to end: registration, the checkers, scripted episodes, tools, rewards, lifecycle."""

from __future__ import annotations

import asyncio
import os
import warnings

import gymnasium
import pytest
from _datasets import require_dataset
from _datasets import task as dataset_task
from agentrl_envs.code_sandbox import (
    CodeSandboxEnv,
    GradeConfig,
    demonstration,
    generate_tasks,
)

import agentrl
from agentrl.checker import check_env
from agentrl.errors import ConfigError
from agentrl.sandbox import SandboxLimits
from agentrl.tools import format_tool_calls, parse_tool_calls
from agentrl.types import ToolCall


def _call(name: str, code: str) -> str:
    return format_tool_calls([ToolCall(name, {"code": code})])


def _children() -> set[int]:
    pids: set[int] = set()
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def env():
    env = CodeSandboxEnv()
    yield env
    env.close()


def play_demonstration(env: CodeSandboxEnv, task, check: bool = True) -> list:
    """Replay the task's demonstration as a scripted policy; every env message must equal the demonstration's."""
    demo = demonstration(task, check=check)
    obs, info = env.reset(seed=0, options={"task": task})
    assert obs == demo[:2] and info["task_id"] == task.task_id
    steps, expected = [], demo[2:]
    for i, message in enumerate(expected):
        if message["role"] != "assistant":
            continue
        step = env.step(message["content"])
        steps.append(step)
        following = [m for m in expected[i + 1 :]]
        answer = following[: next((j for j, m in enumerate(following) if m["role"] == "assistant"), len(following))]
        if not step.terminated:
            assert step.observation == answer
    return steps


def test_registered_through_the_entry_point_group_and_gymnasium():
    assert "code-sandbox-v0" in {s.id for s in agentrl.list_envs()}
    env = agentrl.make("code-sandbox")
    assert isinstance(env.unwrapped, CodeSandboxEnv)
    env.close()
    genv = gymnasium.make("agentrl/code-sandbox-v0")
    obs, info = genv.reset(seed=0)
    assert obs[1]["role"] == "user" and {t["function"]["name"] for t in info["tools"]} == {"run_python", "submit"}
    genv.close()


def test_gymnasium_check_env_passes_on_the_bare_env(make):
    from gymnasium.utils.env_checker import check_env as gym_check_env

    env = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gym_check_env(env, skip_render_check=True)
    env.close()


def test_checker_with_a_scripted_solving_episode(make):
    task = generate_tasks(1, seed=11, config="sft")[0]
    env = make([task])
    actions = [m["content"] for m in demonstration(task) if m["role"] == "assistant"]
    assert check_env(env, actions=actions, make_env=lambda: make([task])) == [
        "types", "robustness", "seeding", "async", "outcome", "gymnasium", "close"]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_scripted_policy_solves_generated_tasks_with_the_demonstration(env, seed):
    task = generate_tasks(1, seed=seed, config="eval")[0]
    steps = play_demonstration(env, task)
    assert [s.terminated for s in steps] == [False, True]
    assert steps[0].info["reward_raw"]["runs"] == 1.0
    assert steps[-1].reward == 1.0 and steps[-1].info["grade"]["passed"] == 5
    assert env.last_grade is not None and env.last_grade.all_passed


@pytest.mark.parametrize("seed", [0, 1])
def test_a_demonstration_without_the_check_submits_in_one_turn(env, seed):
    task = generate_tasks(1, seed=seed, config="sft")[0]
    demo = demonstration(task, check=False)
    assert [m["role"] for m in demo] == ["system", "user", "assistant"]
    assert demo[2] == demonstration(task)[-1]  # the same submission the checked demonstration ends with
    steps = play_demonstration(env, task, check=False)
    assert len(steps) == 1 and steps[0].terminated and steps[0].reward == 1.0


def test_the_env_demonstrates_a_task_or_a_seed_under_its_own_system_prompt(make):
    env = make("sft", system_prompt="Write it.")
    task = generate_tasks(1, seed=4, config="sft")[0]
    assert env.demonstration(task, check=False) == demonstration(task, "Write it.", check=False)
    assert env.demonstration(7) == env.demonstration(7)  # a seed draws the same task every time
    drawn = env.demonstration(7)
    assert drawn[0] == {"role": "system", "content": "Write it."} and len(drawn) == 5
    listed = make([task])
    assert listed.demonstration(0) == demonstration(task)


@pytest.mark.parametrize("task_id", ["HumanEval/32", "MBPP/17"])
def test_scripted_policy_solves_real_humaneval_and_mbpp_items(env, task_id):
    task = dataset_task(task_id)
    steps = play_demonstration(env, task)
    assert len(steps) == 1 and steps[0].terminated and steps[0].reward == 1.0, steps[0].info
    assert steps[0].info["grade"]["total"] >= 3


def test_a_dataset_env_draws_its_tasks_by_seed_or_by_id(make):
    require_dataset("humaneval")
    env = make("humaneval")
    assert env.reset(seed=5)[1]["task_id"] == env.reset(seed=5)[1]["task_id"]
    assert env.reset(options={"task_id": "HumanEval/7"})[1]["task_id"] == "HumanEval/7"
    with pytest.raises(ConfigError, match="no task"):
        env.reset(options={"task_id": "HumanEval/999"})
    env.close()


def test_malformed_calls_are_observations_and_the_episode_goes_on(env):
    env.reset(seed=0)
    step = env.step('<tool_call>\n{"name": "run_python", "arguments": {"code": 1}}\n</tool_call>')
    assert not step.terminated and step.observation[0]["content"].startswith("Error:")
    assert step.info["reward_raw"]["format"] == -1.0
    step = env.step('<tool_call>\n{"name": "run_pyth')
    assert not step.terminated and "Error" in step.observation[0]["content"]
    step = env.step(_call("run_python", "print(6 * 7)"))
    assert step.observation[0]["content"] == "exit code: 0\nstdout:\n42"
    assert step.info["reward_raw"] == {"correct": 0.0, "format": 0.0, "runs": 1.0, "progress": 0.0}
    step = env.step("I am thinking.")
    assert step.truncated and not step.terminated and step.observation[0]["role"] == "user"
    with pytest.raises(RuntimeError, match="reset"):
        env.step("again")


def test_run_python_reports_errors_timeouts_and_truncates_output(make):
    env = make(sandbox_limits=SandboxLimits(wall_time=1.0, cpu_time=1.0), output_chars=50)
    env.reset(seed=0)
    calls = [ToolCall("run_python", {"code": code}) for code in
             ("raise ValueError('boom')", "while True: pass", "print('x' * 500)")]
    obs = env.step(format_tool_calls(calls)).observation
    assert obs[0]["content"].startswith("exit code: 1\nstderr:\n[") and obs[0]["content"].endswith("ValueError: boom")
    assert obs[1]["content"] == "exit code: timeout after 1 s"
    assert obs[2]["content"] == "exit code: 0\nstdout:\n" + "x" * 50 + "\n... [450 more characters]"
    assert [m["tool_call_id"] for m in obs] == ["call_0", "call_1", "call_2"]
    env.close()


def test_run_python_calls_beyond_the_per_turn_cap_are_error_observations_not_runs(make):
    env = make(max_runs=2)
    env.reset(seed=0)
    calls = [ToolCall("run_python", {"code": f"print({i})"}) for i in range(4)]
    step = env.step(format_tool_calls(calls))
    assert [m["content"] for m in step.observation[:2]] == ["exit code: 0\nstdout:\n0", "exit code: 0\nstdout:\n1"]
    for message in step.observation[2:]:
        assert message["role"] == "tool" and message["content"].startswith("Error: at most 2 run_python calls")
    assert [m["tool_call_id"] for m in step.observation] == ["call_0", "call_1", "call_2", "call_3"]
    assert not step.terminated and step.info["reward_raw"]["runs"] == 0.5
    assert env.step(_call("run_python", "print(5)")).observation[0]["content"] == "exit code: 0\nstdout:\n5"
    assert CodeSandboxEnv().max_runs == 4
    with pytest.raises(ConfigError, match="max_runs"):
        CodeSandboxEnv(max_runs=0)


def test_a_final_fenced_block_is_a_submission_and_the_format_gate_holds(env, make):
    task = generate_tasks(1, seed=4, config="rl")[0]
    env.reset(options={"task": task})
    step = env.step(f"Here it is:\n```python\n{task.reference}```")
    assert step.terminated and step.reward == 1.0
    env.reset(options={"task": task})
    step = env.step(_call("submit", task.reference) + "\nI hope this is right! Let me also")
    assert step.terminated and step.reward == 0.0 and step.info["grade"]["gated"]
    assert step.info["grade"]["passed"] == 5 and step.info["reward_raw"]["format"] == -1.0
    lenient = make(format_gate=False)
    lenient.reset(options={"task": task})
    assert lenient.step(_call("submit", task.reference) + "\nbye").reward == 1.0
    lenient.close()


def test_the_format_gate_covers_blocks_and_calls_after_the_submission(env):
    task = generate_tasks(1, seed=4, config="rl")[0]
    submit, run = _call("submit", task.reference), _call("run_python", "print(1)")
    for after in ("\n<tool_call>\nI hope this is right, and here is why\n</tool_call>", "\n" + run, run,
                  "\n" + _call("submit", task.reference)):
        env.reset(options={"task": task})
        step = env.step(submit + after)
        assert step.terminated and step.reward == 0.0 and step.info["grade"]["gated"], after
        assert step.info["grade"]["passed"] == 5
    env.reset(options={"task": task})  # a call before the submission is fine, also with a tag in the code
    tagged = _call("submit", task.reference + "# </tool_call> in a comment\n")
    assert env.step(run + "\n" + tagged).reward == 1.0


def test_weights_orm_modes_and_components_that_sum_to_the_reward(make):
    task = generate_tasks(1, seed=6, config="rl")[0]
    half = f"def solve(v):\n    return {task.tests.expected[0]!r} if v == {task.tests.calls[0].args[0]!r} else None\n"
    weights = {"correct": 2.0, "format": 0.5, "runs": 0.25, "progress": 1.0}
    env = make([task], weights=weights)
    env.reset(seed=0)
    first = env.step(_call("run_python", half))  # defines solve: graded for progress
    assert first.info["reward_raw"]["progress"] > 0 and first.info["reward_raw"]["runs"] == 1.0
    last = env.step(_call("submit", task.reference))
    for step in (first, last):
        parts = step.info["reward_components"]
        assert sum(parts.values()) == pytest.approx(step.reward)
        assert parts == {k: weights[k] * v for k, v in step.info["reward_raw"].items()}
    total_progress = first.info["reward_raw"]["progress"] + last.info["reward_raw"]["progress"]
    assert total_progress == pytest.approx(1.0)  # progress sums to the best share reached
    env.close()
    strict = make([task], orm="all_pass")
    strict.reset(seed=0)
    step = strict.step(_call("submit", half))
    assert step.info["grade"]["passed"] >= 1 and step.reward == 0.0
    strict.close()
    with pytest.raises(ConfigError, match="unknown reward component"):
        CodeSandboxEnv(weights={"speed": 1.0})
    with pytest.raises(ConfigError, match="orm"):
        CodeSandboxEnv(orm="mean")


def test_sandboxes_open_lazily_and_close_without_leaks(make):
    require_dataset("mbpp")
    before = _children()
    env = make("mbpp")
    env.reset(seed=0)
    assert env.sandboxes._boxes == {}  # nothing started for a reset
    task = env.unwrapped._episode.task
    env.step(_call("submit", task.reference))  # untrusted + trusted sandboxes
    assert len(env.sandboxes._boxes) == 2 and _children() - before
    env.close()
    env.close()
    assert not _children() - before


def test_async_api_and_aclose():
    async def episode():
        env = CodeSandboxEnv()
        _, info = await env.areset(seed=3)
        step = await env.astep(_call("run_python", "print('hi')"))
        await env.aclose()
        await env.aclose()
        return info, step

    info, step = asyncio.run(episode())
    assert info["split"] == "train" and step.observation[0]["content"] == "exit code: 0\nstdout:\nhi"


def test_the_demonstration_is_hermes_tool_calls_the_parser_reads_back():
    task = generate_tasks(1, seed=0, config="sft")[0]
    demo = demonstration(task)
    assert [m["role"] for m in demo] == ["system", "user", "assistant", "tool", "assistant"]
    run, submit = (parse_tool_calls(m["content"]).calls[0] for m in demo if m["role"] == "assistant")
    assert run.name == "run_python" and run.arguments["code"].startswith(task.reference.rstrip())
    assert submit.name == "submit" and submit.arguments["code"] == task.reference
    assert task.demonstrated


def test_grading_speed_is_milliseconds(env):
    task = generate_tasks(1, seed=9, config="rl")[0]
    env.reset(options={"task": task})
    env.step(_call("submit", task.reference))  # warm
    seconds = []
    for _ in range(5):
        env.reset(options={"task": task})
        env.step(_call("submit", task.reference))
        seconds.append(env.last_grade.seconds)
    assert sorted(seconds)[2] < 0.5  # one sandbox exec per submission; ~15 ms on an idle 2-core machine


def test_bad_configuration_is_named():
    with pytest.raises(ConfigError, match="max_turns"):
        CodeSandboxEnv(max_turns=0)
    with pytest.raises(ConfigError, match="tasks must be"):
        CodeSandboxEnv([1, 2])
    with pytest.raises(ConfigError, match="not found"):
        CodeSandboxEnv("no-such-file.jsonl")
    with pytest.raises(ConfigError, match="call_timeout"):
        GradeConfig(call_timeout=0)


def test_a_sandbox_that_cannot_run_ends_the_episode_as_an_error_not_a_zero_score(make):
    from agentrl.models.loading import load_tokenizer
    from agentrl.rollout.runner import Task, rollout
    from agentrl.sandbox import SandboxError
    from agentrl.testing import ScriptedPolicy
    from agentrl.types import StopReason

    broken = {"sandbox_options": {"bwrap": "/nonexistent/bwrap"}}
    env = make(**broken)
    # The probe the harness and agentrl train run before any model loads names the reason.
    async def probe(probed):
        try:
            await probed.aprobe()
        finally:
            await probed.aclose()  # on the probe's loop: its sandbox processes belong to it

    with pytest.raises(SandboxError, match="bubblewrap"):
        asyncio.run(probe(make(**broken)))
    asyncio.run(probe(make()))  # a working sandbox passes
    submission = [m for m in env.demonstration(0, check=False) if m["role"] == "assistant"][-1]["content"]
    env.reset(seed=0, options={"task": 0})
    with pytest.raises(SandboxError, match=r"could not be graded: the sandbox failed: .*bubblewrap"):
        env.step(submission)
    # Through the runner: data, not a crash, and never a reward a learner would train on.
    tokenizer = load_tokenizer("tiny")
    [group] = rollout(lambda: CodeSandboxEnv(**broken), ScriptedPolicy(tokenizer, submission), tokenizer,
                      [Task(0, {"task": 0})], group_size=2)  # fmt: skip
    assert all(t.stop_reason is StopReason.ERROR and "could not be graded" in t.error for t in group)
