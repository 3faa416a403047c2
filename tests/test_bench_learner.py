"""`agentrl bench learner --vs trl` runs both learners on the benchmark's setup and reports comparable numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agentrl.bench.learner import AdditionEnv, addition_reward


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<answer>57</answer>", 1.5),
        ("  <answer> 57 </answer>\n", 1.5),
        ("57", 0.5),
        ("the sum is 57", 0.5),
        ("<answer>58</answer>", 0.5),
        ("<answer>57</answer> <answer>3</answer>", 1.0),
        ("157", 0.0),
        ("<answer>57</answer>junk", 1.0),
    ],
)
def test_the_reward_pays_for_the_tagged_sum_and_the_format(text, expected):
    assert addition_reward(text, 23, 34)[0] == expected


def test_the_env_demonstrates_what_it_rewards():
    env = AdditionEnv()
    messages = env.demonstration(5)
    assert env.step(messages[-1]["content"]).reward == 1.5


@pytest.mark.slow
def test_bench_learner_runs_ours_and_trl_side_by_side(tmp_path):
    out = tmp_path / "result.json"
    command = [sys.executable, "-m", "agentrl.cli", "bench", "learner", "--vs", "trl", "--steps", "1",
               "--sft-steps", "4", "--cache", str(tmp_path / "cache"), "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "CPU vs trl" in done.stdout and "agentrl" in done.stdout
    result = json.loads(out.read_text())
    for side in ("agentrl/fp32", "trl/fp32"):
        assert result[side]["steps"] == 1 and result[side]["cpu_s_per_step"] > 0
        assert len(result[side]["rewards"]) == 2 and result[side]["completion_tokens_per_s"] > 0
        assert 0.1 < result[side]["peak_rss_gb"] < 8
