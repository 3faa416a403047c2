"""verifiers v1 tasksets through agentrl: environment packages written here with the real verifiers 0.4 API
(``verifiers.v1``: a taskset, a multi-turn env, an MCP toolset), loaded by id, played by the runner through the
bridge process, with rewards and the token ledger checked.

verifiers 0.4 pins ``mcp==2.0.0`` while vLLM's CPU build needs a newer mcp, so it usually lives in a virtualenv:
``AGENTRL_VERIFIERS_PYTHON`` names its interpreter (default: this one). Its harness programs run with ``uv``, which
the tests look for beside that interpreter or on PATH. Where either is missing the tests skip with the reason,
unless ``AGENTRL_REQUIRE_VERIFIERS=1`` (CI), where they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from _higher_lower import binary_search

import agentrl
from agentrl.checker import check_env
from agentrl.errors import ConfigError, EnvServerError, RolloutError
from agentrl.interop.verifiers import _verifiers_version
from agentrl.interop.verifiers_v1 import VerifiersV1Env
from agentrl.models.loading import load_tokenizer
from agentrl.registry import register_loader
from agentrl.rollout.runner import Task, rollout
from agentrl.testing import ScriptedPolicy
from agentrl.types import StopReason

pytestmark = pytest.mark.slow  # every test starts a bridge process (verifiers' import alone takes seconds)

PYTHON = os.environ.get("AGENTRL_VERIFIERS_PYTHON") or sys.executable
IM_END = "<|im_end|>"

GUESS = '''
"""Find the number: the env plays the user, answering each guess with higher or lower."""
import re

import verifiers.v1 as vf


class GuessConfig(vf.TasksetConfig):
    secrets: list[int] = [3, 7]
    broken: bool = False


class GuessData(vf.TaskData):
    secret: int


class GuessTask(vf.Task[GuessData, vf.State, vf.TaskConfig]):
    pass


class GuessEnvConfig(vf.EnvConfig):
    player: vf.AgentConfig = vf.AgentConfig()


class GuessEnv(vf.Env[GuessEnvConfig]):
    async def run(self, task, agents):
        solved, guesses = False, 0
        async with agents.player.interaction(task) as interaction:
            segment = await interaction.turn()
            while not segment.terminated:
                if self.taskset.config.broken:
                    raise RuntimeError("the referee crashed")
                guesses += 1
                found = re.search(r"\\d+", segment.last_reply)
                guess = int(found.group()) if found else 0
                if guess == task.data.secret:
                    solved = True
                    break
                segment = await interaction.turn("higher" if guess < task.data.secret else "lower")
        interaction.trace.record_reward("solved", float(solved), 1.0)
        interaction.trace.record_reward("guesses", float(guesses), -0.01)


class GuessTaskset(vf.Taskset[GuessTask, GuessConfig]):
    def load(self):
        for secret in self.config.secrets:
            yield GuessTask(
                GuessData(prompt="Find my number between 1 and 10.", system_prompt="Answer with one number.",
                          secret=secret),
                self.config.task,
            )


__all__ = ["GuessEnv", "GuessTaskset"]
'''

CALC_TOOLS = '''
import verifiers.v1 as vf


class CalcTools(vf.Toolset[vf.ToolsetConfig]):
    TOOL_PREFIX = None

    @vf.tool
    async def multiply(self, a: int, b: int) -> str:
        """Multiply two integers."""
        return str(a * b)


if __name__ == "__main__":
    CalcTools.run()
'''

CALC = '''
"""Answer a product, with a multiply tool served over MCP."""
import verifiers.v1 as vf

from v1_calc.tools import CalcTools


class CalcData(vf.TaskData):
    answer: int


class CalcTask(vf.Task[CalcData, vf.State, vf.TaskConfig]):
    @classmethod
    def toolsets(cls, config):
        return [CalcTools(vf.ToolsetConfig())]

    @vf.reward(weight=2.0)
    async def correct(self, task, trace) -> float:
        return float(trace.last_reply.strip() == str(task.answer))

    @vf.metric
    async def tool_calls(self, task, trace) -> float:
        return float(sum(len(m.tool_calls or []) for m in trace.branches[-1].messages if m.role == "assistant"))


class CalcTaskset(vf.Taskset[CalcTask, vf.TasksetConfig]):
    def load(self):
        yield CalcTask(CalcData(prompt="Use the multiply tool: what is 12*34?", answer=408), self.config.task)


__all__ = ["CalcTaskset"]
'''


def _v1_runs() -> str | None:
    """Why the v1 tests cannot run here, or None."""
    if not Path(PYTHON).is_file():
        return f"AGENTRL_VERIFIERS_PYTHON={PYTHON} does not exist"
    probe = subprocess.run([PYTHON, "-c", "import verifiers.v1"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        return (f"{PYTHON} has no verifiers>=0.4 ({probe.stderr.strip().splitlines()[-1:]}); set "
                "AGENTRL_VERIFIERS_PYTHON to a virtualenv with `pip install verifiers==0.4.0 uv`")  # fmt: skip
    if not (Path(PYTHON).parent / "uv").exists() and shutil.which("uv") is None:
        return f"no `uv` beside {PYTHON} or on PATH (verifiers' harness programs run with it): pip install uv"
    return None


@pytest.fixture(scope="module")
def v1_site(tmp_path_factory):
    """The packages on the bridge's path, as a wheel would install them into the verifiers interpreter."""
    reason = _v1_runs()
    if reason is not None:
        if os.environ.get("AGENTRL_REQUIRE_VERIFIERS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("v1-site")
    (root / "v1_guess.py").write_text(GUESS)
    (root / "v1_calc").mkdir()
    (root / "v1_calc" / "__init__.py").write_text(CALC)
    (root / "v1_calc" / "tools.py").write_text(CALC_TOOLS)
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), before) if p)
    register_loader("verifiers", "agentrl.interop.verifiers:load_verifiers_env")
    yield root
    if before is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = before


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def test_a_multi_turn_v1_env_plays_through_the_runner_with_named_rewards_and_exact_masks(v1_site, tokenizer):
    groups = rollout(
        "verifiers:v1-guess", ScriptedPolicy(tokenizer, binary_search), tokenizer,
        [Task(options={"task": i}) for i in range(2)], concurrency=1,
        env_kwargs={"python": PYTHON, "harness": "null"},
    )  # fmt: skip
    for group, secret in zip(groups, [3, 7], strict=True):
        [trajectory] = group.trajectories
        assert trajectory.stop_reason is StopReason.TERMINATED and trajectory.error is None
        guesses = [m["content"] for m in trajectory.messages if m["role"] == "assistant"]
        assert guesses[-1] == str(secret) and len(guesses) >= 2
        # Each recorded reward is a component (score x weight); together they are the episode's reward.
        assert dict(trajectory.turns[-1].reward_components) == pytest.approx(
            {"solved": 1.0, "guesses": -0.01 * len(guesses)}
        )
        assert trajectory.total_reward == pytest.approx(1.0 - 0.01 * len(guesses))
        # The ledger: only the sampled guesses are trained on; the env's user turns and glue are context.
        ids, mask = trajectory.token_ids, trajectory.loss_mask
        assert tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m]) == "".join(
            g + IM_END for g in guesses
        )
        context = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
        assert context.count("<|im_start|>user\n") == len(guesses)  # the task, then one hint per wrong guess
        assert "Answer with one number." in tokenizer.decode(ids[: trajectory.prompt_length])


