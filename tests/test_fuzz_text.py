"""What a model's text can do to a run: any code point, any JSON escape, any number of tool-call blocks.

Each test goes through the real path: the scripted policy's text is tokenized and decoded by the runner,
parsed by :mod:`agentrl.tools` inside a real env's step, recorded in the token ledger, written to JSONL, read
back, and drawn by the eval report writer. The fuzz inputs are seeded, so a failure reproduces.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from agentrl.data.trajectory import Trajectory, TurnSpan, read_jsonl, write_jsonl
from agentrl.evaluation.config import EvalConfig
from agentrl.evaluation.harness import build_results
from agentrl.evaluation.report import escape, transcript_name, write_report
from agentrl.models.loading import load_tokenizer
from agentrl.rollout.policy import SamplingParams
from agentrl.rollout.runner import RolloutLimits, rollout
from agentrl.testing import GuessEnv, ScriptedPolicy
from agentrl.toolenv import ToolEnv
from agentrl.tracking import RunDir
from agentrl.types import StopReason

SEED = 20261207
TIME_BUDGET_S = 20.0


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def echo(text: str, times: int = 1) -> str:
    """Say the text back.

    Args:
        text: what to say.
        times: how often.
    """
    return text * max(0, min(times, 3))


def echo_env() -> ToolEnv:
    return ToolEnv([echo], ["Say something."], lambda task, answer: float(bool(answer)), max_turns=2)


def json_escape(rng: random.Random) -> str:
    """A ``\\uXXXX`` escape, a third of them lone surrogates (the red-team's ``\\ud800``), some pairs."""
    roll = rng.random()
    if roll < 0.35:
        return f"\\u{rng.randint(0xD800, 0xDFFF):04x}"
    if roll < 0.45:
        return f"\\u{rng.randint(0xD800, 0xDBFF):04X}\\u{rng.randint(0xDC00, 0xDFFF):04x}"
    return f"\\u{rng.randint(0, 0xFFFF):04x}"


def code_point(rng: random.Random) -> str:
    """Any Unicode scalar value: the model's decoded text never holds a surrogate, everything else can occur."""
    while True:
        value = rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xFFFF), rng.randint(0x10000, 0x10FFFF)])
        if not 0xD800 <= value <= 0xDFFF:
            return chr(value)


def fuzz_string(rng: random.Random) -> str:
    """The inside of a JSON string literal the model might write."""
    parts = [json_escape(rng) if rng.random() < 0.5 else code_point(rng) for _ in range(rng.randint(0, 6))]
    return "".join(p if p not in ('"', "\\") else "\\" + p for p in parts)


def fuzz_turn(rng: random.Random, tool: str, argument: str) -> str:
    """One assistant turn: text and a few tool calls, well or badly typed, some blocks broken."""
    parts = [fuzz_string(rng).replace("\\", "")]
    for _ in range(rng.randint(1, 4)):
        value = f'"{fuzz_string(rng)}"'
        key = f'"{fuzz_string(rng)}"' if rng.random() < 0.3 else f'"{argument}"'
        block = f'<tool_call>{{"name": "{tool}", "arguments": {{{key}: {value}}}}}</tool_call>'
        if rng.random() < 0.2:
            block = block[: rng.randint(0, len(block))]
        elif rng.random() < 0.2:
            block = f'<tool_call>{{"name": "{fuzz_string(rng)}", "arguments": "{{\\"{argument}\\": {value.replace(chr(34), chr(92) + chr(34))}}}"}}</tool_call>'
        parts.append(block * (rng.choice([1, 1, 1, 500])))  # now and then a flood of blocks
    return "\n".join(parts)


def assert_valid_unicode(text: str) -> None:
    text.encode("utf-8")  # raises on a lone surrogate


