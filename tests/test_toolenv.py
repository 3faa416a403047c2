"""ToolEnv: sync and async tools, failures as observations, timeouts, turn limits, rewards, the checkers."""

from __future__ import annotations

import asyncio
import threading
import time

import gymnasium
import pytest

import agentrl
from agentrl.checker import check_env
from agentrl.errors import ConfigError
from agentrl.rewards import RewardResult, compose
from agentrl.toolenv import Task, ToolEnv, Turn
from agentrl.tools import format_tool_calls, tool
from agentrl.types import ToolCall

CANCELLED = threading.Event()


def add(a: int, b: int) -> int:
    """Add two whole numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


async def multiply(a: int, b: int) -> int:
    """Multiply two whole numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    await asyncio.sleep(0)
    return a * b


def divide(a: float, b: float) -> float:
    """Divide a by b.

    Args:
        a: The dividend.
        b: The divisor.
    """
    return a / b


def stuck() -> str:
    """A sync tool that never answers in time."""
    time.sleep(2.0)
    return "too late"


async def stuck_async() -> str:
    """An async tool that never answers in time."""
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        CANCELLED.set()
        raise
    return "too late"


TASKS = [Task("What is 6 * 7?", answer="42", id="mul"), Task("What is 17 + 25?", answer="42", id="add")]


def exact(task, answer):
    return float(answer == task.answer)


def call(name: str, **arguments) -> str:
    return format_tool_calls([ToolCall(name, arguments)])


@pytest.fixture
def env():
    e = ToolEnv([add, multiply, divide, stuck, stuck_async], TASKS, exact, tool_timeout=0.3, max_turns=4)
    yield e
    e.close()


def assert_components_sum(result):
    assert result.reward == pytest.approx(sum(result.info["reward_components"].values()))


# ---------------------------------------------------------------------------------------------- tools


def test_the_opening_carries_the_prompt_and_the_tool_schemas(env):
    obs, info = env.reset(seed=0, options={"task": "add"})
    assert [m["role"] for m in obs] == ["system", "user"]
    assert obs[1]["content"] == "What is 17 + 25?" and "<answer>" in obs[0]["content"]
    assert [t["function"]["name"] for t in info["tools"]] == ["add", "multiply", "divide", "stuck", "stuck_async"]
    assert info["tools"][0]["function"]["parameters"]["properties"]["a"] == {
        "type": "integer", "description": "The first number."
    }
    assert info["task_id"] == "add"


def test_sync_and_async_tools_answer_and_the_episode_ends_with_the_answer(env):
    env.reset(seed=0, options={"task": "mul"})
    result = env.step(call("multiply", a=6, b=7) + "\n" + call("add", a=40, b=2))
    assert [(m["role"], m["name"], m["content"]) for m in result.observation] == [
        ("tool", "multiply", "42"), ("tool", "add", "42")
    ]
    assert [m["tool_call_id"] for m in result.observation] == ["call_0", "call_1"]
    assert (result.reward, result.terminated, result.truncated) == (0.0, False, False)
    final = env.step("It is <answer>42</answer>.")
    assert (final.observation, final.reward, final.terminated, final.truncated) == ([], 1.0, True, False)
    assert final.info["answer"] == "42" and final.info["reward_components"] == {"outcome": 1.0}
    with pytest.raises(RuntimeError, match="call reset"):
        env.step("more")


def test_a_wrong_answer_scores_zero(env):
    env.reset(seed=0)
    assert env.step("<answer>41</answer>").reward == 0.0


def test_a_tool_that_raises_is_an_error_observation_and_the_episode_goes_on(env):
    env.reset(seed=0, options={"task": "mul"})
    result = env.step(call("divide", a=1, b=0))
    assert result.observation[0]["content"] == "Error: ZeroDivisionError: float division by zero"
    assert not (result.terminated or result.truncated)
    assert env.step(call("divide", a=84, b=2)).observation[0]["content"] == "42.0"
    assert env.step("<answer>42</answer>").reward == 1.0


