"""math-v0: task generation and loading, the calculator, and scripted episodes end to end."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
from agentrl_envs.math import (
    LEVELS,
    CalculatorError,
    MathEnv,
    calculate,
    generate_task,
    generate_tasks,
    load_jsonl,
)

import agentrl
from agentrl.checker import check_env
from agentrl.errors import ConfigError

DATA = Path(__file__).parent / "data"


# ---- tasks -------------------------------------------------------------------------------------------
def test_generated_tasks_are_reproducible_and_cover_every_level():
    tasks = generate_tasks(60, seed=7)
    assert tasks == generate_tasks(60, seed=7)
    assert [t.question for t in tasks] != [t.question for t in generate_tasks(60, seed=8)]
    assert {t.difficulty for t in tasks} == set(range(LEVELS))
    assert len({t.id for t in tasks}) == 60


@pytest.mark.parametrize("level", range(LEVELS))
def test_each_steps_expressions_evaluate_to_the_stated_results_and_the_answer(level):
    for index in range(20):
        task = generate_task(level, seed=1, index=index)
        for text, expression in task.steps:
            assert text.endswith(calculate(expression)) or calculate(expression) in text, (task, text)
        assert Fraction(calculate(task.steps[-1][1])) == Fraction(task.answer)


def test_linear_equation_answers_satisfy_their_equations():
    for index in range(30):
        task = generate_task(3, seed=2, index=index)
        lhs, rhs = task.question.removeprefix("Solve for x: ").split(" = ")
        x = int(task.answer)
        assert Fraction(calculate(lhs.replace("x", f"*({x})"))) == Fraction(rhs)


def test_bad_generator_arguments():
    with pytest.raises(ConfigError, match=r"level must be in 0\.\.5"):
        generate_task(9, seed=0)
    with pytest.raises(ConfigError, match="at least one level"):
        generate_tasks(3, levels=())


def test_loader_reads_gsm8k_and_math_formats():
    gsm = load_jsonl(DATA / "math_gsm8k_sample.jsonl")
    assert [t.answer for t in gsm] == ["27", "1000", "5"]
    assert gsm[0].id == "math_gsm8k_sample-1" and gsm[2].id == "gsm-three"
    assert gsm[1].solution.endswith("#### 1,000")
    competition = load_jsonl(DATA / "math_competition_sample.jsonl", limit=2)
    assert [t.answer for t in competition] == ["\\frac{5}{6}", "(-2, 2)"]
    assert load_jsonl(DATA / "math_competition_sample.jsonl")[2].answer == "1024"


def test_loader_errors_name_the_file_line_and_fix(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"prompt": "x"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: expected GSM8K fields .* got \['prompt'\]"):
        load_jsonl(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: not JSON"):
        load_jsonl(bad)
    bad.write_text(json.dumps({"problem": "p", "solution": "no box"}) + "\n")
    with pytest.raises(ConfigError, match="no \\\\boxed"):
        load_jsonl(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_jsonl(tmp_path / "missing.jsonl")


# ---- calculator --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("expression", "value"),
    [("2 + 3 * 4", "14"), ("(17 + 25) * 3 / 4", "31.5"), ("7 / 3", "7/3"), ("2^10", "1024"), ("-(3 - 5) ** 2", "-4"),
     ("17 // 5 + 17 % 5", "5"), ("0.1 + 0.2", "0.3")],
)
def test_calculator_is_exact(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize(
    ("expression", "message"),
    [("__import__('os').system('id')", "Call is not allowed"), ("x + 1", "Name is not allowed"),
     ("(1).real", "Attribute is not allowed"), ("9 ** 9 ** 9", "exponents are limited"), ("1 / 0", "division by zero"),
     ("2 +", "syntax error"), ("", "empty"), ("'a' * 3", "Constant is not allowed"), ("10 ** 60 * 10 ** 60", "digits")],
)
def test_calculator_rejects_everything_but_arithmetic(expression, message):
    with pytest.raises(CalculatorError, match=message):
        calculate(expression)


# ---- episodes ----------------------------------------------------------------------------------------
def test_math_v0_is_registered_and_a_scripted_policy_solves_a_task():
    env = agentrl.make("math-v0")
    obs, info = env.reset(seed=3)
    task = env._task
    assert obs[-1] == {"role": "user", "content": task.question} and info["task_id"] == task.id
    step = env.step(f"Working it out.\n\\boxed{{{task.answer}}}")
    assert step.terminated and not step.truncated
    assert step.info["reward_components"] == {"correct": 1.0, "format": 0.1}
    assert step.reward == pytest.approx(1.1)
    env.close()


def test_rewards_for_wrong_unformatted_and_reweighted_answers():
    tasks = load_jsonl(DATA / "math_competition_sample.jsonl")
    env = MathEnv(tasks, weights={"format": 0.5})
    env.reset(seed=0, options={"task": 0})
    assert env.step("It is $\\boxed{\\dfrac{10}{12}}$").reward == pytest.approx(1.5)  # verified, not string-equal
    env.reset(seed=0, options={"task": 0})
    assert env.step("\\boxed{0.8}").info["reward_components"] == {"correct": 0.0, "format": 0.5}
    env.reset(seed=0, options={"task": 0})
    assert env.step("the answer is 5/6").reward == 0.0  # right number, required format missing
    env.close()
    with pytest.raises(ConfigError, match=r"unknown reward component 'style'.*\['correct', 'format', 'tool_error'\]"):
        MathEnv(weights={"style": 1.0})
    with pytest.raises(ConfigError, match="unknown math tools"):
        MathEnv(tools=("shell",))


def test_answer_tag_format_and_task_options():
    env = MathEnv(generate_tasks(10, seed=0), answer_format="answer_tag")
    obs, info = env.reset(options={"task": "gen-2-0-2"})
    assert "<answer>" in obs[0]["content"] and info["task_id"] == "gen-2-0-2"
    assert env.step(f"<answer>{env._task.answer}</answer>").reward == pytest.approx(1.1)
    with pytest.raises(ConfigError, match="no math task"):
        env.reset(options={"task": "nope"})
    env.close()


def test_calculator_episode_follows_the_demonstration_and_survives_malformed_calls():
    env = MathEnv(generate_tasks(12, seed=0, levels=[4]), tools=("calculator",), max_turns=5)
    demo = env.demonstration(3)
    obs, info = env.reset(options={"task": 3})
    assert obs == demo[:2] and info["tools"][0]["function"]["name"] == "calculator"

    bad = env.step('<tool_call>{"name": "calculator", "arguments": {"expr": 1}}</tool_call>')
    assert not bad.terminated and bad.observation[0]["content"].startswith("Error:")
    assert bad.info["reward_components"] == {"tool_error": -0.05}
    hostile = env.step('<tool_call>{"name": "calculator", "arguments": {"expression": "__import__(\'os\')"}}</tool_call>')
    assert "not allowed" in hostile.observation[0]["content"] and not hostile.terminated

    env.reset(options={"task": 3})
    turns = [m for m in demo[2:] if m["role"] == "assistant"]
    tool_results = [m for m in demo[2:] if m["role"] == "tool"]
    seen = []
    for turn in turns:
        step = env.step(turn["content"])
        seen += step.observation
    assert [m["content"] for m in seen] == [m["content"] for m in tool_results]
    assert step.terminated and step.info["reward_components"] == {"correct": 1.0, "format": 0.1}
    env.close()


def test_turn_limit_truncates_a_tool_episode():
    env = MathEnv(generate_tasks(3, seed=0), tools=("calculator",), max_turns=2)
    env.reset(seed=0)
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>'
    first = env.step(call)
    assert first.observation[0]["content"] == "2" and not first.truncated
    assert env.step(call).truncated
    env.close()


def test_python_tool_runs_in_the_sandbox_not_on_the_host():
    env = MathEnv(generate_tasks(3, seed=0), tools=("python",), max_turns=3)
    env.reset(seed=0)
    code = "import os\nprint(6 * 7)\nprint(os.path.exists('/work/main/pyproject.toml'))"
    step = env.step(json_call("python", {"code": code}))
    assert step.observation[0]["content"].split() == ["42", "False"]  # the host's files are not visible
    crash = env.step(json_call("python", {"code": "1/0"}))
    assert "ZeroDivisionError" in crash.observation[0]["content"] and not crash.terminated
    env.close()


def json_call(name, arguments):
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def test_tool_variant_passes_the_env_checker():
    assert "close" in check_env(MathEnv(generate_tasks(20, seed=0), tools=("calculator", "python")))


def test_single_turn_demonstrations_end_with_the_wrapped_answer():
    env = MathEnv(load_jsonl(DATA / "math_gsm8k_sample.jsonl"))
    demo = env.demonstration(0)
    assert [m["role"] for m in demo] == ["system", "user", "assistant"]
    assert demo[-1]["content"].endswith("\\boxed{27}") and "12 + 15" in demo[-1]["content"]


def test_multiple_choice_and_decimal_comma_per_env_and_per_task(tmp_path):
    from agentrl_envs.math import MathTask

    choice = MathTask("mc-1", "Which is prime? (A) 4 (B) 6 (C) 7 (D) 9", "C")
    comma = MathTask("eu-1", "Halbiere 3.", "1.5", answer_mode="math", decimal="comma")
    env = MathEnv([choice, comma], answer_mode="choice")
    env.reset(options={"task": "mc-1"})
    assert env.step("\\boxed{\\text{(C) } 7}").info["reward_components"]["correct"] == 1.0
    env.reset(options={"task": "mc-1"})
    assert env.step("\\boxed{A or C}").info["reward_components"]["correct"] == 0.0  # two letters: not paid
    env.reset(options={"task": "mc-1"})
    step = env.step("\\boxed{A} or \\boxed{C}")
    assert step.info["answer"] == "A, C" and step.reward == pytest.approx(0.1)  # one run of boxes, two letters
    env.reset(options={"task": "eu-1"})
    assert env.step("\\boxed{1,5}").info["reward_components"]["correct"] == 1.0  # the task's decimal comma
    env.close()
    point = MathEnv([MathTask("en-1", "Halve 3.", "1.5")], decimal="point")
    point.reset()
    assert point.step("\\boxed{1,5}").info["reward_components"]["correct"] == 0.0  # "1,5" is a list here
    point.close()
    with pytest.raises(ConfigError, match="decimal"):
        MathEnv(decimal="dot")
    with pytest.raises(ConfigError, match="answer mode"):
        MathEnv(answer_mode="letters")
    records = tmp_path / "mc.jsonl"
    records.write_text(json.dumps({"problem": "p", "answer": "B", "answer_mode": "choice"}) + "\n"
                       + json.dumps({"problem": "p", "answer": "1", "decimal": "dot"}) + "\n")
    assert load_jsonl(records, limit=1)[0].answer_mode == "choice"
    with pytest.raises(ConfigError, match=r"mc.jsonl:2: unknown decimal='dot'"):
        load_jsonl(records)
