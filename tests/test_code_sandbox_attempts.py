"""code-sandbox with several submissions: public-test feedback, hidden-test rewards, recovery demonstrations."""

from __future__ import annotations

import asyncio
import dataclasses
import re

import numpy as np
import pytest
from agentrl_envs.code_sandbox import CodeSandboxEnv, generate_tasks
from agentrl_envs.code_sandbox.generator import DOMAINS, PRESETS, generate_task
from agentrl_envs.code_sandbox.slips import SLIPS, slipped

from agentrl.errors import ConfigError
from agentrl.tools import format_tool_calls
from agentrl.types import ToolCall


def _submit(code: str) -> str:
    return format_tool_calls([ToolCall("submit", {"code": code})])


def _run(code: str) -> str:
    return format_tool_calls([ToolCall("run_python", {"code": code})])


def _task(seed: int = 3):
    return generate_tasks(1, seed, "rl")[0]


def _inputs(tests) -> list[str]:
    return [repr(call.args[0]) for call in tests.calls]


def test_public_tests_never_share_an_input_with_the_hidden_tests_and_change_no_other_draw():
    with_public = generate_tasks(300, 7, "eval")
    without = generate_tasks(300, 7, dataclasses.replace(PRESETS["eval"], public_tests=0))
    assert [t.task_id for t in with_public] == [t.task_id for t in without]
    assert [t.tests for t in with_public] == [t.tests for t in without]
    assert all(t.feedback is None for t in without)
    for task in with_public:
        assert task.feedback is not None and len(task.feedback.calls) == 3
        hidden = set(_inputs(task.tests)) | {repr(task.example.args[0])}
        assert not hidden & set(_inputs(task.feedback)), task.task_id


def test_a_failed_submission_shows_a_public_failure_and_the_final_submission_alone_is_scored(make):
    env = make(attempts=3, max_turns=3)
    task = _task()
    env.reset(options={"task": task})
    wrong = f"def {task.entry_point}(x):\n    return 12345\n"
    first = env.step(_submit(wrong))
    assert not first.terminated and not first.truncated
    assert first.reward == 0.0 and first.info["reward_raw"]["correct"] == 0.0
    text = first.observation[-1]["content"]
    assert "returned 12345, expected" in text and "(2 left)" in text
    shown = re.search(r"solve\((.*)\) returned", text).group(1)
    assert shown in _inputs(task.feedback) and shown not in _inputs(task.tests)
    assert first.info["turn_metrics"] == {"attempt": 1.0, "attempt_passed": 0.0, "tool_calls": 1.0, "tool_errors": 0.0}
    assert "grade" not in first.info  # turned back by a public test: never run on the hidden ones
    second = env.step(_submit(task.reference))
    assert second.terminated and second.reward == 1.0
    assert "5/5 hidden tests passed" in second.observation[-1]["content"]
    assert second.info["turn_metrics"]["attempt_passed"] == 1.0 and second.info["attempt"] == 2


def test_a_program_that_does_not_load_is_told_why(make):
    env = make(attempts=2, max_turns=2)
    env.reset(options={"task": _task()})
    text = env.step(_submit("def solve(x):\n    return (\n")).observation[-1]["content"]
    assert text.startswith("Submitted: not yet correct. the program failed to load: ") and "SyntaxError" in text


def test_the_last_attempt_is_final_and_a_truncated_episode_keeps_its_last_submission(make):
    env = make(attempts=2, max_turns=3)
    task = _task()
    env.reset(options={"task": task})
    assert not env.step(_submit("def solve(x):\n    return None\n")).terminated
    last = env.step(_submit("def solve(x):\n    return None\n"))
    assert last.terminated and "hidden tests passed" in last.observation[-1]["content"]

    env = make(attempts=3, max_turns=2)
    env.reset(options={"task": task})
    env.step(_submit("def solve(x):\n    return 0\n"))  # fails a public test: one more turn
    ended = env.step(_run("print(1)"))  # no submission in the last turn: truncated
    assert ended.truncated and not ended.terminated
    assert ended.info["reward_raw"]["correct"] == pytest.approx(env.last_grade.share)