@pytest.mark.parametrize("name", ["stuck", "stuck_async"])
def test_a_tool_that_hangs_times_out_and_the_episode_goes_on(env, name):
    CANCELLED.clear()
    env.reset(seed=0)
    started = time.perf_counter()
    result = env.step(call(name) + call("add", a=1, b=2))
    elapsed = time.perf_counter() - started
    assert result.observation[0]["content"] == f"Error: TimeoutError: tool {name!r} did not finish within 0.3 s"
    assert result.observation[1]["content"] == "3"
    assert 0.3 <= elapsed < 1.5
    assert not (result.terminated or result.truncated)
    if name == "stuck_async":
        assert CANCELLED.wait(1.0)  # an async tool is cancelled, not left running


MALFORMED = {
    "unclosed": ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}', "is never closed"),
    "bad json": ('<tool_call>{"name": "add", "arguments": {"a": 1,}}</tool_call>', "invalid JSON"),
    "not an object": ("<tool_call>[1, 2]</tool_call>", "expected a JSON object"),
    "unknown tool": (call("ad", a=1, b=2), "unknown tool 'ad'. Did you mean 'add'?"),
    "bad arguments": (call("add", a="one"), "missing required argument 'b'"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_call_is_an_error_observation_and_the_episode_goes_on(case):
    action, expected = MALFORMED[case]
    env = ToolEnv([add], TASKS, exact, format_penalty=0.1)
    env.reset(seed=0, options={"task": "add"})
    result = env.step(action)
    assert len(result.observation) == 1 and result.observation[0]["role"] == "tool"
    assert result.observation[0]["content"].startswith("Error: ") and expected in result.observation[0]["content"]
    assert (result.terminated, result.truncated) == (False, False)
    assert result.info["reward_components"] == {"format": -0.1} and result.reward == -0.1
    good = env.step(call("add", a=17, b=25))
    assert good.observation[0]["content"] == "42" and good.info["reward_components"] == {"format": 0.0}
    assert env.step("<answer>42</answer>").reward == 1.0
    env.close()


def test_a_turn_without_a_call_or_an_answer_gets_a_nudge(env):
    env.reset(seed=0)
    result = env.step("Let me think about it.")
    assert result.observation == [
        {"role": "user", "content": "Call a tool, or give your final answer as <answer>…</answer>."}
    ]


def test_the_turn_limit_truncates_and_the_outcome_sees_an_empty_answer():
    answers = []

    def outcome(task, answer):
        answers.append(answer)
        return 0.5

    env = ToolEnv([add], TASKS, outcome, max_turns=2)
    env.reset(seed=0)
    first = env.step(call("add", a=1, b=2))
    assert not first.truncated and "outcome" not in first.info["reward_components"]
    last = env.step(call("add", a=3, b=4))
    assert (last.terminated, last.truncated) == (False, True)
    assert last.info["reward_components"] == {"outcome": 0.5} and answers == [""]
    assert last.observation[0]["content"] == "7"  # the last turn's calls still ran
    env.close()


def test_answering_on_the_last_turn_terminates_rather_than_truncates():
    env = ToolEnv([add], TASKS, exact, max_turns=1)
    env.reset(seed=0, options={"task": 1})
    result = env.step("<answer>42</answer>")
    assert (result.terminated, result.truncated, result.reward) == (True, False, 1.0)
    env.close()


def test_blocks_beyond_the_per_turn_limit_get_one_error_and_are_not_run():
    ran = []

    @tool
    def note(text: str) -> str:
        """Write a note.

        Args:
            text: The note.
        """
        ran.append(text)
        return "ok"

    env = ToolEnv([note], TASKS, exact, max_calls_per_turn=2)
    env.reset(seed=0)
    obs = env.step("".join(call("note", text=str(i)) for i in range(4000))).observation
    assert ran == ["0", "1"]
    assert [m["content"] for m in obs] == [
        "Error: more than 2 tool-call blocks in one turn: the rest of the turn (3998 more <tool_call> block(s)) "
        "was not read; make at most 2 calls per turn",
        "ok",
        "ok",
    ]
    env.close()


def test_long_tool_output_is_cut_with_a_note():
    def shout(n: int) -> str:
        """Say a lot.

        Args:
            n: How many characters.
        """
        return "a" * n

    env = ToolEnv([shout], TASKS, exact, max_output_chars=100)
    env.reset(seed=0)
    content = env.step(call("shout", n=1000)).observation[0]["content"]
    assert content == "a" * 100 + "\n[... 900 more characters cut]"
    env.close()


def test_without_an_answer_tag_a_turn_without_calls_is_the_answer():
    env = ToolEnv([add], TASKS, exact, answer_tag=None)
    obs, _ = env.reset(seed=0, options={"task": "add"})
    assert "reply without a tool call" in obs[0]["content"]
    assert not env.step(call("add", a=17, b=25)).terminated
    assert not env.step("<tool_call>{oops</tool_call>").terminated  # a malformed call is not an answer
    final = env.step("42")
    assert (final.terminated, final.reward, final.info["answer"]) == (True, 1.0, "42")
    env.close()


# ---------------------------------------------------------------------------------------------- rewards


def test_process_and_outcome_rewards_are_named_components_that_sum_to_the_reward():
    def process(task, turn: Turn):
        return RewardResult.single("used_tool", 0.1 * sum(c.status == "ok" for c in turn.calls))

    def outcome(task, answer):
        return compose({"correct": float(answer == task.answer), "short": -len(answer) / 100}, {"short": 0.5})

    env = ToolEnv([add], TASKS, outcome, process_reward=process, format_penalty=0.2)
    env.reset(seed=0, options={"task": "add"})
    first = env.step(call("add", a=17, b=25) + call("nope"))
    assert first.info["reward_components"] == pytest.approx({"used_tool": 0.1, "format": -0.2})
    assert_components_sum(first)
    last = env.step("<answer>42</answer>")
    assert last.info["reward_components"] == pytest.approx(
        {"used_tool": 0.0, "format": 0.0, "correct": 1.0, "short": -0.01}
    )
    assert_components_sum(last)
    env.close()


def test_the_process_reward_sees_the_turn_and_the_earlier_ones():
    seen: list[Turn] = []
    env = ToolEnv([add], TASKS, exact, process_reward=lambda task, turn: seen.append(turn) or 0.0)
    env.reset(seed=0)
    env.step(call("add", a=1, b=2) + call("add", a="x", b=1))
    env.step("<answer>3</answer>")
    first, second = seen
    assert [(c.name, c.status, c.content) for c in first.calls] == [
        ("add", "ok", "3"), ("add", "invalid", "Error: invalid arguments for tool 'add':\n- argument 'a': expected "
                             'integer, got "x"')
    ]
    assert not first.well_formed and second.well_formed
    assert second.earlier == (first,) and second.answer == "3" and second.index == 1
    env.close()


def test_a_dict_reward_becomes_components_and_a_bad_value_is_a_clear_error():
    env = ToolEnv([add], TASKS, lambda task, answer: {"a": 1.0, "b": 0.5})
    env.reset(seed=0)
    assert env.step("<answer>x</answer>").info["reward_components"] == {"a": 1.0, "b": 0.5}
    env = ToolEnv([add], TASKS, lambda task, answer: "yes")
    env.reset(seed=0)
    with pytest.raises(ConfigError, match="reward returned 'yes'; return a finite float"):
        env.step("<answer>x</answer>")
    env.close()


# ---------------------------------------------------------------------------------------------- tasks


def test_tasks_may_be_strings_dicts_or_a_generator():
    env = ToolEnv([add], ["Say hi", {"prompt": "Add 1 and 2", "answer": "3", "id": "sum"}], exact)
    assert [t.id for t in env.tasks] == ["0", "sum"]
    assert env.reset(seed=0, options={"task": "sum"}).observation[1]["content"] == "Add 1 and 2"

    def make(rng):
        a, b = (int(x) for x in rng.integers(0, 100, size=2))
        return Task(f"What is {a} + {b}?", answer=str(a + b))

    generated = ToolEnv([add], make, exact)
    first = generated.reset(seed=3).observation[1]["content"]
    assert generated.reset(seed=3).observation[1]["content"] == first
    assert {generated.reset(seed=s).observation[1]["content"] for s in range(10)} != {first}
    env.close()
    generated.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": []}, "task set is empty"),
        ({"tasks": [{"prompt": "x", "data": 3}]}, "task 0: 'data' must be a mapping"),
        ({"tasks": [3]}, "expected a Task, a prompt string or a dict"),
        ({"tools": [add, add]}, "tool names must be unique"),
        ({"max_turns": 0}, "max_turns"),
    ],
)
def test_bad_configuration_is_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ToolEnv(**{"tools": [add], "tasks": TASKS, "reward": exact, **kwargs})