def test_hermes_tool_calls_reach_the_tasks_mcp_toolset(v1_site):
    env = agentrl.make("verifiers:v1-calc", python=PYTHON, harness="null")
    # Abandoned while its first model call is parked: the next reset ends it.
    env.reset(options={"task_index": 0})
    opening, info = env.reset(options={"task_index": 0})
    assert opening == [{"role": "user", "content": "Use the multiply tool: what is 12*34?"}]
    assert [t["function"]["name"] for t in info["tools"]] == ["multiply"]
    # The parked request can be answered only through step: the endpoint refuses anyone without its key.
    stranger = httpx.post(f"{env.endpoint}/chat/completions", json={"model": "m", "messages": []}, timeout=30)
    assert stranger.status_code == 401
    called = env.step('<tool_call>\n{"name": "multiply", "arguments": {"a": 12, "b": 34}}\n</tool_call>')
    [result] = called.observation
    assert result["role"] == "tool" and result["content"] == "408"  # computed by the toolset's MCP server
    assert not called.terminated and called.reward == pytest.approx(0.0)
    final = env.step("408")
    assert final.terminated and final.info["stop_condition"] == "agent_completed"
    assert final.reward == pytest.approx(2.0)
    assert final.info["reward_components"] == pytest.approx({"correct": 2.0})
    assert final.info["metrics"] == pytest.approx({"tool_calls": 1.0})
    env.reset(options={"task_index": 0})
    started = time.monotonic()
    env.close()  # mid-episode: the parked call is failed, so verifiers' teardown does not wait on it
    assert time.monotonic() - started < 25  # the bridge exits by itself (a hung one is killed after 30 s)


