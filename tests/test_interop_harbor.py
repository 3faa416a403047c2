"""Harbor task folders: the layout parsed, the reward files read, and a small task run for real in docker."""

from __future__ import annotations

import asyncio
import json

import pytest

import agentrl
from agentrl.errors import ConfigError
from agentrl.interop.harbor import HarborEnv, load_tasks, parse_reward
from agentrl.registry import register_loader

TASK_TOML = """version = "1.0"

[metadata]
difficulty = "easy"
category = "files"

[verifier]
timeout_sec = 60.0
env = { EXPECTED_FILE = "count.txt" }

[agent]
timeout_sec = 120.0

[environment]
cpus = 1
memory_mb = 512
allow_internet = false
"""

TEST_SH = """#!/bin/bash
# The verifier: count.txt must hold the number of lines of data.txt.
mkdir -p /logs/verifier
expected=$(wc -l < /app/data.txt)
if [ -f "/app/$EXPECTED_FILE" ] && [ "$(tr -d '[:space:]' < /app/$EXPECTED_FILE)" = "$expected" ]; then
  {writer_ok}
else
  {writer_fail}
fi
"""


def write_task(root, base_image: str, *, json_reward: bool = False):
    (root / "environment").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "solution").mkdir()
    (root / "task.toml").write_text(TASK_TOML)
    (root / "instruction.md").write_text("Write the number of lines of /app/data.txt into /app/count.txt.\n")
    (root / "environment" / "data.txt").write_text("a\nb\nc\nd\ne\n")
    (root / "environment" / "Dockerfile").write_text(
        f"FROM {base_image}\nWORKDIR /app\nCOPY data.txt /app/data.txt\n"
    )
    if json_reward:
        ok, fail = (
            'echo \'{"reward": 1, "lines": 5}\' > /logs/verifier/reward.json',
            'echo \'{"reward": 0, "lines": 5}\' > /logs/verifier/reward.json',
        )
    else:
        ok, fail = "echo 1 > /logs/verifier/reward.txt", "echo 0 > /logs/verifier/reward.txt"
    (root / "tests" / "test.sh").write_text(TEST_SH.replace("{writer_ok}", ok).replace("{writer_fail}", fail))
    (root / "solution" / "solve.sh").write_text("#!/bin/bash\nwc -l < /app/data.txt > /app/count.txt\n")
    return root


def test_the_layout_is_checked_and_parsed(tmp_path):
    task = write_task(tmp_path / "count-lines", "scratch")
    write_task(tmp_path / "count-lines-2", "scratch")
    (tmp_path / "notes").mkdir()
    tasks = load_tasks(tmp_path)
    assert [t.name for t in tasks] == ["count-lines", "count-lines-2"]
    assert tasks[0].timeout("verifier", 1.0) == pytest.approx(60.0)
    assert tasks[0].solution is not None and "wc -l" in tasks[0].solution
    (task / "tests" / "test.sh").unlink()
    with pytest.raises(ConfigError, match=r"missing tests/test\.sh"):
        load_tasks(task)
    with pytest.raises(ConfigError, match="no Harbor task folder"):
        load_tasks(tmp_path / "absent")


def test_reward_files_follow_harbors_contract():
    assert parse_reward("0.5\n", '{"reward": 1}') == ({"tests": 0.5}, {})
    assert parse_reward(None, json.dumps({"reward": 1, "passed": 3})) == ({"tests": 1.0}, {"passed": 3.0})
    assert parse_reward("", json.dumps({"style": 0.2, "correct": 1})) == ({"style": 0.2, "correct": 1.0}, {})
    with pytest.raises(ValueError, match="neither"):
        parse_reward(None, None)
    with pytest.raises(ValueError, match="not finite"):
        parse_reward("nan", None)


@pytest.fixture(scope="module")
def harbor_loader():
    register_loader("harbor", "agentrl.interop.harbor:load_harbor_env")


@pytest.mark.docker
@pytest.mark.parametrize("json_reward", [False, True], ids=["reward.txt", "reward.json"])
def test_a_task_runs_in_docker_and_its_tests_give_the_reward(
    tmp_path, docker_image, harbor_loader, json_reward
):
    write_task(tmp_path / "count-lines", docker_image, json_reward=json_reward)
    env = agentrl.make(f"harbor:{tmp_path / 'count-lines'}", command_timeout=30)
    assert isinstance(env, HarborEnv)
    try:
        # The reference solution, through the bash tool: the tests pass.
        obs, info = env.reset(seed=0)
        assert "count.txt" in obs[-1]["content"] and [t["function"]["name"] for t in info["tools"]] == [
            "bash"
        ]
        solve, finish = env.demonstration_actions(0)
        step = env.step(solve)
        assert step.observation[0]["content"].startswith("[exit code 0]") and not step.terminated
        step = env.step(finish)
        assert step.terminated and step.reward == pytest.approx(1.0)
        assert step.info["reward_components"] == {"tests": pytest.approx(1.0)}
        if json_reward:
            assert step.info["metrics"] == {"lines": pytest.approx(5.0)}
        # A fresh container per episode: the last episode's count.txt is gone, and a wrong answer scores 0.
        env.reset(seed=0)
        step = env.step(
            '<tool_call>\n{"name": "bash", "arguments": {"command": "ls; echo 4 > count.txt"}}\n</tool_call>'
        )
        assert (
            "data.txt" in step.observation[0]["content"] and "count.txt" not in step.observation[0]["content"]
        )
        step = env.step("I am done.")
        assert step.terminated and step.reward == pytest.approx(0.0)
    finally:
        env.close()


@pytest.mark.docker
def test_the_agent_can_neither_write_outside_nor_forge_the_reward_file(tmp_path, docker_image, harbor_loader):
    task = write_task(tmp_path / "count-lines", docker_image)
    (task / "tests" / "test.sh").write_text("#!/bin/bash\necho no reward written\n")
    env = HarborEnv(task, max_turns=1)
    try:
        env.reset(seed=0)
        step = env.step(
            '<tool_call>\n{"name": "bash", "arguments": {"command": "echo 1 > /logs/verifier/reward.txt; touch /etc/x"}}\n</tool_call>'
        )
        assert step.truncated and step.reward == pytest.approx(0.0)
        assert (
            "Read-only file system" in step.observation[0]["content"]
            or "Permission denied" in step.observation[0]["content"]
        )
        assert "no reward written" in step.info["verifier_error"]
    finally:
        asyncio.run(env.aclose())


@pytest.mark.docker
def test_the_card_of_a_task_folder(tmp_path, docker_image, harbor_loader):
    from agentrl.cards import make_card

    write_task(tmp_path / "count-lines", docker_image)
    card = make_card(f"harbor:{tmp_path / 'count-lines'}", n=1, seeds=1)
    assert card.tasks == 1 and card.tools[0]["name"] == "bash"
    assert card.reference is not None and card.reference.passed == 1
    assert "forge-reward-file" in card.probes and card.flagged_probes == []