def test_an_unknown_task_is_named():
    env = ToolEnv([add], TASKS, exact)
    with pytest.raises(ConfigError, match="neither an index below 2 nor a task id"):
        env.reset(seed=0, options={"task": "nope"})
    env.close()


def test_a_demonstration_is_played_through_the_real_tools():
    task = Task("What is 17 + 25?", "42", "add", demonstration=(call("add", a=17, b=25), "<answer>42</answer>"))
    env = ToolEnv([add], [task, Task("no demo")], exact)
    messages = env.demonstration("add")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert messages[3]["content"] == "42" and messages[4]["content"] == "<answer>42</answer>"
    with pytest.raises(ConfigError, match="has no demonstration"):
        env.demonstration(1)
    env.close()


def test_tool_schemas_can_also_go_into_the_system_prompt():
    env = ToolEnv([add], TASKS, exact, tools_in_system_prompt=True)
    system = env.reset(seed=0).observation[0]["content"]
    assert '"name": "add"' in system and "<tool_call>" in system
    env.close()


# ---------------------------------------------------------------------------------------------- contract


def test_the_async_api_runs_on_the_callers_loop():
    async def episode():
        env = ToolEnv([add, multiply], TASKS, exact)
        await env.areset(seed=0, options={"task": "mul"})
        obs = (await env.astep(call("multiply", a=6, b=7))).observation
        result = await env.astep("<answer>42</answer>")
        await env.aclose()
        return obs, result

    obs, result = asyncio.run(episode())
    assert obs[0]["content"] == "42" and result.reward == 1.0