def test_a_submission_that_passes_the_public_tests_is_final_even_when_hidden_tests_fail(make):
    env = make(attempts=3, max_turns=3)
    task = _task()
    table = {repr(c.args[0]): v for c, v in zip(task.feedback.calls, task.feedback.expected, strict=True)}
    # Right on the public inputs only: the episode ends (it looked right) and the hidden tests score it.
    code = f"TABLE = {table!r}\ndef solve(x):\n    return TABLE.get(repr(x))\n"
    env.reset(options={"task": task})
    step = env.step(_submit(code))
    assert step.terminated
    assert step.info["grade"]["passed"] < step.info["grade"]["total"]
    assert step.info["turn_metrics"]["attempt_passed"] == 0.0


def test_what_a_program_saw_under_the_hidden_tests_never_reaches_the_agent(make):
    """A program that stores every input it is called with (work dir and /tmp) and prints or returns them
    later: neither run_python nor the public-test feedback can show a hidden input."""
    env = make(attempts=3, max_turns=3)
    task = _task()
    spy = (
        "import os\n"
        "def _store(x):\n"
        "    for path in ('seen.txt', '/tmp/seen.txt'):\n"
        "        try:\n"
        "            with open(path, 'a') as f:\n"
        "                f.write(repr(x) + '|')\n"
        "        except OSError:\n"
        "            pass\n"
        "def _seen():\n"
        "    out = ''\n"
        "    for path in ('seen.txt', '/tmp/seen.txt'):\n"
        "        try:\n"
        "            out += open(path).read()\n"
        "        except OSError:\n"
        "            pass\n"
        "    return out\n"
        "def solve(x):\n"
        "    _store(x)\n"
        "    return _seen()\n"
    )
    env.reset(options={"task": task})
    shown = [m["content"] for m in env.step(_submit(spy)).observation]
    shown += [m["content"] for m in env.step(_run(spy + "print(_seen())\n")).observation]
    hidden = [h for h in _inputs(task.tests) if h not in _inputs(task.feedback) and len(h) > 2]
    assert hidden, "the task should have distinctive hidden inputs"
    for text in shown:
        for value in hidden:
            assert value not in text, (value, text)


def test_without_public_tests_the_feedback_is_the_hidden_count_only(make):
    task = dataclasses.replace(_task(), feedback=None)
    env = make(attempts=2, max_turns=2)
    env.reset(options={"task": task})
    text = env.step(_submit("def solve(x):\n    return 0\n")).observation[-1]["content"]
    assert re.search(r"\d/5 hidden tests passed\. Fix it and submit again \(1 left\)", text), text
    assert "solve(" not in text


def test_one_attempt_keeps_the_single_submission_episode(make):
    env = make()
    env.reset(options={"task": _task()})
    step = env.step(_submit("def solve(x):\n    return 0\n"))
    assert step.terminated and "hidden tests passed" in step.observation[-1]["content"]
    with pytest.raises(ConfigError, match="attempts must be a positive integer"):
        CodeSandboxEnv(attempts=0)
    with pytest.raises(ConfigError, match="recovery demonstrations need attempts > 1"):
        env.demonstration(0, check=False, recover=0.5)


def test_every_slip_is_a_line_of_the_generator_and_differs_from_it():
    lines = {c.code for d in DOMAINS for c in (*d.steps, *d.finals)}
    assert set(SLIPS) <= lines, set(SLIPS) - lines
    assert all(SLIPS[k] != k for k in SLIPS)


