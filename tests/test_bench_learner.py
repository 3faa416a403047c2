"""`agentrl bench learner --vs trl` runs both learners on the benchmark's setup and reports comparable numbers."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest

from agentrl.bench.learner import AdditionEnv, _summary, addition_reward
from agentrl.bench.learner_dpo import WARMUP_STEPS, preference_conversations, run_side


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


def test_the_summary_times_only_the_steps_after_the_warm_up():
    marks = [(1.0, 10.0, 5, 0.1), (3.0, 11.0, 7, 0.2), (4.0, 13.0, 9, 0.3), (8.0, 14.0, 11, 0.4)]
    one, two = _summary(marks), _summary(marks, warmup=2)
    assert (one["steps"], one["cpu_s_per_step"], one["wall_s_per_step"]) == (3, 7 / 3, 4 / 3)
    assert (two["steps"], two["cpu_s_per_step"], two["wall_s_per_step"]) == (2, 2.5, 1.5)
    assert two["completion_tokens_per_s"] == 20 / 3 and two["rewards"] == [0.1, 0.2, 0.3, 0.4]


def test_dpo_pairs_prefer_the_tagged_sum_over_a_tagged_wrong_one():
    pairs = preference_conversations(200, seed=3)
    assert pairs == preference_conversations(200, seed=3) != preference_conversations(200, seed=4)
    for pair in pairs:
        a, b = (int(x) for x in re.findall(r"\d+", pair["prompt"][0]["content"]))
        assert addition_reward(pair["chosen"][0]["content"], a, b)[0] == 1.5
        assert addition_reward(pair["rejected"][0]["content"], a, b)[0] == 0.5
    assert len({p["rejected"][0]["content"] for p in pairs}) > 100


def test_our_dpo_side_times_its_steps_after_the_warm_up():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_side("agentrl", "tiny", steps=2, precision="fp32", seed=0, ref="precomputed")
    finally:
        torch.set_num_threads(threads)
    assert result["steps"] == 2 and len(result["losses"]) == 2 + WARMUP_STEPS
    assert result["losses"][0] == pytest.approx(math.log(2), abs=1e-4)  # the policy starts as the reference
    assert result["cpu_s_per_step"] > 0 and result["wall_s_per_step"] > 0
    # 8 pairs of 47-token conversations (prompt 34, completion 13) per step, for 2-digit sums
    assert 8 * 2 * 47 * 0.9 < result["tokens_per_s"] * result["wall_s_per_step"] < 8 * 2 * 48 * 1.1


@pytest.mark.slow
def test_bench_learner_dpo_runs_ours_and_trl_side_by_side(tmp_path):
    out = tmp_path / "result.json"
    command = [sys.executable, "-m", "agentrl.cli", "bench", "learner", "--algo", "dpo", "--vs", "trl",
               "--ref", "online", "--steps", "1", "--sft-steps", "4", "--cache", str(tmp_path / "cache"),
               "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reference" in done.stdout and "CPU vs trl" in done.stdout
    result = json.loads(out.read_text())
    assert sorted(result) == ["agentrl/fp32/online", "trl/fp32/online"]
    for side in result.values():
        assert side["steps"] == 1 and side["cpu_s_per_step"] > 0 and side["tokens_per_s"] > 0
        assert len(side["losses"]) == 1 + WARMUP_STEPS and 0.1 < side["peak_rss_gb"] < 8
        assert side["losses"][0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at first
