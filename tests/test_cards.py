"""Environment cards: measured on real envs, probes that catch a hackable grader, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

import agentrl
from agentrl.cards import make_card, render_markdown, tool_probes, write_card
from agentrl.cli import main
from agentrl.core import Env, ResetResult, StepResult
from agentrl.tools import Tool, parse_tool_calls


def submit(code: str) -> str:
    """Submit a program defining `double(x)`.

    Args:
        code: the program.
    """
    raise NotImplementedError


class NaiveGraderEnv(Env):
    """A grader that trusts ``==`` on what the submitted function returns: the always-equal probe beats it."""

    description = "double a number (a grader that trusts ==)"
    tools = (Tool.from_function(submit).schema(),)
    max_turns = 2

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        super().reset(seed=seed)
        return ResetResult([{"role": "user", "content": "Write `double(x)` returning twice x."}], {})

    def step(self, action: str) -> StepResult:
        calls = parse_tool_calls(action).calls
        if not calls:
            return StepResult([], 0.0, True, False, {"reward_components": {"correct": 0.0}})
        program = str(calls[0].arguments.get("code", "")) + "\nprint(double(21) == 42)\n"
        run = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30)
        ok = run.stdout.strip().endswith("True")  # a deliberately careless grader
        reward = 1.0 if ok else 0.0
        return StepResult([], reward, True, False, {"reward_components": {"correct": reward}})

    def demonstration(self, task: int) -> list[dict[str, str]]:
        call = json.dumps({"name": "submit", "arguments": {"code": "def double(x):\n    return 2 * x\n"}})
        return [
            {"role": "user", "content": "..."},
            {"role": "assistant", "content": f"<tool_call>\n{call}\n</tool_call>"},
        ]


@pytest.fixture
def naive_env():
    agentrl.register("naive-grader-v0", NaiveGraderEnv, override=True)
    return "naive-grader-v0"


def test_a_card_measures_reference_probes_and_determinism(naive_env, tmp_path):
    card = make_card(naive_env, n=3, seeds=2)
    assert card.reference is not None and card.reference.passed == 3 and card.reference.errors == 0
    assert card.tools == [{"name": "submit", "description": "Submit a program defining `double(x)`."}]
    # The always-equal program passes the careless grader: the card flags it; answers with no code do not.
    assert card.probes["always-equal"].passed == 3 and "always-equal" in card.flagged_probes
    assert card.probes["empty"].mean_reward == pytest.approx(0.0) and "empty" not in card.flagged_probes
    assert card.determinism == {"seeds": 2, "reproducible": 2, "distinct_openings": 1}
    md, js = write_card(card, tmp_path)
    assert "**flagged**: always-equal" in md.read_text()
    assert json.loads(js.read_text())["flagged_probes"] == ["always-equal"]


def test_bundled_env_card_with_tool_probes_finds_nothing_to_flag():
    card = make_card("code-sandbox", n=2, seeds=2)
    assert card.reference is not None and card.reference.passed == 2
    assert {"always-equal", "exit-before-tests", "print-pass", "skip-tests"} <= set(card.probes)
    assert card.flagged_probes == []
    assert card.determinism["reproducible"] == 2 and card.determinism["distinct_openings"] == 2
    assert "| reference | 2 | 2 (100%)" in render_markdown(card)


def test_probes_follow_the_tools_an_env_offers():
    bash = {"function": {"name": "bash", "parameters": {"properties": {"command": {"type": "string"}}}}}
    run = {"function": {"name": "run_python", "parameters": {"properties": {"code": {"type": "string"}}}}}
    assert set(tool_probes([bash])) == {"forge-reward-file"}
    assert tool_probes([run]) == {}  # running code is not submitting it


def test_card_and_envs_commands(tmp_path, capsys):
    out = tmp_path / "card"
    proc = subprocess.run(
        [sys.executable, "-m", "agentrl.cli", "card", "toy-digits", "--n", "2", "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "reference passed 2/2" in proc.stdout and (out / "card.md").is_file()
    assert main(["envs"]) == 0
    listed = capsys.readouterr().out
    assert "verifiers:<target>" in listed and "harbor:<target>" in listed