@pytest.mark.parametrize("answer", ["tool", "fenced"])
def test_recovery_demonstrations_replay_exactly_as_the_env_plays_them(make, answer):
    env = make("sft", attempts=3, max_turns=3, answer=answer)
    recovered = 0

    async def replay(seed: int) -> None:
        nonlocal recovered
        demo = env.demonstration(seed, check=False, recover=0.5)
        said = [m for m in demo if m["role"] == "assistant"]
        assert all(m.get("weight", 1) == 1 for m in said[1:])
        if len(said) > 1:
            recovered += 1
            assert said[0]["weight"] == 0
        fenced = [m["content"].startswith("```python\n") and m["content"].endswith("\n```") for m in said]
        assert all(fenced) if answer == "fenced" else not any(fenced)
        opening, _ = await env.areset(options={"task": seed})
        played = list(opening)
        for message in said:
            step = await env.astep(message["content"])
            played += [{k: v for k, v in message.items() if k != "weight"}, *step.observation]
        assert step.terminated and step.info["reward_raw"]["correct"] == 1.0
        assert played[: len(demo)] == [{k: v for k, v in m.items() if k != "weight"} for m in demo]

    async def all_of_them() -> None:
        try:
            for seed in range(40):
                await replay(seed)
        finally:
            await env.aclose()  # on this loop: its sandboxes' processes belong to it

    asyncio.run(all_of_them())
    assert 10 <= recovered <= 30  # about half, by a hash of the task id


def test_slips_are_caught_by_the_public_tests_for_most_training_tasks():
    tasks = [generate_task(PRESETS["sft"], np.random.default_rng(s)) for s in range(200)]
    caught = [slipped(t) for t in tasks]
    assert sum(s is not None for s in caught) >= 150
    for task, slip in zip(tasks, caught, strict=True):
        if slip is not None:
            assert slip.program != task.reference and repr(slip.got) != repr(slip.expected)
    assert slipped(dataclasses.replace(tasks[0], feedback=None)) is None


def test_tasks_can_be_a_preset_with_fields_changed_and_bad_ones_are_named(make):
    env = make({"preset": "rl", "alt_share": 0.5, "depths": [1]})
    assert env.source == dataclasses.replace(PRESETS["rl"], alt_share=0.5, depths=(1,))
    with pytest.raises(ConfigError, match=r"\['alt_shar'\] are not GeneratorConfig fields"):
        CodeSandboxEnv({"preset": "rl", "alt_shar": 0.5})
    with pytest.raises(ConfigError, match="unknown preset 'rll'"):
        CodeSandboxEnv({"preset": "rll"})


def test_with_several_attempts_the_submit_tool_says_a_failure_comes_back(make):
    (one,) = [t for t in make().tool_schemas() if t["function"]["name"] == "submit"]
    (several,) = [t for t in make(attempts=2).tool_schemas() if t["function"]["name"] == "submit"]
    assert "episode ends" in one["function"]["description"]
    assert "submit again" in several["function"]["description"]
    assert one["function"]["parameters"] == several["function"]["parameters"]


def test_fenced_answers_list_run_python_only_and_speak_of_the_block(make):
    env = make(attempts=2, answer="fenced")
    assert [t["function"]["name"] for t in env.tool_schemas()] == ["run_python"]
    assert "```python block" in env.system_prompt and "submit tool" not in env.system_prompt
    task = _task()

    async def play() -> list:
        try:
            await env.areset(options={"task": task})
            nudged = await env.astep("I would reverse it.")
            gated = await env.astep(f"```python\n{task.reference}\n```\nDone!")
            return [nudged, gated]
        finally:
            await env.aclose()

    nudged, gated = asyncio.run(play())
    assert "```python block" in nudged.observation[0]["content"] and nudged.info["reward_raw"]["format"] == -1.0
    assert "closing ```" in gated.observation[0]["content"] and gated.reward == 0.0
    with pytest.raises(ConfigError, match=r"answer must be 'tool'.*or 'fenced'.*got 'xml'"):
        CodeSandboxEnv(answer="xml")