def write_read_report(trajectories: list[Trajectory], out: Path, env: str) -> str:
    """Write the episodes as the eval harness does, read them back, render the report; the HTML of task 0."""
    episodes = [
        Trajectory(**{**t.__dict__, "meta": {**t.meta, "task_index": i, "sample_index": 0}})
        for i, t in enumerate(trajectories)
    ]
    path = out / "episodes.jsonl"
    assert write_jsonl(path, episodes) == len(episodes)
    raw = path.read_bytes()
    raw.decode("utf-8")  # strict: a reader in any language can open the file
    back = list(read_jsonl(path))
    assert back == episodes  # what is read back is what the learner trained on
    results = build_results(EvalConfig(env=env, n=len(episodes), k=1, out=out), back)
    report = write_report(out, results, back)
    assert_valid_unicode(report.read_text(encoding="utf-8"))
    return (out / transcript_name(0)).read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("env_id", "arguments", "echoed"),
    [
        ("toy-guess-v0", '{"number": "\\ud800"}', "expected integer"),
        ("code-sandbox-v0", '{"code": ["\\ud800"]}', "expected string"),
        ("web-tools-v0", '{"query": "\\ud800"}', "No results for"),
    ],
)
def test_lone_surrogate_in_a_tool_argument_does_not_end_the_run(
    tokenizer, tmp_path: Path, env_id: str, arguments: str, echoed: str
) -> None:
    """The red-team's case: ``"\\ud800"`` in an argument (wrong-typed, or sent on over HTTP), echoed back."""
    name = {"toy-guess-v0": "guess", "code-sandbox-v0": "run_python", "web-tools-v0": "search"}[env_id]
    reply = f'<tool_call>{{"name": "{name}", "arguments": {arguments}}}</tool_call>'
    limits = RolloutLimits(max_turns=2)
    [group] = rollout(env_id, ScriptedPolicy(tokenizer, reply), tokenizer, 1, limits=limits)
    [trajectory] = group.trajectories
    assert trajectory.error is None and trajectory.stop_reason is StopReason.MAX_TURNS
    echoes = [m["content"] for m in trajectory.messages if m["role"] == "tool"]
    assert len(echoes) == 2 and all(echoed in e and "\ufffd" in e for e in echoes), echoes
    page = write_read_report([trajectory], tmp_path, env_id)
    assert echoed in page


@pytest.mark.parametrize("env_name", ["toy-guess", "tool-env"])
def test_fuzz_escapes_and_code_points_survive_parse_to_report(tokenizer, tmp_path: Path, env_name: str) -> None:
    started = time.monotonic()
    rng = random.Random(f"{SEED}-{env_name}")
    make_env, tool, argument = {
        "toy-guess": (lambda: GuessEnv(max_turns=2), "guess", "number"),
        "tool-env": (echo_env, "echo", "text"),
    }[env_name]
    turns = [fuzz_turn(rng, tool, argument) for _ in range(64)]
    played = iter(range(10**9))

    def reply(prompt: str) -> str:
        return turns[next(played) % len(turns)]

    policy = ScriptedPolicy(tokenizer, reply, max_context=1 << 20)
    sampling = SamplingParams(max_tokens=1 << 16)
    groups = rollout(make_env, policy, tokenizer, 24, concurrency=4, sampling=sampling)
    trajectories = [t for g in groups for t in g.trajectories]
    assert len(trajectories) == 24
    for trajectory in trajectories:
        assert trajectory.error is None, trajectory.error
        for message in trajectory.messages:
            assert_valid_unicode(json.dumps(message, ensure_ascii=False))
    observations = [m["content"] for t in trajectories for m in t.messages if m["role"] == "tool"]
    assert any("\ufffd" in text for text in observations)  # lone surrogates were fed and echoed back
    assert any("tool-call blocks in one turn" in text for text in observations)  # floods were cut
    assert max(len(t.messages) for t in trajectories) <= 2 + 2 * (1 + 33)  # opening, then per turn at most
    write_read_report(trajectories, tmp_path, env_name)
    assert time.monotonic() - started < TIME_BUDGET_S


def test_text_from_elsewhere_with_lone_surrogates_is_written_and_shown_replaced(tmp_path: Path) -> None:
    """A user env's observation or an exception's text is not parsed by agentrl.tools; the ledger cleans it,
    so the JSONL and the report show U+FFFD."""
    odd = "tool said \ud800 and \udfff"
    trajectory = Trajectory(
        token_ids=(1, 2, 3), logprobs=(0.0, -0.5, 0.0), loss_mask=(0, 1, 0),
        turns=(TurnSpan(1, 2, 0.0),),
        messages=({"role": "assistant", "content": "hi"}, {"role": "tool", "content": odd}),
        stop_reason=StopReason.ERROR, error=f"ValueError: {odd}",
    )
    page = write_read_report([trajectory], tmp_path, "toy-guess")
    assert "tool said \ufffd and \ufffd" in page
    assert escape("id \ud800<") == "id \\ud800&lt;"  # any other string on a page: shown as its escape


def test_a_string_metric_with_a_lone_surrogate_is_logged(tmp_path: Path) -> None:
    with RunDir(tmp_path, tensorboard=False) as run:
        run.start_phase("rl", total=1)
        run.log("rl", 1, {"last_answer": "x\ud800"})
    line = (tmp_path / "metrics.jsonl").read_bytes().decode("utf-8")
    assert json.loads(line)["metrics"]["last_answer"] == "x\ud800"