def test_the_env_checker_passes_max_turns_truncates_and_taskset_fields_pass_through(v1_site):
    env = agentrl.make("verifiers:v1-guess", python=PYTHON, harness="null", max_turns=2, secrets=[9])
    assert isinstance(env, VerifiersV1Env) and env.max_turns == 2 and len(env.task_list) == 1
    opening, info = env.reset(seed=0)
    assert [m["role"] for m in opening] == ["system", "user"] and info["task_index"] == 0
    first = env.step("1")
    assert first.observation == [{"role": "user", "content": "higher"}] and not first.terminated
    last = env.step("2")  # the third model call is refused by verifiers' turn limit
    assert last.truncated and not last.terminated and last.info["stop_condition"] == "max_turns"
    assert last.info["reward_components"] == pytest.approx({"solved": 0.0, "guesses": -0.02})
    with pytest.raises(ConfigError, match="task 5"):
        env.reset(options={"task": 5})
    check_env(env)  # ours and gymnasium's checks, on episodes the bridge really plays; it closes the env
    with pytest.raises(EnvServerError, match="closed"):
        env.reset()


def test_an_episode_verifiers_marks_failed_is_an_error_trajectory_not_a_crash(v1_site, tokenizer):
    [group] = rollout(
        "verifiers:v1-guess", ScriptedPolicy(tokenizer, "5"), tokenizer, [Task(options={"task": 0})],
        env_kwargs={"python": PYTHON, "harness": "null", "broken": True},
    )  # fmt: skip
    [trajectory] = group.trajectories
    assert trajectory.stop_reason is StopReason.ERROR
    assert "failed the episode" in trajectory.error and "the referee crashed" in trajectory.error


def test_an_env_that_restarts_the_conversation_fails_the_step_naming_the_ledger(v1_site):
    """verifiers' best-of-n env plays the seat twice in one episode: the second attempt's first request does not
    extend what the policy has seen, which one token ledger cannot hold."""
    env = agentrl.make("verifiers:v1-calc", python=PYTHON, harness="null", config={"id": "best-of-n", "n": 2})
    env.reset(options={"task": 0})
    with pytest.raises(RolloutError, match="token ledger"):
        env.step("7")
    env.close()


def test_bad_ids_interpreters_and_unsafe_runtimes_are_refused_with_the_fix(v1_site, tmp_path):
    with pytest.raises(ConfigError, match=r"could not be loaded.*not found"):
        agentrl.make("verifiers:no-such-taskset", python=PYTHON)
    with pytest.raises(ConfigError, match=r"does not exist.*AGENTRL_VERIFIERS_PYTHON"):
        agentrl.make("verifiers:v1-calc", python=str(tmp_path / "no" / "python"))
    # verifiers' default harness (bash) runs model-written commands: where it runs is the user's choice.
    with pytest.raises(ConfigError, match="runtime='docker'"):
        agentrl.make("verifiers:v1-calc", python=PYTHON)


def test_the_installed_release_decides_the_format(monkeypatch):
    import importlib.metadata

    for text, expected in (("0.1.10", (0, 1, 10)), ("0.3.1", (0, 3, 1)), ("0.4.0", (0, 4, 0)), ("1.0rc2", (1, 0))):
        monkeypatch.setattr(importlib.metadata, "version", lambda name, text=text: text)
        assert _verifiers_version() == expected
    assert (0, 3, 1) < (0, 4) <= (0, 4, 0)  # 0.3's early verifiers.v1 stays on the v0 path


def test_a_v1_package_importable_here_is_routed_by_what_it_imports(v1_site, monkeypatch):
    """This interpreter's verifiers is v0 (0.1.x): a package that imports verifiers.v1 goes to the bridge
    named by AGENTRL_VERIFIERS_PYTHON, and without one the error names that variable."""
    if _verifiers_version() >= (0, 4):
        pytest.skip("this interpreter has verifiers>=0.4 itself: every id is played as v1")
    monkeypatch.syspath_prepend(str(v1_site))
    monkeypatch.delenv("AGENTRL_VERIFIERS_PYTHON", raising=False)
    try:
        with pytest.raises(ConfigError, match=r"v1 taskset.*AGENTRL_VERIFIERS_PYTHON"):
            agentrl.make("verifiers:v1-guess", harness="null")
        monkeypatch.setenv("AGENTRL_VERIFIERS_PYTHON", PYTHON)
        env = agentrl.make("verifiers:v1-guess", harness="null")
        assert isinstance(env, VerifiersV1Env) and env.python == PYTHON
        env.close()
    finally:
        sys.modules.pop("v1_guess", None)