def test_a_tool_env_passes_the_checker_and_gymnasiums_check():
    env = ToolEnv([add, multiply, divide], TASKS, exact, format_penalty=0.1)
    actions = [call("add", a=1, b=2), "<tool_call>{", call("divide", a=1, b=0), "<answer>42</answer>"]
    assert check_env(env, actions=actions) == ["types", "robustness", "seeding", "async", "outcome", "gymnasium", "close"]
    assert check_env(ToolEnv([add], TASKS, exact)) == ["types", "robustness", "seeding", "async", "outcome", "gymnasium",
                                                       "close"]


def test_a_tool_env_registers_and_gymnasium_makes_it():
    agentrl.register("tool-sum-v0", ToolEnv, kwargs={"tools": [add], "tasks": TASKS, "reward": exact},
                     max_turns=4, override=True)
    env = gymnasium.make("agentrl/tool-sum-v0")
    obs, info = env.reset(seed=0)
    assert obs[1]["content"] in {t.prompt for t in TASKS} and info["tools"][0]["function"]["name"] == "add"
    env.close()


def test_close_leaves_no_thread_behind():
    before = set(threading.enumerate())
    env = ToolEnv([add, multiply], TASKS, exact)
    env.reset(seed=0)
    env.step(call("add", a=1, b=2) + call("multiply", a=2, b=3))
    env.close()
    deadline = time.monotonic() + 2.0
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert set(threading.enumerate()) - before == set()


def test_the_example_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "tool_env.py"
    proc = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "passed: types, robustness, seeding, async, outcome, gymnasium, close" in proc.stdout
    assert "reward=1.0 {'format': 0.0, 'outcome': 1.0}" in proc.stdout


@pytest.mark.parametrize("name", ["llama3_json", "mistral", "qwen3_coder", "harmony"])
def test_a_tool_env_runs_calls_written_in_another_familys_markup(name):
    from agentrl.tool_formats import tool_format

    fmt = tool_format(name)
    env = ToolEnv([add], TASKS, exact, tool_format=name)
    env.reset(seed=0, options={"task": "add"})
    result = env.step(fmt.turn_text("", [ToolCall("add", {"a": 17, "b": 25}, fmt.call_id(0))]))
    assert [(m["role"], m["content"]) for m in result.observation] == [("tool", "42")]
    hermes = ToolEnv([add], TASKS, exact)  # the same text read as Hermes markup runs nothing
    hermes.reset(seed=0, options={"task": "add"})
    seen = hermes.step(fmt.turn_text("", [ToolCall("add", {"a": 17, "b": 25}, fmt.call_id(0))])).observation
    assert ("tool", "42") not in [(m["role"], m["content"]) for m in seen]
    with pytest.raises(ConfigError, match="unknown tool format"):
        ToolEnv([add], TASKS, exact, tool_format="hermes2")
